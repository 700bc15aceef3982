"""The sync engine: drains the outbox to the registered cloud processors (DESIGN.md §5–6).

The ledger writer puts one ``outbox`` row per record and processor in the record's own
transaction, with an idempotency key fixed then; those rows are the only queue. Signing never
waits for this module: it reads with the read pool, and every write of sync state (a record
accepted or rejected, an uplink state, a run's stats) goes through the ledger writer — so the
engine never competes with signing for SQLite's write lock. Accepted records are written in
ranges, at most every ``sync.flush_interval_s``, as a low-priority write
(``Ledger.write_soon``: in the next sale's group commit, no fsync of their own); after a
crash the unwritten ones are sent again under their fixed keys and the cloud answers from
its idempotency cache (no duplicate). Uplink states and run stats go through
``ledger.control`` at once (between two group commits): they decide how the next record is
flagged. The replay steps aside while POS requests are in flight
(``SyncEngine.yield_to_pos``, bounded), so a sale never waits behind replay work.

A processor is registered under a ``country/system`` id. :class:`RealtimeProcessor` is the
real-time shape: per chain, records go up strictly in ``seq`` order, one at a time; each
chain has an uplink state (gateway.core.uplink: online → offline → replaying → online, or
stopped after a permanent rejection); records signed while a chain is not online are flagged
``offline`` by the writer (:meth:`SyncEngine.is_offline`) and replayed with
``X-Replay-Remaining`` / ``X-Replay-Hash`` (gateway.core.replay). The move back to online is
decided inside the writer thread, when no record is left, so no record can fall between "the
last offline record went up" and "new records are online". Each processor runs on its own
schedule (``interval_s``), at once when something was signed, when an offline uplink is due
for a probe (capped exponential backoff with jitter), and when the admin API asks. Every run
is a row of ``sync_runs`` (per-run stats; the admin API sums the last 24 h).

The offline budget (gateway.core.offline_budget) is checked inside the writer for every POS
record (:meth:`SyncEngine.guard`), shown in every sign reply (:meth:`SyncEngine.budget`) and
in the status (:meth:`SyncEngine.status`).

What this module leaves to others: HTTP and the cloud's formats (drivers/cloud/*), the
meaning of an answer (gateway.core.sync_policy), the admin API's HTTP side (gateway.admin).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from gateway import sync_report
from gateway.core.errors import (
    CloudError,
    CloudRejected,
    GatewayError,
    OfflineLimitReached,
)
from gateway.core.events import budget_event, uplink_event
from gateway.core.offline_budget import PROTOCOL_MAX_PENDING, Budget, BudgetLimits, assess, worst
from gateway.core.record import Record, format_time, parse_time
from gateway.core.replay import replay_headers
from gateway.core.sync_policy import PartialSend, RunStats, SendOutcome, stats_json
from gateway.core.uplink import (
    OFFLINE,
    ONLINE,
    REPLAYING,
    STOPPED,
    Uplink,
    on_drained,
    on_failure,
    on_rejected,
    on_resume,
    on_success,
)
from gateway.ledger import Entry, Ledger, WriterView
from gateway.reads import ReadPool
from gateway.store import Reader
from gateway.wakeups import run_forever, wait_event

if TYPE_CHECKING:
    from gateway.batch_sync import BatchProcessor

log = logging.getLogger("gateway.sync")

PROCESSOR_ID_RE = re.compile(r"^[a-z0-9_-]{1,32}/[a-z0-9_-]{1,32}$")
#: The processor-level uplink row (reachability of the cloud as a whole).
ANY_CHAIN = "*"
DAY_MS = 24 * 3600 * 1000


class Sender(Protocol):
    """One cloud API's real-time client (drivers/cloud/*)."""

    processor_id: str

    @property
    def errors(self) -> int:
        """Failed HTTP exchanges so far, retried ones included."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def probe(self) -> None:
        """Reach the cloud (e.g. fetch a token); raises CloudError."""

    async def send(
        self, record: Record, key: str, replay: dict[str, str], cloud_ref: str | None
    ) -> SendOutcome:
        """Send one record; raises CloudError or PartialSend."""


@dataclass(frozen=True, slots=True)
class ProcessorSettings:
    interval_s: float = 60.0
    probe_min_s: float = 1.0
    probe_max_s: float = 300.0
    page_records: int = 200
    #: liveness probe of an online uplink after this long without any exchange (docs/sync.md)
    idle_probe_s: float = 30.0


@dataclass(frozen=True, slots=True)
class EngineSettings:
    limits: BudgetLimits = field(default_factory=BudgetLimits)
    alert_failure_rate: float = 0.1
    flush_interval_s: float = 0.2
    flush_max_records: int = 500


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class _Row:
    """A pending outbox row. The record is parsed when it is about to be sent, on the event
    loop, one at a time (~40 µs), not a page at once in a read thread: a page of 200 parsed
    there held the GIL for milliseconds in one go, in the way of every sale signed meanwhile."""

    seq: int
    key: str
    cloud_ref: str | None
    attempts: int
    body: bytes
    hash: str
    sig: str
    time: str

    def record(self) -> Record:
        return Record.from_body(json.loads(self.body), self.hash, self.sig)


@dataclass(slots=True)
class _Writes:
    """Sync state waiting to be written (one transaction through ledger.control)."""

    acks: dict[str, tuple[int, int]] = field(default_factory=dict)  # chain → (lo, hi)
    marks: list[tuple[str, int, str, str | None, str | None]] = field(default_factory=list)
    first_ack_mono: float | None = None

    def empty(self) -> bool:
        return not self.acks and not self.marks


class RealtimeProcessor:
    """One real-time uplink (e.g. ``france/fiskaly``)."""

    def __init__(self, engine: SyncEngine, sender: Sender, settings: ProcessorSettings) -> None:
        if not PROCESSOR_ID_RE.match(sender.processor_id):
            raise ValueError(f"processor id {sender.processor_id!r} is not country/system")
        self.id = sender.processor_id
        self.engine = engine
        self.sender = sender
        self.settings = settings
        self.uplinks: dict[str, Uplink] = {}
        #: every seq <= acked[chain] is final here (accepted or rejected), as far as we know
        self.acked: dict[str, int] = {}
        #: (seq, time ms) of the oldest unsent record of a chain, when known
        self.oldest: dict[str, tuple[int, int]] = {}
        self.lock = asyncio.Lock()
        self.wake = asyncio.Event()
        self.alerting = False
        self.last_run: RunStats | None = None
        self.last_run_at_ms: int | None = None
        #: monotonic time of the last answer from the cloud (a probe or an accepted record)
        self.last_contact = time.monotonic()
        self._writes = _Writes()
        #: accepted-marks handed to the writer as a low-priority write (Ledger.write_soon)
        self._ack_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ state

    def uplink(self, chain: str) -> Uplink:
        u = self.uplinks.get(chain)
        if u is not None:
            return u
        cloud = self.uplinks.get(ANY_CHAIN)
        if cloud is not None and cloud.state != ONLINE:
            return Uplink(OFFLINE, cloud.since_ms, 0, 0, cloud.last_error)
        return Uplink(ONLINE)

    def pending(self, chain: str, head_seq: int) -> int:
        return max(0, head_seq - self.acked.get(chain, 0))

    def load(self, conn: sqlite3.Connection, heads: dict[str, int]) -> None:
        """Restore uplink states and the acknowledged position of every chain."""
        for chain, state, since, failures, probe, err in conn.execute(
            "SELECT chain, state, since_ms, failures, next_probe_ms, last_error "
            "FROM sync_uplink WHERE processor = ?",
            (self.id,),
        ):
            self.uplinks[chain] = Uplink(state, since, failures, probe, err)
        pending = dict(
            conn.execute(
                "SELECT chain, min(seq) FROM outbox WHERE processor = ? AND state = 'pending' "
                "GROUP BY chain",
                (self.id,),
            ).fetchall()
        )
        for chain, head in heads.items():
            self.acked[chain] = pending[chain] - 1 if chain in pending else head
        for chain, first in pending.items():
            self.acked.setdefault(chain, first - 1)
        # after a restart the cloud is probed at once whatever the backoff said
        for chain, u in list(self.uplinks.items()):
            if u.state == OFFLINE:
                self.uplinks[chain] = replace(u, next_probe_ms=0)

    # ------------------------------------------------------------------ writes

    def _ack(self, chain: str, seq: int) -> None:
        w = self._writes
        lo_hi = w.acks.get(chain)
        w.acks[chain] = (lo_hi[0] if lo_hi else seq, seq)
        if w.first_ack_mono is None:
            w.first_ack_mono = time.monotonic()

    def _due_flush(self) -> bool:
        w = self._writes
        if w.first_ack_mono is None:
            return False
        span = sum(hi - lo + 1 for lo, hi in w.acks.values())
        return (
            span >= self.engine.settings.flush_max_records
            or time.monotonic() - w.first_ack_mono >= self.engine.settings.flush_interval_s
        )

    def _mark_done(
        self, conn: sqlite3.Connection, acks: dict[str, tuple[int, int]], stamp: str
    ) -> None:
        for chain, (lo, hi) in acks.items():
            conn.execute(
                "UPDATE outbox SET state = 'done', attempts = attempts + 1, "
                "last_error = NULL, updated_at = ? WHERE processor = ? AND chain = ? "
                "AND seq BETWEEN ? AND ? AND state = 'pending'",
                (stamp, self.id, chain, lo, hi),
            )

    def _flush_acks_soon(self) -> None:
        """Hand the accepted-marks to the writer as a low-priority write: they ride in the
        next sale's group commit (no commit, no fsync of their own while the tills sign), or
        get their own transaction within ``Ledger.defer_max_s``. The replay does not wait for
        it; while one is waiting, new marks accumulate for the next. If it fails, its marks
        are kept for the next write (until then the records stay pending in the database and
        a restart would send them again: the cloud answers from its idempotency cache)."""
        if self._ack_task is not None and not self._ack_task.done():
            return
        acks = dict(self._writes.acks)
        if not acks:
            return
        self._writes.acks.clear()
        self._writes.first_ack_mono = None
        ledger = self.engine.ledger
        assert ledger is not None
        stamp = format_time(self.engine.clock_ms())

        async def flush() -> None:
            try:
                await ledger.write_soon(lambda conn: self._mark_done(conn, acks, stamp))
            except GatewayError as exc:
                log.warning("accepted-marks of %s not written yet: %s", self.id, exc.message)
                for chain, (lo, hi) in acks.items():
                    cur = self._writes.acks.get(chain)
                    self._writes.acks[chain] = (
                        (min(lo, cur[0]), max(hi, cur[1])) if cur else (lo, hi)
                    )

        self._ack_task = asyncio.create_task(flush(), name=f"acks {self.id}")

    async def settle(self) -> None:
        """Wait for the accepted-marks handed to the writer (shutdown)."""
        if self._ack_task is not None:
            await self._ack_task

    async def write(
        self,
        *,
        uplinks: dict[str, Uplink] | None = None,
        drained: Sequence[str] = (),
        run: tuple[RunStats, int, str] | None = None,
    ) -> None:
        """Write pending acks and marks, new uplink states, ``drained`` chains (online if
        nothing was signed since) and a run, in one transaction in the writer thread."""
        writes, self._writes = self._writes, _Writes()
        ledger = self.engine.ledger
        assert ledger is not None
        now = self.engine.clock_ms()
        stamp = format_time(now)
        states = dict(uplinks or {})

        def fn(conn: sqlite3.Connection) -> None:
            for chain in drained:
                u = states.get(chain, self.uplink(chain))
                if u.state not in (OFFLINE, REPLAYING):
                    continue
                row = conn.execute("SELECT seq FROM heads WHERE chain = ?", (chain,)).fetchone()
                if (row[0] if row else 0) <= self.acked.get(chain, 0):
                    states[chain] = on_drained(replace(u, state=REPLAYING), now)
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._mark_done(conn, writes.acks, stamp)
                for chain, seq, state, error, ref in writes.marks:
                    conn.execute(
                        "UPDATE outbox SET state = ?, attempts = attempts + 1, last_error = ?, "
                        "cloud_ref = coalesce(?, cloud_ref), updated_at = ? "
                        "WHERE processor = ? AND chain = ? AND seq = ?",
                        (state, error, ref, stamp, self.id, chain, seq),
                    )
                for chain, u in states.items():
                    conn.execute(
                        "INSERT OR REPLACE INTO sync_uplink (processor, chain, state, since_ms, "
                        "failures, next_probe_ms, last_error) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            self.id,
                            chain,
                            u.state,
                            u.since_ms,
                            u.failures,
                            u.next_probe_ms,
                            u.last_error,
                        ),
                    )
                if run is not None:
                    s, started_ms, trigger = run
                    sync_report.insert_run(conn, self.id, s, started_ms, trigger)
                conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            # in the writer thread, after the commit: the records signed from now on see it,
            # and the event journal is told of each transition as it happens (it only queues)
            olds = {
                chain: self.uplinks.get(chain) if chain == ANY_CHAIN else self.uplink(chain)
                for chain in states
            }
            # chains without a row of their own follow the cloud's row: they move with it
            implicit = {}
            if ANY_CHAIN in states:
                implicit = {
                    c: self.uplink(c)
                    for c in ledger.heads()
                    if c not in self.uplinks and c not in states
                }
            for chain, u in states.items():
                old = olds[chain]
                if old != u:
                    log.info(
                        "uplink %s %s: %s",
                        self.id,
                        chain,
                        u.state,
                        extra={"chain": chain, "processor": self.id, "state": u.state},
                    )
                self.uplinks[chain] = u
                if chain != ANY_CHAIN and old is not None:
                    self.engine.uplink_changed(self.id, chain, old.state, u)
            for chain, was in implicit.items():
                now_u = self.uplink(chain)
                if now_u.state != was.state:
                    self.uplinks[chain] = now_u
                    self.engine.uplink_changed(self.id, chain, was.state, now_u)

        if writes.empty() and not states and not drained and run is None:
            return
        await ledger.control(fn)

    # ------------------------------------------------------------------ runs

    def idle_probe_in_s(self) -> float | None:
        """Seconds until the liveness probe of an online uplink that has had no exchange for
        ``idle_probe_s`` (0: due now); None while the cloud is not online (offline uplinks
        have their own probe schedule)."""
        cloud = self.uplinks.get(ANY_CHAIN, Uplink(ONLINE))
        if cloud.state != ONLINE:
            return None
        return max(0.0, self.last_contact + self.settings.idle_probe_s - time.monotonic())

    def next_wake_s(self, now_ms: int) -> float:
        due = [
            u.next_probe_ms
            for u in self.uplinks.values()
            if u.state == OFFLINE and u.next_probe_ms > 0
        ]
        wait_s = self.settings.interval_s
        if due:
            wait_s = min(wait_s, max(0.0, (min(due) - now_ms) / 1000.0))
        idle = self.idle_probe_in_s()
        if idle is not None:
            wait_s = min(wait_s, idle)
        return wait_s

    def _timed_trigger(self) -> str:
        idle = self.idle_probe_in_s()
        return "probe" if idle is not None and idle <= 0.0 else "schedule"

    async def loop(self) -> None:
        await run_forever(
            self.run_once,
            self.wake,
            lambda: self.next_wake_s(self.engine.clock_ms()),
            self._timed_trigger,
            what=f"sync run of {self.id}",
            log=log,
        )

    async def run_once(self, trigger: str) -> RunStats:
        """One run: probe if due, drain every chain that has work. Returns its stats."""
        async with self.lock:
            started = self.engine.clock_ms()
            t0 = time.monotonic()
            errors0 = self.sender.errors
            stats = RunStats(self.id)
            forced = trigger in ("admin", "start")
            states: dict[str, Uplink] = {}
            cloud = self.uplinks.get(ANY_CHAIN, Uplink(ONLINE))
            # "probe": the uplink is online but nothing went up for idle_probe_s; without a
            # look now an outage would go unnoticed until the next record (docs/sync.md)
            if forced or trigger == "probe" or (cloud.state == OFFLINE and cloud.may_send(started)):
                try:
                    await self.sender.probe()
                except CloudError as exc:
                    stats.run_error = f"{exc.code}: {exc.message}"
                    states = self._fail_all(exc, started)
                else:
                    self.last_contact = time.monotonic()
                    if cloud.state != ONLINE:
                        # written now, not with the run's end: a send failing in this run
                        # takes the cloud offline again, and the end must not undo that
                        await self.write(
                            uplinks={ANY_CHAIN: on_success(cloud, started, offline_waiting=False)}
                        )
                        for chain, u in self.uplinks.items():
                            if u.state == OFFLINE and chain != ANY_CHAIN:
                                self.uplinks[chain] = replace(u, next_probe_ms=0)
            drained: list[str] = []
            cloud = self.uplinks.get(ANY_CHAIN, Uplink(ONLINE))
            if stats.run_error is None and (states.get(ANY_CHAIN, cloud).state == ONLINE):
                chains = self._chains_with_work(forced)
                if chains:
                    results = await asyncio.gather(
                        *(self._drain(c, stats, forced) for c in chains), return_exceptions=True
                    )
                    for chain, res in zip(chains, results, strict=True):
                        if isinstance(res, asyncio.CancelledError):
                            raise res
                        if isinstance(res, BaseException):
                            # a bug or a storage problem, not the cloud: back off like a
                            # failure so the chain is tried again, and make it visible
                            log.error("draining %s %s failed: %r", self.id, chain, res)
                            stats.run_error = f"{type(res).__name__}: {res}"
                            u = self.uplink(chain)
                            s = self.settings
                            states[chain] = on_failure(
                                u,
                                started,
                                f"internal error: {type(res).__name__}: {res}",
                                min_s=s.probe_min_s,
                                max_s=s.probe_max_s,
                                rand=self.engine.rand(),
                            )
                        elif res:
                            drained.append(chain)
            stats.errors_count = self.sender.errors - errors0
            stats.duration_ms = int((time.monotonic() - t0) * 1000)
            stats.check_alert(self.engine.settings.alert_failure_rate)
            record_run = stats.items > 0 or stats.run_error is not None or trigger == "admin"
            await self.write(
                uplinks=states,
                drained=drained,
                run=(stats, started, trigger) if record_run else None,
            )
            if record_run:
                self.last_run, self.last_run_at_ms = stats, started
            await self._alert(stats, started)
            return stats

    def _chains_with_work(self, forced: bool) -> list[str]:
        ledger = self.engine.ledger
        assert ledger is not None
        now = self.engine.clock_ms()
        out = []
        for chain, head in ledger.heads().items():
            u = self.uplink(chain)
            if u.state == STOPPED:
                continue
            has_work = self.pending(chain, head.seq) > 0 or u.state in (OFFLINE, REPLAYING)
            if has_work and (forced or u.may_send(now)):
                out.append(chain)
        return sorted(out)

    def _fail_all(self, exc: CloudError, now_ms: int) -> dict[str, Uplink]:
        """The cloud cannot be reached: every chain (and the processor) goes offline."""
        s = self.settings
        states = {}
        ledger = self.engine.ledger
        assert ledger is not None
        for chain in {ANY_CHAIN, *ledger.heads(), *list(self.uplinks)}:
            u = self.uplinks.get(chain) or self.uplink(chain)
            if u.state == STOPPED:
                continue
            states[chain] = on_failure(
                u,
                now_ms,
                f"{exc.code}: {exc.message}",
                min_s=s.probe_min_s,
                max_s=s.probe_max_s,
                rand=self.engine.rand(),
            )
        return states

    async def _fetch(
        self, chain: str, cursor: int, scan_hi: int, offline_after: int
    ) -> tuple[list[_Row], int, int]:
        """The next page of pending records after ``cursor`` (seq order), and the count of
        offline records waiting after ``cursor``, scanning only rows new since ``scan_hi``."""
        limit = self.settings.page_records
        pid = self.id

        def q(r: Reader) -> tuple[list[_Row], int, int]:
            c = r.conn
            (hi,) = c.execute(
                "SELECT max(seq) FROM outbox WHERE processor = ? AND chain = ? "
                "AND state = 'pending'",
                (pid, chain),
            ).fetchone()
            hi = max(hi or 0, scan_hi)
            added = 0
            if hi > scan_hi:
                (added,) = c.execute(
                    "SELECT count(*) FROM outbox o JOIN records r "
                    "ON r.chain = o.chain AND r.seq = o.seq WHERE o.processor = ? "
                    "AND o.chain = ? AND o.state = 'pending' AND o.seq > ? AND o.seq <= ? "
                    "AND json_extract(CAST(r.body AS TEXT), '$.offline') = 1",
                    (pid, chain, max(scan_hi, cursor), hi),
                ).fetchone()
            rows = c.execute(
                "SELECT o.seq, o.idempotency_key, o.cloud_ref, o.attempts, r.body, r.hash, "
                "r.sig, r.time FROM outbox o JOIN records r ON r.chain = o.chain AND r.seq = o.seq "
                "WHERE o.processor = ? AND o.chain = ? AND o.state = 'pending' AND o.seq > ? "
                "AND o.seq <= ? ORDER BY o.seq LIMIT ?",
                (pid, chain, cursor, hi, limit),
            ).fetchall()
            page = [_Row(*row) for row in rows]
            return page, offline_after + added, hi

        reads = self.engine.reads
        assert reads is not None
        return await reads.run(q)

    async def _drain(self, chain: str, stats: RunStats, forced: bool) -> bool:
        """Send a chain's pending records in order; True when nothing is left."""
        cursor = self.acked.get(chain, 0)
        scan_hi, offline_after = cursor, 0
        first = True
        while True:
            page, offline_after, scan_hi = await self._fetch(chain, cursor, scan_hi, offline_after)
            if not page:
                self.oldest.pop(chain, None)
                return True
            if first:
                first = False
                stats.batches_created += 1
                if page[0].attempts > 0:
                    stats.batches_retried += 1
                stats.chains.add(chain)
            for i, row in enumerate(page):
                rec = row.record()
                if rec.offline:
                    offline_after -= 1
                replay = replay_headers(max(0, offline_after), rec.hash) if rec.offline else {}
                await self.engine.yield_to_pos()
                try:
                    await self.sender.send(rec, row.key, replay, row.cloud_ref)
                except (CloudError, PartialSend) as exc:
                    await self._failed(chain, row, exc, stats)
                    return False
                stats.accepted += 1
                self.last_contact = time.monotonic()
                self.acked[chain] = row.seq
                self._ack(chain, row.seq)
                nxt = page[i + 1] if i + 1 < len(page) else None
                if nxt is not None:
                    self.oldest[chain] = (nxt.seq, parse_time(nxt.time))
                else:
                    self.oldest.pop(chain, None)
                u = self.uplink(chain)
                if u.state == OFFLINE:
                    await self.write(
                        uplinks={chain: on_success(u, self.engine.clock_ms(), offline_waiting=True)}
                    )
                elif self._due_flush():
                    self._flush_acks_soon()
                cursor = row.seq

    async def _failed(
        self, chain: str, row: _Row, exc: CloudError | PartialSend, stats: RunStats
    ) -> None:
        ref = exc.cloud_ref if isinstance(exc, PartialSend) else None
        cause = exc.cause if isinstance(exc, PartialSend) else exc
        message = f"{type(cause).__name__}: {cause}"
        if isinstance(cause, CloudError):
            message = f"{cause.code}: {cause.message}"
        now = self.engine.clock_ms()
        u = self.uplink(chain)
        if isinstance(cause, CloudRejected):
            stats.rejected += 1
            log.error(
                "%s rejected %s seq %d for good: %s; the chain's uplink is stopped",
                self.id,
                chain,
                row.seq,
                message,
                extra={"chain": chain, "seq": row.seq, "processor": self.id},
            )
            self.acked[chain] = row.seq
            self._writes.marks.append((chain, row.seq, "rejected", message, ref))
            await self.write(uplinks={chain: on_rejected(u, now, message)})
            await sync_report.rejected(self.engine, self.id, chain, row.seq, message)
            return
        stats.failed += 1
        log.warning(
            "%s could not send %s seq %d: %s",
            self.id,
            chain,
            row.seq,
            message,
            extra={"chain": chain, "seq": row.seq, "processor": self.id},
        )
        self._writes.marks.append((chain, row.seq, "pending", message, ref))
        s = self.settings
        rand = self.engine.rand()
        # a failure that outlasted its retries says the cloud is not there (or refuses our
        # credentials): the chain and the processor go offline and are probed later
        cloud = self.uplinks.get(ANY_CHAIN, Uplink(ONLINE))
        states = {
            chain: on_failure(u, now, message, min_s=s.probe_min_s, max_s=s.probe_max_s, rand=rand),
            ANY_CHAIN: on_failure(
                cloud, now, message, min_s=s.probe_min_s, max_s=s.probe_max_s, rand=rand
            ),
        }
        await self.write(uplinks=states)

    async def _alert(self, stats: RunStats, now_ms: int) -> None:
        self.alerting = await sync_report.alert(self.engine, self.id, stats, now_ms, self.alerting)

    async def resume(self, chain: str) -> Uplink:
        u = self.uplink(chain)
        if u.state != STOPPED:
            return u
        new = on_resume(u, self.engine.clock_ms())
        await self.write(uplinks={chain: new})
        self.wake.set()
        return new


