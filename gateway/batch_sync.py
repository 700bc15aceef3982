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

Crash safety: before the submit call leaves, one transaction spends the rate token, writes
the batch as a ``submitting`` row of ``sync_batches`` (a local reference in place of the
cloud's id) and puts its items ``inflight`` under that reference, counting the attempt. The
answer's batch id replaces the reference (``open``) at once; at start-up every open batch is
polled, never submitted again. A ``submitting`` row found at the start of a run is a submit
whose answer was never stored (a crash): the cloud may or may not have the batch, and neither
API offers a way to look it up, so its items go back to ``pending`` marked :data:`UNSURE`
and are sent again — the cloud answers a document it already has as a duplicate (GoRoute
``DUPLICATE_DOCUMENT``, SIFEN 1001), which is reconciled as accepted because the item was
unsure (gateway.core.batch_policy.resolve_duplicate); a duplicate answer for an item that was
not is someone else's document and needs review. The same holds for an answer lost on the
wire, a timeout and a lote that timed out.

Retry-After: a 429 holds every request to that cloud (submits and polls) until the time it
names, bounded by ``retry_after_max_s``; the hold is written (``sync_hold``) so a restart
does not send early. Every write goes through ``ledger.control``.

What this module leaves to others: HTTP and formats (drivers/cloud/*), the meaning of an
answer and the rate arithmetic (gateway.core.batch_policy), the engine's registry and the
admin API (gateway.sync, gateway.admin).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from gateway import sync_report
from gateway.core.batch_policy import (
    ACCEPTED,
    DUPLICATE,
    FAILED,
    PENDING,
    REVIEW,
    Limits,
    cut_batches,
    doc_refusal,
    hold_ms,
    rate_keep,
    rate_wait_ms,
    resolve_duplicate,
)
from gateway.core.errors import CloudBusy, CloudError, CloudUnavailable
from gateway.core.record import Record, format_time
from gateway.core.sync_policy import RunStats, retry_after_s
from gateway.store import Reader
from gateway.wakeups import run_forever

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
    state: str  # batch_policy ACCEPTED / REVIEW / FAILED / PENDING / DUPLICATE
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
    #: the longest a 429's Retry-After is honoured (a longer one is cut to this)
    retry_after_max_s: float = 300.0


#: ``cloud_ref`` of a pending item whose last submit may have reached the cloud without our
#: learning its verdict (an interrupted submit, a timeout, a dropped connection, a lote that
#: timed out): a duplicate answer for it later means "already accepted".
UNSURE = "unsure"


@dataclass(frozen=True, slots=True)
class _Item:
    attempts: int
    unsure: bool
    rec: Record
    doc: Document


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
        #: outbox items of this processor in state ``review``: read from the table in every
        #: write's own transaction (never counted by hand), so it cannot drift
        self.review_count = 0
        self.next_wake_ms: int | None = None
        self.last_error: str | None = None
        #: no request to the cloud before this (a 429's Retry-After); 0: none
        self.hold_until_ms = 0

    # ------------------------------------------------------------------ state

    def load(self, conn: sqlite3.Connection) -> None:
        self.sent_ms = [
            t
            for (t,) in conn.execute(
                "SELECT sent_ms FROM sync_rate WHERE processor = ?", (self.id,)
            )
        ]
        self.review_count = self._count_review(conn)
        row = conn.execute(
            "SELECT until_ms FROM sync_hold WHERE processor = ?", (self.id,)
        ).fetchone()
        self.hold_until_ms = row[0] if row else 0

    def _count_review(self, conn: sqlite3.Connection) -> int:
        (n,) = conn.execute(
            "SELECT count(*) FROM outbox WHERE processor = ? AND state = 'review'", (self.id,)
        ).fetchone()
        return int(n)

    async def _write(self, fn: Any) -> Any:
        """Run ``fn(conn)`` in one write transaction (the ledger's writer thread); the
        review count is read again in it (an index probe: ``outbox_pending``)."""
        ledger = self.engine.ledger
        assert ledger is not None

        def tx(conn: sqlite3.Connection) -> tuple[Any, int]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                out = fn(conn)
                review = self._count_review(conn)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            return out, review

        out, self.review_count = await ledger.control(tx)
        return out

    def _stamp(self) -> str:
        return format_time(self.engine.clock_ms())

    def _held(self) -> bool:
        """A 429's Retry-After has not passed: send nothing (the loop wakes at its end).

        The hold is a wall-clock time; if the clock was set back since it was written, it
        would last the step as well: it never reaches further than ``retry_after_max_s``
        from now."""
        now = self.engine.clock_ms()
        self.hold_until_ms = min(
            self.hold_until_ms, now + math.ceil(self.settings.retry_after_max_s * 1000)
        )
        if now < self.hold_until_ms:
            self.next_wake_ms = self.hold_until_ms
            return True
        return False

    def _hold(self, conn: sqlite3.Connection, exc: CloudBusy) -> int:
        """Write the hold a 429 asks for (in the caller's transaction); its end, ms."""
        now = self.engine.clock_ms()
        wait_ms = hold_ms(
            retry_after_s(exc.retry_after, now),
            default_s=self.settings.rate_window_s,
            max_s=self.settings.retry_after_max_s,
        )
        until = now + wait_ms
        conn.execute(
            "INSERT OR REPLACE INTO sync_hold (processor, until_ms, reason) VALUES (?, ?, ?)",
            (self.id, until, f"Retry-After: {exc.retry_after}"),
        )
        return until

    async def _apply(
        self, results: list[tuple[str, int, ItemResult]], batch_ref: str
    ) -> list[tuple[str, int, ItemResult]]:
        """Write final item results of batch ``batch_ref`` (accepted / review / failed →
        pending), a duplicate resolved first: accepted if the item was :data:`UNSURE` when
        this batch took it (an earlier submit may have reached the cloud), else review.
        Returns the results as written; the review ones get their ``SYNC_REJECTED``."""
        stamp = self._stamp()
        pid = self.id

        def fn(conn: sqlite3.Connection) -> list[tuple[str, int, ItemResult]]:
            # items this batch took while unsure (an earlier submit may have reached the
            # cloud): a duplicate of one is ours, and one that fails stays unsure
            unsure: set[tuple[str, int]] = set()
            if any(r.state in (DUPLICATE, FAILED) for _, _, r in results):
                row = conn.execute(
                    "SELECT items FROM sync_batches WHERE processor = ? AND batch_id = ?",
                    (pid, batch_ref),
                ).fetchone()
                for item in json.loads(row[0]) if row else []:
                    if len(item) > 3 and item[3]:
                        unsure.add((item[0], item[1]))
            out = []
            for chain, seq, r in results:
                if r.state == DUPLICATE:
                    state = resolve_duplicate((chain, seq) in unsure)
                    if state == ACCEPTED:
                        log.info(
                            "%s %s seq %d: the cloud already had it (%s): accepted",
                            pid,
                            chain,
                            seq,
                            r.error,
                        )
                    r = ItemResult(state, r.ref, r.error)
                out.append((chain, seq, r))
                if r.state == ACCEPTED:
                    conn.execute(
                        "UPDATE outbox SET state = 'done', cloud_ref = ?, last_error = NULL, "
                        "updated_at = ? WHERE processor = ? AND chain = ? AND seq = ?",
                        (r.ref, stamp, pid, chain, seq),
                    )
                elif r.state == REVIEW:
                    conn.execute(
                        "UPDATE outbox SET state = 'review', last_error = ?, updated_at = ? "
                        "WHERE processor = ? AND chain = ? AND seq = ?",
                        (r.error, stamp, pid, chain, seq),
                    )
                elif r.state == FAILED:
                    # UNSURE when the cloud may still take it: this batch timed out, or an
                    # earlier submit of the item is still without a verdict
                    maybe = r.ref == UNSURE or (chain, seq) in unsure
                    conn.execute(
                        "UPDATE outbox SET state = 'pending', cloud_ref = ?, last_error = ?, "
                        "updated_at = ? WHERE processor = ? AND chain = ? AND seq = ?",
                        (UNSURE if maybe else None, r.error, stamp, pid, chain, seq),
                    )
            return out

        written: list[tuple[str, int, ItemResult]] = await self._write(fn)
        review = [(c, s, r) for c, s, r in written if r.state == REVIEW]
        for chain, seq, r in review:
            await sync_report.rejected(
                self.engine, pid, chain, seq, r.error or "rejected", attempt=batch_ref
            )
        return written

    # ------------------------------------------------------------------ runs

    def next_wake_s(self) -> float:
        """Seconds until the next scheduled run: the interval, or sooner for a poll or the
        end of a Retry-After hold."""
        timeout = self.settings.interval_s
        if self.next_wake_ms is not None:
            timeout = min(timeout, max(0.0, (self.next_wake_ms - self.engine.clock_ms()) / 1000))
        return timeout

    async def loop(self) -> None:
        await run_forever(
            self.run_once,
            self.wake,
            self.next_wake_s,
            lambda: "schedule",
            what=f"batch run of {self.id}",
            log=log,
        )

    async def run_once(self, trigger: str) -> RunStats:
        """One run: settle an interrupted submit, poll the open batches, submit new ones
        within the rate and any Retry-After hold, poll them."""
        async with self.lock:
            started = self.engine.clock_ms()
            t0 = time.monotonic()
            errors0 = self.sender.errors
            stats = RunStats(self.id)
            self.next_wake_ms = None
            await self._resolve_interrupted()
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
                await self._write(
                    lambda conn: sync_report.insert_run(conn, self.id, stats, started, trigger)
                )
                self.last_run, self.last_run_at_ms = stats, started
            self.alerting = await sync_report.alert(
                self.engine, self.id, stats, started, self.alerting
            )
            return stats

    async def _resolve_interrupted(self) -> None:
        """A ``submitting`` batch is a submit whose answer was never stored (the process
        died in between): the cloud may have it or not, and no API we speak can tell. Its
        items go back to ``pending`` with the attempt counted, so the cloud's duplicate
        answer to the resend is taken as "already accepted" (they are :data:`UNSURE`)."""
        pid, stamp = self.id, self._stamp()

        def fn(conn: sqlite3.Connection) -> list[tuple[str, int]]:
            found = []
            for ref, items in conn.execute(
                "SELECT batch_id, items FROM sync_batches WHERE processor = ? "
                "AND state = 'submitting'",
                (pid,),
            ).fetchall():
                n = len(json.loads(items))
                conn.execute(
                    "UPDATE outbox SET state = 'pending', cloud_ref = ?, last_error = ?, "
                    "updated_at = ? WHERE processor = ? AND state = 'inflight' AND cloud_ref = ?",
                    (UNSURE, "submit interrupted; sent again", stamp, pid, ref),
                )
                conn.execute(
                    "UPDATE sync_batches SET state = 'interrupted' WHERE processor = ? "
                    "AND batch_id = ?",
                    (pid, ref),
                )
                found.append((ref, n))
            return found

        for ref, n in await self._write(fn):
            log.warning(
                "%s: submit %s (%d documents) was interrupted before its answer was stored; "
                "its documents are sent again (the cloud answers those it has as duplicates)",
                self.id,
                ref,
                n,
            )

    async def _open_batches(self) -> list[_Open]:
        pid = self.id

        def q(r: Reader) -> list[_Open]:
            out = []
            for batch_id, submitted, items in r.conn.execute(
                "SELECT batch_id, submitted_ms, items FROM sync_batches "
                "WHERE processor = ? AND state = 'open' ORDER BY submitted_ms",
                (pid,),
            ):
                mapping = {d: (c, s) for c, s, d, *_ in json.loads(items)}
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

    async def _fetch(self, after: tuple[str, int]) -> list[tuple[int, bool, Record]]:
        pid, limit = self.id, self.settings.page_records

        def q(r: Reader) -> list[tuple[int, bool, Record]]:
            rows = r.conn.execute(
                "SELECT o.attempts, o.cloud_ref, r.body, r.hash, r.sig FROM outbox o "
                "JOIN records r ON r.chain = o.chain AND r.seq = o.seq WHERE o.processor = ? "
                "AND o.state = 'pending' AND (o.chain, o.seq) > (?, ?) "
                "ORDER BY o.chain, o.seq LIMIT ?",
                (pid, after[0], after[1], limit),
            ).fetchall()
            return [
                (a, ref == UNSURE, Record.from_body(json.loads(b), h, s))
                for a, ref, b, h, s in rows
            ]

        reads = self.engine.reads
        assert reads is not None
        return await reads.run(q)

    async def _submit_pending(self, stats: RunStats, opened: list[_Open]) -> None:
        """Submit what is pending, within the rate and any hold; batches still open go into
        ``opened``. A submit the cloud did not take ends it (``run_error``)."""
        limits = self.sender.limits
        after = ("", 0)
        while True:
            page = await self._fetch(after)
            if not page:
                return
            after = (page[-1][2].chain, page[-1][2].seq)
            docs: list[_Item] = []
            settle: list[tuple[str, int, str, str | None]] = []  # chain, seq, state, error
            for attempts, unsure, rec in page:
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
                    docs.append(_Item(attempts, unsure, rec, doc))
            if settle:
                await self._settle(settle)
                refused = [(c, s, e) for c, s, st, e in settle if st == "review"]
                stats.rejected += len(refused)
                stats.chains.update(c for c, _, _ in refused)
                for chain, seq, err in refused:
                    await sync_report.rejected(
                        self.engine,
                        self.id,
                        chain,
                        seq,
                        err or "",
                        attempt=f"local-{uuid.uuid4().hex[:12]}",
                    )
            for idx in cut_batches([d.doc.size_bytes for d in docs], limits):
                if self._held():
                    return
                batch = [docs[i] for i in idx]
                now = self.engine.clock_ms()
                window_ms = int(self.settings.rate_window_s * 1000)
                wait = rate_wait_ms(
                    self.sent_ms, now, limit=self.settings.rate_limit, window_ms=window_ms
                )
                if wait > 0:
                    self.next_wake_ms = now + wait
                    return
                ref = await self._intend(batch, now, window_ms)
                try:
                    sub = await self.sender.submit([d.doc for d in batch])
                except CloudError as exc:
                    await self._refused(ref, batch, exc, stats)
                    return
                stats.batches_created += 1
                if any(d.attempts > 0 for d in batch):
                    stats.batches_retried += 1
                stats.chains.update(d.rec.chain for d in batch)
                o = await self._record_batch(ref, sub, batch)
                done = [
                    (o.items[d][0], o.items[d][1], r)
                    for d, r in sub.results.items()
                    if d in o.items and r.state != PENDING
                ]
                if done:
                    self._count(await self._apply(done, o.batch_id), stats)
                o.left -= {d for d, r in sub.results.items() if r.state != PENDING}
                if o.left:
                    opened.append(o)
                else:
                    await self._close(o.batch_id, "done")

    def _count(self, done: list[tuple[str, int, ItemResult]], stats: RunStats) -> None:
        for chain, _, r in done:
            stats.chains.add(chain)
            if r.state == ACCEPTED:
                stats.accepted += 1
            elif r.state == REVIEW:
                stats.rejected += 1
            else:
                stats.failed += 1

    async def _intend(self, batch: list[_Item], now_ms: int, window_ms: int) -> str:
        """Before the submit call leaves, in one transaction: spend the rate token, write the
        batch as ``submitting`` under a local reference, put its items ``inflight`` under it
        and count the attempt. Returns the reference."""
        keep = rate_keep(
            [*self.sent_ms, now_ms], now_ms, limit=self.settings.rate_limit, window_ms=window_ms
        )
        ref = f"submitting:{uuid.uuid4().hex}"
        # the 4th element: the item was UNSURE (see _apply)
        items = [(d.rec.chain, d.rec.seq, d.doc.doc_id, int(d.unsure)) for d in batch]
        pid, stamp = self.id, format_time(now_ms)

        def fn(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM sync_rate WHERE processor = ?", (pid,))
            conn.executemany(
                "INSERT INTO sync_rate (processor, sent_ms) VALUES (?, ?)", [(pid, t) for t in keep]
            )
            conn.execute(
                "INSERT INTO sync_batches (processor, batch_id, state, submitted_ms, items) "
                "VALUES (?, ?, 'submitting', ?, ?)",
                (pid, ref, now_ms, json.dumps(items)),
            )
            conn.executemany(
                "UPDATE outbox SET state = 'inflight', cloud_ref = ?, attempts = attempts + 1, "
                "updated_at = ? WHERE processor = ? AND chain = ? AND seq = ?",
                [(ref, stamp, pid, c, s) for c, s, _, _ in items],
            )

        await self._write(fn)
        self.sent_ms = keep
        return ref

    async def _refused(
        self, ref: str, batch: list[_Item], exc: CloudError, stats: RunStats
    ) -> None:
        """The submit call failed. An answer that says the batch was not taken (429, 401,
        4xx) takes the attempt back and leaves each item as unsure as it was; a timeout, a
        dropped connection or a 5xx may have gone through: the attempt stays counted and the
        items become :data:`UNSURE` (a duplicate answer later is "already accepted"). A 429
        holds every request until its Retry-After. The items are pending again; apart from a
        429 (nothing failed: the cloud asked us to wait) they count as failed."""
        error = f"{exc.code}: {exc.message}"[:500]
        maybe_sent = isinstance(exc, CloudUnavailable)
        busy = exc if isinstance(exc, CloudBusy) else None
        pid, stamp = self.id, self._stamp()
        keys = [(d.rec.chain, d.rec.seq) for d in batch]

        def fn(conn: sqlite3.Connection) -> int:
            conn.executemany(
                "UPDATE outbox SET state = 'pending', cloud_ref = ?, last_error = ?, "
                "attempts = attempts - ?, updated_at = ? "
                "WHERE processor = ? AND chain = ? AND seq = ? AND cloud_ref = ?",
                [
                    (
                        UNSURE if maybe_sent or d.unsure else None,
                        error,
                        0 if maybe_sent else 1,
                        stamp,
                        pid,
                        d.rec.chain,
                        d.rec.seq,
                        ref,
                    )
                    for d in batch
                ],
            )
            conn.execute(
                "UPDATE sync_batches SET state = ? WHERE processor = ? AND batch_id = ?",
                ("unknown" if maybe_sent else "refused", pid, ref),
            )
            return self._hold(conn, busy) if busy is not None else 0

        until = await self._write(fn)
        if busy is not None:
            self.hold_until_ms = self.next_wake_ms = until
            error += f"; holding every request until {format_time(until)}"
            log.warning("%s: %s", self.id, error)
        else:
            stats.batches_created += 1
            stats.failed += len(batch)
            stats.chains.update(c for c, _ in keys)
            if any(d.attempts > 0 for d in batch):
                stats.batches_retried += 1
        stats.run_error = error

    async def _settle(self, rows: list[tuple[str, int, str, str | None]]) -> None:
        stamp, pid = self._stamp(), self.id

        def fn(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE outbox SET state = ?, last_error = ?, updated_at = ? "
                "WHERE processor = ? AND chain = ? AND seq = ?",
                [(st, err, stamp, pid, c, s) for c, s, st, err in rows],
            )

        await self._write(fn)

    async def _record_batch(self, ref: str, sub: Submission, batch: list[_Item]) -> _Open:
        """The submit answered: its batch id replaces the local reference (``open``)."""
        items = [(d.rec.chain, d.rec.seq, d.doc.doc_id) for d in batch]
        now, pid = self.engine.clock_ms(), self.id

        def fn(conn: sqlite3.Connection) -> None:
            # a cloud that reuses an id (a restarted simulator) must not hide the new batch
            conn.execute(
                "DELETE FROM sync_batches WHERE processor = ? AND batch_id = ?",
                (pid, sub.batch_id),
            )
            conn.execute(
                "UPDATE sync_batches SET batch_id = ?, state = 'open', submitted_ms = ? "
                "WHERE processor = ? AND batch_id = ?",
                (sub.batch_id, now, pid, ref),
            )
            conn.execute(
                "UPDATE outbox SET cloud_ref = ? WHERE processor = ? AND state = 'inflight' "
                "AND cloud_ref = ?",
                (sub.batch_id, pid, ref),
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
        """Poll every open batch until each item is final or the batch times out. Under a
        hold (a 429) polling stops; the batches stay open for a later run."""
        timeout_ms = int(self.settings.poll_timeout_s * 1000)
        live = [o for o in opened if o.left]
        for o in opened:
            if not o.left:
                await self._close(o.batch_id, "done")
        while live:
            await asyncio.sleep(self.settings.poll_interval_s)
            still = []
            for o in live:
                if self._held():
                    return
                try:
                    results = await self.sender.poll(o.batch_id, sorted(o.left))
                except CloudBusy as exc:
                    self.hold_until_ms = self.next_wake_ms = await self._write(
                        lambda conn, exc=exc: self._hold(conn, exc)
                    )
                    log.warning("%s poll of %s: %s; holding", self.id, o.batch_id, exc.message)
                    return
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
                    self._count(await self._apply(done, o.batch_id), stats)
                    o.left -= {d for d, r in results.items() if r.state != PENDING}
                if not o.left:
                    await self._close(o.batch_id, "done")
                elif self.engine.clock_ms() - o.submitted_ms >= timeout_ms:
                    err = f"batch {o.batch_id} not final after {self.settings.poll_timeout_s:g} s"
                    # the cloud may still process them: a duplicate answer later is ours
                    lost = [
                        (o.items[d][0], o.items[d][1], ItemResult(FAILED, UNSURE, err))
                        for d in sorted(o.left)
                    ]
                    self._count(await self._apply(lost, o.batch_id), stats)
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
            # a review item's earlier submits all have a verdict: it is not UNSURE
            cur = conn.execute(
                "UPDATE outbox SET state = 'pending', cloud_ref = NULL, updated_at = ? "
                "WHERE processor = ? AND chain = ? AND seq = ? AND state = 'review'",
                (stamp, pid, chain, seq),
            )
            return cur.rowcount

        n = await self._write(fn)
        if n:
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
        return bool(n)

    def status(self) -> dict[str, Any]:
        return {
            "processor": self.id,
            "shape": "batch",
            "last_error": self.last_error,
            "alert": self.alerting,
            "needs_review": self.review_count,
            "hold_until": format_time(self.hold_until_ms)
            if self.hold_until_ms > self.engine.clock_ms()
            else None,
            "last_run": self.last_run.result_json() if self.last_run else None,
            "last_run_at": format_time(self.last_run_at_ms)
            if self.last_run_at_ms is not None
            else None,
        }
