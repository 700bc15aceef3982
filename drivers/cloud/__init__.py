"""Fiscal cloud APIs: one module per API, plus its loopback simulator."""
