"""Byte transports to a receipt printer: serial (pyserial), network (``socket://``), file.

Every call blocks the calling thread — :class:`drivers.printers.device.EscposPrinter` runs
them in its own thread, never on the event loop — and every read and write is bounded by a
timeout, so a printer that stops answering costs a timeout, never a hang; and
:meth:`Transport.cancel`, from any other thread, makes a read or write in progress give up at
once (the daemon is stopping: it must not wait out a 10 s write timeout behind a stalled
line). Failures map to
the gateway's exception tree at this edge (most specific first):
:class:`~gateway.core.errors.DeviceTimeout` when the peer makes no progress in time,
:class:`~gateway.core.errors.DeviceUnavailable` when it cannot be opened or went away.

- **serial**: opened by path (use the stable ``/dev/serial/by-id/...`` link), 8 data bits,
  1 stop bit, the configured baud and parity, and flow control ``rtscts`` or ``xonxoff``
  (Linux serial drivers have no DSR/DTR *output* flow control, so that is not offered).
  A write returns once the kernel has handed the bytes to the UART (``TIOCOUTQ`` drained),
  and fails with a timeout if flow control holds them back too long.
- **network**: ``socket://host:port`` (port 9100 "raw" printing), TCP with timeouts.
- **file**: a character device such as ``/dev/usb/lp0`` (read back for status when the
  device allows it), or a plain file that collects the bytes (write-only: no status).
"""

from __future__ import annotations

import os
import select
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Protocol

import serial

from gateway.core.errors import DeviceTimeout, DeviceUnavailable

PARITIES = {"none": serial.PARITY_NONE, "even": serial.PARITY_EVEN, "odd": serial.PARITY_ODD}
FLOW_CONTROLS = ("none", "rtscts", "xonxoff")
BAUD_RATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400)

_READ_CHUNK = 4096
#: Longest single wait inside a write that cannot be interrupted otherwise (file transport).
_CANCEL_SLICE_S = 0.25


class Transport(Protocol):
    """A connection to one printer. ``open`` again after ``close`` reconnects."""

    #: human-readable target, for logs and the status page
    name: str

    @property
    def can_read(self) -> bool:
        """Can the printer answer (status, confirmations) over this transport?"""

    def open(self) -> None: ...

    def write(self, data: bytes, timeout_s: float) -> None:
        """All of ``data``, or DeviceTimeout/DeviceUnavailable (how much went out is then
        unknown)."""

    def read(self, timeout_s: float) -> bytes:
        """Whatever arrives first (at least one byte), or ``b""`` after ``timeout_s``."""

    def cancel(self) -> None:
        """From any thread: the read or write in progress (and any until the next ``open``)
        fails with DeviceUnavailable instead of running to its timeout."""

    def close(self) -> None: ...


def _cancelled(name: str) -> DeviceUnavailable:
    return DeviceUnavailable(f"{name}: cancelled (shutting down)")


