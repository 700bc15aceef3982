"""The gateway's clock: the wall clock, watched for jumps (docs/events.md, ``CLOCK_JUMP``).

:class:`DisciplinedClock` is the one clock the ledger, the dispatcher, the closing schedule
and the event journal read. Every reading is compared with CLOCK_BOOTTIME (which never jumps
and counts suspend) and with the journal's latest record time
(:func:`gateway.core.clock.observe`); a jump is passed to ``on_jump`` — the event journal
records it — and the reading is returned as it is: the chain rule that a record's time never
goes backward lives in :func:`gateway.core.chain.record_time_ms`.

**Test only**: with ``FISCAL_GATEWAY_TEST_CLOCK_OFFSET_FILE`` set in the environment, the
wall clock is the system clock plus the integer number of milliseconds in that file (read
again whenever the file changes), so an end-to-end test can move the daemon's clock back and
forth. The daemon logs a warning and names the source in its ``START`` event; a production
unit never sets it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from gateway.core.clock import ClockJump, ClockState, observe

log = logging.getLogger("gateway.clock")

TEST_CLOCK_ENV = "FISCAL_GATEWAY_TEST_CLOCK_OFFSET_FILE"


def system_ms() -> int:
    return time.time_ns() // 1_000_000


def boottime_ms() -> int:
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1_000_000


class OffsetFileClock:
    """TEST ONLY: the system clock plus the offset (ms) written in a file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._offset_ms = 0
        self._lock = threading.Lock()

    def offset_ms(self) -> int:
        with self._lock:
            try:
                st = self.path.stat()
                stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
                if stamp != self._stamp:
                    text = self.path.read_text("ascii").strip()
                    self._offset_ms = int(text or "0")
                    self._stamp = stamp
            except (OSError, ValueError) as exc:
                log.warning("test clock offset file %s unreadable: %s", self.path, exc)
            return self._offset_ms

    def __call__(self) -> int:
        return system_ms() + self.offset_ms()


def clock_source(env: Mapping[str, str] = os.environ) -> tuple[Callable[[], int], str]:
    """The wall clock to use and its name (``system`` unless the test variable is set)."""
    path = env.get(TEST_CLOCK_ENV)
    if path:
        log.warning("TEST CLOCK: system clock + the offset in %s (never in production)", path)
        return OffsetFileClock(Path(path)), f"test-offset-file:{path}"
    return system_ms, "system"


class DisciplinedClock:
    """A wall clock that reports its jumps (thread-safe: the ledger writer reads it too)."""

    def __init__(
        self,
        source: Callable[[], int] = system_ms,
        *,
        forward_threshold_ms: int,
        on_jump: Callable[[ClockJump], None] = lambda jump: None,
        steady_ms: Callable[[], int] = boottime_ms,
        name: str = "system",
    ) -> None:
        self.source = source
        self.forward_threshold_ms = forward_threshold_ms
        self.on_jump = on_jump
        self.steady_ms = steady_ms
        self.name = name
        #: the journal's latest record time (set once the ledger is open)
        self.journal_ms: Callable[[], int | None] = lambda: None
        self._state = ClockState()
        self._lock = threading.Lock()
        self.jumps = 0

    def now_ms(self) -> int:
        with self._lock:
            wall = self.source()
            self._state, jump = observe(
                self._state,
                wall,
                self.steady_ms(),
                self.journal_ms(),
                forward_threshold_ms=self.forward_threshold_ms,
            )
        if jump is not None:
            self.jumps += 1
            log.warning(
                "clock jump %s by %d ms: %s",
                jump.direction,
                jump.jump_ms,
                jump.reason,
                extra={"code": "CLOCK_JUMP"},
            )
            try:
                self.on_jump(jump)
            except Exception:
                log.exception("clock jump hook failed")
        return wall

    __call__ = now_ms
