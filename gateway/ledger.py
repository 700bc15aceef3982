"""The ledger writer: the only code that appends records to the journal.

One dedicated thread owns the write connection. Callers (any asyncio task) hand it
:class:`Entry` values through a queue and await a future. The thread does **group commit**:
it drains everything queued (up to ``max_group``), and in one SQLite transaction, for each
entry, checks the request id (exactly-once), assigns seq/number/counters/totals, links,
hashes, signs and inserts the record with its ``requests`` row, its outbox rows and its print
job; then one ``COMMIT`` (one fsync of the WAL, ``synchronous=FULL``), and only then resolves
every waiter. A caller therefore never holds a record that is not durable (DESIGN.md §3.1).

Start-up (:meth:`Ledger.open`): the integrity check (below), schema migrations, then for
every chain a tail check anchored at the committed head (``heads`` row, written in the same
transaction as the records): the head record exists, nothing lies beyond it, and the last
``tail_verify`` records verify link by link and signature by signature. Any failure halts
signing (:class:`SigningHalted` for every request) until a technician intervenes; the daemon
can still serve status. Storage errors while committing halt signing the same way.

The integrity check is SQLite's ``PRAGMA quick_check``, which reads every page: with a
million records about 1 s once the file is in the page cache (it is read sequentially into
the cache first, :func:`gateway.store.warm_page_cache`, 0.6 s cold), too slow to wait for at
every start. So it runs *before* ready only when the file may have been damaged since we
last saw it whole — the previous run did not close cleanly (crash, kill, power loss), or the
file is not the one a clean close left (its inode, size, mtime or ctime differ, or a WAL with
content is there); then it runs on its own thread, overlapping the tail check, and open()
waits for it. A clean :meth:`Ledger.close` records that identity in ``<db>.clean``;
:meth:`Ledger.open` removes it before anything is written. After a clean close the check
runs in a background thread right after open, on its own read-only connection, and a failure
halts signing exactly as a failure before ready would; only what is signed in those seconds
precedes the verdict, and those records are chained and verified like any other.
``integrity_check`` says which path was taken and how it ended (status page,
docs/performance.md).

**Held events.** A gateway-wide technical event (start, stop, key generated, ...) goes into
every chain; a fresh install has none yet. :meth:`Ledger.hold_events` decides that in the
writer thread, so no chain can appear meanwhile: with no chain the events are stored in
``held_events`` (committed, so they survive restarts) instead. The group that makes a chain's
first record writes every held event into that chain first — in the order they came, each
with the time it was held (never before the previous record's: the chain rule) — then the
record itself, and deletes the held rows, all in that one transaction. If that record is
refused, none of it happens (but for the offline budget: see ``_one_or_error``). A chain
opened later starts with no held events (they were written into the first one).
``on_held_written`` is told of the records (writer thread).

What this module leaves to others: request validation (gateway.core.request), the decision
of what a request means (the dispatcher), and draining outbox/print queues (their workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gateway.core.canonical import canonical_bytes, parse_canonical
from gateway.core.chain import KEY_ROTATED, ChainHead, ChainRuleError, draft
from gateway.core.errors import (
    Conflict,
    GatewayError,
    IdempotencyMismatch,
    IntegrityError,
    KeyError_,
    OfflineLimitReached,
    RequestError,
    SigningHalted,
    StorageError,
)
from gateway.core.events import KEY_GENERATED
from gateway.core.record import Record, format_time
from gateway.core.verify import ChainVerifier, StoredRecord, VerifyFailure
from gateway.store import Reader, connect, migrate, quick_check, warm_page_cache

log = logging.getLogger("gateway.ledger")


class Signer(Protocol):
    key_id: str
    public_pem: str

    def sign(self, data: bytes) -> str: ...


#: Client of the held gateway-wide events when written into a chain (the event journal's).
HELD_CLIENT = "gateway"
HELD_TYPE = "INTENTION::EVENT"


@dataclass(frozen=True, slots=True)
class HeldEvent:
    """A gateway-wide event waiting for the first chain (a ``held_events`` row)."""

    id: int
    time_ms: int
    request_id: str
    payload: dict[str, Any]


class WriterView(Protocol):
    """What an entry's ``prepare`` hook may read, inside the writer's transaction."""

    #: the clock reading of this group (a record's time: chain.record_time_ms(head, now_ms))
    now_ms: int

    def head(self, chain: str) -> ChainHead: ...

    def record(self, chain: str, seq: int) -> Record | None: ...

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    def claim(self, key: str) -> None:
        """Take a journal-wide unique key for the record being made (see Entry.claims)."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One record to append. ``payload`` or ``prepare`` (computes it in the writer)."""

    chain: str
    client: str
    request_id: str
    fingerprint: str
    record_type: str
    payload: dict[str, Any] | None = None
    prepare: Callable[[WriterView], dict[str, Any]] | None = None
    print_job: bool = False
    #: journal-wide unique keys this record takes (e.g. "supersede:<chain>:<seq>": a sale
    #: is cancelled or corrected once); a key already taken refuses the entry (CONFLICT).
    claims: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Signed:
    """The outcome of one entry: the stored record, and whether it already existed."""

    record: Record
    replayed: bool = False


Outcome = Signed | GatewayError


@dataclass(slots=True)
class _Job:
    entries: tuple[Entry, ...]
    atomic: bool
    stop_on_error: bool
    loop: asyncio.AbstractEventLoop | None
    future: asyncio.Future[Any] | None
    result: list[Outcome] = field(default_factory=list)


@dataclass(slots=True)
class _Control:
    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


