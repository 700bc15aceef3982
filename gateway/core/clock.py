"""Clock discipline: when a wall-clock reading is a jump worth a technical event.

Record times never go backward within a chain — :func:`gateway.core.chain.record_time_ms`
gives a record the previous record's time + 1 ms when the clock is behind. This module
decides when a reading must also be *recorded* as a ``CLOCK_JUMP`` event (DESIGN.md §3.5):

- **backward**: the wall clock went back more than ``tolerance_ms`` against the elapsed
  time of a clock that never jumps (the caller passes CLOCK_BOOTTIME, which also counts
  suspend), or it is behind the journal's latest record time (e.g. at start-up after the
  box ran on a wrong clock) — once, until it has caught up;
- **forward**: it went ahead of the elapsed time by more than ``forward_threshold_ms``.

Pure: the readings are arguments, the state is a value the caller keeps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.core.record import format_time

BACKWARD = "BACKWARD"
FORWARD = "FORWARD"

#: Two clocks read one after the other disagree by a little; smaller steps back are noise.
DEFAULT_TOLERANCE_MS = 1000


@dataclass(frozen=True, slots=True)
class ClockState:
    """The previous reading: wall and steady clock (ms), and whether wall was behind the
    journal then."""

    wall_ms: int | None = None
    steady_ms: int | None = None
    behind: bool = False


@dataclass(frozen=True, slots=True)
class ClockJump:
    direction: str
    from_ms: int  # where the wall clock should have been (or the journal's latest time)
    to_ms: int  # where it is
    reason: str

    @property
    def jump_ms(self) -> int:
        return self.to_ms - self.from_ms

    def fields(self) -> dict[str, Any]:
        """The ``CLOCK_JUMP`` event's fields (docs/events.md)."""
        return {
            "direction": self.direction,
            "from_time": format_time(max(0, self.from_ms)),
            "to_time": format_time(max(0, self.to_ms)),
            "jump_ms": self.jump_ms,
            "reason": self.reason,
        }


def observe(
    state: ClockState,
    wall_ms: int,
    steady_ms: int,
    journal_ms: int | None,
    *,
    forward_threshold_ms: int,
    tolerance_ms: int = DEFAULT_TOLERANCE_MS,
) -> tuple[ClockState, ClockJump | None]:
    """The state after a reading, and the jump it shows (if any)."""
    jump = None
    if state.wall_ms is not None and state.steady_ms is not None:
        expected = state.wall_ms + (steady_ms - state.steady_ms)
        skew = wall_ms - expected
        if skew < -tolerance_ms:
            jump = ClockJump(BACKWARD, expected, wall_ms, "the wall clock was set back")
        elif skew > forward_threshold_ms:
            jump = ClockJump(FORWARD, expected, wall_ms, "the wall clock was set forward")
    behind = journal_ms is not None and wall_ms < journal_ms
    if jump is None and behind and not state.behind:
        assert journal_ms is not None
        jump = ClockJump(BACKWARD, journal_ms, wall_ms, "the wall clock is behind the journal")
    return ClockState(wall_ms, steady_ms, behind), jump
