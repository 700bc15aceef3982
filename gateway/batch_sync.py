"""The batch shape of a sync processor (DESIGN.md §6): gather pending outbox rows into
batches within the API's limits, submit them under a persisted rate limit, poll until every
item is final, and keep per-item results (docs/sync.md, "Batch processors").

Outbox states used here (the ``outbox`` rows the ledger writer made for this processor):
``pending`` → ``inflight`` (``cloud_ref`` = the batch id, the batch a row of
``sync_batches``) → ``done`` (``cloud_ref`` = the cloud's id of the item) / ``review``
(``last_error`` says why; listed on the status and the admin API, sent again only when a
technician asks) / back to ``pending`` (failed: goes into a later batch, which counts as
retried). ``skipped``: the record is not for this processor (a receipt for Peppol). A
document refused locally (over a limit, or one the driver cannot render) goes to ``review``
with the reason, before anything is sent.

Crash safety: the batch id is written, in the same transaction as its items going
``inflight``, as soon as the submit call answers; at start-up every open batch is polled,
never submitted again. The window between the submit call and that write is the one place
a crash resends a batch; the drivers name documents deterministically (GoRoute ``id``,
SIFEN ``cdc``) so the cloud can tell. Every write goes through ``ledger.control``.

What this module leaves to others: HTTP and formats (drivers/cloud/*), the meaning of an
answer and the rate arithmetic (gateway.core.batch_policy), the engine's registry and the
admin API (gateway.sync, gateway.admin).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gateway.core.batch_policy import (
    ACCEPTED,
    FAILED,
    PENDING,
    REVIEW,
    Limits,
    cut_batches,
    doc_refusal,
    rate_keep,
    rate_wait_ms,
)
from gateway.core.errors import CloudError
from gateway.core.record import Record, format_time
from gateway.core.sync_policy import RunStats
from gateway.store import Reader
from gateway.wakeups import wait_event

if TYPE_CHECKING:
    from gateway.sync import SyncEngine

log = logging.getLogger("gateway.sync.batch")


class DocumentRefused(Exception):
    """This record's document can never be sent as it is (the reason says why)."""


@dataclass(frozen=True, slots=True)
class Document:
    """One item of a batch: ``doc_id`` names it to the cloud; ``body`` is its JSON entry."""

    doc_id: str
    body: dict[str, Any]
    size_bytes: int


@dataclass(frozen=True, slots=True)
class ItemResult:
    state: str  # batch_policy ACCEPTED / REVIEW / FAILED / PENDING
    ref: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Submission:
    batch_id: str
    #: per doc_id; items not named are pending
    results: dict[str, ItemResult] = field(default_factory=dict)


class BatchSender(Protocol):
    """One cloud API's batch client (drivers/cloud/*)."""

    processor_id: str
    limits: Limits

    @property
    def errors(self) -> int: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def document(self, record: Record) -> Document | None:
        """The record's document; None when the record is not for this processor;
        raises DocumentRefused."""

    async def submit(self, docs: list[Document]) -> Submission:
        """Submit one batch; raises CloudError (nothing of it was taken)."""

    async def poll(self, batch_id: str, doc_ids: list[str]) -> dict[str, ItemResult]:
        """The current state of a batch's items; raises CloudError (a failed poll)."""


@dataclass(frozen=True, slots=True)
class BatchSettings:
    interval_s: float = 60.0
    poll_interval_s: float = 5.0
    poll_timeout_s: float = 300.0
    rate_limit: int = 10
    rate_window_s: float = 60.0
    page_records: int = 1000


@dataclass(slots=True)
class _Open:
    batch_id: str
    submitted_ms: int
    items: dict[str, tuple[str, int]]  # doc_id → (chain, seq)
    left: set[str]


