"""The rules of the batch processors (DESIGN.md §6): the rate limit, cutting batches within
an API's limits, and what a per-item answer means.

Rate limit: "at most ``limit`` batches per ``window_ms``" is kept as a token bucket of
``limit`` tokens in which each token comes back ``window_ms`` after it was spent (the send
times of the last ``limit`` batches are the bucket's state, persisted so a restart does not
refill it). Unlike a bucket refilled at a constant rate, this never lets more than ``limit``
batches into *any* window of ``window_ms`` (a constant-rate bucket of capacity ``limit``
allows up to 2 × ``limit`` in a window that starts full).

Item classes (docs/sync.md, "Batch item states"):

- ``accepted``: done; the cloud's id (transaction id, CDC) is kept.
- ``review`` (needs review): a permanent rejection; the item is set aside, listed on the
  status and the admin API, never dropped, and sent again only when a technician asks.
- ``failed``: may pass (a retriable rejection, an item the cloud failed, a timeout, the cloud
  unreachable): the item goes into a later batch, and that batch counts as retried.
- ``pending``: the cloud is still working on it: poll again.
- ``duplicate``: the cloud refused the document because it already has it (GoRoute
  ``DUPLICATE_DOCUMENT``, SIFEN ``codigoError`` 1001 "CDC duplicado"). Resolved by
  :func:`resolve_duplicate`: ``accepted`` when we may have sent it before (a submit whose
  answer we never stored: a crash, a timeout, a dropped connection), else ``review``
  (someone else sent a document under our number: a person must look).

Retry-After (:func:`hold_ms`): after a 429 no request goes to that cloud before the time it
names, read on our clock, never longer than a configured maximum (a bogus header must not
stop the uplink for days); a 429 without a readable header holds for ``default_s``.

Pure: time is an argument.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

ACCEPTED = "accepted"
REVIEW = "review"
FAILED = "failed"
PENDING = "pending"
DUPLICATE = "duplicate"

#: GoRoute's item error code for a document it already has (our assumption: seed 001 names
#: no code for it; the simulator answers it with the first ``transaction_id``).
GOROUTE_DUPLICATE = "DUPLICATE_DOCUMENT"
#: SIFEN's rejection code for a CDC it already has ("CDC duplicado", SET's Manual Técnico;
#: seed 002 lists no codes).
SIFEN_DUPLICATE_CDC = 1001

#: GoRoute error codes worth sending again unchanged (the others need a person).
GOROUTE_RETRIABLE = frozenset(
    {
        "RATE_LIMITED",
        "INTERNAL_ERROR",
        "SERVICE_UNAVAILABLE",
        "TIMEOUT",
        "RECIPIENT_UNREACHABLE",
        "DELIVERY_FAILED",
        "LOOKUP_FAILED",
    }
)


def classify_goroute(status: str, error_code: str | None) -> str:
    """One GoRoute ``results[]`` item: ``status`` accepted / rejected / failed / pending.
    A rejection with a code we do not know needs review (never retried blindly)."""
    s = status.lower()
    if s == "rejected" and error_code == GOROUTE_DUPLICATE:
        return DUPLICATE
    if s in ("accepted", "delivered"):
        return ACCEPTED
    if s in ("pending", "processing", "queued"):
        return PENDING
    if s == "failed":
        return FAILED
    if error_code is not None and error_code in GOROUTE_RETRIABLE:
        return FAILED
    return REVIEW


def classify_sifen(estado: str, codigo_error: object = None) -> str:
    """One SIFEN ``resultados[]`` item by its ``estado`` (and ``codigoError``)."""
    e = estado.strip().lower()
    if e == "aprobado" or e == "aprobado con observación":
        return ACCEPTED
    if e == "rechazado":
        return DUPLICATE if str(codigo_error) == str(SIFEN_DUPLICATE_CDC) else REVIEW
    return PENDING  # "Procesando", "En Cola", anything new: keep polling


def resolve_duplicate(sent_before: bool) -> str:
    """A ``duplicate`` answer: ``accepted`` if an earlier submit of ours may have reached the
    cloud, else ``review``."""
    return ACCEPTED if sent_before else REVIEW


def hold_ms(retry_after_s: float | None, *, default_s: float, max_s: float) -> int:
    """How long (ms) to send nothing after a 429: its Retry-After in seconds (None: missing or
    unreadable → ``default_s``), at most ``max_s``, rounded up to the millisecond."""
    wait_s = default_s if retry_after_s is None else retry_after_s
    # rounded to the microsecond first: 40.0 s must not become 40,001 ms through float noise
    return math.ceil(round(min(max(wait_s, 0.0), max_s) * 1000, 3))


def _recent(sent_ms: Iterable[int], now_ms: int, window_ms: int) -> list[int]:
    """The send times inside the window, sorted. One later than now (the clock was set back
    since) counts as sent now: it did happen, but must not hold the bucket past one window."""
    return sorted(min(t, now_ms) for t in sent_ms if t > now_ms - window_ms)


def rate_wait_ms(sent_ms: Sequence[int], now_ms: int, *, limit: int, window_ms: int) -> int:
    """How long to wait before one more batch may go (0: now). ``sent_ms``: send times."""
    recent = _recent(sent_ms, now_ms, window_ms)
    if len(recent) < limit:
        return 0
    return recent[len(recent) - limit] + window_ms - now_ms


def rate_keep(sent_ms: Iterable[int], now_ms: int, *, limit: int, window_ms: int) -> list[int]:
    """The send times worth keeping (the last ``limit`` inside the window)."""
    recent = _recent(sent_ms, now_ms, window_ms)
    return recent[-limit:]


@dataclass(frozen=True, slots=True)
class Limits:
    max_docs: int = 100
    max_batch_bytes: int = 50 * 1024 * 1024
    max_doc_bytes: int = 15 * 1024 * 1024
    #: bytes a batch's envelope adds around its documents (JSON keys, escaping margin)
    overhead_bytes: int = 1024


def doc_refusal(size_bytes: int, limits: Limits) -> str | None:
    """Why one document can never go (None: it can)."""
    if size_bytes > limits.max_doc_bytes:
        return f"document of {size_bytes} bytes is over the {limits.max_doc_bytes}-byte limit"
    if size_bytes + limits.overhead_bytes > limits.max_batch_bytes:
        return f"document of {size_bytes} bytes does not fit a {limits.max_batch_bytes}-byte batch"
    return None


def cut_batches(sizes: Sequence[int], limits: Limits) -> list[list[int]]:
    """Indexes of ``sizes`` in order, cut into batches within the count and byte limits
    (every size must have passed :func:`doc_refusal`)."""
    out: list[list[int]] = []
    cur: list[int] = []
    cur_bytes = limits.overhead_bytes
    for i, size in enumerate(sizes):
        if cur and (len(cur) >= limits.max_docs or cur_bytes + size > limits.max_batch_bytes):
            out.append(cur)
            cur, cur_bytes = [], limits.overhead_bytes
        cur.append(i)
        cur_bytes += size
    if cur:
        out.append(cur)
    return out
