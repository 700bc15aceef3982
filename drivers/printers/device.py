"""One ESC/POS printer behind a transport: status queries, sending, print confirmations.

Blocking, and meant to be driven from a single dedicated thread (the print worker owns one);
every call is bounded by the transport's timeouts. What the bytes *say* lives in
:mod:`.escpos` (commands) and :mod:`.status` (answers); which job to print next, and what a
failure means for the queue, is the print worker's business (gateway.printing).

- :meth:`EscposPrinter.status` sends ``DLE EOT 1..4`` and decodes the four answers. Real-time
  commands are answered even while the printer is offline or its buffer is full, so no answer
  within ``status_timeout_s`` means the printer is off, unplugged or not listening.
- :meth:`EscposPrinter.send` writes one document, followed by ``GS ( H`` fn 48 with the job's
  process id when the profile supports confirmations; :meth:`wait_confirmation` then waits
  for the matching process-ID response, which the printer sends once the paper is cut.
- Automatic Status Back messages (when enabled) and stray bytes are parsed whenever the
  line is read; the latest ASB status is kept in :attr:`auto_status`.
"""

from __future__ import annotations

import threading
import time

from drivers.printers.escpos import (
    ASB_ENABLE,
    STATUS_REQUEST,
    Layout,
    Profile,
    confirmation_request,
)
from drivers.printers.status import (
    AutoStatus,
    Message,
    PrinterStatus,
    ProcessId,
    ResponseParser,
    StatusByte,
    decode_dle_eot,
)
from drivers.printers.transport import Transport
from gateway.core.errors import DeviceTimeout, DeviceUnavailable

_ABORT_SLICE_S = 0.25


class EscposPrinter:
    def __init__(
        self,
        transport: Transport,
        profile: Profile,
        layout: Layout,
        *,
        status_queries: bool = True,
        status_timeout_s: float = 2.0,
        write_timeout_s: float = 10.0,
        wire_bytes_per_s: float | None = None,
    ) -> None:
        self.transport = transport
        self.profile = profile
        self.layout = layout
        self.status_queries = status_queries
        self.status_timeout_s = status_timeout_s
        self.write_timeout_s = write_timeout_s
        #: serial line speed (baud / 10 for 8N1): a long document gets the time it needs
        self.wire_bytes_per_s = wire_bytes_per_s
        self.auto_status: PrinterStatus | None = None
        self.noise_bytes = 0
        self._parser = ResponseParser()
        self._confirmed: set[str] = set()
        self._open = False
        self._abort = threading.Event()

    @property
    def name(self) -> str:
        return self.transport.name

    @property
    def answers(self) -> bool:
        """Can this printer answer over its transport (status, confirmations)?"""
        return self.transport.can_read

    @property
    def confirms(self) -> bool:
        """Will a job be confirmed by a process-ID response?"""
        return self.profile.confirm and self.answers

    # ------------------------------------------------------------------ connection

    def connect(self) -> None:
        if self._open:
            return
        self.transport.open()
        self._open = True
        self._parser = ResponseParser()
        if self.layout.status_back and self.answers:
            self._write(ASB_ENABLE)

    def disconnect(self) -> None:
        self._open = False
        self.transport.close()
        self._abort.clear()

    def abort(self) -> None:
        """From any thread: make a status or confirmation wait, or a write, in progress give
        up soon (the owner is shutting down); the next call after :meth:`disconnect` works
        again."""
        self._abort.set()
        self.transport.cancel()

    # ------------------------------------------------------------------ operations

    def status(self) -> PrinterStatus | None:
        """Ask ``DLE EOT 1..4``; None when this printer cannot answer (or is told not to)."""
        self.connect()
        if not (self.status_queries and self.answers):
            return None
        self._drain()
        self._write(STATUS_REQUEST)
        answers: list[int] = []
        deadline = time.monotonic() + self.status_timeout_s
        while len(answers) < 4:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceTimeout(
                    f"{self.name}: no answer to DLE EOT within {self.status_timeout_s:g} s "
                    f"(got {len(answers)} of 4 status bytes)"
                )
            for msg in self._parser.feed(self._read(left)):
                if isinstance(msg, StatusByte):
                    answers.append(msg.value)
                else:
                    self._note(msg)
        return decode_dle_eot(*answers[:4])

    def send(self, document: bytes, process_id: str | None = None) -> None:
        """Write one document (and the confirmation request after it)."""
        self.connect()
        if process_id is not None:
            self._confirmed.discard(process_id)
            document += confirmation_request(process_id)
        self._write(document)

    def wait_confirmation(self, process_id: str, timeout_s: float) -> bool:
        """Wait for the process-ID response; False if none came within ``timeout_s``."""
        self.connect()
        deadline = time.monotonic() + timeout_s
        while process_id not in self._confirmed:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            for msg in self._parser.feed(self._read(left)):
                self._note(msg)
        self._confirmed.discard(process_id)
        return True

    # ------------------------------------------------------------------ internals

    def _write(self, data: bytes) -> None:
        timeout = self.write_timeout_s
        if self.wire_bytes_per_s:
            timeout += len(data) / self.wire_bytes_per_s
        try:
            self.transport.write(data, timeout)
        except DeviceUnavailable:
            self.disconnect()
            raise

    def _read(self, timeout_s: float) -> bytes:
        """Read in short slices so that :meth:`abort` is noticed within a quarter second."""
        if self._abort.is_set():
            raise DeviceUnavailable(f"{self.name}: aborted (shutting down)")
        return self.transport.read(min(timeout_s, _ABORT_SLICE_S))

    def _drain(self) -> None:
        """Parse whatever is already waiting (late ASB, confirmations, stray bytes) so that
        the next status answers are the ones just asked for."""
        while self.answers:
            data = self.transport.read(0)
            if not data:
                return
            for msg in self._parser.feed(data):
                self._note(msg)

    def _note(self, msg: Message) -> None:
        if isinstance(msg, AutoStatus):
            self.auto_status = msg.status
        elif isinstance(msg, ProcessId):
            self._confirmed.add(msg.process_id)
        elif isinstance(msg, StatusByte):
            self.noise_bytes += 1  # an answer nobody is waiting for
        else:
            self.noise_bytes += 1