@dataclass(slots=True)
class _Deferred:
    """A low-priority write (:meth:`Ledger.write_soon`): rides in the next group's transaction,
    or gets its own once ``due`` (monotonic) passed without one."""

    fn: Callable[[sqlite3.Connection], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    due: float


_STOP = object()


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class Stats:
    groups: int = 0
    records: int = 0
    replays: int = 0
    max_group: int = 0
    checkpoints: int = 0

    @property
    def avg_group(self) -> float:
        return self.records / self.groups if self.groups else 0.0


class Ledger:
    """The journal's single writer. Use ``await Ledger.open(...)`` then ``submit``."""

    def __init__(
        self,
        path: Path,
        signer: Signer,
        *,
        clock_ms: Callable[[], int] = _now_ms,
        processors: Sequence[str] = (),
        is_offline: Callable[[str], bool] = lambda chain: False,
        max_group: int = 512,
        tail_verify: int = 1000,
        idle_checkpoint_s: float = 1.0,
        checkpoint_every_commits: int = 250,
        run_quick_check: bool = True,
        defer_max_s: float = 1.0,
    ) -> None:
        self.path = path
        self.signer = signer
        self.clock_ms = clock_ms
        self.processors = tuple(processors)
        self.is_offline = is_offline
        self.max_group = max_group
        self.tail_verify = tail_verify
        self.idle_checkpoint_s = idle_checkpoint_s
        self.checkpoint_every_commits = checkpoint_every_commits
        self.run_quick_check = run_quick_check
        self.defer_max_s = defer_max_s
        #: low-priority writes waiting for a group commit (only the writer thread touches it)
        self._deferred: list[_Deferred] = []
        self.stats = Stats()
        self.halted: str | None = None
        self._heads: dict[str, ChainHead] = {}
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: close() has begun: nothing more is queued (it would land behind the stop marker,
        #: where the writer may never look). Set and read on the event loop's thread.
        self._closing = False
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._commits_since_checkpoint = 0
        self.last_progress = time.monotonic()
        self.integrity_check = "not run"
        #: why the last run did not close cleanly (None: it did), known once open() ran
        self.unclean_reason: str | None = None
        self._check_thread: threading.Thread | None = None
        self._check_conn: sqlite3.Connection | None = None
        #: gateway-wide events held until a chain exists (only the writer thread changes it)
        self._held: tuple[HeldEvent, ...] = ()
        #: told of the held events once written into a new chain (called in the writer thread)
        self.on_held_written: Callable[[list[Record]], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    async def open(cls, path: Path, signer: Signer, **kwargs: Any) -> Ledger:
        ledger = cls(path, signer, **kwargs)
        await asyncio.to_thread(ledger._open_sync)
        return ledger

    def _open_sync(self) -> None:
        self._take_lock()
        try:
            unclean = self.unclean_reason = self._take_clean_mark()
            conn = connect(self.path, write=True)
        except BaseException:
            self._release_lock()
            raise
        self._conn = conn
        try:
            if self.run_quick_check and unclean is not None:
                # on its own connection and thread, in SQLite's C code without the GIL, so
                # that it overlaps the tail check; open() waits for it below
                self._start_check(before_ready=unclean)
            migrate(conn)
            self._register_key(conn, self.signer)
            self._load_and_check_heads(conn)
            self._held = _load_held(conn)
            self._check_held_key()
        except IntegrityError as exc:
            self.halt(exc.message)
        except BaseException as exc:
            damage = _damage(exc)
            if damage is None:
                # not the data's fault: give back the connection and the lock, then report
                self._stop_check()
                self._conn = None
                conn.close()
                self._release_lock()
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"cannot open the journal {self.path}: {exc}") from exc
                raise
            self.halt(damage)
        if self._check_thread is not None:
            self._check_thread.join()  # the check before ready
            self._check_thread = None
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)
        self._thread.start()
        if self.run_quick_check and unclean is None and self.halted is None:
            self._start_check(before_ready=None)

    # ------------------------------------------------------------------ integrity check

    def _clean_mark_path(self) -> Path:
        return self.path.with_name(self.path.name + ".clean")

    def _file_identity(self) -> str | None:
        """Identity of the journal file at rest, or None if a WAL with content is there."""
        wal = self.path.with_name(self.path.name + "-wal")
        with contextlib.suppress(FileNotFoundError):
            if wal.stat().st_size > 0:
                return None
        st = self.path.stat()
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"

    def _take_clean_mark(self) -> str | None:
        """Remove ``<db>.clean``; None if it proves a clean close, else why it does not."""
        mark = self._clean_mark_path()
        try:
            recorded = mark.read_text().strip()
        except FileNotFoundError:
            return "no clean close recorded" if self.path.exists() else "new journal"
        except OSError as exc:
            return f"clean-close record unreadable: {exc}"
        try:
            identity = self._file_identity() if self.path.exists() else None
        except OSError:
            identity = None
        mark.unlink()
        _fsync_dir(mark.parent)  # from here on a crash must read as an unclean shutdown
        if identity is None or identity != recorded:
            return "the journal changed since the last clean close"
        return None

    def _write_clean_mark(self) -> None:
        try:
            identity = self._file_identity()
            if identity is None:
                return
            mark = self._clean_mark_path()
            tmp = mark.with_name(mark.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, identity.encode("ascii") + b"\n")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, mark)
            _fsync_dir(mark.parent)
        except OSError as exc:  # only costs a synchronous check at the next start
            log.warning("cannot record the clean close: %s", exc)

    def _start_check(self, *, before_ready: str | None) -> None:
        """Start the integrity check thread; ``before_ready``: why open() must wait for it
        (None: it runs in the background after a clean close)."""
        when = "before ready" if before_ready is not None else "in the background"
        why = before_ready or "previous close was clean"
        try:
            self._check_conn = connect(self.path, write=False)
        except StorageError as exc:
            self.integrity_check = f"FAILED {when}: cannot start: {exc.message}"
            self.halt(f"integrity check could not start: {exc.message}")
            return
        self.integrity_check = f"running {when} ({why})"
        self._check_thread = threading.Thread(
            target=self._check, args=(when, why), name="ledger-integrity-check", daemon=True
        )
        self._check_thread.start()

    def _check(self, when: str, why: str) -> None:
        conn = self._check_conn
        assert conn is not None
        t0 = time.monotonic()
        try:
            warm_page_cache(self.path)
            quick_check(conn)
        except IntegrityError as exc:
            self.integrity_check = f"FAILED {when}: {exc.message}"
            self.halt(exc.message)
        except sqlite3.OperationalError as exc:
            if "interrupt" in str(exc):  # close() interrupted it; runs again at next start
                self.integrity_check = "interrupted by close; runs again at the next start"
            else:
                self.integrity_check = f"FAILED {when}: {exc}"
                self.halt(f"integrity check failed: {exc}")
        except sqlite3.Error as exc:
            reason = _damage(exc) or f"integrity check failed: {exc}"
            self.integrity_check = f"FAILED {when}: {reason}"
            self.halt(reason)
        else:
            self.integrity_check = f"passed {when} in {time.monotonic() - t0:.2f} s ({why})"
        finally:
            conn.close()

    def _stop_check(self) -> None:
        if self._check_thread is None:
            return
        # interrupt() is a no-op while no statement runs, so repeat it until the thread ends
        while self._check_thread.is_alive():
            if self._check_conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._check_conn.interrupt()
            self._check_thread.join(0.05)
        self._check_thread = None
        self._check_conn = None

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StorageError(f"{self.path} is in use by another gateway process") from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def close(self) -> None:
        """Finish everything queued, checkpoint, close. Idempotent."""
        self._closing = True
        if self._thread is not None:
            self._q.put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None
        await asyncio.to_thread(self._stop_check)
        if self._conn is not None:
            conn = self._conn
            self._conn = None
            clean = True
            try:
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
                clean = busy == 0
            except sqlite3.Error as exc:
                log.warning("checkpoint at close failed: %s", exc)
                clean = False
            conn.close()
            # a halted ledger is not "clean": the next start checks before ready
            if clean and self.halted is None:
                await asyncio.to_thread(self._write_clean_mark)
        self._release_lock()

    @property
    def writer_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _check_open(self) -> None:
        """Refuse work the writer would never take: before open, or once close() began."""
        if self._closing or not self.writer_alive:
            raise SigningHalted("the ledger is not running")

    def halt(self, reason: str) -> None:
        if self.halted is None:
            log.error("signing halted: %s", reason)
            self.halted = reason

    # ------------------------------------------------------------------ public API

    def heads(self) -> dict[str, ChainHead]:
        """Committed heads (a snapshot; safe to read from the event loop)."""
        return dict(self._heads)

    def held(self) -> tuple[HeldEvent, ...]:
        """The gateway-wide events held until the first chain exists (a snapshot)."""
        return self._held

    def held_key_id(self) -> str | None:
        """With no chain yet: the key the newest held ``KEY_GENERATED`` names — the key the
        first chain will say it is signed by (a generated key, or one ``rotate-key`` put in
        place). None when no such event is held."""
        for h in reversed(self._held):
            if h.payload.get("event") == KEY_GENERATED:
                key = h.payload.get("key_id")
                return key if isinstance(key, str) else None
        return None

    def _check_held_key(self) -> None:
        """No chain yet, but ``rotate-key`` committed another key than the configured one
        (cut short before it switched the key files): the first chain would open saying one
        key and be signed by another. (A generated key that was lost before anything was
        signed is not this: the daemon generates and announces the next one.)"""
        if self._heads:
            return
        last = next(
            (h.payload for h in reversed(self._held) if h.payload.get("event") == KEY_GENERATED),
            None,
        )
        key = last.get("key_id") if last is not None and last.get("by") == "rotate-key" else None
        if key is not None and key != self.signer.key_id:
            raise IntegrityError(
                f"the journal has no chain yet, but its key is {key} (the KEY_GENERATED event "
                f"held for the first chain) and the configured key is {self.signer.key_id}: "
                f"configure key {key}, or run an interrupted 'fiscal-gateway rotate-key' again"
            )

    def latest_time_ms(self) -> int | None:
        """The latest record time of the journal, held events included (None: empty)."""
        heads, held = dict(self._heads), self._held  # snapshots: the writer thread moves on
        times = [h.time_ms for h in heads.values()] + [h.time_ms for h in held]
        return max(times, default=None)

    async def hold_events(self, items: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """Hold gateway-wide events ``(request id, payload)`` if no chain exists yet.

        Decided in the writer thread, between groups: returns ``[]`` once the events are
        committed to ``held_events`` (a request id already held is held once), or the chains
        that exist — then nothing is held and the caller writes the events into those.
        """

        def hold(conn: sqlite3.Connection) -> list[str]:
            if self.halted is not None:
                raise SigningHalted(f"signing is halted: {self.halted}")
            if self._heads:
                return sorted(self._heads)
            self._hold(conn, items)
            return []

        chains: list[str] = await self.control(hold)
        return chains

    def _hold(
        self,
        conn: sqlite3.Connection,
        items: Sequence[tuple[str, dict[str, Any]]],
        *,
        also: Callable[[], None] | None = None,
    ) -> None:
        """Commit ``items`` to ``held_events`` (writer thread, no chain yet), with ``also``
        (more statements) in the same transaction; a storage failure halts signing."""
        now = self.clock_ms()
        # canonical first, outside the transaction: an event that cannot be signed (a float,
        # say) is refused alone and leaves no transaction open behind it
        rows = [(now, rid, canonical_bytes(p).decode("utf-8")) for rid, p in items]
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT OR IGNORE INTO held_events (time_ms, request_id, payload) VALUES (?, ?, ?)",
                rows,
            )
            if also is not None:
                also()
            conn.execute("COMMIT")
            self._held = _load_held(conn)
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if not isinstance(exc, sqlite3.Error):
                raise
            self.halt(f"storage failure: {exc}")
            raise StorageError(f"events not held: storage failure: {exc}") from exc

    async def submit(self, entry: Entry) -> Signed:
        """Append one record (or return the stored one for a repeated request id)."""
        (outcome,) = await self.submit_many([entry], atomic=False)
        if isinstance(outcome, GatewayError):
            raise outcome
        return outcome

    async def submit_many(
        self, entries: Sequence[Entry], *, atomic: bool, stop_on_error: bool = False
    ) -> list[Outcome]:
        """Append several entries in one transaction.

        ``atomic``: all or nothing — the first failure undoes the others (no seq consumed)
        and every outcome is that failure's error. Otherwise each entry succeeds or fails on
        its own; with ``stop_on_error`` the entries after the first failure are not tried
        and their outcome is :class:`Skipped`.
        """
        if self.halted is not None:
            raise SigningHalted(f"signing is halted: {self.halted}")
        self._check_open()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Outcome]] = loop.create_future()
        self._q.put(_Job(tuple(entries), atomic, stop_on_error, loop, fut))
        return await fut

    async def control(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn(conn)`` in the writer thread between groups (e.g. a key rotation)."""
        self._check_open()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._q.put(_Control(fn, loop, fut))
        return await fut

    async def write_soon(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn(conn)`` in the writer thread inside the next group commit's transaction,
        after its records (so no commit, no fsync of its own while sales are being signed),
        or in a transaction of its own when no group came within ``defer_max_s``. For writes
        that may wait and must never make a sale wait (the sync engine's accepted-marks).
        ``fn`` runs in a savepoint: if it raises, only its own changes are undone and the
        exception is this call's; it must not BEGIN or COMMIT. Returns ``fn``'s result once
        committed."""
        self._check_open()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        self._q.put(_Deferred(fn, loop, fut, time.monotonic() + self.defer_max_s))
        return await fut

    async def rotate_key(self, new_signer: Signer, *, client: str = "gateway") -> list[Record]:
        """Announce ``new_signer`` in every chain (signed by the old key), then switch.

        All of it runs in the writer thread between two groups: no other record can fall
        between an announcement and the switch (it would be signed by the retired key), and
        a chain started while the rotation was queued is announced too.

        With no chain yet the old key signed nothing and there is nothing to announce in: the
        new key simply becomes the journal's key, and a ``KEY_GENERATED`` event naming the
        key it replaces (``replaces_key_id``) is held for the first chain, committed together
        with the new key's registration. Returns ``[]`` then.
        """
        stamp = uuid.uuid4().hex[:12]

        def rotate(conn: sqlite3.Connection) -> list[Outcome]:
            old = self.signer
            if self.halted is not None:
                raise SigningHalted(f"signing is halted: {self.halted}")
            if not self._heads:
                payload = {
                    "event": KEY_GENERATED,
                    "key_id": new_signer.key_id,
                    "replaces_key_id": old.key_id,
                    "by": "rotate-key",
                }
                # named by the two keys: a rotation cut short and run again holds it once
                self._hold(
                    conn,
                    [(f"key-rotation-{old.key_id}-{new_signer.key_id}", payload)],
                    also=lambda: self._register_key(conn, new_signer),
                )
                self.signer = new_signer
                return []
            entries = tuple(
                Entry(
                    chain,
                    client,
                    f"key-rotation-{stamp}-{chain}",
                    "",
                    "INTENTION::EVENT",
                    {
                        "event": KEY_ROTATED,
                        "old_key_id": old.key_id,
                        "new_key_id": new_signer.key_id,
                        "new_public_key": new_signer.public_pem,
                    },
                )
                for chain in sorted(self._heads)
            )
            self._register_key(conn, new_signer)
            job = _Job(entries=entries, atomic=True, stop_on_error=False, loop=None, future=None)
            self._run_group([job])
            if self.halted is not None:  # the group was not committed
                raise SigningHalted(f"key rotation failed: signing is halted: {self.halted}")
            if all(isinstance(o, Signed) for o in job.result):
                self.signer = new_signer
            return job.result

        outcomes: list[Outcome] = await self.control(rotate)
        records = []
        for o in outcomes:
            if isinstance(o, GatewayError):
                raise o
            records.append(o.record)
        return records

    # ------------------------------------------------------------------ start-up checks

    def _register_key(self, conn: sqlite3.Connection, signer: Signer) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO keys (key_id, public_pem, added_at) VALUES (?, ?, ?)",
            (signer.key_id, signer.public_pem, format_time(self.clock_ms())),
        )

    def _load_and_check_heads(self, conn: sqlite3.Connection) -> None:
        from drivers.signers.software import KeyRing  # verification needs only public keys

        ring = KeyRing(pem for (pem,) in conn.execute("SELECT public_pem FROM keys"))
        heads = dict(conn.execute("SELECT chain, seq || ':' || hash FROM heads"))
        chains = _distinct_chains(conn)
        for chain in chains:
            if chain not in heads:
                raise IntegrityError(f"chain {chain!r} has records but no committed head")
        for chain, anchor in heads.items():
            seq_s, head_hash = anchor.split(":", 1)
            self._heads[chain] = self._check_tail(conn, ring, chain, int(seq_s), head_hash)
        for chain, head in self._heads.items():
            if head.key_id != self.signer.key_id:
                raise IntegrityError(
                    f"chain {chain!r} is signed by key {head.key_id} but the configured key is "
                    f"{self.signer.key_id}; rotate keys with 'fiscal-gateway rotate-key' "
                    f"instead of replacing the key file"
                )

    def _check_tail(
        self, conn: sqlite3.Connection, ring: Any, chain: str, head_seq: int, head_hash: str
    ) -> ChainHead:
        max_seq = (
            conn.execute("SELECT max(seq) FROM records WHERE chain = ?", (chain,)).fetchone()[0]
            or 0
        )
        if max_seq < head_seq:
            raise IntegrityError(
                f"chain {chain!r}: committed head is seq {head_seq} but the "
                f"last stored record is seq {max_seq} (records lost)"
            )
        if max_seq > head_seq:
            raise IntegrityError(
                f"chain {chain!r}: records beyond the committed head seq "
                f"{head_seq} (written by someone else)"
            )
        first = max(1, head_seq - self.tail_verify + 1)
        start = ChainHead(chain)
        if first > 1:
            row = conn.execute(
                "SELECT body, hash FROM records WHERE chain = ? AND seq = ?", (chain, first - 1)
            ).fetchone()
            if row is None:
                raise IntegrityError(f"chain {chain!r}: record {first - 1} is missing")
            try:
                body = parse_canonical(bytes(row[0]))
            except GatewayError as exc:
                raise IntegrityError(f"chain {chain!r} seq {first - 1}: {exc.message}") from exc
            start = ChainHead.from_body(body, row[1])
        verifier = ChainVerifier(chain, ring.check_sig, start)
        rows = conn.execute(
            "SELECT body, hash, sig FROM records WHERE chain = ? AND seq >= ? ORDER BY seq",
            (chain, first),
        )
        try:
            for body_b, h, sig in rows:
                verifier.feed(StoredRecord(bytes(body_b), h, sig))
            verifier.finish(head_seq, head_hash)
        except VerifyFailure as exc:
            raise IntegrityError(f"start-up check failed: {exc}") from exc
        return verifier.head

    # ------------------------------------------------------------------ writer thread

    def _run(self) -> None:
        stop = False
        while not stop:
            timeout = self.idle_checkpoint_s
            if self._deferred:
                timeout = max(0.0, min(timeout, self._deferred[0].due - time.monotonic()))
            try:
                first = self._q.get(timeout=timeout)
            except queue.Empty:
                if self._deferred and self._deferred[0].due <= time.monotonic():
                    self._run_deferred_alone()
                else:
                    self._checkpoint("PASSIVE")
                self.last_progress = time.monotonic()
                continue
            if first is _STOP:
                break
            if isinstance(first, _Deferred):
                self._deferred.append(first)
                continue
            items = [first]
            n = _entries(first)
            while n < self.max_group:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                if isinstance(nxt, _Deferred):
                    self._deferred.append(nxt)
                    continue
                items.append(nxt)
                n += _entries(nxt)
            jobs: list[_Job] = []
            for it in items:
                if isinstance(it, _Control):
                    self._run_group(jobs)
                    jobs = []
                    self._run_control(it)
                else:
                    jobs.append(it)
            self._run_group(jobs)
            self.last_progress = time.monotonic()
        # low-priority writes still waiting are written now; anything queued after the stop
        # marker is refused politely
        while True:
            try:
                it = self._q.get_nowait()
            except queue.Empty:
                break
            if isinstance(it, _Deferred):
                self._deferred.append(it)
            elif isinstance(it, _Job | _Control) and it.loop is not None and it.future is not None:
                _resolve(it.loop, it.future, SigningHalted("the ledger is shutting down"))
        if self._deferred:
            self._run_deferred_alone()

    def _apply_deferred(self, conn: sqlite3.Connection) -> list[tuple[_Deferred, Any]]:
        """Run the waiting low-priority writes inside the open transaction, each in its own
        savepoint; their results, to resolve after the commit."""
        done, self._deferred = self._deferred, []
        out: list[tuple[_Deferred, Any]] = []
        for d in done:
            conn.execute("SAVEPOINT deferred")
            try:
                result: Any = d.fn(conn)
            except Exception as exc:
                conn.execute("ROLLBACK TO deferred")
                result = exc
            conn.execute("RELEASE deferred")
            out.append((d, result))
        return out

    def _run_deferred_alone(self) -> None:
        conn = self._conn
        if conn is None or self.halted is not None:
            done, self._deferred = self._deferred, []
            for d in done:
                _resolve(d.loop, d.future, SigningHalted(f"signing is halted: {self.halted}"))
            return
        waiting = list(self._deferred)
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = self._apply_deferred(conn)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            # nothing of them was written; signing goes on (a sale's own commit will tell
            # whether the disk is really gone)
            err = StorageError(f"deferred write failed: {exc}")
            for d in waiting:
                _resolve(d.loop, d.future, err)
            self._deferred = []
            return
        self._commits_since_checkpoint += 1
        for d, result in results:
            _resolve(d.loop, d.future, result)

    def _run_control(self, ctl: _Control) -> None:
        assert self._conn is not None
        try:
            result: Any = ctl.fn(self._conn)
        except Exception as exc:
            result = exc
        _resolve(ctl.loop, ctl.future, result)

    def _checkpoint(self, mode: str) -> None:
        # Checkpointing often (checkpoint_every_commits, default 250) is for speed as much as
        # for size: once every frame is back in the database, the next commit rewinds the WAL
        # and overwrites it in place, and an fsync of a file that does not grow costs about
        # half of one that does (docs/performance.md). It runs here, between groups, because
        # a checkpoint that races the writer never catches up and the WAL never rewinds.
        if self._conn is None or self._commits_since_checkpoint == 0:
            return
        try:
            self._conn.execute(f"PRAGMA wal_checkpoint({mode})")
            self._commits_since_checkpoint = 0
            self.stats.checkpoints += 1
        except sqlite3.Error as exc:
            log.warning("checkpoint failed: %s", exc)

    def _run_group(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        if self.halted is not None:
            for job in jobs:
                _finish(job, SigningHalted(f"signing is halted: {self.halted}"))
            return
        conn = self._conn
        assert conn is not None
        group = _Group(self, conn)
        waiting = list(self._deferred)
        try:
            conn.execute("BEGIN IMMEDIATE")
            group.look_up_requests(jobs)
            for job in jobs:
                group.run_job(job)
            group.write_heads()
            group.delete_held()
            deferred = self._apply_deferred(conn) if self._deferred else []
            conn.execute("COMMIT")
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, IntegrityError):
                reason = f"integrity failure: {exc.message}"
            elif isinstance(exc, sqlite3.Error | OSError):
                reason = f"storage failure: {exc}"
            else:
                log.exception("unexpected error in the ledger writer")
                reason = f"internal error: {type(exc).__name__}: {exc}"
            self.halt(reason)
            err = StorageError(f"nothing was signed: {reason}")
            for job in jobs:
                _finish(job, err)
            for d in waiting:
                _resolve(d.loop, d.future, err)
            self._deferred = []
            return
        self._heads.update(group.heads)
        if group.held_chains:
            self._held = ()
            if self.on_held_written is not None:
                try:
                    self.on_held_written(list(group.held_records))
                except Exception:
                    log.exception("held events hook failed")
        _resolve_many([(job, job.result) for job in jobs])  # first: the callers are waiting
        for d, result in deferred:
            _resolve(d.loop, d.future, result)
        n = sum(1 for job in jobs for o in job.result if isinstance(o, Signed) and not o.replayed)
        n += len(group.held_records)
        self.stats.groups += 1
        self.stats.records += n
        self.stats.replays += group.replays
        self.stats.max_group = max(self.stats.max_group, n)
        self._commits_since_checkpoint += 1
        if self._commits_since_checkpoint >= self.checkpoint_every_commits:
            self._checkpoint("PASSIVE")


