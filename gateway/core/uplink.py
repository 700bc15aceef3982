"""The uplink state of one chain towards one real-time processor, and when to probe it.

States (DESIGN.md §5, docs/sync.md)::

    online ──failure──► offline ──success, offline records wait──► replaying
      ▲                  ▲  │                                         │
      │                  │  └──success, nothing offline waits──┐      │ failure
      │                  └─────────────────────────────────────┼──────┘
      └───────────────── backlog drained ◄──────────────────────┘ (replaying)
    any ──permanent rejection──► stopped ──technician resumes──► offline (probe at once)

A *failure* is a connect error, a timeout, a dropped connection, a 5xx, or a 409/429 that
outlasted its wait. While not ``online`` the chain's new records are flagged ``offline``
(the record's ``offline`` field, decided by the ledger writer at signing time) and are later
replayed with ``X-Replay-Remaining`` / ``X-Replay-Hash``. An ``offline`` uplink is probed
after a capped exponential delay with jitter (:func:`probe_delay_s`).

Pure: time and the random draw are arguments. What this module does not do: talk to a cloud,
persist anything, or decide what a response means (gateway.core.sync_policy).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

ONLINE = "online"
OFFLINE = "offline"
REPLAYING = "replaying"
STOPPED = "stopped"
STATES = (ONLINE, OFFLINE, REPLAYING, STOPPED)

#: Beyond this many doublings the cap applies anyway; keeps 2**n small.
_MAX_DOUBLINGS = 32


def probe_delay_s(failures: int, *, min_s: float, max_s: float, rand: float) -> float:
    """Wait before the next probe after ``failures`` consecutive failures (>= 1).

    Capped exponential, "equal jitter": half of ``min(max_s, min_s * 2**(failures-1))`` is
    fixed and half is ``rand`` (in [0, 1)) of it, so a fleet of gateways that lost the same
    cloud does not come back in lockstep and a probe never follows at once.
    """
    n = min(max(failures - 1, 0), _MAX_DOUBLINGS)
    ceiling = min(max_s, min_s * 2.0**n)
    return ceiling / 2.0 + min(max(rand, 0.0), 1.0) * ceiling / 2.0


@dataclass(frozen=True, slots=True)
class Uplink:
    state: str = ONLINE
    since_ms: int = 0
    #: consecutive failures (0 while things work)
    failures: int = 0
    #: earliest time of the next attempt while offline (epoch ms)
    next_probe_ms: int = 0
    last_error: str | None = None

    @property
    def offline(self) -> bool:
        """Records signed now are flagged ``offline``: the uplink is not live."""
        return self.state != ONLINE

    def may_send(self, now_ms: int) -> bool:
        if self.state == STOPPED:
            return False
        return self.state != OFFLINE or now_ms >= self.next_probe_ms

    def to_json(self) -> dict[str, object]:
        return {
            "state": self.state,
            "since_ms": self.since_ms,
            "failures": self.failures,
            "next_probe_ms": self.next_probe_ms,
            "last_error": self.last_error,
        }


def _to(u: Uplink, state: str, now_ms: int, **changes: object) -> Uplink:
    since = u.since_ms if u.state == state else now_ms
    return replace(u, state=state, since_ms=since, **changes)  # type: ignore[arg-type]


def on_failure(
    u: Uplink, now_ms: int, error: str, *, min_s: float, max_s: float, rand: float
) -> Uplink:
    """A send or probe failed for a reason that may pass: go (or stay) offline."""
    if u.state == STOPPED:
        return replace(u, last_error=error)
    failures = u.failures + 1
    delay_ms = int(probe_delay_s(failures, min_s=min_s, max_s=max_s, rand=rand) * 1000)
    return _to(
        u, OFFLINE, now_ms, failures=failures, next_probe_ms=now_ms + delay_ms, last_error=error
    )


def on_success(u: Uplink, now_ms: int, *, offline_waiting: bool) -> Uplink:
    """A call went through. From offline: replaying if offline records wait, else online."""
    if u.state == STOPPED:
        return u
    if u.state in (OFFLINE, REPLAYING):
        state = REPLAYING if offline_waiting else ONLINE
        return _to(u, state, now_ms, failures=0, next_probe_ms=0, last_error=None)
    return replace(u, failures=0, next_probe_ms=0)


def on_drained(u: Uplink, now_ms: int) -> Uplink:
    """Nothing waits any more (checked where no record can be signed meanwhile)."""
    if u.state == REPLAYING:
        return _to(u, ONLINE, now_ms, failures=0, next_probe_ms=0, last_error=None)
    return u


def on_rejected(u: Uplink, now_ms: int, error: str) -> Uplink:
    """The cloud refused a record for good: stop this chain's uplink (strict order)."""
    return _to(u, STOPPED, now_ms, last_error=error, next_probe_ms=0)


def on_resume(u: Uplink, now_ms: int) -> Uplink:
    """A technician resumed a stopped uplink: probe at once."""
    if u.state != STOPPED:
        return u
    return _to(u, OFFLINE, now_ms, failures=0, next_probe_ms=now_ms)
