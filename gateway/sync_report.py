"""What a sync run leaves behind, the same for every processor shape (real-time and batch):
its row of ``sync_runs`` (the admin API's per-run and 24-hour stats), and the technical-event
records it signs — ``SYNC_ALERT`` when its failure rate crosses ``sync.alert_failure_rate``
and ``SYNC_REJECTED`` for an item the cloud refused for good (docs/events.md, docs/sync.md).

What this module leaves to others: counting (gateway.core.sync_policy.RunStats), signing the
event (``SyncEngine.event``: through the ledger writer, never raises), and when a processor
calls these (gateway.sync, gateway.batch_sync).
"""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING

from gateway.core.sync_policy import RunStats

if TYPE_CHECKING:
    from gateway.sync import SyncEngine

log = logging.getLogger("gateway.sync")


def insert_run(
    conn: sqlite3.Connection, processor: str, s: RunStats, started_ms: int, trigger: str
) -> None:
    """One run's row of ``sync_runs`` (inside the caller's transaction)."""
    conn.execute(
        "INSERT INTO sync_runs (processor, started_ms, trigger, batches_created, "
        "batches_retried, accepted, rejected, failed, errors_count, failure_rate, "
        "alert_triggered, duration_ms, run_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            processor,
            started_ms,
            trigger,
            s.batches_created,
            s.batches_retried,
            s.accepted,
            s.rejected,
            s.failed,
            s.errors_count,
            s.failure_rate,
            int(s.alert_triggered),
            s.duration_ms,
            s.run_error,
        ),
    )


async def alert(
    engine: SyncEngine, processor: str, stats: RunStats, now_ms: int, alerting: bool
) -> bool:
    """The processor's alert state after this run (``stats.check_alert`` done). Entering an
    alert signs one ``SYNC_ALERT`` in each chain the run touched — once per episode, not per
    run; a run with items below the threshold ends the episode, a run without items keeps
    it."""
    threshold = engine.settings.alert_failure_rate
    if stats.alert_triggered and not alerting:
        log.error(
            "%s failure rate %.3f above %.3f: alert", processor, stats.failure_rate, threshold
        )
        for chain in sorted(stats.chains):
            await engine.event(
                chain,
                f"sync-alert:{processor}:{now_ms}:{chain}",
                {
                    "event": "SYNC_ALERT",
                    "processor": processor,
                    "failure_rate": f"{stats.failure_rate:.3f}",
                    "threshold": f"{threshold:.3f}",
                    "failed": stats.failed,
                    "items": stats.items,
                },
            )
        return True
    if stats.alert_triggered:
        return True
    return alerting and stats.items == 0


async def rejected(
    engine: SyncEngine, processor: str, chain: str, seq: int, error: str, *, attempt: str = ""
) -> None:
    """``SYNC_REJECTED`` in ``chain`` for record ``seq``, refused for good. ``attempt`` tells
    two refusals of the same record apart (a batch item sent again after review is a new
    refusal; the request id of the event is what makes it once-only)."""
    suffix = f":{attempt}" if attempt else ""
    await engine.event(
        chain,
        f"sync-rejected:{processor}:{chain}:{seq}{suffix}",
        {"event": "SYNC_REJECTED", "processor": processor, "seq": seq, "error": error[:500]},
    )
