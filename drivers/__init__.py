"""Device and service drivers: signers, printers, cloud APIs (wired in by gateway.app)."""
