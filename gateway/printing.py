"""The print worker: drains the durable print queue to the configured printer.

Print jobs are rows written in the same transaction as their record, so a receipt is never
lost to a crash; signing never waits for the printer. The worker wakes when told that
something was signed (or every ``poll_s``), prints pending jobs in order and marks them
``printed`` through the ledger writer (one writer for the whole database, so the printer
never competes with signing for SQLite's write lock). A job that fails is retried later and
its error is kept for the status page.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from typing import Any

from drivers.printers.virtual import VirtualPrinter, render_text
from gateway.core.record import Record
from gateway.dispatch import receipt_data
from gateway.ledger import Ledger
from gateway.reads import ReadPool
from gateway.store import Reader

log = logging.getLogger("gateway.printing")


class PrintWorker:
    def __init__(
        self,
        ledger: Ledger,
        reads: ReadPool,
        printer: VirtualPrinter,
        *,
        header: str = "",
        poll_s: float = 2.0,
        batch: int = 50,
        coalesce_s: float = 0.05,
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
        self.wake = asyncio.Event()
        self.printed = 0
        self.last_error: str | None = None

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), self.poll_s)
            except TimeoutError:
                pass
            await asyncio.sleep(self.coalesce_s)
            self.wake.clear()
            try:
                while await self._drain_once():
                    pass
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = str(exc)
                log.exception("print worker error")

    async def _drain_once(self) -> bool:
        jobs = await self.reads.run(self._pending)
        if not jobs:
            return False
        texts = [
            render_text(rec.to_json(), receipt_data(rec), header=self.header, original=orig)
            for _, rec, orig in jobs
        ]
        await asyncio.to_thread(self.printer.print_texts, texts)
        done = [job_id for job_id, _, _ in jobs]
        self.printed += len(done)

        def mark(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE print_jobs SET state = 'printed', attempts = attempts + 1, "
                "updated_at = strftime('%Y-%m-%dT%H:%M:%fZ','now') WHERE id = ?",
                [(i,) for i in done],
            )

        await self.ledger.control(mark)
        return len(jobs) == self.batch

    def _pending(self, r: Reader) -> list[tuple[int, Record, dict[str, Any] | None]]:
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
            if b["type"] == "INTENTION::DUPLICATE":
                ref = b["payload"]["ref"]
                stored = r.record(ref["chain"], ref["seq"])
                original = json.loads(stored.body) if stored is not None else None
            out.append((job_id, Record.from_body(b, h, sig), original))
        return out