class SerialTransport:
    def __init__(
        self,
        path: str,
        *,
        baud: int = 19200,
        parity: str = "none",
        flow_control: str = "rtscts",
    ) -> None:
        if parity not in PARITIES:
            raise ValueError(f"parity must be one of {', '.join(PARITIES)}")
        if flow_control not in FLOW_CONTROLS:
            raise ValueError(f"flow control must be one of {', '.join(FLOW_CONTROLS)}")
        self.path = path
        self.name = f"serial:{path}@{baud}"
        self.baud = baud
        self.parity = parity
        self.flow_control = flow_control
        self._ser: serial.Serial | None = None
        self._cancel = threading.Event()
        #: held by close() and cancel(): pyserial's cancel_* write to pipes that close() closes
        self._lock = threading.Lock()

    @property
    def can_read(self) -> bool:
        return True

    def open(self) -> None:
        if self._ser is not None:
            return
        self._cancel.clear()
        ser = serial.Serial()
        ser.port = self.path
        ser.baudrate = self.baud
        ser.bytesize = serial.EIGHTBITS
        ser.stopbits = serial.STOPBITS_ONE
        ser.parity = PARITIES[self.parity]
        ser.rtscts = self.flow_control == "rtscts"
        ser.xonxoff = self.flow_control == "xonxoff"
        ser.dsrdtr = False
        ser.exclusive = True  # a second process writing the same printer interleaves receipts
        ser.timeout = 0
        ser.write_timeout = 0
        try:
            ser.open()
            ser.reset_input_buffer()
        except (serial.SerialException, OSError, ValueError) as exc:
            ser.close()
            raise DeviceUnavailable(f"cannot open {self.path}: {exc}") from exc
        self._ser = ser

    def _port(self) -> serial.Serial:
        if self._ser is None:
            raise DeviceUnavailable(f"{self.path} is not open")
        return self._ser

    def write(self, data: bytes, timeout_s: float) -> None:
        ser = self._port()
        deadline = time.monotonic() + timeout_s
        ser.write_timeout = timeout_s
        try:
            written = ser.write(data)
            # pyserial returns early, with what it wrote, when cancel_write() interrupts it
            if self._cancel.is_set() or (written is not None and written < len(data)):
                raise _cancelled(self.path)
            # Wait (bounded) until the kernel has sent it: tcdrain() could block forever
            # while flow control holds the line.
            while ser.out_waiting:
                if self._cancel.is_set():
                    raise _cancelled(self.path)
                if time.monotonic() >= deadline:
                    raise DeviceTimeout(
                        f"{self.path}: {ser.out_waiting} bytes still queued after "
                        f"{timeout_s:g} s (printer holding flow control?)"
                    )
                time.sleep(0.005)
        except serial.SerialTimeoutException as exc:
            raise DeviceTimeout(f"{self.path}: write timed out after {timeout_s:g} s") from exc
        except (serial.SerialException, OSError) as exc:
            raise DeviceUnavailable(f"{self.path}: write failed: {exc}") from exc

    def read(self, timeout_s: float) -> bytes:
        ser = self._port()
        try:
            ser.timeout = timeout_s
            first: bytes = ser.read(1)
            if self._cancel.is_set():
                raise _cancelled(self.path)
            if not first:
                return b""
            ser.timeout = 0
            rest: bytes = ser.read(min(ser.in_waiting, _READ_CHUNK))
            return first + rest
        except (serial.SerialException, OSError) as exc:
            raise DeviceUnavailable(f"{self.path}: read failed: {exc}") from exc

    def cancel(self) -> None:
        self._cancel.set()
        with self._lock:
            ser = self._ser
            if ser is not None:
                try:
                    ser.cancel_write()
                    ser.cancel_read()
                except (serial.SerialException, OSError):
                    pass

    def close(self) -> None:
        with self._lock:
            ser, self._ser = self._ser, None
            if ser is not None:
                try:
                    ser.close()
                except (serial.SerialException, OSError):
                    pass


def parse_socket_url(url: str) -> tuple[str, int]:
    """``socket://host:port`` → (host, port); ValueError if it is not one."""
    if not url.startswith("socket://"):
        raise ValueError("must be socket://HOST:PORT, e.g. socket://192.0.2.10:9100")
    host, sep, port = url.removeprefix("socket://").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be socket://HOST:PORT, e.g. socket://192.0.2.10:9100")
    return host.strip("[]"), int(port)


