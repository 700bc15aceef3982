"""gateway.wakeups.wait_event: woken, timed out, and never deaf to cancellation."""

from __future__ import annotations

import asyncio

import pytest

from gateway.wakeups import wait_event


async def test_wait_event_set_returns_true_timeout_returns_false() -> None:
    ev = asyncio.Event()
    assert await wait_event(ev, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, ev.set)
    assert await wait_event(ev, 5.0) is True


async def test_wait_event_cancel_racing_wakeup_still_cancels() -> None:
    # The race that asyncio.wait_for loses on 3.11: the event is set and the task cancelled
    # in the same loop iteration. The waiter must end cancelled, every time.
    for _ in range(200):
        ev = asyncio.Event()

        async def worker(ev: asyncio.Event = ev) -> None:
            while True:
                await wait_event(ev, 10.0)
                ev.clear()

        task = asyncio.create_task(worker())
        await asyncio.sleep(0)
        ev.set()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5.0)
