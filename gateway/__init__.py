"""fiscal-gateway: an embedded POS fiscal gateway daemon."""

__version__ = "0.1.0"