def _damage(exc: BaseException) -> str | None:
    """The halt reason when start-up found the database file damaged, else None.

    A file SQLite calls corrupt, or stored rows our parsers cannot read (a mangled key or
    record), is an integrity failure like a broken chain (DESIGN.md §3.8): halt signing and
    keep the daemon up to report it, rather than crash with the lock still held.
    """
    if isinstance(exc, sqlite3.DatabaseError):
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return f"the database file is damaged: {exc}"
        return None
    if isinstance(exc, StorageError) or not isinstance(
        exc, ValueError | KeyError | TypeError | GatewayError
    ):
        return None
    return f"start-up check failed: stored data is unreadable: {exc}"


_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


def _claim_conflict(claim: str, chain: str, seq: int) -> str:
    kind, _, target = claim.partition(":")
    if kind == "supersede":
        c, _, n = target.rpartition(":")
        return f"{c} seq {n} was already cancelled or corrected (by {chain} seq {seq})"
    return f"{claim} is already taken by {chain} seq {seq}"


def _load_held(conn: sqlite3.Connection) -> tuple[HeldEvent, ...]:
    rows = conn.execute("SELECT id, time_ms, request_id, payload FROM held_events ORDER BY id")
    return tuple(HeldEvent(i, t, rid, parse_canonical(p.encode("utf-8"))) for i, t, rid, p in rows)


