"""The replay shares the box with the tills (docs/sync.md, "Sharing the box with the tills"):
it steps aside while a request that signs is in flight, never for longer than its bound, and
its accepted-marks reach the database through the ledger's low-priority writes.

Real ledger, real HTTP on loopback to the strict simulator.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sync_support import Gateway, check_upstream, gateway, make_sim, wait_for

import gateway.sync as sync_module
from drivers.signers.software import SoftwareSigner
from gateway.sync import EngineSettings, SyncEngine

pytestmark = pytest.mark.timeout(120)


async def test_yield_to_pos_waits_for_the_request_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sync_module, "POS_YIELD_MAX_S", 60.0)
    engine = SyncEngine(EngineSettings())
    await engine.yield_to_pos()  # nothing in flight: at once
    engine.pos_begin()
    engine.pos_begin()
    waiting = asyncio.create_task(engine.yield_to_pos())
    await asyncio.sleep(0)
    engine.pos_end()
    await asyncio.sleep(0)
    assert not waiting.done()  # one sale still being answered
    engine.pos_end()
    await asyncio.wait_for(waiting, 10)
    assert engine.pos_inflight == 0


async def test_yield_to_pos_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sync_module, "POS_YIELD_MAX_S", 0.0)
    engine = SyncEngine(EngineSettings())
    engine.pos_begin()  # a till that never pauses
    await asyncio.wait_for(engine.yield_to_pos(), 10)  # slows the replay, never stops it


async def test_replay_with_a_till_always_busy_still_completes(
    db_path: Path, signer: SoftwareSigner
) -> None:
    async with make_sim() as sim:
        await sim.down()
        async with gateway(db_path, signer, sim.url) as gw:
            records = await gw.sign(300)
            gw.engine.pos_begin()  # a request in flight for the whole replay
            await sim.up()
            p = gw.processor
            await wait_for(lambda: p.acked.get("till-1") == records[-1].seq, 60, "replayed")
            gw.engine.pos_end()
            check_upstream(sim, records, exact_remaining=False)
            # the accepted-marks reach the database (as low-priority writes)
            await wait_for(lambda: _all_done(gw, len(records)), 20, "marks written")


async def _all_done(gw: Gateway, n: int) -> bool:
    return await gw.outbox("done") == n
