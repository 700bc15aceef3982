"""Noticing an outage while idle, and the uplink events pushed as they happen.

The liveness probe of an online, idle uplink (``GET /systems/{id}``), the record that falls
between an outage and its detection (docs/sync.md, "Noticing an outage"), and
``UPLINK_OFFLINE`` / ``UPLINK_ONLINE`` / ``OFFLINE_WARNING`` / ``OFFLINE_LIMIT`` written by
the sync engine into the event journal at each transition (docs/events.md). Real ledger,
real event journal, real HTTP on loopback to the strict simulator; every wait is for a
durable fact (records accepted upstream, event records in the chain), never for a momentary
uplink state.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sync_support import (
    Gateway,
    check_upstream,
    event_codes,
    gateway,
    make_sim,
    wait_for,
)

from drivers.cloud.fiskaly_sim import FiskalySim
from drivers.signers.software import SoftwareSigner
from gateway.core.offline_budget import BudgetLimits
from gateway.core.record import Record
from gateway.sync import ProcessorSettings

pytestmark = pytest.mark.timeout(120)

#: Probes far apart: nothing but the test's own actions moves the uplink.
QUIET = ProcessorSettings(interval_s=30.0, probe_min_s=30.0, probe_max_s=30.0, idle_probe_s=30.0)


async def chain(gw: Gateway) -> list[Record]:
    import json

    def q(r: object) -> list[Record]:
        rows = r.conn.execute(  # type: ignore[attr-defined]
            "SELECT body, hash, sig FROM records WHERE chain = 'till-1' ORDER BY seq"
        ).fetchall()
        return [Record.from_body(json.loads(b), h, s) for b, h, s in rows]

    return list(await gw.reads.run(q))


async def all_upstream(gw: Gateway, sim: FiskalySim) -> bool:
    """Every record of till-1 accepted upstream (and nothing left to send)."""
    head = gw.ledger.heads()["till-1"].seq
    return sim.final_seqs("till-1") == list(range(1, head + 1)) and await gw.outbox("pending") == 0


async def test_sync_idle_probe_notices_outage_and_records_after_it_replay_offline(
    db_path: Path, signer: SoftwareSigner
) -> None:
    idle = ProcessorSettings(interval_s=30.0, probe_min_s=0.02, probe_max_s=0.2, idle_probe_s=0.1)
    # strict: a record flagged online more than 5 s into the outage is a violation
    async with (
        make_sim(outage_grace_s=5.0) as sim,
        gateway(db_path, signer, sim.url, processor=idle, events=True) as gw,
    ):
        online = await gw.sign(1, prefix="on")
        await wait_for(lambda: sim.final_seqs("till-1") == [1], 20, "the online sale sent")
        probes = sim.requests["/systems"]
        await wait_for(lambda: sim.requests["/systems"] > probes, 20, "an idle probe")
        await sim.down()
        # nothing is signed: only the idle probe can notice, and it says so in the journal
        await wait_for(lambda: _has(gw, "UPLINK_OFFLINE"), 20, "UPLINK_OFFLINE from the idle probe")
        later = await gw.sign(5, prefix="off")
        assert all(r.offline for r in later)
        assert not online[0].offline
        await sim.up()
        await wait_for(lambda: _has(gw, "UPLINK_ONLINE"), 30, "UPLINK_ONLINE")
        await wait_for(lambda: all_upstream(gw, sim), 30, "everything upstream")
        records = await chain(gw)
        # the UPLINK_OFFLINE event and the five sales are offline, replayed with the
        # countdown; the sale before the outage and UPLINK_ONLINE are online
        assert [r.offline for r in records] == [False, *[True] * 6, False]
        assert await event_codes(gw) == ["UPLINK_OFFLINE", "UPLINK_ONLINE"]
        check_upstream(sim, records)


async def test_sync_record_signed_before_outage_noticed_goes_up_online_first(
    db_path: Path, signer: SoftwareSigner
) -> None:
    # the window docs/sync.md describes: the cloud went away after the last exchange and a
    # sale comes before any probe noticed. The sale is flagged online (signed, it cannot
    # change); its send fails and takes the uplink offline; after the outage it goes up first,
    # without replay headers, and the offline records after it replay with the countdown.
    async with (
        make_sim(outage_grace_s=10.0) as sim,
        gateway(db_path, signer, sim.url, processor=QUIET, events=True) as gw,
    ):
        await gw.sign(1, prefix="warm")
        await wait_for(lambda: sim.final_seqs("till-1") == [1], 20, "the first sale sent")
        await sim.down()
        (window,) = await gw.sign(1, prefix="window")
        assert not window.offline
        await wait_for(lambda: _has(gw, "UPLINK_OFFLINE"), 20, "the failed send noticed")
        later = await gw.sign(3, prefix="off")
        assert all(r.offline for r in later)
        await sim.up()
        (run,) = await gw.engine.process_pending()
        assert run.failed == 0 and run.rejected == 0
        await wait_for(lambda: _has(gw, "UPLINK_ONLINE"), 20, "UPLINK_ONLINE")
        await wait_for(lambda: all_upstream(gw, sim), 20, "everything upstream")
        records = await chain(gw)
        check_upstream(sim, records)
        finals = [r for r in sim.records if r["final"]]
        assert finals[1]["seq"] == window.seq and finals[1]["remaining"] is None
        # then the offline ones (the three sales, UPLINK_OFFLINE and the failed run's
        # SYNC_ALERT), counting down to 0 (check_upstream: exactly)
        offline = [r for r in finals[2:] if r["offline"]]
        assert len(offline) == 5 and [r["remaining"] for r in offline] == [4, 3, 2, 1, 0]


async def test_fiskaly_sim_refuses_online_record_signed_past_outage_grace(
    db_path: Path, signer: SoftwareSigner
) -> None:
    # the simulator enforces the rule: a record flagged online and signed more than the grace
    # into an outage is a violation (answered 400, so the gateway rejects it)
    async with (
        make_sim(outage_grace_s=0.05) as sim,
        gateway(db_path, signer, sim.url, processor=QUIET) as gw,
    ):
        await gw.sign(1, prefix="warm")
        await wait_for(lambda: sim.final_seqs("till-1") == [1], 20, "the first sale sent")
        await sim.down()
        await asyncio.sleep(0.1)  # a lower bound: the sale is signed past the grace
        (late,) = await gw.sign(1, prefix="late")
        assert not late.offline
        await sim.up()
        gw.processor.wake.set()
        await wait_for(lambda: _rejected(gw), 20, "the record rejected")
        assert len(sim.violations) == 1 and "into an outage" in sim.violations[0]


async def test_sync_flap_shorter_than_a_poll_recorded_as_it_happens(
    db_path: Path, signer: SoftwareSigner
) -> None:
    # down and back within two admin runs (milliseconds): a 2 s poll of the status saw
    # nothing of it; pushed transitions leave both events in the journal
    async with (
        make_sim() as sim,
        gateway(db_path, signer, sim.url, processor=QUIET, events=True) as gw,
    ):
        await gw.sign(1)
        await wait_for(lambda: sim.final_seqs("till-1") == [1], 20, "the sale sent")
        await sim.down()
        (run,) = await gw.engine.process_pending()
        assert run.run_error is not None
        await sim.up()
        (run,) = await gw.engine.process_pending()
        assert run.run_error is None
        await wait_for(
            lambda: _codes_are(gw, ["UPLINK_OFFLINE", "UPLINK_ONLINE"]), 20, "both events"
        )
        await wait_for(lambda: all_upstream(gw, sim), 20, "the events upstream too")
        check_upstream(sim, await chain(gw), exact_remaining=False)


async def test_sync_bad_state_at_start_up_recorded_and_budget_levels_pushed(
    db_path: Path, signer: SoftwareSigner
) -> None:
    limits = BudgetLimits(max_records=20, warn_records=3)
    async with make_sim() as sim:
        await sim.down()
        async with gateway(
            db_path, signer, sim.url, processor=QUIET, limits=limits, events=True
        ) as gw:
            await gw.sign(1)  # till-1 is born offline (the start-up probe failed)
            await wait_for(lambda: _has(gw, "UPLINK_OFFLINE"), 20, "UPLINK_OFFLINE")
            await gw.sign(1, prefix="w")  # 3 pending with the event: the warning level
            await wait_for(lambda: _has(gw, "OFFLINE_WARNING"), 20, "OFFLINE_WARNING")
        # restarted, still offline: a restart hides nothing — both are recorded again
        async with gateway(
            db_path, signer, sim.url, processor=QUIET, limits=limits, events=True
        ) as gw:
            await wait_for(
                lambda: _codes_are(
                    gw, ["UPLINK_OFFLINE", "OFFLINE_WARNING", "UPLINK_OFFLINE", "OFFLINE_WARNING"]
                ),
                20,
                "the bad states recorded at start-up",
            )
            await sim.up()
            (run,) = await gw.engine.process_pending()
            assert run.failed == 0
            await wait_for(lambda: _has(gw, "UPLINK_ONLINE"), 20, "UPLINK_ONLINE")
            await wait_for(lambda: all_upstream(gw, sim), 20, "everything upstream")
            check_upstream(sim, await chain(gw))


async def _has(gw: Gateway, code: str) -> bool:
    return code in await event_codes(gw)


async def _codes_are(gw: Gateway, codes: list[str]) -> bool:
    return await event_codes(gw) == codes


async def _rejected(gw: Gateway) -> bool:
    return await gw.outbox("rejected") == 1
