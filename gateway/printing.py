"""The print worker: drains the durable print queue to the configured printer.

Print jobs are rows written in the same transaction as their record, so a receipt is never
lost to a crash; signing never waits for the printer. The worker wakes when told that
something was signed (or every ``poll_s``), prints pending jobs in ``id`` order and records
each job's state through the ledger writer (one writer for the whole database, so the printer
never competes with signing for SQLite's write lock).

Two kinds of printer:

- the **virtual printer** (text file): jobs go ``pending → printed`` in bursts;
- an **ESC/POS printer** (:class:`~drivers.printers.device.EscposPrinter`, serial, network or
  file), driven from one dedicated IO thread:

  ``pending → sending → printed``  the printer confirmed it (``GS ( H`` process-ID response)
  ``pending → sending → sent``     written, and the printer cannot confirm (or did not, while
                                   reporting no fault): the last error says which
  ``pending → sending → failed``   outcome unknown (link lost mid-job, no confirmation after a
                                   fault, or a restart found it ``sending``): a duplicate
                                   (``INTENTION::DUPLICATE``) is signed and queued instead —
                                   an original is never printed twice.

  Before every job, and every ``poll_s`` while idle, the printer is asked for its status
  (``DLE EOT 1..4``). Offline, cover open, paper out or an error pauses the queue (the job
  stays ``pending``) and the status is polled again; a link failure or timeout closes the
  connection and retries with exponential backoff (``retry_min_s`` … ``retry_max_s``).
  Nothing here ever blocks the event loop or the ledger writer.

Faults and recoveries are logged and passed to ``on_event(name, details)`` —
``PRINTER_FAULT`` / ``PRINTER_RECOVERED`` — the hook where technical-event records
(``INTENTION::EVENT``) will be made once that record type is specified.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from drivers.printers.device import EscposPrinter
from drivers.printers.escpos import encode_document, encode_test_page, process_id_of
from drivers.printers.status import PrinterStatus
from drivers.printers.virtual import VirtualPrinter, render_text
from gateway.core.errors import DeviceError, GatewayError
from gateway.core.record import Record, format_time
from gateway.dispatch import Dispatcher, receipt_data
from gateway.ledger import Ledger
from gateway.reads import ReadPool
from gateway.store import Reader
from gateway.wakeups import wait_event

log = logging.getLogger("gateway.printing")

T = TypeVar("T")

#: ``reprint(chain, seq, request_id, reason)``: sign a duplicate of a record (and queue it).
Reprint = Callable[[str, int, str, str], Awaitable[Record]]
#: ``on_event(name, details)``: printer fault / recovery (technical-event hook).
OnEvent = Callable[[str, dict[str, Any]], None]

PrintJob = tuple[int, Record, dict[str, Any] | None]

JOB_STATES = ("pending", "sending", "sent", "printed", "failed")


def reprinter(dispatcher: Dispatcher) -> Reprint:
    """Duplicates through the dispatcher, exactly as a POS ``reprint`` request makes them
    (copy counter, claims); ``request_id`` makes a retry after a crash sign nothing new."""

    async def reprint(chain: str, seq: int, request_id: str, reason: str) -> Record:
        request = {
            "id": request_id,
            "op": "reprint",
            "till": chain,
            "ref": {"chain": chain, "seq": seq},
            "reason": reason,
        }
        signed = await dispatcher.ledger.submit(dispatcher.entry("reprint", request))
        return signed.record

    return reprint


def _record(chain: str, seq: int, r: Reader) -> Record | None:
    stored = r.record(chain, seq)
    if stored is None:
        return None
    return Record.from_body(json.loads(stored.body), stored.hash, stored.sig)


class _Paused(Exception):
    """The printer reported a fault: stop this cycle, poll its status again later."""


class PrintWorker:
    def __init__(
        self,
        ledger: Ledger,
        reads: ReadPool,
        printer: VirtualPrinter | EscposPrinter,
        *,
        header: str = "",
        poll_s: float = 2.0,
        batch: int = 50,
        coalesce_s: float = 0.05,
        confirm_timeout_s: float = 30.0,
        retry_min_s: float = 0.5,
        retry_max_s: float = 30.0,
        reprint: Reprint | None = None,
        on_event: OnEvent | None = None,
    ) -> None:
        self.ledger = ledger
        self.reads = reads
        self.printer = printer
        self.header = header
        self.poll_s = poll_s
        self.batch = batch
        # After a wake-up, wait this long so that a burst of sales is printed and marked in
        # one go (one fsync, one writer commit) instead of competing with signing per sale.
        self.coalesce_s = coalesce_s
        self.confirm_timeout_s = confirm_timeout_s
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.reprint = reprint
        self.on_event = on_event
        self.wake = asyncio.Event()
        self.printed = 0
        self.sent = 0
        self.duplicates = 0
        self.last_error: str | None = None
        #: "starting", "ready", "paused" (the printer reports a fault) or "unreachable"
        self.state = "starting"
        self.problem: str | None = None
        self.since = format_time(time.time_ns() // 1_000_000)
        self.printer_status: PrinterStatus | None = None
        self._retry_s = 0.0
        self._awaiting: tuple[int, Record, str] | None = None
        self._io: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ status

    def snapshot(self) -> dict[str, Any]:
        """The printer part of the status page (no IO)."""
        device = self.printer if isinstance(self.printer, EscposPrinter) else None
        return {
            "state": "ready" if device is None else self.state,
            "problem": self.problem,
            "since": self.since,
            "device": device.name if device else str(getattr(self.printer, "path", "")),
            "status": self.printer_status.to_json() if self.printer_status else None,
            "printed_since_start": self.printed,
            "sent_since_start": self.sent,
            "duplicates_since_start": self.duplicates,
            "last_error": self.last_error,
        }

    async def print_test_page(self) -> str:
        """A test page (the maintenance action): sent in the printer's IO thread, between
        jobs; returns where it went. Device errors propagate (GatewayError)."""
        if isinstance(self.printer, EscposPrinter):
            device = self.printer
            if self._io is None:
                raise DeviceError("the printer worker is not running")
            page = encode_test_page(device.profile, device.layout)
            await self._in_io(device.send, page, None)
            return device.name
        await asyncio.to_thread(self.printer.print_texts, ["TEST PAGE\nfiscal-gateway\n"])
        return str(getattr(self.printer, "path", ""))

    async def job_counts(self) -> dict[str, int]:
        def q(r: Reader) -> dict[str, int]:
            rows = r.conn.execute("SELECT state, count(*) FROM print_jobs GROUP BY state")
            return {**dict.fromkeys(JOB_STATES, 0), **dict(rows)}

        return await self.reads.run(q)

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        if isinstance(self.printer, EscposPrinter):
            await self._run_device(self.printer)
            return
        while True:
            await self._sleep(self.poll_s)
            await asyncio.sleep(self.coalesce_s)
            self.wake.clear()
            try:
                while await self._drain_virtual():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = str(exc)
                log.exception("print worker error")

    async def _sleep(self, delay_s: float) -> None:
        """Until woken or ``delay_s`` passed. (``asyncio.timeout``, not ``wait_for``: on
        Python 3.11 ``wait_for`` can swallow a cancellation that races the wake-up, and a
        worker that cannot be cancelled keeps the daemon from stopping.)"""
        await wait_event(self.wake, delay_s)

    async def _drain_virtual(self) -> bool:
        assert isinstance(self.printer, VirtualPrinter)
        jobs = await self.reads.run(self._pending)
        if not jobs:
            return False
        printer = self.printer

        def render_and_print() -> None:
            # Rendering and encoding are CPU work: done here, in a worker thread, with the
            # file writes, so the event loop keeps serving requests meanwhile.
            out: list[tuple[str, str, bytes | None]] = []
            for job_id, rec, orig in jobs:
                doc, receipt = rec.to_json(), receipt_data(rec)
                text = render_text(doc, receipt, header=self.header, original=orig)
                data = None
                if printer.escpos is not None:
                    profile, layout = printer.escpos
                    data = encode_document(
                        doc, receipt, profile=profile, layout=layout, original=orig
                    )
                out.append((f"{job_id:08d}-{rec.chain}-{rec.seq}", text, data))
            printer.print_jobs(out)

        await asyncio.to_thread(render_and_print)
        done = [job_id for job_id, _, _ in jobs]
        self.printed += len(done)
        await self._mark_many(done, "printed")
        return len(jobs) == self.batch

    async def _run_device(self, device: EscposPrinter) -> None:
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="printer-io")
        try:
            delay = 0.0
            while True:
                if delay > 0:
                    await self._sleep(delay)
                self.wake.clear()
                delay = await self._cycle(device)
        finally:
            device.abort()
            io, self._io = self._io, None
            try:
                # after whatever call is still running in the IO thread (bounded by timeouts)
                await asyncio.get_running_loop().run_in_executor(io, device.disconnect)
            finally:
                io.shutdown(wait=False)

    async def _in_io(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._io is not None
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def _cycle(self, device: EscposPrinter) -> float:
        """One pass; returns how long to wait before the next one (0: go on at once)."""
        try:
            await self._settle_unknown()
            if self._awaiting is not None:
                await self._resume_awaiting(device)
            jobs = await self.reads.run(self._pending)
            if not jobs:
                await self._check(device)
                return self.poll_s
            for job in jobs:
                await self._check(device)
                await self._print(device, job)
            return 0.0 if len(jobs) == self.batch else self.poll_s
        except _Paused:
            return self.poll_s
        except DeviceError as exc:
            await self._in_io(device.disconnect)
            self._set_state("unreachable", f"{exc.code}: {exc.message}", None)
            self._retry_s = min(self.retry_max_s, max(self.retry_min_s, self._retry_s * 2))
            return self._retry_s
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or a storage problem: keep the worker alive
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("print worker error")
            self._retry_s = min(self.retry_max_s, max(self.retry_min_s, self._retry_s * 2))
            return self._retry_s

    async def _check(self, device: EscposPrinter) -> None:
        """Status before a job (and while idle): pause on a fault, note a recovery."""
        st = await self._in_io(device.status)
        self.printer_status = st
        if st is not None and not st.ready:
            self._set_state("paused", st.problem, st)
            raise _Paused
        self._retry_s = 0.0
        self._set_state("ready", None, st)

    async def _print(self, device: EscposPrinter, job: PrintJob) -> None:
        job_id, record, original = job
        data = encode_document(
            record.to_json(),
            receipt_data(record),
            profile=device.profile,
            layout=device.layout,
            original=original,
        )
        pid = process_id_of(job_id) if device.confirms else None
        await self._mark(job_id, "sending", attempt=True)
        try:
            await self._in_io(device.send, data, pid)
        except DeviceError as exc:
            await self._unknown(job_id, record, f"sending failed: {exc.message}")
            raise
        if pid is None:
            self.sent += 1
            await self._mark(job_id, "sent")
            return
        await self._confirm(device, job_id, record, pid)

    async def _confirm(self, device: EscposPrinter, job_id: int, record: Record, pid: str) -> None:
        try:
            if await self._in_io(device.wait_confirmation, pid, self.confirm_timeout_s):
                self.printed += 1
                await self._mark(job_id, "printed")
                return
            st = await self._in_io(device.status)
        except DeviceError as exc:
            await self._unknown(job_id, record, f"link lost before confirmation: {exc.message}")
            raise
        if st is None or st.ready:
            # Online and no fault, yet no process-ID response: a printer that does not
            # implement GS ( H (check printer.profile). Printed as far as we can tell.
            self.sent += 1
            await self._mark(
                job_id, "sent", error=f"no print confirmation within {self.confirm_timeout_s:g} s"
            )
            return
        # Stopped mid-job (paper out, cover open): the rest is in the printer's buffer and
        # prints after the fix; keep the job 'sending' and wait for its confirmation then.
        self._awaiting = (job_id, record, pid)
        self.printer_status = st
        self._set_state("paused", st.problem, st)
        raise _Paused

    async def _resume_awaiting(self, device: EscposPrinter) -> None:
        assert self._awaiting is not None
        job_id, record, pid = self._awaiting
        await self._check(device)  # raises _Paused while the fault lasts
        self._awaiting = None
        try:
            confirmed = await self._in_io(device.wait_confirmation, pid, self.confirm_timeout_s)
        except DeviceError as exc:
            await self._unknown(job_id, record, f"link lost before confirmation: {exc.message}")
            raise
        if confirmed:
            self.printed += 1
            await self._mark(job_id, "printed")
        else:
            await self._unknown(job_id, record, "no confirmation after the printer recovered")

    async def _settle_unknown(self) -> None:
        """Jobs left ``sending`` by an earlier run (crash, restart): outcome unknown."""

        def q(r: Reader) -> list[tuple[int, str, int]]:
            return r.conn.execute(
                "SELECT id, chain, seq FROM print_jobs WHERE state = 'sending' ORDER BY id"
            ).fetchall()

        awaiting = self._awaiting[0] if self._awaiting else None
        for job_id, chain, seq in await self.reads.run(q):
            if job_id == awaiting:
                continue
            record = await self.reads.run(partial(_record, chain, seq))
            if record is not None:
                await self._unknown(job_id, record, "the gateway stopped while it was printing")

    async def _unknown(self, job_id: int, record: Record, why: str) -> None:
        """Outcome unknown: sign a duplicate (printed later) and close this job as failed.

        If the duplicate cannot be signed now the job stays ``sending`` and is settled on a
        later pass; the request id makes sure only one duplicate is ever signed for it.
        """
        chain, seq = record.chain, record.seq
        if record.type == "INTENTION::DUPLICATE":  # a copy of a copy copies the original
            ref = record.payload["ref"]
            chain, seq = ref["chain"], ref["seq"]
        note = f"outcome unknown ({why})"
        if self.reprint is None:
            log.error("print job %d: %s; no reprint configured", job_id, note)
            await self._mark(job_id, "failed", error=note)
            return
        try:
            dup = await self.reprint(chain, seq, f"gateway:print-job-{job_id}", note[:200])
        except GatewayError as exc:
            self.last_error = f"print job {job_id}: {note}; reprint failed: {exc.message}"
            log.error("%s", self.last_error)
            return
        self.duplicates += 1
        log.warning(
            "print job %d (%s seq %d): %s; printing duplicate %s seq %d",
            job_id,
            record.chain,
            record.seq,
            note,
            dup.chain,
            dup.seq,
        )
        await self._mark(job_id, "failed", error=f"{note}; reprinted as {dup.chain} seq {dup.seq}")
        self.wake.set()

    # ------------------------------------------------------------------ state

    def _set_state(self, state: str, problem: str | None, st: PrinterStatus | None) -> None:
        if st is not None:
            self.printer_status = st
        if (state, problem) == (self.state, self.problem):
            return
        previous = self.state
        self.state, self.problem = state, problem
        self.since = format_time(time.time_ns() // 1_000_000)
        details = {
            "state": state,
            "problem": problem,
            "previous": previous,
            "status": st.to_json() if st else None,
        }
        if state == "ready":
            self.last_error = None  # what the status page (and MQTT alerts) call a fault
            if previous != "starting":
                log.info("printer recovered", extra={"code": "PRINTER_RECOVERED"})
                self._event("PRINTER_RECOVERED", details)
            else:
                log.info("printer ready")
            return
        self.last_error = problem
        log.warning("printer %s: %s", state, problem, extra={"code": "PRINTER_FAULT"})
        self._event("PRINTER_FAULT", details)

    def _event(self, name: str, details: dict[str, Any]) -> None:
        if self.on_event is None:
            return
        try:
            self.on_event(name, details)
        except Exception:
            log.exception("printer event hook failed")

    # ------------------------------------------------------------------ database

    async def _mark(
        self, job_id: int, state: str, *, error: str | None = None, attempt: bool = False
    ) -> None:
        def mark(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE print_jobs SET state = ?, last_error = ?, attempts = attempts + ?, "
                "updated_at = strftime('%Y-%m-%dT%H:%M:%fZ','now') WHERE id = ?",
                (state, error, 1 if attempt else 0, job_id),
            )

        await self.ledger.control(mark)

    async def _mark_many(self, job_ids: list[int], state: str) -> None:
        def mark(conn: sqlite3.Connection) -> None:
            # One transaction: the writer connection is in autocommit mode, where each UPDATE
            # of an executemany would be its own commit and fsync.
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "UPDATE print_jobs SET state = ?, attempts = attempts + 1, "
                    "updated_at = strftime('%Y-%m-%dT%H:%M:%fZ','now') WHERE id = ?",
                    [(state, i) for i in job_ids],
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        await self.ledger.control(mark)

    def _pending(self, r: Reader) -> list[PrintJob]:
        rows = r.conn.execute(
            "SELECT p.id, r.body, r.hash, r.sig FROM print_jobs p JOIN records r "
            "ON r.chain = p.chain AND r.seq = p.seq WHERE p.state = 'pending' "
            "ORDER BY p.id LIMIT ?",
            (self.batch,),
        ).fetchall()
        out = []
        for job_id, body, h, sig in rows:
            b: dict[str, Any] = json.loads(body)
            original = None
            ref = b["payload"].get("ref") if b["type"] == "INTENTION::DUPLICATE" else None
            for _ in range(8):  # a copy of a copy prints the original's content
                if ref is None:
                    break
                stored = r.record(ref["chain"], ref["seq"])
                original = json.loads(stored.body) if stored is not None else None
                is_copy = original is not None and original["type"] == "INTENTION::DUPLICATE"
                ref = original["payload"].get("ref") if original and is_copy else None
            out.append((job_id, Record.from_body(b, h, sig), original))
        return out
