"""Benchmark receipt printing: encoding, bytes on the wire, and draining the print queue.

- encoding a typical receipt (3 lines, 2 VAT rates, native QR) and its duplicate: µs each;
- bytes per receipt and the wire-speed ceiling in receipts per minute at 19200 and 115200
  baud (8N1: 10 bits per byte), for 58 and 80 mm paper and for a raster QR;
- draining N queued jobs (real ledger on SQLite, print worker, fake printer on a real pty
  answering status and confirmations): jobs per second the gateway itself sustains — a pty
  has no baud rate, so this is the gateway's own ceiling, above the wire's.

    python bench/bench_printing.py [--encode 2000] [--jobs 500]

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from escpos_peer import FakePrinter, open_pty  # noqa: E402

from drivers.printers.device import EscposPrinter  # noqa: E402
from drivers.printers.escpos import PROFILES, Layout, encode_document  # noqa: E402
from drivers.printers.transport import SerialTransport  # noqa: E402
from drivers.signers.software import generate_key  # noqa: E402
from gateway.core.record import Record  # noqa: E402
from gateway.core.request import Rules  # noqa: E402
from gateway.dispatch import Dispatcher, receipt_data  # noqa: E402
from gateway.ledger import Ledger  # noqa: E402
from gateway.printing import PrintWorker  # noqa: E402
from gateway.reads import ReadPool  # noqa: E402


def sale_request(rid: str) -> dict[str, Any]:
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
            },
            {"text": "Croissant", "qty": "1", "unit_price": 130, "vat_rate": "5.50", "amount": 130},
            {
                "text": "Jus d'orange pressé",
                "qty": "1",
                "unit_price": 450,
                "vat_rate": "10.00",
                "amount": 450,
            },
        ],
        "payments": [{"method": "CARD", "amount": 1080}],
        "total": 1080,
    }


def typical_record() -> tuple[dict[str, Any], dict[str, Any]]:
    body = {
        "format": 1,
        "chain": "till-1",
        "seq": 1234,
        "type": "TRANSACTION::RECEIPT",
        "number": 1200,
        "time": "2026-11-21T09:00:00.123Z",
        "client": "till-1",
        "request_id": "r1",
        "counters": {},
        "totals": {},
        "offline": False,
        "prev_hash": "0" * 64,
        "key_id": "0123456789abcdef",
        "payload": {
            "currency": "EUR",
            "lines": sale_request("x")["lines"],
            "vat": [
                {"rate": "10.00", "net": 864, "vat": 86, "gross": 950},
                {"rate": "5.50", "net": 123, "vat": 7, "gross": 130},
            ],
            "total": 1080,
            "payments": [{"method": "CARD", "amount": 1080}],
        },
    }
    rec = Record.from_body(body, "ab" * 32, base64.b64encode(os.urandom(71)).decode())
    return rec.to_json(), receipt_data(rec)


def bench_encode(n: int) -> None:
    record, receipt = typical_record()
    shop = ("Café de la Gare", ("1 place de la Gare", "75010 Paris"), "FR40123456789")
    for width, profile in ((80, "epson-tm"), (58, "epson-tm"), (80, "generic-raster")):
        layout = Layout(paper_width_mm=width, merchant=shop[0], address=shop[1], vat_id=shop[2])
        p = PROFILES[profile]
        data = encode_document(record, receipt, profile=p, layout=layout)
        t0 = time.perf_counter()
        for _ in range(n):
            encode_document(record, receipt, profile=p, layout=layout)
        us = (time.perf_counter() - t0) / n * 1e6
        per_min = {baud: baud / 10 / len(data) * 60 for baud in (19200, 115200)}
        print(
            f"{width} mm {profile:15s} {len(data):6d} bytes  encode {us:7.1f} µs  "
            f"wire ceiling: {per_min[19200]:6.0f}/min at 19200, "
            f"{per_min[115200]:6.0f}/min at 115200 baud"
        )


async def until(check: Callable[[], bool]) -> None:
    while True:
        if check():
            return
        await asyncio.sleep(0.01)


async def bench_drain(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "gateway.db"
        signer = generate_key(Path(tmp) / "keys" / "signing.pem")
        ledger = await Ledger.open(db, signer)
        reads = ReadPool(db)
        dispatcher = Dispatcher(ledger, rules=Rules(), print_documents=True)
        master, slave, path = open_pty()
        fake = FakePrinter(master)
        fake.set(paper_out=True)  # queue everything first
        for i in range(n):
            reply = await dispatcher.handle(sale_request(f"s{i}"))
            assert reply["ok"], reply
        device = EscposPrinter(
            SerialTransport(path, baud=115200, flow_control="none"),
            PROFILES["epson-tm"],
            Layout(paper_width_mm=80),
        )
        worker = PrintWorker(ledger, reads, device, poll_s=0.05)
        task = asyncio.create_task(worker.run())
        try:
            await until(lambda: worker.state == "paused")
            t0 = time.perf_counter()
            fake.set(paper_out=False)
            await until(lambda: worker.printed >= n)
            s = time.perf_counter() - t0
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            fake.close()
            os.close(slave)
            reads.close()
            await ledger.close()
        size = len(fake.raw) / n
        print(
            f"drained {n} confirmed jobs in {s:.2f} s: {n / s:.0f} jobs/s "
            f"({n / s * 60:.0f}/min), {size:.0f} bytes per job incl. status queries"
        )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--encode", type=int, default=2000)
    ap.add_argument("--jobs", type=int, default=500)
    args = ap.parse_args()
    bench_encode(args.encode)
    asyncio.run(bench_drain(args.jobs))


if __name__ == "__main__":
    main()
