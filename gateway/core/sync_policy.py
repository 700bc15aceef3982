"""What a cloud answer means for the sync engine, and the numbers a run reports.

Classification of one HTTP exchange (docs/sync.md, "Error classes"):

========================  =========  ==================================================
answer                    class      what the engine does
========================  =========  ==================================================
2xx                       ok         the call is done (``X-Idempotency-Replayed: true``
                                     too: a retry of a call that had gone through)
connect error, timeout,   transient  retry in place a few times with backoff; then the
dropped connection, 5xx,             uplink goes offline and is probed later
408
401                       auth       fetch a new token and retry once; then transient
409                       busy       the same key is still being processed: wait, retry
                                     with the same key (bounded), then transient
429                       busy       wait ``Retry-After`` (bounded), then transient
422, 400, other 4xx       permanent  the record is rejected: set aside, alert, stop the
                                     chain's uplink (strict seq order)
========================  =========  ==================================================

:class:`RunStats` carries exactly the fields of the admin API's results (seed 000).
``failure_rate`` = (``rejected`` + ``failed``) / (``accepted`` + ``rejected`` + ``failed``):
the items that did not get through. The seed's two examples disagree (its ``results`` example,
1 failed and 2 rejected of 13 = 0.077, counts only ``failed``; its ``stats`` example, 3
rejected of 145 = 0.021, counts ``rejected`` too); we count both, so that permanent
rejections — the worse kind — raise the alert as well (docs/sync.md). Pure: the clock is an
argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

OK = "ok"
TRANSIENT = "transient"
AUTH = "auth"
BUSY = "busy"
PERMANENT = "permanent"


def classify_status(status: int) -> str:
    if 200 <= status < 300:
        return OK
    if status == 401:
        return AUTH
    if status in (409, 429):
        return BUSY
    if status == 408 or status >= 500:
        return TRANSIENT
    return PERMANENT


def retry_after_s(value: str | None, now_ms: int) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date)."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_ms / 1000.0)


def failure_rate(accepted: int, rejected: int, failed: int) -> float:
    total = accepted + rejected + failed
    return (rejected + failed) / total if total else 0.0


@dataclass(slots=True)
class RunStats:
    """One run of one processor (or a sum of runs)."""

    processor: str
    batches_created: int = 0
    batches_retried: int = 0
    accepted: int = 0
    rejected: int = 0
    failed: int = 0
    errors_count: int = 0
    duration_ms: int = 0
    alert_triggered: bool = False
    #: chains this run touched (not reported; for the alert's event records)
    chains: set[str] = field(default_factory=set)
    #: a run-level failure (e.g. the cloud could not be reached at all)
    run_error: str | None = None

    @property
    def failure_rate(self) -> float:
        return failure_rate(self.accepted, self.rejected, self.failed)

    @property
    def succeeded(self) -> bool:
        """Every item tried was accepted and nothing stopped the run (200 vs 207)."""
        return self.failed == 0 and self.rejected == 0 and self.run_error is None

    @property
    def items(self) -> int:
        return self.accepted + self.rejected + self.failed

    def check_alert(self, threshold: float) -> bool:
        """alert_triggered: the failure rate is above the configured threshold."""
        self.alert_triggered = self.items > 0 and self.failure_rate > threshold
        return self.alert_triggered

    def result_json(self) -> dict[str, object]:
        """One element of ``results[]`` of ``POST /v1/admin/process-pending`` (seed 000)."""
        return {
            "processor": self.processor,
            "batches_created": self.batches_created,
            "batches_retried": self.batches_retried,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "failed": self.failed,
            "failure_rate": round(self.failure_rate, 3),
            "alert_triggered": self.alert_triggered,
            "errors_count": self.errors_count,
            "duration_ms": self.duration_ms,
        }


def stats_json(
    processor: str,
    *,
    batches_created: int,
    batches_retried: int,
    accepted: int,
    rejected: int,
    failed: int,
    since_ms: int,
    alerts_triggered: int | None = None,
) -> dict[str, object]:
    """One element of ``stats[]`` of ``GET /v1/admin/batch-stats`` (seed 000), plus our
    ``alerts_triggered`` when given: how many of the runs summed raised the failure-rate
    alert (the seed's stats have no alert field; its per-run results do)."""
    out: dict[str, object] = {
        "processor": processor,
        "batches_created": batches_created,
        "batches_retried": batches_retried,
        "accepted": accepted,
        "rejected": rejected,
        "failed": failed,
        "failure_rate": round(failure_rate(accepted, rejected, failed), 3),
    }
    if alerts_triggered is not None:
        out["alerts_triggered"] = alerts_triggered
    out["since"] = format_since(since_ms)
    return out


def format_since(epoch_ms: int) -> str:
    """``2026-03-08T14:30:00Z`` (the seed's form: seconds, ``Z``)."""
    return datetime.fromtimestamp(epoch_ms // 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class SendOutcome:
    """A record went up: the cloud's id of its last call, and whether every call was a
    cached answer (``X-Idempotency-Replayed: true``: it had gone through before)."""

    cloud_id: str
    replayed: bool
    calls: int


class PartialSend(Exception):
    """A record's first call went through, a later one failed with ``cause``; ``cloud_ref``
    (the first call's cloud id) must be kept so a later retry does not make it again."""

    def __init__(self, cloud_ref: str, cause: Exception) -> None:
        super().__init__(f"{cause} (after the first call made {cloud_ref})")
        self.cloud_ref = cloud_ref
        self.cause = cause
