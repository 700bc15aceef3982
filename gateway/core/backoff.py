"""Reconnect delays: capped exponential backoff with jitter.

Pure: the random draw is an argument (like the clock elsewhere in the core), so the policy is
tested without sleeping or seeding. Used by the MQTT reconnect loop, which the app owns.
"""

from __future__ import annotations

#: Beyond this many doublings the cap applies anyway; keeps 2**attempt small.
_MAX_DOUBLINGS = 32


def backoff_s(attempt: int, *, min_s: float, max_s: float, rand: float) -> float:
    """Delay before reconnect attempt ``attempt`` (0 = first retry), ``rand`` in [0, 1).

    "Equal jitter": half the capped exponential delay is fixed, half random, so retries never
    collapse to zero and gateways that lost the same broker do not reconnect in lockstep.
    """
    ceiling = min(max_s, min_s * 2.0 ** min(max(attempt, 0), _MAX_DOUBLINGS))
    return ceiling / 2.0 + min(max(rand, 0.0), 1.0) * ceiling / 2.0
