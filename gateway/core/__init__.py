"""The pure core of the gateway.

Everything in this package is deterministic computation on values: request validation,
money and VAT arithmetic, the record model, canonical bytes, chain linking, counters and
verification. It deliberately does *not* do IO of any kind: no files, sockets, SQLite,
asyncio, clock reads or randomness. Time, keys and signature checks are passed in as
arguments by the adapters around it (``gateway.ledger``, ``gateway.store``, ``drivers``).
"""
