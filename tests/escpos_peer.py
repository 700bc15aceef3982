"""The far side of the printer line, for tests: an ESC/POS decoder and a fake printer.

:func:`decode` turns the bytes the encoder made back into what a customer would see: lines
with their styles, QR payloads, raster images, cuts, drawer kicks. It is written from the
ESC/POS command reference, not from the encoder, so the two check each other.

:class:`FakePrinter` is a receipt printer on the master end of a real pseudo-terminal: it reads
ESC/POS bytes, answers ``DLE EOT 1..4`` with real status bytes (online / paper out / cover
open / offline, as the test scripts them), holds printed documents while the paper is out
and answers ``GS ( H`` fn 48 with the process-ID response once a document is "printed".
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import tty
from dataclasses import dataclass, field

CODECS = {0: "cp437", 2: "cp850", 16: "cp1252", 17: "cp866", 18: "cp852", 19: "cp858"}


class Incomplete(Exception):
    """The buffer ends in the middle of a command."""


@dataclass(frozen=True)
class Line:
    text: str
    align: str = "left"
    bold: bool = False
    width: int = 1
    height: int = 1


@dataclass(frozen=True)
class Raster:
    width_bytes: int
    height: int
    data: bytes

    def pixel(self, x: int, y: int) -> bool:
        return bool(self.data[y * self.width_bytes + x // 8] & (0x80 >> (x % 8)))


@dataclass
class Decoded:
    lines: list[Line] = field(default_factory=list)
    qr: list[str] = field(default_factory=list)
    qr_module_dots: list[int] = field(default_factory=list)
    qr_ecc: list[int] = field(default_factory=list)
    rasters: list[Raster] = field(default_factory=list)
    code_pages: list[int] = field(default_factory=list)
    inits: int = 0
    cuts: int = 0
    drawer_kicks: int = 0
    feeds: int = 0
    asb: list[int] = field(default_factory=list)
    confirmations: list[str] = field(default_factory=list)
    status_requests: list[int] = field(default_factory=list)

    @property
    def texts(self) -> list[str]:
        return [ln.text for ln in self.lines]


# (prefix, fixed length) of the fixed-length commands the encoder may use
_FIXED = {
    b"\x1b@": 2,
    b"\x1bt": 3,
    b"\x1bR": 3,
    b"\x1ba": 3,
    b"\x1bE": 3,
    b"\x1bd": 3,
    b"\x1bp": 5,
    b"\x1d!": 3,
    b"\x1da": 3,
    b"\x10\x04": 3,
}


def token_length(buf: bytes, i: int) -> int:
    """Length of the command or text run at ``buf[i]``; Incomplete if it runs past the end."""
    b = buf[i]
    if b == 0x0A:
        return 1
    if b >= 0x20:
        j = i
        while j < len(buf) and buf[j] >= 0x20:
            j += 1
        return j - i
    need = i + 2
    if len(buf) < need:
        raise Incomplete
    head = bytes(buf[i:need])
    if head in _FIXED:
        n = _FIXED[head]
    elif head == b"\x1dV":
        if len(buf) < i + 3:
            raise Incomplete
        n = 4 if buf[i + 2] in (65, 66) else 3
    elif head == b"\x1d(":
        if len(buf) < i + 5:
            raise Incomplete
        n = 5 + buf[i + 3] + 256 * buf[i + 4]
    elif head == b"\x1dv":
        if len(buf) < i + 8:
            raise Incomplete
        x = buf[i + 4] + 256 * buf[i + 5]
        y = buf[i + 6] + 256 * buf[i + 7]
        n = 8 + x * y
    else:
        raise ValueError(f"unknown command {head.hex()} at byte {i}")
    if len(buf) < i + n:
        raise Incomplete
    return n


class Decoder:
    """Stateful: styles and code page carry from one command to the next."""

    def __init__(self) -> None:
        self.doc = Decoded()
        self.code_page = 0
        self.align = "left"
        self.bold = False
        self.width = self.height = 1
        self.pending = b""
        self._qr_data: bytes = b""

    def token(self, t: bytes) -> None:
        d = self.doc
        if t == b"\n":
            d.lines.append(
                Line(
                    self.pending.decode(CODECS[self.code_page]),
                    self.align,
                    self.bold,
                    self.width,
                    self.height,
                )
            )
            self.pending = b""
        elif t[0] >= 0x20:
            self.pending += t
        elif t == b"\x1b@":
            d.inits += 1
            self.code_page, self.align, self.bold, self.width, self.height = 0, "left", False, 1, 1
        elif t[:2] == b"\x1bt":
            self.code_page = t[2]
            d.code_pages.append(t[2])
        elif t[:2] == b"\x1bR":
            assert t[2] == 0, "international character set USA"
        elif t[:2] == b"\x1ba":
            self.align = ("left", "center", "right")[t[2] % 48]
        elif t[:2] == b"\x1bE":
            self.bold = bool(t[2] & 1)
        elif t[:2] == b"\x1bd":
            d.feeds += t[2]
        elif t[:2] == b"\x1bp":
            d.drawer_kicks += 1
        elif t[:2] == b"\x1d!":
            self.width, self.height = (t[2] >> 4) + 1, (t[2] & 0x0F) + 1
        elif t[:2] == b"\x1da":
            d.asb.append(t[2])
        elif t[:2] == b"\x1dV":
            d.cuts += 1
        elif t[:2] == b"\x10\x04":
            d.status_requests.append(t[2])
        elif t[:3] == b"\x1d(k":
            cn, fn, rest = t[5], t[6], t[7:]
            assert cn == 49, "only QR codes (cn 49)"
            if fn == 67:
                d.qr_module_dots.append(rest[0])
            elif fn == 69:
                d.qr_ecc.append(rest[0])
            elif fn == 80:
                self._qr_data = rest[1:]
            elif fn == 81:
                d.qr.append(self._qr_data.decode("ascii"))
        elif t[:3] == b"\x1d(H":
            assert t[5:7] == b"00", "GS ( H fn 48"
            d.confirmations.append(t[7:11].decode("ascii"))
        elif t[:3] == b"\x1dv0":
            x = t[4] + 256 * t[5]
            y = t[6] + 256 * t[7]
            d.rasters.append(Raster(x, y, bytes(t[8:])))
        else:
            raise ValueError(f"unhandled command {t[:3].hex()}")


def decode(data: bytes) -> Decoded:
    """Decode a complete byte string (ValueError on anything unknown or cut short)."""
    dec = Decoder()
    i = 0
    while i < len(data):
        try:
            n = token_length(data, i)
        except Incomplete:
            raise ValueError(f"command cut short at byte {i}") from None
        dec.token(data[i : i + n])
        i += n
    if dec.pending:
        raise ValueError(f"text without a line feed at the end: {dec.pending!r}")
    return dec.doc


def tokens(data: bytes) -> list[bytes]:
    """The commands and text runs of ``data``, in order."""
    out, i = [], 0
    while i < len(data):
        n = token_length(data, i)
        out.append(data[i : i + n])
        i += n
    return out


# ---------------------------------------------------------------------- the fake printer


class FakePrinter:
    """A printer on the master side of a pty. Attributes script its sensors and firmware."""

    def __init__(self, master_fd: int, *, confirm: bool = True) -> None:
        self.fd = master_fd
        self.confirm = confirm
        self.paper_out = False
        self.cover_open = False
        self.offline = False
        self.silent = False  # never answers anything (switched off, wrong cable)
        self.stalled = False  # stops reading: the line fills up
        #: the paper runs out while the N-th document is printing (it stays in the buffer)
        self.paper_runs_out_at: int | None = None
        self.documents: list[Decoded] = []
        self.raw = bytearray()
        self.status_queries = 0
        self.asb_enabled = False  # GS a n received: status changes are sent unasked
        self._buf = bytearray()
        self._decoder: Decoder | None = None
        self._held: list[tuple[Decoded, list[str]]] = []  # printed once the paper is back
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-printer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ test API

    def set(self, **sensors: bool) -> None:
        with self._lock:
            for k, v in sensors.items():
                assert hasattr(self, k), k
                setattr(self, k, v)
            asb = self._asb() if self.asb_enabled and not self.silent else b""
        if asb:
            with contextlib.suppress(OSError):
                os.write(self.fd, asb)

    def printed(self) -> list[Decoded]:
        with self._lock:
            return list(self.documents)

    def wait_printed(self, n: int, timeout_s: float = 15.0) -> list[Decoded]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            docs = self.printed()
            if len(docs) >= n:
                return docs
            time.sleep(0.02)
        raise AssertionError(f"printed {len(self.printed())} documents, expected {n}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(OSError):
            os.close(self.fd)

    # ------------------------------------------------------------------ firmware

    def _status_byte(self, n: int) -> int:
        if n == 1:
            return 0x12 | (0x08 if self.offline or self.paper_out or self.cover_open else 0)
        if n == 2:
            return 0x12 | (0x04 if self.cover_open else 0) | (0x20 if self.paper_out else 0)
        if n == 3:
            return 0x12
        return 0x12 | (0x6C if self.paper_out else 0)

    def _asb(self) -> bytes:
        """An Automatic Status Back message for the current sensors."""
        down = self.offline or self.paper_out or self.cover_open
        b1 = 0x10 | (0x08 if down else 0) | (0x20 if self.cover_open else 0)
        return bytes([b1, 0x00, 0x0F if self.paper_out else 0x00, 0x00])

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.stalled:
                time.sleep(0.02)
                continue
            try:
                readable, _, _ = select.select([self.fd], [], [], 0.02)
                data = os.read(self.fd, 65536) if readable else b""
            except OSError:  # the other side is not open (yet): nothing to read
                time.sleep(0.02)
                continue
            with self._lock:
                self.raw += data
                if self.silent:  # switched off: the bytes go nowhere
                    continue
                self._buf += data
                replies = self._process()
                if not data and self._decoder is not None and self._decoder.doc.cuts:
                    self._finish_document()  # cut, then silence: no confirmation coming
                replies += self._release_held()
            if replies and not self.silent:
                with contextlib.suppress(OSError):
                    os.write(self.fd, replies)

    def _process(self) -> bytes:
        replies = bytearray()
        i = 0
        buf = self._buf
        while i < len(buf):
            try:
                n = token_length(buf, i)
            except Incomplete:
                break
            t = bytes(buf[i : i + n])
            i += n
            if t[:2] == b"\x10\x04":  # real-time: answered at once, whatever the state
                self.status_queries += 1
                replies.append(self._status_byte(t[2]))
                continue
            if t[:2] == b"\x1da":  # ASB on or off; when on, the current status at once
                self.asb_enabled = t[2] != 0
                if self.asb_enabled:
                    replies += self._asb()
                continue
            if t == b"\x1b@" and self._decoder is not None and self._decoder.doc.cuts:
                self._finish_document()
            if self._decoder is None:
                self._decoder = Decoder()
            self._decoder.token(t)
            if t[:3] == b"\x1d(H":
                self._finish_document()
        del buf[:i]
        return bytes(replies)

    def _finish_document(self) -> None:
        dec = self._decoder
        if dec is None:
            return
        doc = dec.doc
        self._decoder = None
        pids = list(doc.confirmations) if self.confirm else []
        self._held.append((doc, pids))
        at = self.paper_runs_out_at
        if at is not None and len(self.documents) + len(self._held) >= at:
            self.paper_out, self.paper_runs_out_at = True, None

    def _release_held(self) -> bytes:
        if self.paper_out or self.cover_open or self.offline or not self._held:
            return b""
        out = bytearray()
        for doc, pids in self._held:
            self.documents.append(doc)
            for pid in pids:
                out += b"\x37\x22" + pid.encode("ascii") + b"\x00"
        self._held.clear()
        return bytes(out)


def open_pty() -> tuple[int, int, str]:
    """A raw pseudo-terminal: (master fd, slave fd, slave path)."""
    master, slave = os.openpty()
    tty.setraw(slave)
    return master, slave, os.ttyname(slave)