def _distinct_chains(conn: sqlite3.Connection) -> list[str]:
    """The chains that have records: one index probe per chain instead of a scan of all
    records (``SELECT DISTINCT`` reads the whole primary-key index: ~0.3 s per million)."""
    chains: list[str] = []
    row = conn.execute("SELECT min(chain) FROM records").fetchone()
    while row is not None and row[0] is not None:
        chains.append(row[0])
        row = conn.execute("SELECT min(chain) FROM records WHERE chain > ?", (row[0],)).fetchone()
    return chains


#: Keys per request look-up query (two parameters each; SQLite allows 32,766).
_LOOKUP_CHUNK = 256


@functools.lru_cache(maxsize=16)
def _lookup_sql(keys: int) -> str:
    # a join, not "(client, request_id) IN (VALUES ...)": SQLite scans the table for that
    values = ",".join(["(?, ?)"] * keys)  # only placeholders go into the text
    return (
        f"SELECT r.client, r.request_id, r.fingerprint, r.chain, r.seq FROM (VALUES {values}) "  # noqa: S608
        "AS v JOIN requests AS r ON r.client = v.column1 AND r.request_id = v.column2"
    )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _entries(item: Any) -> int:
    return len(item.entries) if isinstance(item, _Job) else 1


def _resolve(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[Any], value: Any) -> None:
    def setter() -> None:
        if fut.done():
            return
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)

    try:
        loop.call_soon_threadsafe(setter)
    except RuntimeError:  # the caller's loop is closed; nobody is waiting any more
        pass


