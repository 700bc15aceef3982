"""The technical event journal: ``INTENTION::EVENT`` records, never in a sale's way.

Any part of the daemon reports an event with one call (docs/events.md has the code table)::

    events.record("UPLINK_OFFLINE", chain="till-1", processor="france/fiskaly", error="...")

:meth:`EventJournal.record` only queues: it is thread-safe, never blocks and never raises
(a bad code or field is logged and dropped), so it can be called from the event loop, the
ledger writer thread (clock jumps) or a device thread. A worker task signs the queued events
through the ledger writer like any other record. ``chain=None`` means an event of the
gateway as a whole: it is written into every chain the journal holds; a gateway with no
chain yet (a fresh install) holds it in the journal file until its first chain is made, and
the ledger writes it there first, with its own time (:meth:`Ledger.hold_events`).
Identical events (same code, chain and fields) within ``journal.event_window_s`` are written
once, and the repeats as one more record with ``count``, ``first_time`` and ``last_time``
when the window ends (:class:`gateway.core.events.RateLimiter`).

:meth:`EventJournal.write` records at once and waits for the records (start-up, shutdown).
Command-line tools that cannot take the ledger writer while the daemon runs drop events into
the **spool** (:func:`spool_event`, ``<db dir>/events/*.json``); the daemon signs and removes
them at start-up and every few seconds, exactly once (the file name is the request id).

While signing is halted, events are logged and dropped: a halted journal takes no record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway.core.canonical import MAX_SAFE_INT
from gateway.core.errors import GatewayError
from gateway.core.events import RateLimiter, event_payload
from gateway.core.record import Record
from gateway.ledger import Entry, Ledger, Signed
from gateway.wakeups import wait_event

log = logging.getLogger("gateway.events")

CLIENT = "gateway"
EVENT = "INTENTION::EVENT"
#: Queued events beyond this are dropped (and counted): a broken hook cannot eat memory.
MAX_QUEUED = 10_000
#: Seconds between looks into the spool directory.
SPOOL_POLL_S = 5.0
_MAX_TEXT = 1000


def plain(value: Any, depth: int = 0) -> Any:
    """``value`` as record-safe JSON: no floats (decimal strings), bounded strings."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if abs(value) <= MAX_SAFE_INT else str(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, str):
        return value[:_MAX_TEXT]
    if depth < 4 and isinstance(value, dict):
        return {str(k)[:64]: plain(v, depth + 1) for k, v in value.items()}
    if depth < 4 and isinstance(value, list | tuple):
        return [plain(v, depth + 1) for v in value[:50]]
    return str(value)[:_MAX_TEXT]


