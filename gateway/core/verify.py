"""Full-chain verification: every rule a stored chain must satisfy, first failure reported.

Input is *unverified*: the stored body bytes, hash and signature of each record, in the order
found. Signature checking is a callable passed in (``check_sig(key_id, data, sig_b64)``
returning bool and raising ``KeyError`` for an unknown key), so this module stays free of key
material and IO. The failure names the chain position where the chain breaks — the ``seq``
that was expected next — and a stable ``reason``:

``NOT_CANONICAL``, ``HASH_MISMATCH``, ``BAD_FIELD``, ``WRONG_CHAIN``, ``SEQ_GAP``,
``SEQ_REPEATED``, ``PREV_HASH_MISMATCH``, ``TIME_DECREASED``, ``WRONG_KEY``, ``UNKNOWN_KEY``,
``BAD_SIGNATURE``, ``COUNTER_MISMATCH``, ``TOTALS_MISMATCH``, ``TRUNCATED``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from gateway.core.canonical import CanonicalError, parse_canonical
from gateway.core.chain import KEY_ROTATED, ChainHead, ChainRuleError, next_state
from gateway.core.record import (
    BODY_FIELDS,
    FORMAT,
    RECORD_TYPES,
    key_id_of,
    parse_time,
    pem_to_der,
)

CheckSig = Callable[[str, bytes, str], bool]


@dataclass(frozen=True, slots=True)
class StoredRecord:
    """A record as found on disk or in an export: canonical body bytes, hash, signature."""

    body: bytes
    hash: str
    sig: str


class VerifyFailure(Exception):
    """Where a chain breaks: ``seq``, a stable ``reason``, and (journal rules) the ``field``."""

    def __init__(
        self, chain: str, seq: int, reason: str, message: str, *, field: str | None = None
    ) -> None:
        where = f" {field}" if field else ""
        super().__init__(f"chain {chain!r} seq {seq}{where}: {reason}: {message}")
        self.chain = chain
        self.seq = seq
        self.reason = reason
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "chain": self.chain,
            "seq": self.seq,
            "reason": self.reason,
            "message": self.message,
        }
        if self.field is not None:
            out["field"] = self.field
        return out


_TYPES: dict[str, type | tuple[type, ...]] = {
    "format": int,
    "chain": str,
    "seq": int,
    "type": str,
    "number": int,
    "time": str,
    "client": str,
    "request_id": str,
    "payload": dict,
    "counters": dict,
    "totals": dict,
    "offline": bool,
    "prev_hash": str,
    "key_id": str,
}


_BODY_FIELD_SET = frozenset(BODY_FIELDS)


class ChainVerifier:
    """Checks one chain record by record, starting from ``start`` (default: empty chain)."""

    def __init__(self, chain: str, check_sig: CheckSig, start: ChainHead | None = None) -> None:
        self.chain = chain
        self.check_sig = check_sig
        self.head = start if start is not None else ChainHead(chain)
        self.count = 0

    def _fail(self, reason: str, message: str) -> VerifyFailure:
        return VerifyFailure(self.chain, self.head.seq + 1, reason, message)

    def feed(self, rec: StoredRecord) -> dict[str, Any]:
        """Check the next record; return its parsed body or raise VerifyFailure."""
        try:
            body = parse_canonical(rec.body)
        except CanonicalError as exc:
            raise self._fail("NOT_CANONICAL", exc.message) from None
        if hashlib.sha256(rec.body).hexdigest() != rec.hash:
            raise self._fail("HASH_MISMATCH", "SHA-256 of the body differs from the stored hash")
        self._check_fields(body)
        head = self.head
        if body["chain"] != self.chain:
            raise self._fail("WRONG_CHAIN", f"record belongs to chain {body['chain']!r}")
        if body["seq"] != head.seq + 1:
            reason = "SEQ_REPEATED" if body["seq"] <= head.seq else "SEQ_GAP"
            raise self._fail(reason, f"found seq {body['seq']}, expected {head.seq + 1}")
        if body["prev_hash"] != head.hash:
            raise self._fail("PREV_HASH_MISMATCH", "prev_hash is not the previous record's hash")
        time_ms = parse_time(body["time"])
        if time_ms < head.time_ms:
            raise self._fail("TIME_DECREASED", f"time {body['time']} is before the previous")
        if head.key_id is not None and body["key_id"] != head.key_id:
            raise self._fail("WRONG_KEY", f"signed by {body['key_id']}, expected {head.key_id}")
        try:
            sig_ok = self.check_sig(body["key_id"], rec.body, rec.sig)
        except KeyError:
            raise self._fail("UNKNOWN_KEY", f"no public key {body['key_id']}") from None
        if not sig_ok:
            raise self._fail("BAD_SIGNATURE", "signature does not verify")
        try:
            _seq, number, counters, totals = next_state(head, body["type"], body["payload"])
        except ChainRuleError as exc:
            raise self._fail(exc.reason, str(exc)) from None
        except (KeyError, TypeError, AttributeError) as exc:
            raise self._fail("BAD_FIELD", f"malformed totals or counters: {exc!r}") from None
        if number != body["number"] or not _same_json(counters, body["counters"]):
            raise self._fail("COUNTER_MISMATCH", "number/counters do not follow the previous")
        if not _same_json(totals, body["totals"]):
            raise self._fail("TOTALS_MISMATCH", "grand totals do not follow from the previous")
        if body["type"] == "INTENTION::EVENT" and body["payload"].get("event") == KEY_ROTATED:
            self._check_rotation(body["payload"])
        self.head = ChainHead.from_body(body, rec.hash)
        self.count += 1
        checked: dict[str, Any] = body
        return checked

    def finish(self, expected_seq: int | None = None, expected_hash: str | None = None) -> None:
        """Check the chain reached the expected head (detects deleted tail records)."""
        if expected_seq is not None and self.head.seq < expected_seq:
            raise self._fail(
                "TRUNCATED", f"chain ends at seq {self.head.seq}, head is {expected_seq}"
            )
        if expected_seq is not None and self.head.seq > expected_seq:
            raise VerifyFailure(
                self.chain,
                expected_seq + 1,
                "SEQ_GAP",
                f"records beyond the expected head seq {expected_seq}",
            )
        if expected_hash is not None and self.head.hash != expected_hash:
            raise VerifyFailure(
                self.chain,
                self.head.seq,
                "HASH_MISMATCH",
                "head hash differs from the expected head",
            )

    def _check_fields(self, body: Any) -> None:
        if not isinstance(body, dict) or body.keys() != _BODY_FIELD_SET:
            raise self._fail("BAD_FIELD", "record fields are not the record format's")
        for name, t in _TYPES.items():
            v = body[name]
            if not isinstance(v, t) or (t is int and isinstance(v, bool)):
                raise self._fail("BAD_FIELD", f"{name} has the wrong type")
        if body["format"] != FORMAT:
            raise self._fail("BAD_FIELD", f"unknown format {body['format']}")
        if body["type"] not in RECORD_TYPES:
            raise self._fail("BAD_FIELD", f"unknown record type {body['type']!r}")
        try:
            parse_time(body["time"])  # also refuses well-shaped impossible dates (month 13)
        except ValueError:
            raise self._fail("BAD_FIELD", "time is not RFC 3339 UTC with milliseconds") from None

    def _check_rotation(self, payload: dict[str, Any]) -> None:
        try:
            der = pem_to_der(payload["new_public_key"])
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise self._fail("BAD_FIELD", f"key rotation without a valid new key: {exc}") from None
        if key_id_of(der) != payload.get("new_key_id"):
            raise self._fail("BAD_FIELD", "new_key_id is not the id of new_public_key")


def _same_json(a: Any, b: Any) -> bool:
    """Equal as JSON: ``==`` plus equal types (Python has ``True == 1``, JSON does not)."""
    # Runs twice per verified record (counters, totals): plain loops, no generators.
    t = type(a)
    if t is not type(b):
        return False
    if t is dict:
        if a.keys() != b.keys():
            return False
        for k, v in a.items():
            w = b[k]
            tv = type(v)
            if tv is not type(w):
                return False
            if tv is dict or tv is list:
                if not _same_json(v, w):
                    return False
            elif v != w:
                return False
        return True
    if t is list:
        if len(a) != len(b):
            return False
        return all(_same_json(v, w) for v, w in zip(a, b, strict=True))
    return bool(a == b)


def verify_chain(
    chain: str,
    records: Iterable[StoredRecord],
    check_sig: CheckSig,
    *,
    expected_seq: int | None = None,
    expected_hash: str | None = None,
) -> ChainHead:
    """Verify a whole chain from seq 1; return its head or raise VerifyFailure."""
    v = ChainVerifier(chain, check_sig)
    for rec in records:
        v.feed(rec)
    v.finish(expected_seq, expected_hash)
    return v.head
