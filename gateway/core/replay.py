"""Header rules of the real-time uplink: idempotency keys and the offline replay headers.

Seed 004 (fiskaly SIGN FR) and docs/sync.md:

- ``X-Api-Version``: ``YYYY-MM-DD`` (10 characters).
- ``X-Idempotency-Key``: a UUID, version 4 or 3, on every POST/PATCH. The gateway fixes one
  v4 key per record and processor when the record is written (the ``outbox`` row). A record
  that goes up in several calls (``INTENTION::TRANSACTION`` then ``TRANSACTION::RECEIPT``)
  uses the stored key for the first call and, for each later call, the v3 UUID named by the
  call's cloud type in the stored key's namespace: fixed, distinct per call, and derived the
  same way on every retry and after every restart (v5 would be simpler but the API accepts
  only v3 and v4).
- The replay rule: a record flagged ``offline`` is sent with ``X-Replay-Remaining`` = the
  number of offline records of the same chain still waiting for this processor *after* this
  one (so the last one says ``0``), at most 4 digits, and ``X-Replay-Hash`` = base64 of the
  record's chain hash (the raw 32 bytes: 44 characters). A record not flagged offline is sent
  without either header. Every call of a record carries the same pair.

Pure: no IO, no randomness (the v4 key is made by the ledger writer).
"""

from __future__ import annotations

import bisect
import re
import uuid

from gateway.core.record import hash_b64

MAX_REPLAY_REMAINING = 9999

API_VERSION_RE = re.compile(r"^[0-9]{4}-(0[1-9]|1[012])-(0[1-9]|[12][0-9]|3[01])$")
IDEMPOTENCY_KEY_RE = re.compile(
    r"^[0-9a-f]{8}-[0-9a-f]{4}-[34][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)
REPLAY_REMAINING_RE = re.compile(r"^(\d{1,4})$")

REPLAY_REMAINING = "X-Replay-Remaining"
REPLAY_HASH = "X-Replay-Hash"


def call_key(stored_key: str, call_index: int, cloud_type: str) -> str:
    """The idempotency key of call ``call_index`` (0-based) of a record."""
    if call_index == 0:
        return stored_key
    return str(uuid.uuid3(uuid.UUID(stored_key), cloud_type))


def replay_headers(remaining: int, hash_hex: str) -> dict[str, str]:
    """The two replay headers of an offline record; ValueError beyond 4 digits."""
    if not 0 <= remaining <= MAX_REPLAY_REMAINING:
        raise ValueError(
            f"X-Replay-Remaining {remaining} is outside 0-{MAX_REPLAY_REMAINING} (the offline "
            "budget must keep a chain below that)"
        )
    return {REPLAY_REMAINING: str(remaining), REPLAY_HASH: hash_b64(hash_hex)}


def remaining_after(offline_seqs: list[int], seq: int, offline_beyond: int) -> int:
    """Offline records after ``seq``: those of ``offline_seqs`` (one page, sorted) above it,
    plus ``offline_beyond`` known to wait after the page."""
    return len(offline_seqs) - bisect.bisect_right(offline_seqs, seq) + offline_beyond
