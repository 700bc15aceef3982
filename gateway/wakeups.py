"""Sleeping until woken: the one way the daemon's worker loops wait, and the loop the sync
processors share (:func:`run_forever`).

``await wait_event(event, timeout_s)`` returns True when ``event`` was set and False when
``timeout_s`` passed. It uses ``asyncio.timeout``, not ``asyncio.wait_for``: on Python 3.11
``wait_for`` can swallow a cancellation that races the event being set, and a worker that
ignores its cancellation keeps the daemon from stopping (seen in the print worker).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

#: Seconds a worker waits after a run that raised (a bug or a storage problem), so that a
#: failure that repeats at once cannot spin the event loop.
RUN_FAILED_PAUSE_S = 1.0


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set (True) or ``timeout_s`` seconds pass (False)."""
    try:
        async with asyncio.timeout(max(0.0, timeout_s)):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def run_forever(
    run_once: Callable[[str], Awaitable[object]],
    wake: asyncio.Event,
    next_wait_s: Callable[[], float],
    timed_trigger: Callable[[], str],
    *,
    what: str,
    log: logging.Logger,
) -> None:
    """``run_once(trigger)`` again and again until cancelled: first with ``"start"``, then
    with ``"signed"`` when ``wake`` was set, or ``timed_trigger()`` when ``next_wait_s()``
    passed first. A run that raises is logged (as ``what``) and the loop goes on after
    :data:`RUN_FAILED_PAUSE_S`: a worker never dies of one bad run."""
    trigger = "start"
    while True:
        try:
            await run_once(trigger)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", what)
            await asyncio.sleep(RUN_FAILED_PAUSE_S)
        trigger = "signed" if await wait_event(wake, next_wait_s()) else timed_trigger()
        wake.clear()
