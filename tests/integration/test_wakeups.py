"""gateway.wakeups.wait_event: woken, timed out, and never deaf to cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.wakeups import run_forever, wait_event


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


async def test_run_forever_triggers_survives_a_failed_run_and_stops_on_cancel() -> None:
    wake = asyncio.Event()
    triggers: list[str] = []
    seen, started = asyncio.Event(), asyncio.Event()

    async def run_once(trigger: str) -> None:
        triggers.append(trigger)
        started.set()
        if len(triggers) >= 4:
            seen.set()
        if trigger == "start":
            raise RuntimeError("a bad run")  # logged; the loop goes on

    task = asyncio.create_task(
        run_forever(
            run_once,
            wake,
            lambda: 0.0 if len(triggers) >= 2 else 30.0,
            lambda: "schedule",
            what="test run",
            log=logging.getLogger("test"),
        )
    )
    await asyncio.wait_for(started.wait(), 5.0)
    wake.set()  # woken while waiting its 30 s: a "signed" run (after the failed run's pause)
    await asyncio.wait_for(seen.wait(), 30.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5.0)
    assert triggers[:2] == ["start", "signed"]
    assert set(triggers[2:]) == {"schedule"}
