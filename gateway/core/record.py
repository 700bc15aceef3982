"""The signed record: the unit of the fiscal journal (DESIGN.md §4, docs/record-format.md).

A record's *body* is every field but ``hash`` and ``sig``; its canonical bytes
(:func:`gateway.core.canonical.canonical_bytes`) are what is hashed (``hash`` = lowercase hex
SHA-256) and signed (``sig`` = base64 DER ECDSA). Stored records are never updated.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

FORMAT = 1
GENESIS_HASH = "0" * 64

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")

#: Every record type the journal knows (names as the fiscal APIs use them).
RECORD_TYPES = frozenset(
    {
        "TRANSACTION::RECEIPT",
        "TRANSACTION::INVOICE",
        "TRANSACTION::CANCELLATION",
        "TRANSACTION::CORRECTION",
        "INTENTION::DUPLICATE",
        "INTENTION::EVENT",
        "CLOSING::DAILY",
        "CLOSING::MONTHLY",
        "CLOSING::YEARLY",
        "EXPORT::RECORDS",
    }
)

#: Types whose payload ``vat`` breakdown adds to the perpetual grand totals.
TOTALLING_PREFIX = "TRANSACTION::"

BODY_FIELDS = (
    "format",
    "chain",
    "seq",
    "type",
    "number",
    "time",
    "client",
    "request_id",
    "payload",
    "counters",
    "totals",
    "offline",
    "prev_hash",
    "key_id",
)


def format_time(epoch_ms: int) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-21T23:00:00.123Z``."""
    seconds, ms = divmod(epoch_ms, 1000)
    return f"{_second_text(seconds)}{ms:03d}Z"


def parse_time(text: str) -> int:
    """Epoch milliseconds of a record time (the inverse of :func:`format_time`)."""
    if not TIME_RE.fullmatch(text):  # fullmatch: "$" alone would accept a trailing newline
        raise ValueError(f"not an RFC 3339 UTC millisecond time: {text!r}")
    return _second_ms(text[:19]) + int(text[20:23])


# Records of one chain mostly fall in the same second as their neighbours: the date part is
# converted once per second (memoized, a pure function) instead of once per record.


@lru_cache(maxsize=64)
def _second_text(epoch_s: int) -> str:
    return (_EPOCH + timedelta(seconds=epoch_s)).strftime("%Y-%m-%dT%H:%M:%S.")


@lru_cache(maxsize=64)
def _second_ms(text: str) -> int:
    """Epoch ms of ``YYYY-MM-DDTHH:MM:SS`` (digits already checked); ValueError if no such
    date or time (month 13, 30 February, second 60)."""
    dt = datetime(
        int(text[0:4]),
        int(text[5:7]),
        int(text[8:10]),
        int(text[11:13]),
        int(text[14:16]),
        int(text[17:19]),
        tzinfo=UTC,
    )
    return (dt - _EPOCH) // timedelta(milliseconds=1)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_b64(hash_hex: str) -> str:
    """Base64 of the raw 32-byte digest (the ``X-Replay-Hash`` form)."""
    return base64.b64encode(bytes.fromhex(hash_hex)).decode("ascii")


def key_id_of(public_key_der: bytes) -> str:
    """Key id: the first 16 hex digits of SHA-256 over the SubjectPublicKeyInfo DER."""
    return hashlib.sha256(public_key_der).hexdigest()[:16]


def pem_to_der(pem: str) -> bytes:
    """Body of a single PEM block (pure base64 decoding, no crypto)."""
    lines = [ln.strip() for ln in pem.strip().splitlines()]
    if (
        len(lines) < 3
        or not lines[0].startswith("-----BEGIN ")
        or not lines[-1].startswith("-----END ")
    ):
        raise ValueError("not a PEM block")
    return base64.b64decode("".join(lines[1:-1]), validate=True)


@dataclass(frozen=True, slots=True)
class Record:
    """A signed record as stored and exported."""

    chain: str
    seq: int
    type: str
    number: int
    time: str
    client: str
    request_id: str
    payload: dict[str, Any]
    counters: dict[str, int]
    totals: dict[str, Any]
    offline: bool
    prev_hash: str
    key_id: str
    hash: str
    sig: str
    format: int = FORMAT

    def body(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in BODY_FIELDS}

    def to_json(self) -> dict[str, Any]:
        out = self.body()
        out["hash"] = self.hash
        out["sig"] = self.sig
        return out

    @classmethod
    def from_body(cls, body: dict[str, Any], hash_hex: str, sig: str) -> Record:
        return cls(
            chain=body["chain"],
            seq=body["seq"],
            type=body["type"],
            number=body["number"],
            time=body["time"],
            client=body["client"],
            request_id=body["request_id"],
            payload=body["payload"],
            counters=body["counters"],
            totals=body["totals"],
            offline=body["offline"],
            prev_hash=body["prev_hash"],
            key_id=body["key_id"],
            hash=hash_hex,
            sig=sig,
            format=body["format"],
        )
