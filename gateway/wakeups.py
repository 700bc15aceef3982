"""Sleeping until woken: the one way the daemon's worker loops wait.

``await wait_event(event, timeout_s)`` returns True when ``event`` was set and False when
``timeout_s`` passed. It uses ``asyncio.timeout``, not ``asyncio.wait_for``: on Python 3.11
``wait_for`` can swallow a cancellation that races the event being set, and a worker that
ignores its cancellation keeps the daemon from stopping (seen in the print worker).
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set (True) or ``timeout_s`` seconds pass (False)."""
    try:
        async with asyncio.timeout(max(0.0, timeout_s)):
            await event.wait()
    except TimeoutError:
        return False
    return True