class SocketTransport:
    def __init__(self, url: str, *, connect_timeout_s: float = 5.0) -> None:
        self.host, self.port = parse_socket_url(url)
        self.name = url
        self.connect_timeout_s = connect_timeout_s
        self._sock: socket.socket | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()

    @property
    def can_read(self) -> bool:
        return True

    def open(self) -> None:
        if self._sock is not None:
            return
        self._cancel.clear()
        try:
            self._sock = socket.create_connection(
                (self.host, self.port), timeout=self.connect_timeout_s
            )
        except TimeoutError as exc:
            raise DeviceTimeout(f"{self.name}: connect timed out") from exc
        except OSError as exc:
            raise DeviceUnavailable(f"{self.name}: cannot connect: {exc}") from exc

    def _conn(self) -> socket.socket:
        if self._sock is None:
            raise DeviceUnavailable(f"{self.name} is not connected")
        if self._cancel.is_set():
            raise _cancelled(self.name)
        return self._sock

    def write(self, data: bytes, timeout_s: float) -> None:
        sock = self._conn()
        try:
            sock.settimeout(timeout_s)
            sock.sendall(data)
        except TimeoutError as exc:
            raise DeviceTimeout(f"{self.name}: write timed out after {timeout_s:g} s") from exc
        except OSError as exc:
            if self._cancel.is_set():
                raise _cancelled(self.name) from exc
            raise DeviceUnavailable(f"{self.name}: write failed: {exc}") from exc

    def read(self, timeout_s: float) -> bytes:
        sock = self._conn()
        try:
            sock.settimeout(timeout_s)
            data = sock.recv(_READ_CHUNK)
        except (TimeoutError, BlockingIOError):  # timeout 0 makes the socket non-blocking
            return b""
        except OSError as exc:
            raise DeviceUnavailable(f"{self.name}: read failed: {exc}") from exc
        if not data:
            if self._cancel.is_set():
                raise _cancelled(self.name)
            raise DeviceUnavailable(f"{self.name}: the printer closed the connection")
        return data

    def cancel(self) -> None:
        self._cancel.set()
        with self._lock:
            if self._sock is not None:
                try:  # wakes a sendall()/recv() blocked in the IO thread
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()


class FileTransport:
    """``/dev/usb/lpN`` (usblp) or a plain file; non-blocking IO bounded by ``select``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.name = f"file:{path}"
        self._fd: int | None = None
        self._readable = False
        self._cancel = threading.Event()

    @property
    def can_read(self) -> bool:
        return self._readable

    def open(self) -> None:
        if self._fd is not None:
            return
        self._cancel.clear()
        p = Path(self.path)
        try:
            if p.exists() and stat.S_ISCHR(p.stat().st_mode):
                flags = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
                try:
                    self._fd = os.open(p, os.O_RDWR | flags)
                    self._readable = True
                except PermissionError:
                    self._fd = os.open(p, os.O_WRONLY | flags)
                    self._readable = False
            else:
                self._fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
                self._readable = False
        except OSError as exc:
            raise DeviceUnavailable(f"cannot open {self.path}: {exc}") from exc

    def _fileno(self) -> int:
        if self._fd is None:
            raise DeviceUnavailable(f"{self.path} is not open")
        return self._fd

    def write(self, data: bytes, timeout_s: float) -> None:
        fd = self._fileno()
        deadline = time.monotonic() + timeout_s
        view = memoryview(data)
        try:
            while view:
                if self._cancel.is_set():
                    raise _cancelled(self.path)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeviceTimeout(
                        f"{self.path}: {len(view)} bytes not accepted after {timeout_s:g} s"
                    )
                _, writable, _ = select.select([], [fd], [], min(left, _CANCEL_SLICE_S))
                if not writable:
                    continue
                try:
                    view = view[os.write(fd, view) :]
                except BlockingIOError:
                    continue
        except OSError as exc:
            raise DeviceUnavailable(f"{self.path}: write failed: {exc}") from exc

    def read(self, timeout_s: float) -> bytes:
        fd = self._fileno()
        if not self._readable:
            return b""
        try:
            readable, _, _ = select.select([fd], [], [], timeout_s)
            if not readable:
                return b""
            return os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return b""
        except OSError as exc:
            raise DeviceUnavailable(f"{self.path}: read failed: {exc}") from exc

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
