"""What an ESC/POS printer says back: status bytes, Automatic Status Back, process IDs.

Pure: bytes in, typed values out (no IO). Three kinds of message arrive on the same line and
are told apart by their first byte, as the ESC/POS spec arranges it:

- ``DLE EOT n`` answer — one byte ``0xx1xx10`` (bit 0 = 0, bit 1 = 1, bit 4 = 1, bit 7 = 0);
- Automatic Status Back (``GS a``) — four bytes, the first ``0xx1xx00``;
- "header to NUL" blocks — ``37h``, an identifier, data, ``00h``; identifier ``22h`` is the
  process-ID response to ``GS ( H`` fn 48 (the job with that id has been printed).

XON/XOFF bytes (11h/13h) never collide with these; the tty driver consumes them when XON/XOFF
flow control is on, and :class:`ResponseParser` ignores any that get through.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

XON, XOFF = 0x11, 0x13


@dataclass(frozen=True, slots=True)
class PrinterStatus:
    """A printer's state as its sensors report it."""

    online: bool = True
    cover_open: bool = False
    paper_near_end: bool = False
    paper_out: bool = False
    #: e.g. an autocutter error or a paper jam: fix the cause (then DLE ENQ or power cycle)
    recoverable_error: bool = False
    #: hardware failure (e.g. a broken wire): the printer needs service
    unrecoverable_error: bool = False
    #: e.g. print head overheated: clears by itself
    auto_recoverable_error: bool = False
    drawer_signal: bool = False  # drawer connector pin 3 high (meaning depends on the drawer)

    @property
    def ready(self) -> bool:
        """Can it print now? (Paper near-end is a warning, not a stop.)"""
        return self.problem is None

    @property
    def problem(self) -> str | None:
        """Why it cannot print, most specific first; None when it can."""
        if self.unrecoverable_error:
            return "unrecoverable error"
        if self.cover_open:
            return "cover open"
        if self.paper_out:
            return "paper out"
        if self.recoverable_error:
            return "recoverable error"
        if self.auto_recoverable_error:
            return "auto-recoverable error"
        if not self.online:
            return "offline"
        return None

    def to_json(self) -> dict[str, bool]:
        return asdict(self)


def is_status_byte(b: int) -> bool:
    """A ``DLE EOT`` answer: ``0xx1xx10``."""
    return b & 0x93 == 0x12


def is_asb_first_byte(b: int) -> bool:
    return b & 0x93 == 0x10


def decode_dle_eot(printer: int, offline: int, error: int, paper: int) -> PrinterStatus:
    """The answers to ``DLE EOT 1``, ``2``, ``3`` and ``4``, in that order."""
    for n, b in enumerate((printer, offline, error, paper), 1):
        if not is_status_byte(b):
            raise ValueError(f"byte {b:#04x} is not a DLE EOT {n} status answer")
    return PrinterStatus(
        online=not printer & 0x08,
        drawer_signal=bool(printer & 0x04),
        cover_open=bool(offline & 0x04),
        # n=2 bit 5: printing stopped at paper end; n=4 bits 5-6: roll end sensor
        paper_out=bool(offline & 0x20) or paper & 0x60 == 0x60,
        paper_near_end=paper & 0x0C == 0x0C,
        recoverable_error=bool(error & 0x08),
        unrecoverable_error=bool(error & 0x20),
        auto_recoverable_error=bool(error & 0x40),
    )


def decode_asb(data: bytes) -> PrinterStatus:
    """The four bytes of an Automatic Status Back message."""
    if len(data) != 4 or not is_asb_first_byte(data[0]):
        raise ValueError(f"{data.hex()} is not an ASB message")
    b1, b2, b3, _ = data
    return PrinterStatus(
        online=not b1 & 0x08,
        drawer_signal=bool(b1 & 0x04),
        cover_open=bool(b1 & 0x20),
        recoverable_error=bool(b2 & 0x08),
        unrecoverable_error=bool(b2 & 0x20),
        auto_recoverable_error=bool(b2 & 0x40),
        paper_near_end=b3 & 0x03 == 0x03,
        paper_out=b3 & 0x0C == 0x0C,
    )


@dataclass(frozen=True, slots=True)
class StatusByte:
    value: int


@dataclass(frozen=True, slots=True)
class AutoStatus:
    status: PrinterStatus


@dataclass(frozen=True, slots=True)
class ProcessId:
    process_id: str


@dataclass(frozen=True, slots=True)
class Block:
    """Another "header to NUL" block (identifier and data), kept for diagnostics."""

    identifier: int
    data: bytes


@dataclass(frozen=True, slots=True)
class Noise:
    value: int


Message = StatusByte | AutoStatus | ProcessId | Block | Noise

_MAX_BLOCK = 128


class ResponseParser:
    """Splits the printer's byte stream into messages, however the bytes are chunked."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        buf = self._buf
        while buf:
            b = buf[0]
            if is_status_byte(b):
                out.append(StatusByte(b))
                del buf[:1]
            elif is_asb_first_byte(b):
                if len(buf) < 4:
                    break
                out.append(AutoStatus(decode_asb(bytes(buf[:4]))))
                del buf[:4]
            elif b == 0x37:
                end = buf.find(0, 1)
                if end < 0:
                    if len(buf) > _MAX_BLOCK:  # no NUL in sight: not a block after all
                        out.append(Noise(b))
                        del buf[:1]
                        continue
                    break
                block = bytes(buf[1:end])
                del buf[: end + 1]
                if len(block) == 5 and block[0] == 0x22:
                    out.append(ProcessId(block[1:].decode("ascii", "replace")))
                else:
                    out.append(Block(block[0] if block else 0, block[1:]))
            else:
                if b not in (XON, XOFF):
                    out.append(Noise(b))
                del buf[:1]
        return out