class BatchProcessor:
    """One batch uplink (e.g. ``peppol/goroute``, ``paraguay/sifen``)."""

    def __init__(self, engine: SyncEngine, sender: BatchSender, settings: BatchSettings) -> None:
        self.id = sender.processor_id
        self.engine = engine
        self.sender = sender
        self.settings = settings
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()
        self.alerting = False
        self.last_run: RunStats | None = None
        self.last_run_at_ms: int | None = None
        self.sent_ms: list[int] = []
        self.review_count = 0
        self.next_wake_ms: int | None = None
        self.last_error: str | None = None

    # ------------------------------------------------------------------ state

    def load(self, conn: sqlite3.Connection) -> None:
        self.sent_ms = [
            t
            for (t,) in conn.execute(
                "SELECT sent_ms FROM sync_rate WHERE processor = ?", (self.id,)
            )
        ]
        (self.review_count,) = conn.execute(
            "SELECT count(*) FROM outbox WHERE processor = ? AND state = 'review'", (self.id,)
        ).fetchone()

    async def _write(self, fn: Any) -> Any:
        ledger = self.engine.ledger
        assert ledger is not None

        def tx(conn: sqlite3.Connection) -> Any:
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            return out

        return await ledger.control(tx)

    def _stamp(self) -> str:
        return format_time(self.engine.clock_ms())

    async def _apply(self, results: list[tuple[str, int, ItemResult]]) -> None:
        """Write final item results (accepted / review / failed → pending)."""
        stamp = self._stamp()
        pid = self.id

        def fn(conn: sqlite3.Connection) -> int:
            n_review = 0
            for chain, seq, r in results:
                if r.state == ACCEPTED:
                    conn.execute(
                        "UPDATE outbox SET state = 'done', cloud_ref = ?, last_error = NULL, "
                        "updated_at = ? WHERE processor = ? AND chain = ? AND seq = ?",
                        (r.ref, stamp, pid, chain, seq),
                    )
                elif r.state == REVIEW:
                    n_review += 1
                    conn.execute(
                        "UPDATE outbox SET state = 'review', last_error = ?, updated_at = ? "
                        "WHERE processor = ? AND chain = ? AND seq = ?",
                        (r.error, stamp, pid, chain, seq),
                    )
                elif r.state == FAILED:
                    conn.execute(
                        "UPDATE outbox SET state = 'pending', cloud_ref = NULL, last_error = ?, "
                        "updated_at = ? WHERE processor = ? AND chain = ? AND seq = ?",
                        (r.error, stamp, pid, chain, seq),
                    )
            return n_review

        self.review_count += await self._write(fn)

    # ------------------------------------------------------------------ runs

    async def loop(self) -> None:
        trigger = "start"
        while True:
            try:
                await self.run_once(trigger)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("batch run of %s failed", self.id)
                await asyncio.sleep(1.0)
            timeout = self.settings.interval_s
            if self.next_wake_ms is not None:
                timeout = min(
                    timeout, max(0.0, (self.next_wake_ms - self.engine.clock_ms()) / 1000)
                )
            trigger = "signed" if await wait_event(self.wake, timeout) else "schedule"
            self.wake.clear()

    async def run_once(self, trigger: str) -> RunStats:
        """One run: poll the open batches, submit new ones within the rate, poll them."""
        async with self.lock:
            started = self.engine.clock_ms()
            t0 = time.monotonic()
            errors0 = self.sender.errors
            stats = RunStats(self.id)
            self.next_wake_ms = None
            opened = await self._open_batches()
            await self._submit_pending(stats, opened)
            if opened:
                await self._poll_all(opened, stats)
            stats.errors_count = self.sender.errors - errors0
            stats.duration_ms = int((time.monotonic() - t0) * 1000)
            stats.check_alert(self.engine.settings.alert_failure_rate)
            self.last_error = stats.run_error
            record_run = stats.items > 0 or stats.run_error is not None or trigger == "admin"
            if record_run:
                await self._write(lambda conn: _insert_run(conn, self.id, stats, started, trigger))
                self.last_run, self.last_run_at_ms = stats, started
                self.alerting = stats.alert_triggered or (self.alerting and stats.items == 0)
            return stats

    async def _open_batches(self) -> list[_Open]:
        pid = self.id

        def q(r: Reader) -> list[_Open]:
            out = []
            for batch_id, submitted, items in r.conn.execute(
                "SELECT batch_id, submitted_ms, items FROM sync_batches "
                "WHERE processor = ? AND state = 'open' ORDER BY submitted_ms",
                (pid,),
            ):
                mapping = {d: (c, s) for c, s, d in json.loads(items)}
                left = set()
                for doc_id, (c, s) in mapping.items():
                    row = r.conn.execute(
                        "SELECT state, cloud_ref FROM outbox WHERE processor = ? AND chain = ? "
                        "AND seq = ?",
                        (pid, c, s),
                    ).fetchone()
                    if row is not None and row[0] == "inflight" and row[1] == batch_id:
                        left.add(doc_id)
                out.append(_Open(batch_id, submitted, mapping, left))
            return out

        reads = self.engine.reads
        assert reads is not None
        return await reads.run(q)

    async def _fetch(self, after: tuple[str, int]) -> list[tuple[int, Record]]:
        pid, limit = self.id, self.settings.page_records

        def q(r: Reader) -> list[tuple[int, Record]]:
            rows = r.conn.execute(
                "SELECT o.attempts, r.body, r.hash, r.sig FROM outbox o JOIN records r "
                "ON r.chain = o.chain AND r.seq = o.seq WHERE o.processor = ? "
                "AND o.state = 'pending' AND (o.chain, o.seq) > (?, ?) "
                "ORDER BY o.chain, o.seq LIMIT ?",
                (pid, after[0], after[1], limit),
            ).fetchall()
            return [(a, Record.from_body(json.loads(b), h, s)) for a, b, h, s in rows]

        reads = self.engine.reads
        assert reads is not None
        return await reads.run(q)

    async def _submit_pending(self, stats: RunStats, opened: list[_Open]) -> None:
        """Submit what is pending, within the rate; batches still open go into ``opened``.
        A submit the cloud did not take ends it (``run_error``): its items are failed."""
        limits = self.sender.limits
        after = ("", 0)
        while True:
            page = await self._fetch(after)
            if not page:
                return
            after = (page[-1][1].chain, page[-1][1].seq)
            docs: list[tuple[int, Record, Document]] = []
            settle: list[tuple[str, int, str, str | None]] = []  # chain, seq, state, error
            for attempts, rec in page:
                try:
                    doc = self.sender.document(rec)
                    refusal = None if doc is None else doc_refusal(doc.size_bytes, limits)
                except DocumentRefused as exc:
                    doc, refusal = None, str(exc)
                if refusal is not None:
                    settle.append((rec.chain, rec.seq, "review", f"refused locally: {refusal}"))
                    log.error(
                        "%s refused %s seq %d locally: %s", self.id, rec.chain, rec.seq, refusal
                    )
                elif doc is None:
                    settle.append((rec.chain, rec.seq, "skipped", None))
                else:
                    docs.append((attempts, rec, doc))
            if settle:
                await self._settle(settle)
                stats.rejected += sum(1 for s in settle if s[2] == "review")
            for idx in cut_batches([d.size_bytes for _, _, d in docs], limits):
                batch = [docs[i] for i in idx]
                now = self.engine.clock_ms()
                window_ms = int(self.settings.rate_window_s * 1000)
                wait = rate_wait_ms(
                    self.sent_ms, now, limit=self.settings.rate_limit, window_ms=window_ms
                )
                if wait > 0:
                    self.next_wake_ms = now + wait
                    return
                await self._take_token(now, window_ms)
                stats.batches_created += 1
                if any(a > 0 for a, _, _ in batch):
                    stats.batches_retried += 1
                stats.chains.update(r.chain for _, r, _ in batch)
                try:
                    sub = await self.sender.submit([d for _, _, d in batch])
                except CloudError as exc:
                    stats.failed += len(batch)
                    stats.run_error = f"{exc.code}: {exc.message}"
                    await self._settle(
                        [(r.chain, r.seq, "pending", stats.run_error[:500]) for _, r, _ in batch],
                        attempt=True,
                    )
                    return
                o = await self._record_batch(sub, batch)
                done = [
                    (o.items[d][0], o.items[d][1], r)
                    for d, r in sub.results.items()
                    if d in o.items and r.state != PENDING
                ]
                self._count(done, stats)
                if done:
                    await self._apply(done)
                o.left -= {d for d, r in sub.results.items() if r.state != PENDING}
                if o.left:
                    opened.append(o)
                else:
                    await self._close(o.batch_id, "done")

    def _count(self, done: list[tuple[str, int, ItemResult]], stats: RunStats) -> None:
        for _, _, r in done:
            if r.state == ACCEPTED:
                stats.accepted += 1
            elif r.state == REVIEW:
                stats.rejected += 1
            else:
                stats.failed += 1

    async def _take_token(self, now_ms: int, window_ms: int) -> None:
        keep = rate_keep(
            [*self.sent_ms, now_ms], now_ms, limit=self.settings.rate_limit, window_ms=window_ms
        )
        pid = self.id

        def fn(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM sync_rate WHERE processor = ?", (pid,))
            conn.executemany(
                "INSERT INTO sync_rate (processor, sent_ms) VALUES (?, ?)", [(pid, t) for t in keep]
            )

        await self._write(fn)
        self.sent_ms = keep

    async def _settle(
        self, rows: list[tuple[str, int, str, str | None]], *, attempt: bool = False
    ) -> None:
        stamp, pid = self._stamp(), self.id
        inc = 1 if attempt else 0

        def fn(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE outbox SET state = ?, last_error = ?, attempts = attempts + ?, "
                "updated_at = ? WHERE processor = ? AND chain = ? AND seq = ?",
                [(st, err, inc, stamp, pid, c, s) for c, s, st, err in rows],
            )

        await self._write(fn)
        self.review_count += sum(1 for r in rows if r[2] == "review")

    async def _record_batch(
        self, sub: Submission, batch: list[tuple[int, Record, Document]]
    ) -> _Open:
        items = [(r.chain, r.seq, d.doc_id) for _, r, d in batch]
        now, stamp, pid = self.engine.clock_ms(), self._stamp(), self.id

        def fn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO sync_batches (processor, batch_id, state, submitted_ms, "
                "items) VALUES (?, ?, 'open', ?, ?)",
                (pid, sub.batch_id, now, json.dumps(items)),
            )
            conn.executemany(
                "UPDATE outbox SET state = 'inflight', cloud_ref = ?, attempts = attempts + 1, "
                "updated_at = ? WHERE processor = ? AND chain = ? AND seq = ?",
                [(sub.batch_id, stamp, pid, c, s) for c, s, _ in items],
            )

        await self._write(fn)
        mapping = {d: (c, s) for c, s, d in items}
        return _Open(sub.batch_id, now, mapping, set(mapping))

    async def _close(self, batch_id: str, state: str) -> None:
        pid = self.id

        def fn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE sync_batches SET state = ? WHERE processor = ? AND batch_id = ?",
                (state, pid, batch_id),
            )

        await self._write(fn)

    async def _poll_all(self, opened: list[_Open], stats: RunStats) -> None:
        """Poll every open batch until each item is final or the batch times out."""
        timeout_ms = int(self.settings.poll_timeout_s * 1000)
        live = [o for o in opened if o.left]
        for o in opened:
            if not o.left:
                await self._close(o.batch_id, "done")
        while live:
            await asyncio.sleep(self.settings.poll_interval_s)
            still = []
            for o in live:
                try:
                    results = await self.sender.poll(o.batch_id, sorted(o.left))
                except CloudError as exc:
                    # a failed poll is not a verdict: poll again until the timeout
                    log.warning("%s poll of %s failed: %s", self.id, o.batch_id, exc.message)
                    results = {}
                done = [
                    (o.items[d][0], o.items[d][1], r)
                    for d, r in results.items()
                    if d in o.left and r.state != PENDING
                ]
                if done:
                    self._count(done, stats)
                    await self._apply(done)
                    o.left -= {d for d, r in results.items() if r.state != PENDING}
                if not o.left:
                    await self._close(o.batch_id, "done")
                elif self.engine.clock_ms() - o.submitted_ms >= timeout_ms:
                    err = f"batch {o.batch_id} not final after {self.settings.poll_timeout_s:g} s"
                    lost = [
                        (o.items[d][0], o.items[d][1], ItemResult(FAILED, error=err))
                        for d in sorted(o.left)
                    ]
                    self._count(lost, stats)
                    await self._apply(lost)
                    await self._close(o.batch_id, "timeout")
                    log.warning(
                        "%s: %s; its %d items go into a later batch", self.id, err, len(lost)
                    )
                else:
                    still.append(o)
            live = still

    # ------------------------------------------------------------------ review

    async def review(self, limit: int = 100) -> list[dict[str, Any]]:
        pid = self.id

        def q(r: Reader) -> list[dict[str, Any]]:
            return [
                {"chain": c, "seq": s, "error": e, "since": u}
                for c, s, e, u in r.conn.execute(
                    "SELECT chain, seq, last_error, updated_at FROM outbox WHERE processor = ? "
                    "AND state = 'review' ORDER BY chain, seq LIMIT ?",
                    (pid, limit),
                )
            ]

        reads = self.engine.reads
        assert reads is not None
        return await reads.run(q)

    async def retry(self, chain: str, seq: int) -> bool:
        """Send a needs-review item again (after correction); False if it is not in review."""
        pid, stamp = self.id, self._stamp()

        def fn(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE outbox SET state = 'pending', updated_at = ? WHERE processor = ? "
                "AND chain = ? AND seq = ? AND state = 'review'",
                (stamp, pid, chain, seq),
            )
            return cur.rowcount

        n = await self._write(fn)
        if n:
            self.review_count -= n
            self.wake.set()
        return bool(n)

    async def mark_reviewed(self, chain: str, seq: int, note: str) -> bool:
        """Close a needs-review item without sending it (a technician dealt with it outside
        the gateway): state ``reviewed``, kept with its error and the note, never sent again
        and no longer counted as needing review. False if it is not in review."""
        pid, stamp = self.id, self._stamp()

        def fn(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE outbox SET state = 'reviewed', updated_at = ?, "
                "last_error = coalesce(last_error, '') || ' | reviewed: ' || ? "
                "WHERE processor = ? AND chain = ? AND seq = ? AND state = 'review'",
                (stamp, note, pid, chain, seq),
            )
            return cur.rowcount

        n = await self._write(fn)
        self.review_count -= n
        return bool(n)

    def status(self) -> dict[str, Any]:
        return {
            "processor": self.id,
            "shape": "batch",
            "last_error": self.last_error,
            "alert": self.alerting,
            "needs_review": self.review_count,
            "last_run": self.last_run.result_json() if self.last_run else None,
            "last_run_at": format_time(self.last_run_at_ms)
            if self.last_run_at_ms is not None
            else None,
        }


def _insert_run(
    conn: sqlite3.Connection, pid: str, s: RunStats, started_ms: int, trigger: str
) -> None:
    conn.execute(
        "INSERT INTO sync_runs (processor, started_ms, trigger, batches_created, "
        "batches_retried, accepted, rejected, failed, errors_count, failure_rate, "
        "alert_triggered, duration_ms, run_error) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            pid,
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
