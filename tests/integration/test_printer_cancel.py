"""Stopping while a printer line is stalled: every transport's ``cancel()`` (called by
``EscposPrinter.abort()`` when the print worker stops) interrupts a write or read blocked on
a real peer that never reads, instead of letting shutdown wait out the write timeout."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import closing

import pytest
from escpos_peer import open_pty

from drivers.printers.transport import FileTransport, SerialTransport, SocketTransport
from gateway.core.errors import DeviceUnavailable

#: A write timeout no test could wait out: the write can only end by being cancelled.
NEVER_S = 600.0
#: Far more than any pty or socket buffer takes: the write must block.
BIG = b"\x1b@" + b"x" * (8 * 1024 * 1024)
JOIN_S = 30.0


def run_blocked(call: Callable[[], object], cancel: Callable[[], None]) -> DeviceUnavailable:
    """Start ``call`` in a thread, let it block, cancel it; the DeviceUnavailable it ended
    with (what the print worker sees: the printer is gone, not a crash)."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # handed to the test
            outcome.append(exc)

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(0.5)
    assert t.is_alive(), f"the call did not block: {outcome}"
    cancel()
    t.join(JOIN_S)
    assert not t.is_alive(), "cancel() did not interrupt the blocked call"
    exc = outcome[0]
    assert isinstance(exc, DeviceUnavailable), exc
    return exc


@pytest.fixture
def pty() -> Iterator[tuple[int, str]]:
    master, slave, path = open_pty()
    try:
        yield master, path
    finally:
        os.close(slave)
        os.close(master)


def test_serial_transport_cancel_interrupts_a_stalled_write(pty: tuple[int, str]) -> None:
    master, path = pty
    t = SerialTransport(path, baud=115200, flow_control="none")
    t.open()
    try:
        exc = run_blocked(lambda: t.write(BIG, NEVER_S), t.cancel)
        assert "cancelled" in exc.message
    finally:
        t.close()
    # drain what the stalled write left in the line, then the transport works again
    os.set_blocking(master, False)
    while True:
        try:
            if not os.read(master, 1 << 16):
                break
        except BlockingIOError:
            break
    t.open()
    try:
        t.write(b"\x1b@ok\n", 5.0)
        got = b""
        while not got.endswith(b"ok\n"):
            got += os.read(master, 64)
    finally:
        t.close()


def test_serial_transport_cancel_interrupts_a_read(pty: tuple[int, str]) -> None:
    _, path = pty
    t = SerialTransport(path, baud=115200, flow_control="none")
    t.open()
    try:
        run_blocked(lambda: t.read(NEVER_S), t.cancel)
    finally:
        t.close()


def test_file_transport_cancel_interrupts_a_stalled_write(pty: tuple[int, str]) -> None:
    _, path = pty  # a pty slave is a character device, like /dev/usb/lp0
    t = FileTransport(path)
    t.open()
    try:
        exc = run_blocked(lambda: t.write(BIG, NEVER_S), t.cancel)
        assert "cancelled" in exc.message
    finally:
        t.close()


def test_socket_transport_cancel_interrupts_a_stalled_write() -> None:
    with closing(socket.socket()) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        t = SocketTransport(f"socket://127.0.0.1:{port}", connect_timeout_s=5.0)
        t.open()
        peer, _ = server.accept()  # accepted, never read: the printer's buffer is full
        try:
            run_blocked(lambda: t.write(BIG * 4, NEVER_S), t.cancel)
        finally:
            t.close()
            peer.close()
