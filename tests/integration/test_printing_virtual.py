"""The virtual printer and the print worker, on a real ledger and SQLite file."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

from drivers.printers.escpos import PROFILES, Layout
from drivers.printers.virtual import VirtualPrinter
from drivers.signers.software import SoftwareSigner
from gateway.core.request import Rules
from gateway.dispatch import Dispatcher
from gateway.ledger import Ledger
from gateway.printing import PrintWorker
from gateway.reads import ReadPool


def _sale(rid: str) -> dict[str, Any]:
    return {
        "id": rid,
        "op": "sign",
        "till": "till-1",
        "type": "RECEIPT",
        "currency": "EUR",
        "lines": [
            {
                "text": "Café crème",
                "qty": "2",
                "unit_price": 250,
                "vat_rate": "10.00",
                "amount": 500,
            }
        ],
        "payments": [{"method": "CASH", "amount": 500}],
        "total": 500,
    }


async def test_print_worker_sale_and_reprint_prints_documents_and_marks_jobs(
    tmp_path: Path, signer: SoftwareSigner
) -> None:
    db = tmp_path / "gateway.db"
    ledger = await Ledger.open(db, signer)
    reads = ReadPool(db)
    out = tmp_path / "printer" / "virtual-printer.txt"
    worker = PrintWorker(
        ledger,
        reads,
        VirtualPrinter(out, escpos=(PROFILES["generic"], Layout(merchant="SHOP"))),
        header="SHOP",
        poll_s=0.05,
        coalesce_s=0.0,
    )
    task = asyncio.create_task(worker.run())
    try:
        d = Dispatcher(ledger, rules=Rules(), print_documents=True)
        sale = await d.handle(_sale("s1"))
        assert sale["ok"], sale
        copy = await d.handle(
            {"id": "p1", "op": "reprint", "till": "till-1", "ref": {"chain": "till-1", "seq": 1}}
        )
        assert copy["ok"], copy
        worker.wake.set()
        for _ in range(100):
            if worker.printed >= 2:
                break
            await asyncio.sleep(0.05)
        assert worker.printed == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        reads.close()
        await ledger.close()
    text = out.read_text()
    first, second = text.split("=" * 42)[:2]
    assert "TICKET" in first and "Café crème" in first and "5.00 EUR" in first
    assert "till-1-R-00000001" in first
    # the copy carries the original's content under its own DUPLICATA title and number
    assert "DUPLICATA - COPY 1" in second and "Café crème" in second
    assert "till-1-D-00000001" in second
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    # one ESC/POS file per job with its text rendering beside it
    jobs = sorted((out.parent / "jobs").iterdir())
    assert [p.name for p in jobs] == [
        "00000001-till-1-1.bin",
        "00000001-till-1-1.txt",
        "00000002-till-1-2.bin",
        "00000002-till-1-2.txt",
    ]
    sale_bytes = jobs[0].read_bytes()
    assert sale_bytes.startswith(b"\x1b@")  # ESC @ first
    assert b"\x1dV" in sale_bytes  # the cut
    assert "Café crème".encode("cp858") in sale_bytes  # the configured code page
    assert sale["receipt"]["qr"].encode("ascii") in sale_bytes  # native QR payload
    assert b"DUPLICATA" in jobs[2].read_bytes()
    assert "Café crème" in jobs[1].read_text() and "DUPLICATA" in jobs[3].read_text()
    with closing(sqlite3.connect(db)) as conn:
        states = conn.execute("SELECT state FROM print_jobs ORDER BY id").fetchall()
    assert states == [("printed",), ("printed",)]


async def test_print_worker_no_printer_configured_keeps_jobs_queued(
    tmp_path: Path, signer: SoftwareSigner
) -> None:
    db = tmp_path / "gateway.db"
    ledger = await Ledger.open(db, signer)
    try:
        d = Dispatcher(ledger, rules=Rules(), print_documents=False)
        assert (await d.handle(_sale("s1")))["ok"]
    finally:
        await ledger.close()
    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM print_jobs").fetchone() == (0,)
