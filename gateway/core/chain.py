"""Chain linking, counters and perpetual grand totals.

A chain's state after record *n* (:class:`ChainHead`) is a pure function of the state after
record *n−1* and record *n*. The ledger writer uses :func:`draft` to make record *n*;
the verifier uses :func:`advance` to check it. Both go through :func:`next_state`, so there is
exactly one definition of how ``seq``, ``number``, ``counters``, ``totals`` and the current
signing key move along a chain.

Rules (docs/record-format.md):
- ``seq`` starts at 1 and grows by one; ``prev_hash`` is the previous ``hash`` (64 zeros for
  seq 1).
- ``counters[type]`` counts the records of each type; a record's ``number`` is its type's
  counter after it. Counters never decrease.
- ``totals`` are the perpetual grand totals after the record: ``gross``, ``net``, ``vat`` and
  ``gross_abs`` (sum of absolute grosses) overall and ``by_rate``; only ``TRANSACTION::*``
  records add their payload's ``vat`` breakdown.
- ``time`` never decreases; when the wall clock is behind the chain, the record takes the
  previous time + 1 ms (the caller records a clock-jump event).
- The first record fixes the chain's key; an ``INTENTION::EVENT`` with
  ``payload.event == "KEY_ROTATED"``, signed by the old key, switches to
  ``payload.new_key_id`` for every later record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.core.canonical import canonical_bytes
from gateway.core.record import (
    FORMAT,
    GENESIS_HASH,
    TOTALLING_PREFIX,
    format_time,
    parse_time,
    sha256_hex,
)

KEY_ROTATED = "KEY_ROTATED"


def zero_totals() -> dict[str, Any]:
    return {"gross": 0, "net": 0, "vat": 0, "gross_abs": 0, "by_rate": {}}


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The state of a chain after its last record (seq 0: empty chain)."""

    chain: str
    seq: int = 0
    hash: str = GENESIS_HASH
    time_ms: int = 0
    key_id: str | None = None
    counters: dict[str, int] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=zero_totals)

    @classmethod
    def from_body(cls, body: dict[str, Any], hash_hex: str) -> ChainHead:
        """The head after a stored record (its body already carries counters/totals)."""
        key_id = body["key_id"]
        payload = body["payload"]
        if body["type"] == "INTENTION::EVENT" and payload.get("event") == KEY_ROTATED:
            key_id = payload["new_key_id"]
        return cls(
            chain=body["chain"],
            seq=body["seq"],
            hash=hash_hex,
            time_ms=parse_time(body["time"]),
            key_id=key_id,
            counters=body["counters"],
            totals=body["totals"],
        )


class ChainRuleError(ValueError):
    """A record does not follow the chain rules; ``reason`` is a stable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def contribution(record_type: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The VAT lines a record adds to the perpetual totals."""
    if not record_type.startswith(TOTALLING_PREFIX):
        return []
    vat = payload.get("vat", [])
    if not isinstance(vat, list):
        raise ChainRuleError("BAD_FIELD", "payload.vat must be a list")
    for v in vat:
        if not (
            isinstance(v, dict)
            and isinstance(v.get("rate"), str)
            and all(type(v.get(k)) is int for k in ("net", "vat", "gross"))
        ):
            raise ChainRuleError("BAD_FIELD", "payload.vat items need rate, net, vat, gross")
    return vat


def add_totals(totals: dict[str, Any], lines: list[dict[str, Any]]) -> dict[str, Any]:
    if not lines:
        return totals
    out = dict(totals)
    out["by_rate"] = {k: dict(v) for k, v in totals["by_rate"].items()}
    for v in lines:
        out["gross"] += v["gross"]
        out["net"] += v["net"]
        out["vat"] += v["vat"]
        out["gross_abs"] += abs(v["gross"])
        r = out["by_rate"].setdefault(v["rate"], {"gross": 0, "net": 0, "vat": 0})
        r["gross"] += v["gross"]
        r["net"] += v["net"]
        r["vat"] += v["vat"]
    return out


def next_state(
    head: ChainHead, record_type: str, payload: dict[str, Any]
) -> tuple[int, int, dict[str, int], dict[str, Any]]:
    """(seq, number, counters, totals) of the record that follows ``head``."""
    counters = dict(head.counters)
    number = counters.get(record_type, 0) + 1
    counters[record_type] = number
    totals = add_totals(head.totals, contribution(record_type, payload))
    return head.seq + 1, number, counters, totals


def record_time_ms(head: ChainHead, now_ms: int) -> int:
    """Time of the next record: the clock, or previous + 1 ms if the clock is behind."""
    return now_ms if now_ms >= head.time_ms else head.time_ms + 1


@dataclass(frozen=True, slots=True)
class Draft:
    """A record made and hashed, waiting for its signature."""

    body: dict[str, Any]
    body_bytes: bytes
    hash: str
    head: ChainHead  # the chain's state once this record is stored


def draft(
    head: ChainHead,
    *,
    record_type: str,
    client: str,
    request_id: str,
    payload: dict[str, Any],
    now_ms: int,
    key_id: str,
    offline: bool = False,
) -> Draft:
    """Make the next record of ``head``'s chain (everything but the signature)."""
    if head.key_id is not None and key_id != head.key_id:
        raise ChainRuleError(
            "WRONG_KEY", f"chain {head.chain} is signed by {head.key_id}, not {key_id}"
        )
    seq, number, counters, totals = next_state(head, record_type, payload)
    time_ms = record_time_ms(head, now_ms)
    body = {
        "format": FORMAT,
        "chain": head.chain,
        "seq": seq,
        "type": record_type,
        "number": number,
        "time": format_time(time_ms),
        "client": client,
        "request_id": request_id,
        "payload": payload,
        "counters": counters,
        "totals": totals,
        "offline": offline,
        "prev_hash": head.hash,
        "key_id": key_id,
    }
    body_bytes = canonical_bytes(body)
    hash_hex = sha256_hex(body_bytes)
    next_key = key_id
    if record_type == "INTENTION::EVENT" and payload.get("event") == KEY_ROTATED:
        next_key = payload["new_key_id"]
    new_head = ChainHead(head.chain, seq, hash_hex, time_ms, next_key, counters, totals)
    return Draft(body, body_bytes, hash_hex, new_head)