def spool_event(spool_dir: Path, code: str, *, chain: str | None = None, **fields: Any) -> Path:
    """Leave an event for the daemon to sign (a tool without the ledger writer)."""
    payload = event_payload(code, plain(fields))
    spool_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    name = f"{uuid.uuid4().hex}.json"
    tmp = spool_dir / f".{name}.tmp"
    data = json.dumps({"chain": chain, "payload": payload}).encode("utf-8")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    final = spool_dir / name
    os.replace(tmp, final)
    with contextlib.suppress(OSError):
        dfd = os.open(spool_dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return final


class EventJournal:
    """Queues technical events and signs them through the ledger (see the module docstring)."""

    def __init__(
        self,
        *,
        window_s: float,
        clock_ms: Callable[[], int],
        spool_dir: Path | None = None,
    ) -> None:
        self.limiter = RateLimiter(int(window_s * 1000))
        self.clock_ms = clock_ms
        self.spool_dir = spool_dir
        self.ledger: Ledger | None = None
        self.guard: Callable[[Entry], Entry] | None = None
        self.on_signed: Callable[[list[Record]], None] | None = None
        self.recorded = 0
        self.dropped = 0
        self._queue: deque[tuple[str | None, dict[str, Any]]] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def bind(
        self,
        ledger: Ledger,
        *,
        guard: Callable[[Entry], Entry] | None = None,
        on_signed: Callable[[list[Record]], None] | None = None,
    ) -> None:
        """Start writing into ``ledger`` (call on the event loop, once the ledger is open).
        ``guard``: the sync engine's offline-budget check; ``on_signed``: told of records."""
        self.ledger = ledger
        self.guard = guard
        self.on_signed = on_signed
        self._loop = loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if on_signed is not None:
            # held events written into a new chain (in the writer thread): tell on_signed,
            # on the loop, before the caller that opened the chain hears of its record
            def held_written(records: list[Record]) -> None:
                with contextlib.suppress(RuntimeError):  # the loop is closed
                    loop.call_soon_threadsafe(on_signed, records)

            ledger.on_held_written = held_written
        self._poke()

    # ------------------------------------------------------------------ reporting

    def record(self, code: str, *, chain: str | None = None, **fields: Any) -> None:
        """Queue an event (thread-safe; never blocks, never raises)."""
        try:
            payload = event_payload(code, plain(fields))
        except ValueError as exc:
            log.error("event %s not recorded: %s", code, exc)
            return
        with self._lock:
            if len(self._queue) >= MAX_QUEUED:
                self.dropped += 1
                log.error("event queue full; %s dropped", code)
                return
            self._queue.append((chain, payload))
        self._poke()

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(wake.set)

    async def write(self, code: str, *, chain: str | None = None, **fields: Any) -> list[Record]:
        """Record an event now (no rate limit) and return its records (none when it is held
        for the first chain)."""
        return await self._submit([(chain, event_payload(code, plain(fields)))])

    # ------------------------------------------------------------------ the worker

    async def run(self) -> None:
        """Sign queued events, bursts and spooled events until cancelled."""
        assert self._wake is not None
        spool_at = 0.0
        loop = asyncio.get_running_loop()
        while True:
            timeout = SPOOL_POLL_S
            nxt = self.limiter.next_due_ms()
            if nxt is not None:
                timeout = min(timeout, max(0.0, (nxt - self.clock_ms()) / 1000))
            await wait_event(self._wake, timeout)
            self._wake.clear()
            await self._drain(flush=False)
            if self.spool_dir is not None and loop.time() >= spool_at:
                await self.ingest_spool()
                spool_at = loop.time() + SPOOL_POLL_S

    async def flush(self) -> None:
        """Sign everything queued and every pending burst now (before a clean stop)."""
        await self._drain(flush=True)

    async def _drain(self, *, flush: bool) -> None:
        with self._lock:
            queued = list(self._queue)
            self._queue.clear()
        now = self.clock_ms()
        items = [(c, p) for c, p in queued if self.limiter.offer(c, p, now)]
        items += [(b.chain, b.payload) for b in self.limiter.due(now, flush=flush)]
        if items:
            await self._submit(items)

    async def _submit(self, items: Sequence[tuple[str | None, dict[str, Any]]]) -> list[Record]:
        ledger = self.ledger
        if ledger is None:
            for _chain, payload in items:
                log.warning("event %s not recorded: the journal is not open", payload["event"])
            return []
        records, _ = await self._sign(ledger, [(c, p, f"ev-{uuid.uuid4().hex}") for c, p in items])
        return records

    async def _sign(
        self, ledger: Ledger, items: Sequence[tuple[str | None, dict[str, Any], str]]
    ) -> tuple[list[Record], bool]:
        """Sign ``(chain, payload, request id)`` items; the records and whether all were
        (gateway-wide events held for the first chain count as done)."""
        chains = sorted(ledger.heads())
        gateway_wide = [(rid, p) for c, p, rid in items if c is None]
        if gateway_wide and not chains:
            try:
                chains = await ledger.hold_events(gateway_wide)
            except GatewayError as exc:
                log.error("%d event(s) not held: %s", len(gateway_wide), exc.message)
                return [], False
            if not chains:
                for _rid, payload in gateway_wide:
                    log.info("event %s held until the first chain is made", payload["event"])
                items = [(c, p, rid) for c, p, rid in items if c is not None]
        entries = []
        for chain, payload, rid in items:
            for c in [chain] if chain is not None else chains:
                request_id = rid if chain is not None else f"{rid}:{c}"
                e = Entry(c, CLIENT, request_id, request_id, EVENT, payload)
                entries.append(self.guard(e) if self.guard is not None else e)
        if not entries:
            return [], True
        try:
            outcomes = await ledger.submit_many(entries, atomic=False)
        except GatewayError as exc:
            log.error("%d event record(s) not written: %s", len(entries), exc.message)
            return [], False
        records = []
        for entry, o in zip(entries, outcomes, strict=True):
            if isinstance(o, Signed):
                records.append(o.record)
                self.recorded += 0 if o.replayed else 1
            else:
                log.error("event not written to %s: %s: %s", entry.chain, o.code, o.message)
        if records and self.on_signed is not None:
            self.on_signed(records)
        return records, len(records) == len(entries)

    # ------------------------------------------------------------------ the spool

    async def ingest_spool(self) -> int:
        """Sign the spooled events (oldest first) and remove their files; how many."""
        ledger, spool = self.ledger, self.spool_dir
        if ledger is None or spool is None or ledger.halted is not None:
            return 0
        files = await asyncio.to_thread(_spooled, spool)
        done = 0
        for path in files:
            try:
                data = json.loads(await asyncio.to_thread(path.read_bytes))
                chain = data["chain"]
                # record-safe like any event (a spool file is written by other processes)
                fields = plain(data["payload"])
                if not isinstance(fields, dict):
                    raise TypeError("payload is not an object")
                payload = event_payload(fields.pop("event"), fields)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.error("spooled event %s unreadable (%s); set aside", path.name, exc)
                with contextlib.suppress(OSError):
                    path.rename(path.with_name(path.name + ".bad"))
                continue
            _, complete = await self._sign(ledger, [(chain, payload, f"spool-{path.stem}")])
            if complete:
                with contextlib.suppress(OSError):
                    path.unlink()
                done += 1
        return done


def _spooled(spool: Path) -> list[Path]:
    try:
        files = [p for p in spool.iterdir() if p.suffix == ".json" and not p.name.startswith(".")]
    except FileNotFoundError:
        return []
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))