#: ``on_event(code, chain=..., **fields)``: the app's event journal (it only queues).
EventSink = Callable[..., None]
#: Longest a record's send waits for POS requests in flight to be answered (docs/sync.md,
#: "Sharing the box with the tills"): a till that never pauses slows the replay, never stops it.
POS_YIELD_MAX_S = 0.02
#: Seconds between looks at the offline budgets' age levels (count levels are looked at
#: as soon as records are signed).
BUDGET_WATCH_S = 1.0


class SyncEngine:
    """The registry of processors and everything the rest of the daemon asks of sync."""

    def __init__(
        self,
        settings: EngineSettings,
        *,
        clock_ms: Callable[[], int] = _now_ms,
        rand: Callable[[], float] = random.random,
        on_event: EventSink | None = None,
    ) -> None:
        self.settings = settings
        self.clock_ms = clock_ms
        self.rand = rand
        #: told of every uplink transition and budget level reached, as it happens
        #: (UPLINK_OFFLINE, UPLINK_ONLINE, OFFLINE_WARNING, OFFLINE_LIMIT; docs/events.md)
        self.on_event = on_event
        #: (processor, chain) → the budget level last reported
        self._levels: dict[tuple[str, str], str] = {}
        self._budget_wake = asyncio.Event()
        #: POS requests being answered now (pos_begin / pos_end, from the app's dispatcher)
        self.pos_inflight = 0
        self._pos_idle = asyncio.Event()
        self._pos_idle.set()
        self.processors: dict[str, RealtimeProcessor] = {}
        #: the batch-shaped processors (gateway.batch_sync); not in the offline budget
        self.batch_processors: dict[str, BatchProcessor] = {}
        self.ledger: Ledger | None = None
        self.reads: ReadPool | None = None

    # ------------------------------------------------------------------ registry

    def register(self, sender: Sender, settings: ProcessorSettings) -> RealtimeProcessor:
        if sender.processor_id in self.processors:
            raise ValueError(f"processor {sender.processor_id} is already registered")
        p = RealtimeProcessor(self, sender, settings)
        self.processors[p.id] = p
        return p

    def register_batch(self, processor: BatchProcessor) -> BatchProcessor:
        if not PROCESSOR_ID_RE.match(processor.id):
            raise ValueError(f"processor id {processor.id!r} is not country/system")
        if processor.id in self.processors or processor.id in self.batch_processors:
            raise ValueError(f"processor {processor.id} is already registered")
        self.batch_processors[processor.id] = processor
        return processor

    def processor_ids(self) -> tuple[str, ...]:
        return tuple(self.processors) + tuple(self.batch_processors)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, ledger: Ledger, reads: ReadPool) -> None:
        """Load the persisted state (the ledger is open, its migrations applied)."""
        self.ledger = ledger
        self.reads = reads
        heads = {c: h.seq for c, h in ledger.heads().items()}

        def load(conn: sqlite3.Connection) -> None:
            for p in self.processors.values():
                p.load(conn, heads)
            for b in self.batch_processors.values():
                b.load(conn)

        await ledger.control(load)
        # a state seen bad at start-up is recorded too: a restart hides nothing
        for p in self.processors.values():
            for chain in sorted((set(heads) | set(p.uplinks)) - {ANY_CHAIN}):
                self.uplink_changed(p.id, chain, ONLINE, p.uplink(chain))
        for p in self.processors.values():
            await p.sender.start()
        for b in self.batch_processors.values():
            await b.sender.start()

    async def run(self) -> None:
        """Run every processor's loop until cancelled (owned by the app's TaskGroup)."""
        if not self.processors and not self.batch_processors:
            return
        async with asyncio.TaskGroup() as tg:
            if self.processors:
                tg.create_task(self._watch_budgets(), name="offline budget watch")
            for p in self.processors.values():
                tg.create_task(p.loop(), name=f"sync {p.id}")
            for b in self.batch_processors.values():
                tg.create_task(b.loop(), name=f"sync {b.id}")

    async def close(self) -> None:
        """Write what is buffered and close the clients. Idempotent."""
        for p in self.processors.values():
            with contextlib.suppress(GatewayError, RuntimeError):
                if self.ledger is not None and self.ledger.writer_alive:
                    await p.settle()
                    await p.write()
            await p.sender.close()
        for b in self.batch_processors.values():
            await b.sender.close()

    # ------------------------------------------------------------------ the tills first

    def pos_begin(self) -> None:
        """A POS request arrived (the app's dispatcher; on the event loop)."""
        self.pos_inflight += 1
        self._pos_idle.clear()

    def pos_end(self) -> None:
        """It was answered."""
        self.pos_inflight = max(0, self.pos_inflight - 1)
        if self.pos_inflight == 0:
            self._pos_idle.set()

    async def yield_to_pos(self) -> None:
        """Wait (at most POS_YIELD_MAX_S) until no POS request is in flight: a sale being
        signed gets the event loop, the GIL and the ledger writer without a replay's HTTP
        work or a write of sync state in its way. Returns at once when the tills are quiet."""
        if self._pos_idle.is_set():
            return
        await wait_event(self._pos_idle, POS_YIELD_MAX_S)

    # ------------------------------------------------------------------ events

    def _emit(self, code: str, chain: str, fields: dict[str, Any]) -> None:
        sink = self.on_event
        if sink is None:
            return
        try:
            sink(code, chain=chain, **fields)
        except Exception:  # a broken hook must not stop sync (or the writer thread)
            log.exception("event %s for %s not reported", code, chain)

    def uplink_changed(self, processor: str, chain: str, old_state: str, new: Uplink) -> None:
        """A chain's uplink moved (called where it happens: the writer thread, right after the
        commit that made it; or at start-up). Never blocks: the sink only queues."""
        code = uplink_event(old_state, new.state)
        if code == "UPLINK_OFFLINE":
            self._emit(code, chain, {"processor": processor, "error": new.last_error})
        elif code is not None:
            self._emit(code, chain, {"processor": processor})

    async def _watch_budgets(self) -> None:
        """Report each chain's offline budget reaching a worse level (OFFLINE_WARNING,
        OFFLINE_LIMIT): at once after records are signed (count levels), and every
        BUDGET_WATCH_S (age levels grow with time alone). The first look reports a level
        already bad at start-up."""
        while True:
            try:
                await self.check_budgets()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("offline budget check failed")
            await wait_event(self._budget_wake, BUDGET_WATCH_S)
            self._budget_wake.clear()

    async def check_budgets(self) -> None:
        ledger = self.ledger
        if ledger is None:
            return
        for chain in sorted(ledger.heads()):
            for p in self.processors.values():
                key = (p.id, chain)
                old = self._levels.get(key, "ok")
                if old == "ok" and p.pending(chain, ledger.heads()[chain].seq) == 0:
                    continue
                pending, oldest_ms = await self._unsent(p, chain, ledger.heads()[chain].seq)
                age_s = None if oldest_ms is None else (self.clock_ms() - oldest_ms) / 1000.0
                b = assess(self.settings.limits, pending, age_s)
                self._levels[key] = b.level
                code = budget_event(old, b.level)
                if code is not None:
                    self._emit(
                        code,
                        chain,
                        {
                            "processor": p.id,
                            "pending_records": b.pending_records,
                            "oldest_unsent_age_s": b.to_json()["oldest_unsent_age_s"],
                        },
                    )

    # ------------------------------------------------------------------ ledger hooks

    def is_offline(self, chain: str) -> bool:
        """The ``offline`` flag of a record signed now (called in the writer thread)."""
        return any(p.uplink(chain).offline for p in self.processors.values())

    def guard(self, entry: Entry) -> Entry:
        """``entry`` refused in the writer (OFFLINE_LIMIT_REACHED) when its chain's offline
        budget says so; the check sees the group's uncommitted records too."""
        if not self.processors:
            return entry
        chain, prepare, payload = entry.chain, entry.prepare, entry.payload

        def guarded(view: WriterView) -> dict[str, Any]:
            self._check(view, chain)
            if prepare is not None:
                return prepare(view)
            assert payload is not None
            return payload

        return replace(entry, payload=None, prepare=guarded)

    def _check(self, view: WriterView, chain: str) -> None:
        head = view.head(chain).seq
        limits = self.settings.limits
        for p in self.processors.values():
            acked = p.acked.get(chain, 0)
            pending = max(0, head - acked)
            if pending == 0:
                continue
            age_s = None
            if limits.policy == "block":
                rows = view.query(
                    "SELECT time FROM records WHERE chain = ? AND seq = ?", (chain, acked + 1)
                )
                if rows:
                    age_s = (self.clock_ms() - parse_time(rows[0][0])) / 1000.0
            refusal = assess(limits, pending, age_s).refusal
            if refusal is not None:
                raise OfflineLimitReached(f"{chain}: {refusal}; nothing was signed")

    def signed(self, records: Sequence[Record]) -> None:
        """Records were signed (dispatcher): remember the oldest unsent, wake the uplinks."""
        if not records:
            return
        for b in self.batch_processors.values():
            b.wake.set()
        if not self.processors:
            return
        for p in self.processors.values():
            for rec in records:
                if p.acked.get(rec.chain, 0) == rec.seq - 1 and rec.chain not in p.oldest:
                    p.oldest[rec.chain] = (rec.seq, parse_time(rec.time))
                if rec.chain not in p.uplinks:
                    # a chain born while the cloud is away: its journal says so too
                    u = p.uplink(rec.chain)
                    if u.state != ONLINE:
                        p.uplinks[rec.chain] = u
                        self.uplink_changed(p.id, rec.chain, ONLINE, u)
            p.wake.set()
        self._budget_wake.set()

    async def event(self, chain: str, request_id: str, payload: dict[str, Any]) -> None:
        """A technical-event record (INTENTION::EVENT) in ``chain``; never raises."""
        ledger = self.ledger
        if ledger is None:
            return
        head = ledger.heads().get(chain)
        if head is not None and any(
            p.pending(chain, head.seq) >= PROTOCOL_MAX_PENDING for p in self.processors.values()
        ):
            log.error("no room for event %s in %s: %s", request_id, chain, payload)
            return
        try:
            signed = await ledger.submit(
                Entry(chain, "gateway", request_id, "", "INTENTION::EVENT", payload)
            )
        except GatewayError as exc:
            log.error("cannot record event %s: %s", request_id, exc.message)
            return
        self.signed([signed.record])

    # ------------------------------------------------------------------ budget

    async def budget(self, chain: str) -> Budget | None:
        """The offline budget of ``chain`` now (the strictest over the processors)."""
        if not self.processors or self.ledger is None:
            return None
        head = self.ledger.heads().get(chain)
        head_seq = head.seq if head is not None else 0
        now = self.clock_ms()
        pending = 0
        oldest_ms: int | None = None
        for p in self.processors.values():
            n, t = await self._unsent(p, chain, head_seq)
            pending = max(pending, n)
            if t is not None:
                oldest_ms = t if oldest_ms is None else min(oldest_ms, t)
        age = None if oldest_ms is None else (now - oldest_ms) / 1000.0
        return assess(self.settings.limits, pending, age)

    async def _unsent(
        self, p: RealtimeProcessor, chain: str, head_seq: int
    ) -> tuple[int, int | None]:
        """Records of ``chain`` not yet accepted by ``p``, and the time of the oldest."""
        n = p.pending(chain, head_seq)
        if n == 0:
            return 0, None
        first = p.acked.get(chain, 0) + 1
        known = p.oldest.get(chain)
        if known is not None and known[0] == first:
            return n, known[1]
        return n, await self._time(chain, first)

    async def _time(self, chain: str, seq: int) -> int | None:
        if self.reads is None:
            return None

        def q(r: Reader) -> int | None:
            row = r.conn.execute(
                "SELECT time FROM records WHERE chain = ? AND seq = ?", (chain, seq)
            ).fetchone()
            return parse_time(row[0]) if row else None

        return await self.reads.run(q)

    # ------------------------------------------------------------------ admin

    async def process_pending(self) -> list[RunStats]:
        """Run every processor now (admin API); one result per processor."""
        procs = list(self.processors.values())
        batch = list(self.batch_processors.values())
        results = await asyncio.gather(
            *(p.run_once("admin") for p in procs), *(b.run_once("admin") for b in batch)
        )
        return list(results)

    async def batch_stats(self, *, window_ms: int = DAY_MS) -> list[dict[str, object]]:
        """Per processor, the sums of its runs over the last 24 h (admin API)."""
        assert self.reads is not None
        since = self.clock_ms() - window_ms
        ids = list(self.processors) + list(self.batch_processors)

        def q(r: Reader) -> dict[str, tuple[int, ...]]:
            rows = r.conn.execute(
                "SELECT processor, sum(batches_created), sum(batches_retried), sum(accepted), "
                "sum(rejected), sum(failed), sum(alert_triggered) FROM sync_runs "
                "WHERE started_ms >= ? "
                "GROUP BY processor",
                (since,),
            ).fetchall()
            return {row[0]: tuple(int(v or 0) for v in row[1:]) for row in rows}

        sums = await self.reads.run(q)
        out = []
        for pid in sorted(set(ids) | set(sums)):
            b, br, a, rj, f, al = sums.get(pid, (0, 0, 0, 0, 0, 0))
            out.append(
                stats_json(
                    pid,
                    batches_created=b,
                    batches_retried=br,
                    accepted=a,
                    rejected=rj,
                    failed=f,
                    alerts_triggered=al,
                    since_ms=since,
                )
            )
        return out

    async def resume(self, processor: str, chain: str) -> Uplink:
        p = self.processors.get(processor)
        if p is None:
            raise KeyError(processor)
        return await p.resume(chain)

    # ------------------------------------------------------------------ status

    async def status(self) -> dict[str, Any]:
        """The ``offline`` and ``sync`` parts of the status JSON (docs/sync.md)."""
        ledger = self.ledger
        heads = {c: h.seq for c, h in ledger.heads().items()} if ledger else {}
        offline = []
        sync: list[dict[str, Any]] = []
        red = False
        for p in self.processors.values():
            chains = []
            levels = []
            for chain in sorted(set(heads) | {c for c in p.uplinks if c != ANY_CHAIN}):
                u = p.uplink(chain)
                b = await self.budget(chain)
                level = b.level if b else "ok"
                levels.append(level)
                chains.append(
                    {
                        "chain": chain,
                        "uplink": u.state,
                        "since": format_time(u.since_ms) if u.since_ms else None,
                        "last_error": u.last_error,
                        "budget": b.to_json() if b else None,
                    }
                )
            stopped = [c["chain"] for c in chains if c["uplink"] == STOPPED]
            red = red or p.alerting or bool(stopped)
            cloud = p.uplinks.get(ANY_CHAIN, Uplink(ONLINE))
            offline.append(
                {
                    "name": p.id,
                    "state": cloud.state,
                    "limit": worst(levels),
                    "chains": chains,
                }
            )
            sync.append(
                {
                    "processor": p.id,
                    "cloud": cloud.state,
                    "last_error": cloud.last_error,
                    "alert": p.alerting,
                    "stopped_chains": stopped,
                    "last_run": p.last_run.result_json() if p.last_run else None,
                    "last_run_at": (
                        format_time(p.last_run_at_ms) if p.last_run_at_ms is not None else None
                    ),
                }
            )
        for bp in self.batch_processors.values():
            # items set aside for review are a person's job: red until they are dealt with
            red = red or bp.alerting or bp.review_count > 0
            sync.append({**bp.status(), "review": await bp.review(limit=20)})
        return {
            "offline": {"processors": offline},
            "sync": {"health": "red" if red else "green", "processors": sync},
        }