def _resolve_many(outcomes: Sequence[tuple[_Job, Any]]) -> None:
    """Resolve the futures of a whole group: one wake-up per event loop, not one per job.

    ``call_soon_threadsafe`` writes to the loop's self-pipe every time; for a group of 32
    callers that was 32 syscalls in the writer and 32 wake-ups of the loop.
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
    for job, value in outcomes:
        if job.loop is not None and job.future is not None:
            by_loop.setdefault(job.loop, []).append((job.future, value))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_all, items)
        except RuntimeError:  # the caller's loop is closed; nobody is waiting any more
            pass


def _set_all(items: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for fut, value in items:
        if fut.done():
            continue
        if isinstance(value, BaseException):
            fut.set_exception(value)
        else:
            fut.set_result(value)


def _finish(job: _Job, err: GatewayError) -> None:
    if job.loop is not None and job.future is not None:
        _resolve(job.loop, job.future, err)


class _Group:
    """The state of one group commit (uncommitted heads and request ids)."""

    def __init__(self, ledger: Ledger, conn: sqlite3.Connection) -> None:
        self.ledger = ledger
        self.conn = conn
        self.heads: dict[str, ChainHead] = {}
        self.requests: dict[tuple[str, str], tuple[str, Record]] = {}
        self.replays = 0
        self.now_ms = ledger.clock_ms()
        self.dynamic_claims: list[str] = []
        # chains opened in this group with the held events written first, and those records
        self.held_chains: list[str] = []
        self.held_records: list[Record] = []
        # (client, request_id) -> (fingerprint, chain, seq) as committed before this group,
        # for every entry of the group; None: look each one up as it comes
        self.stored: dict[tuple[str, str], tuple[str, str, int]] | None = None

    def look_up_requests(self, jobs: Sequence[_Job]) -> None:
        """Find the stored requests of all the group's entries with one query, not one each.

        Padded to a power of two so that few distinct statements reach the statement cache
        (a repeated key only repeats a row). What the group itself adds is in ``requests``.
        """
        keys = list({(e.client, e.request_id) for job in jobs for e in job.entries})
        if len(keys) < 2:
            return
        stored: dict[tuple[str, str], tuple[str, str, int]] = {}
        for i in range(0, len(keys), _LOOKUP_CHUNK):
            chunk = keys[i : i + _LOOKUP_CHUNK]
            size = 1 << (len(chunk) - 1).bit_length()
            chunk += [chunk[-1]] * (size - len(chunk))
            rows = self.conn.execute(_lookup_sql(size), [x for key in chunk for x in key])
            for client, request_id, fingerprint, chain, seq in rows:
                stored[(client, request_id)] = (fingerprint, chain, seq)
        self.stored = stored

    # WriterView
    def head(self, chain: str) -> ChainHead:
        h = self.heads.get(chain)
        if h is None:
            h = self.ledger._heads.get(chain)
        return h if h is not None else ChainHead(chain)

    def record(self, chain: str, seq: int) -> Record | None:
        row = self.conn.execute(
            "SELECT body, hash, sig FROM records WHERE chain = ? AND seq = ?", (chain, seq)
        ).fetchone()
        if row is None:
            return None
        return Record.from_body(parse_canonical(bytes(row[0])), row[1], row[2])

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(sql, params).fetchall()

    def claim(self, key: str) -> None:
        self.dynamic_claims.append(key)

    def run_job(self, job: _Job) -> None:
        if not job.atomic:
            job.result = []
            failed = False
            for e in job.entries:
                if failed:
                    job.result.append(Skipped("not tried: an earlier operation failed"))
                    continue
                out = self._one_or_error(e)
                failed = job.stop_on_error and isinstance(out, GatewayError)
                job.result.append(out)
            return
        self.conn.execute("SAVEPOINT job")
        saved = self._save()
        results: list[Outcome] = []
        for i, e in enumerate(job.entries):
            out = self._one_or_error(e)
            if isinstance(out, GatewayError):
                self.conn.execute("ROLLBACK TO job")
                self._restore(saved)
                job.result = [_AtomicAbort(i, out)] * len(job.entries)
                self.conn.execute("RELEASE job")
                return
            results.append(out)
        self.conn.execute("RELEASE job")
        job.result = results

    def _save(self) -> tuple[Any, ...]:
        return (
            dict(self.heads),
            dict(self.requests),
            list(self.held_chains),
            list(self.held_records),
        )

    def _restore(self, saved: tuple[Any, ...]) -> None:
        self.heads, self.requests, self.held_chains, self.held_records = saved

    def _one_or_error(self, e: Entry) -> Outcome:
        # the entry that opens a chain writes the held events first; if it is refused, so
        # are they (a refused request changes nothing) — unless the chain's offline budget
        # refused it: the held events themselves may fill it (policy block), and only once
        # they are in the chain can the uplink send them and the chain take sales again
        opens = bool(self.ledger._held) and self.head(e.chain).seq == 0
        if opens:
            self.conn.execute("SAVEPOINT opening")
            saved = self._save()
        out: Outcome
        try:
            out = self._one(e)
        except RequestError as exc:
            out = exc
        except ChainRuleError as exc:
            out = IntegrityError(str(exc))
        if opens:
            kept = isinstance(out, OfflineLimitReached) and e.chain in self.held_chains
            if isinstance(out, GatewayError) and not kept:
                self.conn.execute("ROLLBACK TO opening")
                self._restore(saved)
            self.conn.execute("RELEASE opening")
        return out

    def _write_held(self, chain: str) -> None:
        """The held gateway-wide events, as the first records of the new ``chain``."""
        for h in self.ledger._held:
            rid = f"{h.request_id}:{chain}"
            record = self._insert(
                Entry(chain, HELD_CLIENT, rid, rid, HELD_TYPE, h.payload), h.payload, (), h.time_ms
            )
            self.held_records.append(record)
        self.held_chains.append(chain)

    def delete_held(self) -> None:
        if self.held_chains and self.ledger._held:
            last = max(h.id for h in self.ledger._held)
            self.conn.execute("DELETE FROM held_events WHERE id <= ?", (last,))

    def _one(self, e: Entry) -> Signed:
        key = (e.client, e.request_id)
        pending = self.requests.get(key)
        if pending is not None:
            return self._replay(e, pending[0], pending[1])
        if self.stored is not None:
            row = self.stored.get(key)
        else:
            row = self.conn.execute(
                "SELECT fingerprint, chain, seq FROM requests WHERE client = ? AND request_id = ?",
                key,
            ).fetchone()
        if row is not None:
            stored = self.record(row[1], row[2])
            if stored is None:
                raise IntegrityError(f"request {e.request_id} points at a missing record")
            return self._replay(e, row[0], stored)
        if self.ledger._held and self.head(e.chain).seq == 0:
            self._write_held(e.chain)
        self.dynamic_claims = []
        payload = e.payload if e.prepare is None else e.prepare(self)
        assert payload is not None
        claims = (*e.claims, *self.dynamic_claims)
        for claim in claims:
            taken = self.conn.execute(
                "SELECT chain, seq FROM claims WHERE key = ?", (claim,)
            ).fetchone()
            if taken is not None:
                raise Conflict(_claim_conflict(claim, taken[0], taken[1]))
        return Signed(self._insert(e, payload, claims, self.now_ms))

    def _insert(
        self, e: Entry, payload: dict[str, Any], claims: Sequence[str], now_ms: int
    ) -> Record:
        """Make, sign and store the next record of ``e.chain`` (time: ``now_ms``, or the
        previous record's + 1 ms if that is later) with its request, outbox rows, claims and
        print job."""
        signer = self.ledger.signer
        d = draft(
            self.head(e.chain),
            record_type=e.record_type,
            client=e.client,
            request_id=e.request_id,
            payload=payload,
            now_ms=now_ms,
            key_id=signer.key_id,
            offline=self.ledger.is_offline(e.chain),
        )
        sig = signer.sign(d.body_bytes)
        body = d.body
        c = self.conn
        c.execute(
            "INSERT INTO records (chain, seq, type, number, time, client, request_id, key_id, "
            "hash, sig, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                body["chain"],
                body["seq"],
                body["type"],
                body["number"],
                body["time"],
                e.client,
                e.request_id,
                body["key_id"],
                d.hash,
                sig,
                d.body_bytes,
            ),
        )
        c.execute(
            "INSERT INTO requests (client, request_id, fingerprint, chain, seq) "
            "VALUES (?, ?, ?, ?, ?)",
            (e.client, e.request_id, e.fingerprint, body["chain"], body["seq"]),
        )
        for processor in self.ledger.processors:
            c.execute(
                "INSERT INTO outbox (processor, chain, seq, idempotency_key) VALUES (?, ?, ?, ?)",
                (processor, body["chain"], body["seq"], str(uuid.uuid4())),
            )
        for claim in claims:
            c.execute(
                "INSERT INTO claims (key, chain, seq) VALUES (?, ?, ?)",
                (claim, body["chain"], body["seq"]),
            )
        if e.print_job:
            c.execute(
                "INSERT INTO print_jobs (chain, seq) VALUES (?, ?)", (body["chain"], body["seq"])
            )
        record = Record.from_body(body, d.hash, sig)
        self.heads[e.chain] = d.head
        self.requests[(e.client, e.request_id)] = (e.fingerprint, record)
        return record

    def _replay(self, e: Entry, fingerprint: str, record: Record) -> Signed:
        if fingerprint != e.fingerprint:
            raise IdempotencyMismatch(
                f"request id {e.request_id!r} of {e.client!r} was already used for a different "
                f"request (signed as {record.chain} seq {record.seq}); use a new id"
            )
        self.replays += 1
        return Signed(record, replayed=True)

    def write_heads(self) -> None:
        for chain, h in self.heads.items():
            self.conn.execute(
                "INSERT INTO heads (chain, seq, hash) VALUES (?, ?, ?) ON CONFLICT(chain) "
                "DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                (chain, h.seq, h.hash),
            )


class Skipped(RequestError):
    """Outcome of an entry not tried because an earlier one failed (stop_on_error)."""

    code = "SKIPPED"


class _AtomicAbort(RequestError):
    """Every outcome of an atomic job that failed: which entry failed, and why."""

    def __init__(self, index: int, cause: GatewayError) -> None:
        super().__init__(
            f"operation {index} failed, nothing was signed: {cause.message}", cause.details
        )
        self.index = index
        self.cause = cause
        self.code = cause.code


def in_use(path: Path) -> bool:
    """Whether a gateway process (the daemon, a tool) holds the journal ``path`` open for
    writing: its ``<db>.lock`` is locked (see :meth:`Ledger._take_lock`)."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:  # no lock file: never opened; unreadable: opening the journal will say
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor releases a lock we took
    return False


def read_heads(path: Path) -> dict[str, tuple[int, str]]:
    with Reader(path) as r:
        return {h.chain: (h.seq, h.hash) for h in r.heads()}


__all__ = ["Entry", "KeyError_", "Ledger", "Outcome", "Signed", "Signer", "Skipped", "WriterView"]
