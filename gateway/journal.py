"""The fiscal journal in the daemon: clock, technical events, closing schedule, archives.

The composition root (gateway.app) makes one :class:`FiscalJournal` from the configuration
before the ledger opens (the ledger reads its clock), then:

- :meth:`FiscalJournal.start`, once the ledger is open and before the POS is served: records
  ``UNCLEAN_STOP`` (the previous run did not close cleanly), ``INTEGRITY_ALARM`` (the previous
  run halted signing), ``START``, ``CONFIG_CHANGED`` (the configuration hash differs from the
  last ``START``'s) and ``KEY_GENERATED``, then makes the closings a stopped box missed, each
  with its true period, and their archives;
- :meth:`FiscalJournal.tasks`: the event worker, the closing schedule (archives follow each
  closing), the integrity watch (a halt is remembered in ``<db>.halted`` so the next run
  that can sign records it). ``UPLINK_OFFLINE``, ``UPLINK_ONLINE``, ``OFFLINE_WARNING`` and
  ``OFFLINE_LIMIT`` are not watched here: the sync engine pushes them into ``events`` as
  they happen (gateway.sync);
- :meth:`FiscalJournal.stop`, after the listeners stopped: ``STOP``.

The parts: gateway.clock, gateway.events, gateway.closings, gateway.archive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any
from zoneinfo import ZoneInfo

from gateway import __version__
from gateway.archive import PERIODS, Archiver, ArchiveRun
from gateway.clock import DisciplinedClock, clock_source
from gateway.closings import Scheduler
from gateway.config import Config
from gateway.core.closing import Schedule, parse_closing_time, parse_year_end
from gateway.core.errors import SigningHalted
from gateway.core.events import KEY_GENERATED
from gateway.core.record import Record, format_time
from gateway.events import EventJournal
from gateway.ledger import Entry, Ledger
from gateway.reads import ReadPool
from gateway.store import Reader

log = logging.getLogger("gateway.journal")

#: Seconds between looks at whether signing halted (to remember it for the next run).
WATCH_S = 1.0
#: Seconds between looks for closings (made on request) still without an archive.
ARCHIVE_POLL_S = 60.0


def schedule_of(cfg: Config) -> Schedule:
    j = cfg.journal
    return Schedule(
        ZoneInfo(j.time_zone),
        parse_closing_time(j.closing_time) if j.closing_time else None,
        j.monthly_closing,
        j.yearly_closing,
        parse_year_end(j.fiscal_year_end),
    )


def last_config_hash(r: Reader) -> str | None:
    """``config_sha256`` of the latest ``START`` event in the journal (any chain, or held
    for the first chain)."""
    held = r.conn.execute(
        "SELECT payload FROM held_events "
        "WHERE json_extract(payload, '$.event') = 'START' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    if held is not None:  # held events exist only while no chain does
        value = json.loads(held[0]).get("config_sha256")
        return value if isinstance(value, str) else None
    best: tuple[str, str] | None = None
    for h in r.heads():
        row = r.conn.execute(
            "SELECT time, body FROM records WHERE chain = ? AND type = 'INTENTION::EVENT' "
            "AND json_extract(CAST(body AS TEXT), '$.payload.event') = 'START' "
            "ORDER BY seq DESC LIMIT 1",
            (h.chain,),
        ).fetchone()
        if row is not None and (best is None or row[0] > best[0]):
            best = (row[0], bytes(row[1]).decode("utf-8"))
    if best is None:
        return None
    value = json.loads(best[1])["payload"].get("config_sha256")
    return value if isinstance(value, str) else None


class FiscalJournal:
    def __init__(
        self,
        cfg: Config,
        *,
        env: Mapping[str, str] = os.environ,
        key_generated: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.key_generated = key_generated
        source, name = clock_source(env)
        self.events = EventJournal(
            window_s=cfg.journal.event_window_s,
            clock_ms=source,
            spool_dir=cfg.db_path.parent / "events",
        )
        self.clock = DisciplinedClock(
            source,
            forward_threshold_ms=int(cfg.journal.clock_jump_threshold_s * 1000),
            on_jump=lambda jump: self.events.record("CLOCK_JUMP", **jump.fields()),
            name=name,
        )
        self.events.clock_ms = self.clock.now_ms
        self.schedule = schedule_of(cfg)
        self.scheduler: Scheduler | None = None
        self.archiver: Archiver | None = None
        #: one archive run at a time (schedule, catch-up, admin API): never two writers
        #: in one archive directory
        self.archive_lock = asyncio.Lock()
        self.ledger: Ledger | None = None
        self.reads: ReadPool | None = None
        self.guard: Callable[[Entry], Entry] | None = None
        self.started_mono = time.monotonic()
        self.halt_mark = cfg.db_path.with_name(cfg.db_path.name + ".halted")

    # ------------------------------------------------------------------ start-up

    async def start(
        self,
        ledger: Ledger,
        reads: ReadPool,
        *,
        guard: Callable[[Entry], Entry] | None = None,
        on_signed: Callable[[list[Record]], None] | None = None,
    ) -> None:
        """The start-up records, missed closings and archives (before the POS is served)."""
        self.ledger = ledger
        self.reads = reads
        self.guard = guard
        self.clock.journal_ms = ledger.latest_time_ms
        self.events.bind(ledger, guard=guard, on_signed=on_signed)
        j = self.cfg.journal
        if j.archive_period:
            self.archiver = Archiver(
                ledger,
                reads,
                self.cfg.path(j.archive_dir),
                PERIODS[j.archive_period],
                clock_ms=self.clock.now_ms,
                guard=guard,
                lock=self.archive_lock,
            )
        self.scheduler = Scheduler(
            ledger,
            reads,
            self.schedule,
            clock_ms=self.clock.now_ms,
            guard=guard,
            on_closed=self._closed,
        )
        if ledger.halted is not None:
            return  # a halted journal takes no record; the watch remembers why
        self.clock.now_ms()  # a clock behind the journal is a CLOCK_JUMP before anything else
        previous_hash = await reads.run(last_config_hash)
        unclean = ledger.unclean_reason
        if unclean is not None and unclean != "new journal":
            await self.events.write("UNCLEAN_STOP", reason=unclean)
        await self._integrity_alarm()
        await self.events.write(
            "START",
            version=__version__,
            key_id=ledger.signer.key_id,
            config_sha256=self.cfg.source_sha256,
            time_zone=j.time_zone,
            clock=self.clock.name,
        )
        if previous_hash is not None and previous_hash != self.cfg.source_sha256:
            await self.events.write(
                "CONFIG_CHANGED",
                config_sha256=self.cfg.source_sha256,
                previous_sha256=previous_hash,
            )
        if self.key_generated is not None:
            await self.events.write(KEY_GENERATED, key_id=self.key_generated)
        await self.events.flush()
        made = await self.scheduler.catch_up()
        if made:
            log.info("made %d closing(s) missed while the gateway was off", len(made))
        if self.archiver is not None:
            await self.archiver.run_due()
        await self.events.ingest_spool()

    async def _integrity_alarm(self) -> None:
        try:
            data = json.loads(await asyncio.to_thread(self.halt_mark.read_text))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            data = {"reason": f"unreadable halt record: {exc}", "since": None}
        await self.events.write(
            "INTEGRITY_ALARM", reason=data.get("reason"), since=data.get("since")
        )
        with contextlib.suppress(OSError):
            self.halt_mark.unlink()

    async def archive(self, period: str, chain: str | None = None) -> ArchiveRun:
        """Archive the ``period`` (``MONTHLY``/``YEARLY``) closings of ``chain`` (None: of
        every chain) that have no archive yet, into ``journal.archive_dir`` (admin API)."""
        ledger, reads = self.ledger, self.reads
        if ledger is None or reads is None:
            raise SigningHalted("the journal is not open")
        if ledger.halted is not None:
            raise SigningHalted(f"signing is halted: {ledger.halted}")
        archiver = Archiver(
            ledger,
            reads,
            self.cfg.path(self.cfg.journal.archive_dir),
            PERIODS[period],
            clock_ms=self.clock.now_ms,
            guard=self.guard,
            lock=self.archive_lock,
        )
        return await archiver.run(chain)

    async def _closed(self, records: list[Record]) -> None:
        if self.archiver is not None and any(r.type == self.archiver.kind for r in records):
            await self.archiver.run_due()

    # ------------------------------------------------------------------ running

    def tasks(self, tg: asyncio.TaskGroup) -> None:
        tg.create_task(self.events.run(), name="event journal")
        if self.scheduler is not None:
            tg.create_task(self.scheduler.run(), name="closing schedule")
        tg.create_task(self._watch(), name="integrity watch")
        if self.archiver is not None:
            tg.create_task(self._archive_loop(self.archiver), name="archives")

    async def _archive_loop(self, archiver: Archiver) -> None:
        """Archives of closings the POS asked for (scheduled ones are archived at once)."""
        while True:
            await asyncio.sleep(ARCHIVE_POLL_S)
            try:
                await archiver.run_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("archive run failed")

    async def _watch(self) -> None:
        marked = False
        while True:
            ledger = self.ledger
            if ledger is not None and ledger.halted is not None and not marked:
                record = {"reason": ledger.halted, "since": format_time(self.clock.now_ms())}
                try:
                    await asyncio.to_thread(self.halt_mark.write_text, json.dumps(record))
                    marked = True
                except OSError as exc:
                    log.error("cannot remember the halt in %s: %s", self.halt_mark, exc)
            await asyncio.sleep(WATCH_S)

    def printer_event(self, name: str, details: dict[str, Any]) -> None:
        """The print worker's ``on_event`` hook (PRINTER_FAULT / PRINTER_RECOVERED)."""
        self.events.record(
            name,
            state=details.get("state"),
            problem=details.get("problem"),
            previous=details.get("previous"),
        )

    def config_reloaded(self, old_sha256: str, new_sha256: str) -> None:
        if old_sha256 != new_sha256:
            self.events.record(
                "CONFIG_CHANGED",
                config_sha256=new_sha256,
                previous_sha256=old_sha256,
                reloaded=True,
            )

    def status(self) -> dict[str, Any]:
        s = self.schedule
        nxt = s.next_boundary_ms(self.clock.now_ms()) if s.closing_time is not None else None
        return {
            "time_zone": self.cfg.journal.time_zone,
            "clock": self.clock.name,
            "clock_jumps": self.clock.jumps,
            "next_closing": format_time(nxt) if nxt is not None else None,
            "closings_made": self.scheduler.made if self.scheduler is not None else 0,
            "events_recorded": self.events.recorded,
            "events_dropped": self.events.dropped,
            "events_held": len(self.ledger.held()) if self.ledger is not None else 0,
        }

    # ------------------------------------------------------------------ stopping

    async def stop(self) -> None:
        """``STOP`` (and whatever events are still queued), before the ledger closes."""
        ledger = self.ledger
        if ledger is None or ledger.halted is not None or not ledger.writer_alive:
            return
        with contextlib.suppress(Exception):
            await self.events.flush()
            await self.events.write(
                "STOP", uptime_s=int(time.monotonic() - self.started_mono), clean=True
            )
