"""Technical events: the stable code table and the rate limit of identical events.

An event is an ``INTENTION::EVENT`` record whose payload is ``{"event": CODE, ...fields}``
(docs/events.md). :data:`CODES` is the table of every code the gateway writes; codes are
stable, clients and auditors depend on them (new ones may be added, none renamed).

:class:`RateLimiter` turns a burst of identical events (same code, chain and fields) into two
records at most per window: the first at once, then, when the window ends, one carrying
``count`` (how many more came) and the ``first_time`` / ``last_time`` of those.

Pure: the caller passes the time in; no IO, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.core.canonical import canonical_bytes
from gateway.core.record import format_time

#: The event of a key that signs first: a generated one, or one ``rotate-key`` put in place on
#: a journal with no chain yet (the ledger holds the journal to it).
KEY_GENERATED = "KEY_GENERATED"

#: code → when the gateway records it (the full table with fields is docs/events.md)
CODES: dict[str, str] = {
    "START": "the gateway started (version, key, configuration hash, time zone)",
    "STOP": "the gateway stopped cleanly",
    "UNCLEAN_STOP": "found at start-up: the previous run did not stop cleanly",
    "UPLINK_OFFLINE": "a sync processor lost its fiscal cloud",
    "UPLINK_ONLINE": "a sync processor reached its fiscal cloud again",
    "OFFLINE_WARNING": "a chain's offline budget reached its warning level",
    "OFFLINE_LIMIT": "a chain's offline budget reached its hard level",
    "CLOCK_JUMP": "the wall clock jumped backward, or forward beyond the threshold",
    "PRINTER_FAULT": "the receipt printer reported a fault or could not be reached",
    "PRINTER_RECOVERED": "the receipt printer works again",
    KEY_GENERATED: "a new signing key was generated",
    "KEY_ROTATED": "the chain switches to a new signing key (chain rule, see record-format)",
    "CONFIG_CHANGED": "the configuration differs from the one last recorded",
    "EXPORT_MADE": "an auditor export was written",
    "INTEGRITY_ALARM": "an integrity failure halted signing (recorded once signing works)",
    "ADMIN_ACTION": "a technician acted through the admin API or the command line",
    "SYNC_REJECTED": "a fiscal cloud refused a record for good (sync engine)",
    "SYNC_ALERT": "a sync run's failure rate crossed the alert threshold (sync engine)",
}

#: Fields the journal adds to a rate-limited event; callers cannot use them.
RESERVED = frozenset({"event", "count", "first_time", "last_time"})


def event_payload(code: str, fields: dict[str, Any]) -> dict[str, Any]:
    """``{"event": code, **fields}``; ValueError on an unknown code or a reserved field."""
    if code not in CODES:
        raise ValueError(f"unknown event code {code!r} (see docs/events.md)")
    clash = RESERVED & fields.keys()
    if clash:
        raise ValueError(f"event fields {sorted(clash)} are reserved")
    return {"event": code, **fields}


def event_key(chain: str | None, payload: dict[str, Any]) -> bytes:
    """What makes two events identical: chain and payload, canonically."""
    return canonical_bytes({"chain": chain, "payload": payload})


@dataclass(slots=True)
class _Window:
    chain: str | None
    payload: dict[str, Any]
    ends_ms: int
    count: int = 0
    first_ms: int = 0
    last_ms: int = 0


@dataclass(frozen=True, slots=True)
class Burst:
    """The repeats of one event within a window, to be recorded as one record."""

    chain: str | None
    payload: dict[str, Any]

    @staticmethod
    def of(w: _Window) -> Burst:
        return Burst(
            w.chain,
            {
                **w.payload,
                "count": w.count,
                "first_time": format_time(w.first_ms),
                "last_time": format_time(w.last_ms),
            },
        )


@dataclass(slots=True)
class RateLimiter:
    """Identical events within ``window_ms`` of the first become one extra record."""

    window_ms: int
    windows: dict[bytes, _Window] = field(default_factory=dict)
    ready: list[Burst] = field(default_factory=list)

    def offer(self, chain: str | None, payload: dict[str, Any], now_ms: int) -> bool:
        """True: record this event now; False: it repeats one within its window (counted)."""
        key = event_key(chain, payload)
        w = self.windows.get(key)
        if w is None or now_ms >= w.ends_ms:
            if w is not None and w.count:
                self.ready.append(Burst.of(w))
            self.windows[key] = _Window(chain, payload, now_ms + self.window_ms)
            return True
        if w.count == 0:
            w.first_ms = now_ms
        w.count += 1
        w.last_ms = now_ms
        return False

    def due(self, now_ms: int, *, flush: bool = False) -> list[Burst]:
        """Bursts whose window ended (all of them with ``flush``); forgets ended windows."""
        out, self.ready = self.ready, []
        for key, w in list(self.windows.items()):
            if flush or now_ms >= w.ends_ms:
                if w.count:
                    out.append(Burst.of(w))
                del self.windows[key]
        return out

    def next_due_ms(self) -> int | None:
        """When the next window with repeats ends (None: nothing waits)."""
        if self.ready:
            return 0
        ends = [w.ends_ms for w in self.windows.values() if w.count]
        return min(ends) if ends else None


# ---------------------------------------------------------------------- sync transitions

_LEVEL_CODES = {"warning": "OFFLINE_WARNING", "hard": "OFFLINE_LIMIT"}


def uplink_event(old_state: str, new_state: str) -> str | None:
    """The event a chain's uplink going from ``old_state`` to ``new_state`` (states of
    gateway.core.uplink) is: ``UPLINK_OFFLINE`` when it goes down, ``UPLINK_ONLINE`` when it
    is live again (from offline, or at the end of a replay); None for every other move. At
    start-up the old state is ``online``, so an uplink restored offline is recorded again and
    a restart hides nothing."""
    if new_state == "offline" and old_state != "offline":
        return "UPLINK_OFFLINE"
    if new_state == "online" and old_state in ("offline", "replaying"):
        return "UPLINK_ONLINE"
    return None


def budget_event(old_level: str, new_level: str) -> str | None:
    """``OFFLINE_WARNING`` / ``OFFLINE_LIMIT`` when a chain's offline budget reaches a worse
    level (gateway.core.offline_budget levels); None when it stays or gets better."""
    if new_level != old_level and new_level in _LEVEL_CODES:
        order = ("ok", "warning", "hard")
        if old_level in order and order.index(new_level) < order.index(old_level):
            return None
        return _LEVEL_CODES[new_level]
    return None
