"""The daemon with a serial ESC/POS printer: a fake printer on a real pty, the daemon a real
subprocess configured with ``[printer] kind = "serial"`` pointing at the pty."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from escpos_peer import FakePrinter, open_pty

Daemon = Any  # tests/e2e/conftest.py: the daemon subprocess handle
StartDaemon = Callable[..., Any]


@pytest.fixture
def fake() -> Iterator[tuple[FakePrinter, str]]:
    master, slave, path = open_pty()
    printer = FakePrinter(master)
    try:
        yield printer, path
    finally:
        printer.close()
        os.close(slave)


def config(path: str) -> str:
    return f"""
[printer]
kind = "serial"
device = "{path}"
baud = 115200
flow_control = "none"
paper_width_mm = 58
merchant = "Café de la Gare"
status_timeout_s = 0.5
poll_s = 0.2
confirm_timeout_s = 30.0
retry_max_s = 1.0
"""


async def printer_status(d: Daemon) -> dict[str, Any]:
    status: dict[str, Any] = (await d.status())["printer"]
    return status


async def until(check: Callable[[], Any], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_daemon_serial_printer_prints_receipts_and_reports_paper_out(
    start_daemon: StartDaemon,
    fake: tuple[FakePrinter, str],
    make_pos_sale: Callable[..., dict[str, Any]],
) -> None:
    printer, path = fake
    d = await start_daemon(config(path))
    reply = await d.request(make_pos_sale("s1"))
    assert reply["ok"], reply
    (doc,) = await asyncio.to_thread(printer.wait_printed, 1)
    assert doc.qr == [reply["receipt"]["qr"]]  # the QR payload is what the sign reply says
    assert "Café de la Gare" in doc.texts and doc.qr_module_dots == [5]  # 58 mm: 6 → 5
    st = await printer_status(d)
    assert (
        st["kind"] == "serial"
        and st["state"] == "ready"
        and st["device"].endswith(path + "@115200")
    )

    async def printed_one() -> bool:
        return (await printer_status(d))["jobs"]["printed"] == 1

    await until(printed_one)
    printer.set(paper_out=True)

    async def paused() -> bool:
        s = await printer_status(d)
        return s["state"] == "paused" and s["problem"] == "paper out"

    await until(paused)
    second = await d.request(make_pos_sale("s2"))  # signing goes on without paper
    assert second["ok"], second
    st = await printer_status(d)
    assert st["queue"] == 1 and st["status"]["paper_out"] is True
    printer.set(paper_out=False)
    await asyncio.to_thread(printer.wait_printed, 2)

    async def printed_two() -> bool:
        s = await printer_status(d)
        return s["state"] == "ready" and s["jobs"]["printed"] == 2

    await until(printed_two)
    assert "PRINTER_FAULT" in d.stderr_text() and "PRINTER_RECOVERED" in d.stderr_text()

    async def recorded() -> bool:  # technical events in the chain (docs/events.md)
        rows = d.query("SELECT body FROM records WHERE type = 'INTENTION::EVENT' ORDER BY seq")
        events = [json.loads(bytes(b))["payload"] for (b,) in rows]
        faults = [e for e in events if e["event"].startswith("PRINTER_")]  # not START etc.
        return [(e["event"], e["problem"]) for e in faults] == [
            ("PRINTER_FAULT", "paper out"),
            ("PRINTER_RECOVERED", None),
        ]

    await until(recorded)


async def test_daemon_killed_while_printing_prints_duplicate_after_restart(
    start_daemon: StartDaemon,
    fake: tuple[FakePrinter, str],
    make_pos_sale: Callable[..., dict[str, Any]],
) -> None:
    printer, path = fake
    printer.set(confirm=False)  # the receipt goes out; the confirmation never comes back
    d = await start_daemon(config(path))
    assert (await d.request(make_pos_sale("s1")))["ok"]
    await asyncio.to_thread(printer.wait_printed, 1)
    await until(lambda: _async(d.query("SELECT state FROM print_jobs") == [("sending",)]))
    await d.kill()  # kill -9 between "sent" and "printed"
    printer.set(confirm=True)
    await d.start()
    docs = await asyncio.to_thread(printer.wait_printed, 2)
    await until(
        lambda: _async(
            d.query("SELECT state FROM print_jobs ORDER BY id") == [("failed",), ("printed",)]
        )
    )
    assert "DUPLICATA" in docs[1].texts and "COPY 1" in docs[1].texts
    assert "DUPLICATA" not in docs[0].texts
    rows = d.query("SELECT type FROM records WHERE type != 'INTENTION::EVENT' ORDER BY seq")
    assert rows == [("TRANSACTION::RECEIPT",), ("INTENTION::DUPLICATE",)]
    await asyncio.sleep(0.5)
    assert len(printer.printed()) == 2  # the original is never printed a second time


async def _async(value: bool) -> bool:
    return value
