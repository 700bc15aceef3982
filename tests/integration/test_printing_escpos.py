"""ESC/POS printing over a real pseudo-terminal: transport, status, the durable print queue.

The printer is :class:`escpos_peer.FakePrinter` on the master side of an ``os.openpty()``
pair; the gateway opens the slave by path with pyserial, exactly as it opens
``/dev/serial/by-id/...``. The ledger is a real SQLite file, signing goes through the real
dispatcher, and the print worker runs in-process with short timeouts.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import pytest
from escpos_peer import FakePrinter, open_pty

from drivers.printers.device import EscposPrinter
from drivers.printers.escpos import PROFILES, Layout, encode_test_page
from drivers.printers.transport import FileTransport, SerialTransport, SocketTransport
from drivers.signers.software import SoftwareSigner
from gateway.core.errors import DeviceTimeout, DeviceUnavailable
from gateway.core.request import Rules
from gateway.dispatch import Dispatcher
from gateway.ledger import Ledger
from gateway.printing import PrintWorker, reprinter
from gateway.reads import ReadPool

SaleFactory = Callable[..., dict[str, Any]]


class Pty:
    """A fake printer on a fresh pty; ``path`` is what the gateway opens."""

    def __init__(self, *, confirm: bool = True) -> None:
        self.master, self.slave, self.path = open_pty()
        self.fake = FakePrinter(self.master, confirm=confirm)

    def unplug(self) -> None:
        self.fake.close()  # closes the master: the slave side gets EIO
        os.close(self.slave)

    def close(self) -> None:
        self.fake.close()
        try:
            os.close(self.slave)
        except OSError:
            pass


@pytest.fixture
def pty() -> Iterator[Pty]:
    p = Pty()
    try:
        yield p
    finally:
        p.close()


def device(path: str, profile: str = "epson-tm", **kwargs: Any) -> EscposPrinter:
    kwargs.setdefault("status_timeout_s", 0.5)
    kwargs.setdefault("write_timeout_s", 2.0)
    return EscposPrinter(
        SerialTransport(path, baud=115200, flow_control="none"),
        PROFILES[profile],
        Layout(paper_width_mm=80, merchant="SHOP"),
        **kwargs,
    )


async def eventually(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]], timeout_s: float = 15.0
) -> Any:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.02)


def jobs(db: Path) -> list[tuple[int, int, str, int, str | None]]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(
            "SELECT id, seq, state, attempts, last_error FROM print_jobs ORDER BY id"
        ).fetchall()


def record_types(db: Path) -> list[tuple[int, str]]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT seq, type FROM records ORDER BY seq").fetchall()


class Gateway:
    """A ledger, the dispatcher and a print worker on one database (one "daemon run")."""

    def __init__(self, ledger: Ledger, worker: PrintWorker, dispatcher: Dispatcher) -> None:
        self.ledger = ledger
        self.worker = worker
        self.dispatcher = dispatcher
        self.events: list[tuple[str, dict[str, Any]]] = []

    async def sign(self, request: dict[str, Any]) -> dict[str, Any]:
        reply = await self.dispatcher.handle(request)
        assert reply["ok"], reply
        self.worker.wake.set()
        return reply


@asynccontextmanager
async def running(
    db: Path, signer: SoftwareSigner, printer: EscposPrinter, **kwargs: Any
) -> AsyncIterator[Gateway]:
    """Start a gateway; leaving the block stops it the way a daemon stop (or crash) does."""
    ledger = await Ledger.open(db, signer)
    reads = ReadPool(db)
    dispatcher = Dispatcher(ledger, rules=Rules(), print_documents=True)
    kwargs.setdefault("poll_s", 0.1)
    kwargs.setdefault("confirm_timeout_s", 3.0)
    worker = PrintWorker(
        ledger,
        reads,
        printer,
        retry_min_s=0.05,
        retry_max_s=0.3,
        reprint=reprinter(dispatcher),
        **kwargs,
    )
    gw = Gateway(ledger, worker, dispatcher)
    worker.on_event = lambda name, details: gw.events.append((name, details))
    task = asyncio.create_task(worker.run())
    try:
        yield gw
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        reads.close()
        await ledger.close()


def numbers(docs: list[Any]) -> list[str]:
    return [next(t for t in d.texts if t.startswith("No ")) for d in docs]


# ---------------------------------------------------------------------- transport + status


def test_serial_transport_silent_printer_status_times_out(pty: Pty) -> None:
    pty.fake.set(silent=True)
    dev = device(pty.path, status_timeout_s=0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout, match="no answer to DLE EOT"):
            dev.status()
        assert time.monotonic() - t0 < 2.0
    finally:
        dev.disconnect()


def test_serial_transport_stalled_line_write_times_out(pty: Pty) -> None:
    pty.fake.set(stalled=True)  # the printer stops taking bytes: the pty buffer fills up
    t = SerialTransport(pty.path, baud=115200, flow_control="none")
    t.open()
    try:
        t0 = time.monotonic()
        with pytest.raises(DeviceTimeout):
            t.write(b"x" * 4_000_000, 0.3)
        assert time.monotonic() - t0 < 3.0
        assert t.read(0.1) == b""  # a read with nothing to read times out empty
    finally:
        t.close()


def test_serial_transport_unplugged_printer_raises_unavailable(pty: Pty) -> None:
    t = SerialTransport(pty.path, baud=115200, flow_control="rtscts")
    t.open()
    try:
        pty.unplug()
        with pytest.raises(DeviceUnavailable):
            t.read(1.0)
    finally:
        t.close()
    with pytest.raises(DeviceUnavailable, match="cannot open"):
        SerialTransport("/dev/serial/by-id/no-such-printer").open()


def test_escpos_printer_status_reports_paper_out_cover_open_and_recovery(pty: Pty) -> None:
    dev = device(pty.path)
    try:
        assert dev.status() is not None and dev.status().ready  # type: ignore[union-attr]
        pty.fake.set(paper_out=True)
        st = dev.status()
        assert st is not None and st.paper_out and st.problem == "paper out"
        pty.fake.set(paper_out=False, cover_open=True)
        st = dev.status()
        assert st is not None and st.problem == "cover open"
        pty.fake.set(cover_open=False)
        assert dev.status() is not None and dev.status().ready  # type: ignore[union-attr]
        assert pty.fake.status_queries == 4 * 6
    finally:
        dev.disconnect()


def test_socket_transport_network_printer_prints_and_confirms() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        dev = EscposPrinter(
            SocketTransport(f"socket://127.0.0.1:{port}"),
            PROFILES["epson-tm"],
            Layout(),
            status_timeout_s=1.0,
        )
        try:
            dev.connect()
            conn, _ = server.accept()
            fake = FakePrinter(conn.detach())
            try:
                st = dev.status()
                assert st is not None and st.ready
                dev.send(encode_test_page(dev.profile, dev.layout), "0007")
                assert dev.wait_confirmation("0007", 5.0)
                (page,) = fake.printed()
                assert page.confirmations == ["0007"] and "TEST PAGE" in page.texts
            finally:
                fake.close()  # the printer hangs up
            with pytest.raises(DeviceUnavailable, match="closed the connection"):
                dev.wait_confirmation("0008", 5.0)
        finally:
            dev.disconnect()


def test_file_transport_plain_file_collects_bytes_without_status(tmp_path: Path) -> None:
    out = tmp_path / "lp0.bin"
    dev = EscposPrinter(FileTransport(str(out)), PROFILES["epson-tm"], Layout())
    try:
        assert dev.status() is None  # a plain file cannot answer
        assert not dev.confirms
        dev.send(encode_test_page(dev.profile, dev.layout))
        dev.send(encode_test_page(dev.profile, dev.layout))
    finally:
        dev.disconnect()
    data = out.read_bytes()
    assert data == 2 * encode_test_page(dev.profile, dev.layout)
    assert oct(out.stat().st_mode & 0o777) == "0o600"


def test_escpos_printer_automatic_status_back_tracks_paper_out(pty: Pty) -> None:
    dev = EscposPrinter(
        SerialTransport(pty.path, baud=115200, flow_control="none"),
        PROFILES["epson-tm"],
        Layout(status_back=True),
    )
    try:
        dev.connect()  # sends GS a 15; the printer answers with its status at once
        assert not dev.wait_confirmation("0001", 0.3)  # reading parses what arrived
        assert dev.auto_status is not None and dev.auto_status.ready
        pty.fake.set(paper_out=True)  # the printer reports the change unasked
        assert not dev.wait_confirmation("0001", 0.3)
        assert dev.auto_status.paper_out and dev.auto_status.problem == "paper out"
        st = dev.status()  # DLE EOT answers are still told apart from ASB messages
        assert st is not None and st.paper_out
    finally:
        dev.disconnect()


# ---------------------------------------------------------------------- the print queue


async def test_print_worker_paper_out_pauses_queue_and_resumes_in_order(
    tmp_path: Path, signer: SoftwareSigner, pty: Pty, make_sale: SaleFactory
) -> None:
    db = tmp_path / "gateway.db"
    async with running(db, signer, device(pty.path)) as gw:
        first = await gw.sign(make_sale("s1"))
        (doc,) = await asyncio.to_thread(pty.fake.wait_printed, 1)
        assert doc.qr == [first["receipt"]["qr"]]  # the QR payload is what sign returned
        pty.fake.set(paper_out=True)
        await eventually(lambda: gw.worker.state == "paused")
        for i in range(2, 5):  # signing goes on while the printer is out of paper
            await gw.sign(make_sale(f"s{i}"))
        await asyncio.sleep(0.5)
        assert len(pty.fake.printed()) == 1
        assert gw.worker.problem == "paper out"
        assert gw.worker.snapshot()["status"]["paper_out"] is True
        assert [s for _, _, s, _, _ in jobs(db)] == ["printed"] + ["pending"] * 3
        pty.fake.set(paper_out=False)
        docs = await asyncio.to_thread(pty.fake.wait_printed, 4)
        await eventually(lambda: [s for _, _, s, _, _ in jobs(db)] == ["printed"] * 4)
    assert numbers(docs) == [f"No till-1-R-{n:08d}" for n in range(1, 5)]
    assert [name for name, _ in gw.events] == ["PRINTER_FAULT", "PRINTER_RECOVERED"]
    assert gw.events[0][1]["problem"] == "paper out"
    assert gw.worker.state == "ready" and gw.worker.printed == 4
    assert gw.worker.last_error is None  # cleared on recovery (MQTT's printer_ok alert)


async def test_print_worker_silent_printer_signing_unaffected(
    tmp_path: Path, signer: SoftwareSigner, pty: Pty, make_sale: SaleFactory
) -> None:
    pty.fake.set(silent=True)  # switched off: no answers at all
    db = tmp_path / "gateway.db"
    async with running(db, signer, device(pty.path, status_timeout_s=0.2)) as gw:
        await eventually(lambda: gw.worker.state == "unreachable")
        replies = [await gw.sign(make_sale(f"s{i}")) for i in range(1, 6)]
        assert [r["record"]["seq"] for r in replies] == [1, 2, 3, 4, 5]
        assert gw.worker.problem is not None and "DEVICE_TIMEOUT" in gw.worker.problem
        assert [s for _, _, s, _, _ in jobs(db)] == ["pending"] * 5
        pty.fake.set(silent=False)  # switched on again
        docs = await asyncio.to_thread(pty.fake.wait_printed, 5)
        await eventually(lambda: [s for _, _, s, _, _ in jobs(db)] == ["printed"] * 5)
    assert numbers(docs) == [f"No till-1-R-{n:08d}" for n in range(1, 6)]


async def test_print_worker_restart_prints_each_original_once_in_order(
    tmp_path: Path, signer: SoftwareSigner, pty: Pty, make_sale: SaleFactory
) -> None:
    db = tmp_path / "gateway.db"
    pty.fake.set(paper_out=True)
    async with running(db, signer, device(pty.path)) as gw:
        for i in range(1, 4):
            await gw.sign(make_sale(f"s{i}"))
        await eventually(lambda: gw.worker.state == "paused")
    # the gateway is down; the technician refills the paper; the gateway starts again
    pty.fake.set(paper_out=False)
    async with running(db, signer, device(pty.path)) as gw:
        await gw.sign(make_sale("s4"))
        docs = await asyncio.to_thread(pty.fake.wait_printed, 4)
        await eventually(lambda: [s for _, _, s, _, _ in jobs(db)] == ["printed"] * 4)
        await asyncio.sleep(0.3)  # nothing more comes
    assert numbers(pty.fake.printed()) == [f"No till-1-R-{n:08d}" for n in range(1, 5)]
    assert len(docs) == 4
    assert [t for _, t in record_types(db)] == ["TRANSACTION::RECEIPT"] * 4  # no duplicates


async def test_print_worker_stopped_before_confirmation_reprints_as_duplicate(
    tmp_path: Path, signer: SoftwareSigner, pty: Pty, make_sale: SaleFactory
) -> None:
    db = tmp_path / "gateway.db"
    pty.fake.set(confirm=False)  # prints, but the confirmation never comes back
    async with running(db, signer, device(pty.path), confirm_timeout_s=30.0) as gw:
        await gw.sign(make_sale("s1"))
        await asyncio.to_thread(pty.fake.wait_printed, 1)
        await eventually(lambda: jobs(db)[0][2] == "sending")
    # stopped (or crashed) while waiting: did the customer get the receipt? Unknown.
    pty.fake.set(confirm=True)
    async with running(db, signer, device(pty.path)) as gw:
        docs = await asyncio.to_thread(pty.fake.wait_printed, 2)
        await eventually(lambda: [s for _, _, s, _, _ in jobs(db)] == ["failed", "printed"])
    original, copy = docs
    assert "TICKET" in original.texts and "DUPLICATA" not in original.texts
    assert copy.texts.count("DUPLICATA") == 2 and "COPY 1" in copy.texts
    assert "No till-1-D-00000001" in copy.texts
    assert any(t.startswith("1 x Café") for t in copy.texts)  # the original's content
    assert record_types(db) == [(1, "TRANSACTION::RECEIPT"), (2, "INTENTION::DUPLICATE")]
    (_, _, _, _, error), _ = jobs(db)
    assert error is not None and "outcome unknown" in error and "till-1 seq 2" in error
    assert gw.worker.duplicates == 1


async def test_print_worker_paper_out_mid_job_waits_for_confirmation(
    tmp_path: Path, signer: SoftwareSigner, pty: Pty, make_sale: SaleFactory
) -> None:
    db = tmp_path / "gateway.db"
    pty.fake.set(paper_runs_out_at=1)  # the first receipt stops half-way, in the buffer
    async with running(db, signer, device(pty.path), confirm_timeout_s=0.5) as gw:
        await gw.sign(make_sale("s1"))
        await gw.sign(make_sale("s2"))
        await eventually(lambda: gw.worker.state == "paused")
        assert [s for _, _, s, _, _ in jobs(db)] == ["sending", "pending"]
        pty.fake.set(paper_out=False)
        docs = await asyncio.to_thread(pty.fake.wait_printed, 2)
        await eventually(lambda: [s for _, _, s, _, _ in jobs(db)] == ["printed", "printed"])
    assert numbers(docs) == ["No till-1-R-00000001", "No till-1-R-00000002"]
    assert len(record_types(db)) == 2  # confirmed after the refill: no duplicate needed


async def test_print_worker_no_confirmation_from_online_printer_marks_sent(
    tmp_path: Path, signer: SoftwareSigner, pty: Pty, make_sale: SaleFactory
) -> None:
    db = tmp_path / "gateway.db"
    pty.fake.set(confirm=False)  # firmware without GS ( H despite the profile
    async with running(db, signer, device(pty.path), confirm_timeout_s=0.3) as gw:
        await gw.sign(make_sale("s1"))
        await eventually(lambda: jobs(db)[0][2] == "sent")
    ((_, _, _, attempts, error),) = jobs(db)
    assert attempts == 1 and error is not None and "no print confirmation" in error
    assert len(record_types(db)) == 1


async def test_print_worker_profile_without_confirmation_marks_sent(
    tmp_path: Path, signer: SoftwareSigner, pty: Pty, make_sale: SaleFactory
) -> None:
    db = tmp_path / "gateway.db"
    async with running(db, signer, device(pty.path, profile="generic")) as gw:
        await gw.sign(make_sale("s1"))
        await eventually(lambda: jobs(db)[0][2] == "sent")
        (doc,) = await asyncio.to_thread(pty.fake.wait_printed, 1)
    assert doc.confirmations == [] and doc.cuts == 1
    assert gw.worker.sent == 1 and gw.worker.printed == 0


async def test_print_worker_unplugged_printer_reconnects_and_reprints_unknown_job(
    tmp_path: Path, signer: SoftwareSigner, make_sale: SaleFactory
) -> None:
    link = tmp_path / "printer"  # stands for /dev/serial/by-id/...: the same path on replug
    first = Pty(confirm=False)
    link.symlink_to(first.path)
    second: Pty | None = None
    db = tmp_path / "gateway.db"
    try:
        async with running(db, signer, device(str(link)), confirm_timeout_s=30.0) as gw:
            await gw.sign(make_sale("s1"))
            await asyncio.to_thread(first.fake.wait_printed, 1)
            first.unplug()  # cable pulled while the receipt was printing
            await eventually(lambda: gw.worker.state == "unreachable")
            await gw.sign(make_sale("s2"))
            second = Pty()
            link.unlink()
            link.symlink_to(second.path)  # plugged in again (udev recreates the link)
            docs = await asyncio.to_thread(second.fake.wait_printed, 2)
            await eventually(
                lambda: [s for _, _, s, _, _ in jobs(db)] == ["failed", "printed", "printed"]
            )
        # s1's outcome is unknown: its duplicate was signed (and queued) when the link broke
        assert numbers(docs) == ["No till-1-D-00000001", "No till-1-R-00000002"]
        assert "DUPLICATA" in docs[0].texts
        assert [name for name, _ in gw.events][-1] == "PRINTER_RECOVERED"
    finally:
        first.close()
        if second is not None:
            second.close()


def test_print_test_cli_prints_test_page_and_reports_paper_out(
    tmp_path: Path, pty: Pty, run_cli: Callable[..., Any]
) -> None:
    cfg = tmp_path / "gw.toml"
    cfg.write_text(
        f'[printer]\nkind = "serial"\ndevice = "{pty.path}"\nflow_control = "none"\n'
        "status_timeout_s = 1.0\nconfirm_timeout_s = 5.0\n",
        "utf-8",
    )
    done = run_cli("print-test", "--config", cfg)
    assert done.returncode == 0, done.stderr
    assert "printed" in done.stdout and "(confirmed)" in done.stdout
    (page,) = pty.fake.wait_printed(1)
    assert "TEST PAGE" in page.texts and page.qr == ["FG1|TEST"]
    assert "€ £ é è à ç ñ ü ß Ø" in page.texts  # all in CP858
    pty.fake.set(paper_out=True)
    done = run_cli("print-test", "--config", cfg)
    assert done.returncode == 1 and "paper out" in done.stdout
