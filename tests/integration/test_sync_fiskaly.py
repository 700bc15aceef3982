"""The sync engine and the real fiskaly client against the strict loopback simulator.

Real ledger (SQLite on disk, the writer thread), real HTTP on loopback, the simulator
enforcing seed 004's rules and docs/sync.md's choices (drivers/cloud/fiskaly_sim.py). The
daemon-level tests (SIGKILL mid-replay, budget policy, admin API over the daemon) are in
tests/e2e/test_sync_daemon.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sync_support import (
    PROCESSOR,
    SYSTEM_ID,
    Gateway,
    check_upstream,
    client_settings,
    every_fault,
    gateway,
    make_sim,
    sale_entry,
    wait_for,
)

from drivers.cloud.fiskaly import FiskalyClient, FiskalyUplink, call_body
from drivers.signers.software import SoftwareSigner
from gateway.admin import AdminApi
from gateway.core.errors import CloudBusy, CloudRejected, OfflineLimitReached
from gateway.core.offline_budget import BudgetLimits
from gateway.core.record import Record
from gateway.core.uplink import OFFLINE, ONLINE, STOPPED
from gateway.ledger import Signed
from gateway.store import Reader
from gateway.sync import ProcessorSettings

pytestmark = pytest.mark.timeout(180)


async def chain_records(gw: Gateway, chain: str = "till-1") -> list[Record]:
    """Every record of ``chain`` as stored, in seq order."""

    def q(r: Reader) -> list[Record]:
        rows = r.conn.execute(
            "SELECT body, hash, sig FROM records WHERE chain = ? ORDER BY seq", (chain,)
        ).fetchall()
        return [Record.from_body(json.loads(b), h, s) for b, h, s in rows]

    return await gw.reads.run(q)


async def cloud_down_then_sign(gw: Gateway, n: int) -> list[Record]:
    """Wait until the engine saw the cloud down, then sign ``n`` sales (all offline)."""
    p = gw.processor
    await wait_for(lambda: p.uplink("till-1").state == OFFLINE, 10, "the uplink offline")
    return await gw.sign(n)


async def all_written(gw: Gateway) -> bool:
    return await gw.outbox("pending") == 0


# ---------------------------------------------------------------------- offline replay


async def test_sync_replay_5000_offline_records_accepted_once_in_order_budget_full(
    db_path: Path, signer: SoftwareSigner
) -> None:
    async with make_sim() as sim:
        await sim.down()
        async with gateway(db_path, signer, sim.url) as gw:
            records = await cloud_down_then_sign(gw, 5000)
            assert all(r.offline for r in records)
            budget = await gw.engine.budget("till-1")
            assert budget is not None and budget.pending_records == 5000
            assert budget.level == "warning"  # default warn_pending_records = 5000
            await sim.up()
            p = gw.processor
            t0 = time.monotonic()
            await wait_for(lambda: p.uplink("till-1").state == ONLINE, 120, "replay done")
            elapsed = time.monotonic() - t0
            check_upstream(sim, records)
            assert sim.replay_extensions == 0  # nothing signed meanwhile: a strict countdown
            budget = await gw.engine.budget("till-1")
            assert budget is not None
            assert (budget.pending_records, budget.remaining_records, budget.level) == (
                0,
                9999,
                "ok",
            )
            await wait_for(lambda: all_written(gw), 10, "accepted marks written")
            assert await gw.outbox("done") == 5000
            # a record signed now is online again and goes up at once, without replay headers
            (rec,) = await gw.sign(1, prefix="after")
            assert not rec.offline
            await wait_for(lambda: p.acked.get("till-1") == rec.seq, 10, "the online record")
            assert sim.records[-1]["remaining"] is None and sim.violations == []
            print(f"replayed 5000 records in {elapsed:.1f} s")


async def test_sync_replay_every_fault_20_percent_exactly_once_in_order(
    db_path: Path, signer: SoftwareSigner
) -> None:
    async with make_sim(faults=every_fault(0.2, stall_s=0.4)) as sim:
        await sim.down()
        async with gateway(db_path, signer, sim.url, read_timeout_s=0.25) as gw:
            signed = await cloud_down_then_sign(gw, 1500)
            await sim.up()
            p = gw.processor
            await wait_for(
                lambda: (
                    p.acked.get("till-1") == gw.ledger.heads()["till-1"].seq
                    and p.uplink("till-1").state == ONLINE
                ),
                150,
                "replay done",
            )
            # the chain may also hold SYNC_ALERT events the faults caused: all go up, once
            records = await chain_records(gw)
            assert records[: len(signed)] == signed
            # alert events signed during the replay grow the announced count: the simulator's
            # countdown rule checks that, not the exact numbers
            check_upstream(sim, records, exact_remaining=False)
            kinds = set(sim.faults_injected)
            assert kinds >= {"refuse", "error500", "stall", "drop_after", "conflict"}, kinds
            assert sim.replayed_answers > 0  # drops after processing were answered from cache
            (stats,) = await gw.engine.batch_stats()
            assert stats["accepted"] == len(records) and stats["rejected"] == 0
            await wait_for(lambda: all_written(gw), 10, "accepted marks written")


async def test_sync_online_record_sent_at_once_without_replay_headers(
    db_path: Path, signer: SoftwareSigner
) -> None:
    async with make_sim() as sim, gateway(db_path, signer, sim.url) as gw:
        p = gw.processor
        (rec,) = await gw.sign(1)
        assert not rec.offline
        await wait_for(lambda: p.acked.get("till-1") == 1, 10, "sent")
        assert [(r["cloud_type"], r["remaining"]) for r in sim.records] == [
            ("INTENTION::TRANSACTION", None),
            ("TRANSACTION::RECEIPT", None),
        ]
        check_upstream(sim, [rec])


async def test_sync_failure_mid_replay_goes_offline_then_probes_and_finishes(
    db_path: Path, signer: SoftwareSigner
) -> None:
    async with make_sim() as sim:
        await sim.down()
        async with gateway(db_path, signer, sim.url) as gw:
            records = await cloud_down_then_sign(gw, 300)
            await sim.up()
            p = gw.processor
            await wait_for(lambda: p.acked.get("till-1", 0) >= 50, 30, "replay started")
            await sim.down()
            await wait_for(lambda: p.uplink("till-1").state == OFFLINE, 10, "offline again")
            # signed while the replay is interrupted: offline, announced by the next replay
            more = await gw.sign(20, prefix="later")
            assert all(r.offline for r in more)
            await sim.up()
            await wait_for(lambda: p.uplink("till-1").state == ONLINE, 60, "replay done")
            check_upstream(sim, records + more, exact_remaining=False)
            assert sim.replay_extensions >= 1  # the count grew by the 20 announced later


# ---------------------------------------------------------------------- tokens


async def test_sync_token_expired_mid_replay_refetched_and_replay_completes(
    db_path: Path, signer: SoftwareSigner
) -> None:
    async with make_sim(token_ttl_s=600) as sim:
        await sim.down()
        async with gateway(db_path, signer, sim.url) as gw:
            records = await cloud_down_then_sign(gw, 600)
            await sim.up()
            p = gw.processor
            await wait_for(lambda: p.acked.get("till-1", 0) >= 100, 30, "replay started")
            sim.advance(601)  # the cloud's clock passes the token's expiry
            await wait_for(lambda: p.uplink("till-1").state == ONLINE, 60, "replay done")
            check_upstream(sim, records)
            assert sim.tokens_issued == 2
            assert sim.statuses[401] == 1  # one refusal, then a new token and the same call


async def test_fiskaly_token_refreshed_before_expiry_without_401() -> None:
    offset = [0]

    def clock() -> int:
        return time.time_ns() // 1_000_000 + offset[0]

    async with make_sim(token_ttl_s=3600) as sim:
        client = FiskalyClient(client_settings(sim.url, token_refresh_margin_s=60), clock_ms=clock)
        try:
            await client.ensure_token()
            offset[0] = 3545 * 1000  # 55 s before expiry: within the 60 s margin
            await client.ensure_token()
            assert sim.tokens_issued == 2 and sim.statuses[401] == 0
        finally:
            await client.close()


async def test_fiskaly_bad_credentials_raise_auth_failed_and_uplink_offline(
    db_path: Path, signer: SoftwareSigner
) -> None:
    async with (
        make_sim() as sim,
        gateway(db_path, signer, sim.url, api_secret="wrong-secret-value") as gw,
    ):
        p = gw.processor
        await wait_for(lambda: p.uplink("till-1").state == OFFLINE, 10, "offline")
        assert "CLOUD_AUTH_FAILED" in str(p.uplinks["*"].last_error)
        results = await gw.engine.process_pending()
        assert not results[0].succeeded and results[0].run_error is not None


# ---------------------------------------------------------------------- 409 / 422 / 429


async def fresh_record(db_path: Path, signer: SoftwareSigner) -> Record:
    from gateway.ledger import Ledger

    led = await Ledger.open(db_path, signer)
    try:
        out = await led.submit(sale_entry("one"))
        assert isinstance(out, Signed)
        return out.record
    finally:
        await led.close()


async def test_fiskaly_409_same_key_in_flight_waits_and_retries_same_key(
    db_path: Path, signer: SoftwareSigner
) -> None:
    record = await fresh_record(db_path, signer)
    async with make_sim() as sim:
        client = FiskalyClient(client_settings(sim.url))
        try:
            sim.faults.script = ["conflict", "conflict", "conflict"]
            outcome = await FiskalyUplink(client).send(
                record, "5b3f0a4e-3d5c-4a8e-9f51-2d1e6c7b8a90", {}, None
            )
            assert outcome.calls == 2 and not outcome.replayed
            assert sim.statuses[409] == 3 and client.errors == 3
            assert [r["cloud_type"] for r in sim.records] == [
                "INTENTION::TRANSACTION",
                "TRANSACTION::RECEIPT",
            ]
            # 409 for longer than busy_max_wait_s: given up (the engine goes offline)
            sim.faults.script = ["conflict"] * 50
            slow = FiskalyClient(client_settings(sim.url, busy_max_wait_s=0.05))
            try:
                body = call_body(record, 0, "INTENTION::TRANSACTION", SYSTEM_ID, None)
                with pytest.raises(CloudBusy):
                    await slow.create_record(body, "0f6f7f0e-1111-4222-8333-444455556666")
            finally:
                await slow.close()
        finally:
            await client.close()


async def test_fiskaly_429_honours_retry_after(db_path: Path, signer: SoftwareSigner) -> None:
    record = await fresh_record(db_path, signer)
    async with make_sim() as sim:
        sim.faults.retry_after_s = 1
        client = FiskalyClient(client_settings(sim.url))
        try:
            sim.faults.script = ["throttle"]
            t0 = time.monotonic()
            await FiskalyUplink(client).send(
                record, "7d0e2c1a-8b9f-4c3d-a2e1-f0e9d8c7b6a5", {}, None
            )
            assert time.monotonic() - t0 >= 1.0
            assert sim.statuses[429] == 1 and len(sim.records) == 2
        finally:
            await client.close()


async def test_fiskaly_422_same_key_other_payload_is_permanent(
    db_path: Path, signer: SoftwareSigner
) -> None:
    record = await fresh_record(db_path, signer)
    async with make_sim() as sim:
        client = FiskalyClient(client_settings(sim.url))
        try:
            key = "9c1d2e3f-4a5b-4c6d-8e7f-a0b1c2d3e4f5"
            body = call_body(record, 0, "INTENTION::TRANSACTION", SYSTEM_ID, None)
            first = await client.create_record(body, key)
            again = await client.create_record(body, key)  # a retry: the cached answer
            assert again.replayed and again.record_id == first.record_id
            other = {**body, "metadata": {**body["metadata"], "fg_seq": "2"}}
            with pytest.raises(CloudRejected) as exc:
                await client.create_record(other, key)
            assert exc.value.status == 422 and not exc.value.retryable
            assert sim.duplicates == 0 and len(sim.records) == 1
        finally:
            await client.close()


async def test_sync_422_rejects_record_stops_chain_alerts_and_resume_continues(
    db_path: Path, signer: SoftwareSigner
) -> None:
    async with make_sim() as sim:
        await sim.down()
        async with gateway(db_path, signer, sim.url) as gw:
            records = await cloud_down_then_sign(gw, 3)
            # someone used record 2's first key with another payload: the cloud has it cached
            key = await gw.reads.run(
                lambda r: r.conn.execute(
                    "SELECT idempotency_key FROM outbox WHERE chain = 'till-1' AND seq = 2"
                ).fetchone()[0]
            )
            await sim.up()
            intruder = FiskalyClient(client_settings(sim.url))
            try:
                body = call_body(records[0], 0, "INTENTION::TRANSACTION", SYSTEM_ID, None)
                body["metadata"].update(fg_chain="till-9", fg_offline="false")
                await intruder.create_record(body, key)
            finally:
                await intruder.close()
            p = gw.processor
            gw.processor.wake.set()

            async def settled() -> bool:
                # the run stops the chain, then signs the alert at its end: wait for both
                # (a momentary state alone raced the alert under load)
                if p.uplink("till-1").state != STOPPED:
                    return False
                records = await chain_records(gw)
                return sum(r.type == "INTENTION::EVENT" for r in records) >= 2

            await wait_for(settled, 20, "stopped, rejection and alert recorded")
            state = await gw.reads.run(
                lambda r: r.conn.execute(
                    "SELECT seq, state, last_error FROM outbox WHERE chain = 'till-1' ORDER BY seq"
                ).fetchall()
            )
            assert [s[:2] for s in state[:3]] == [(1, "done"), (2, "rejected"), (3, "pending")]
            assert "422" in state[1][2]
            # the alert: a technical-event record, a red status, the budget still counting
            events = [r for r in await chain_records(gw) if r.type == "INTENTION::EVENT"]
            # SYNC_REJECTED for the record, SYNC_ALERT for the run (1 of 2 items rejected)
            assert [e.payload["event"] for e in events] == ["SYNC_REJECTED", "SYNC_ALERT"]
            assert events[0].payload["seq"] == 2
            status = await gw.engine.status()
            assert status["sync"]["health"] == "red"
            assert status["sync"]["processors"][0]["stopped_chains"] == ["till-1"]
            assert [c["uplink"] for c in status["offline"]["processors"][0]["chains"]] == [STOPPED]
            # a technician resumes: record 2 stays set aside, 3 and the event go up
            assert (await gw.engine.resume(PROCESSOR, "till-1")).state == OFFLINE
            await wait_for(lambda: p.uplink("till-1").state == ONLINE, 20, "online")
            head = gw.ledger.heads()["till-1"].seq
            assert sim.final_seqs("till-1") == [1, *range(3, head + 1)]
            assert sim.duplicates == 0


# ---------------------------------------------------------------------- crash windows


async def test_sync_second_call_failed_first_call_id_kept_no_duplicate_after_cache_expiry(
    db_path: Path, signer: SoftwareSigner
) -> None:
    # Probes far apart (15-30 s): nothing retries on its own while the test runs, so each
    # step is driven by an admin run that returns only when its writes and its alert are
    # done. Waiting instead for the uplink to read "offline" raced twice: it already reads
    # offline (from the outage) between the simulator drawing the last 500 and the gateway
    # storing cloud_ref, and with fast probes the retry makes it online again within ~20 ms,
    # before the cloud's clock was advanced (so the cache expiry was not even exercised).
    slow_probe = ProcessorSettings(interval_s=30.0, probe_min_s=30.0, probe_max_s=30.0)

    async def outbox_row(seq: int) -> tuple[str, str | None]:
        return await gw.reads.run(
            lambda r: r.conn.execute(
                "SELECT state, cloud_ref FROM outbox WHERE chain = 'till-1' AND seq = ?", (seq,)
            ).fetchone()
        )

    async with make_sim() as sim:
        await sim.down()
        async with gateway(db_path, signer, sim.url, processor=slow_probe, retry_attempts=2) as gw:
            (record,) = await cloud_down_then_sign(gw, 1)
            # the intention goes through, the receipt call fails every attempt
            sim.faults.script = ["none", "error500", "error500"]
            await sim.up()
            p = gw.processor
            (run,) = await gw.engine.process_pending()
            assert (run.accepted, run.failed, run.alert_triggered) == (0, 1, True)
            assert sim.faults.script == [] and sim.statuses[500] == 2
            assert [r["cloud_type"] for r in sim.records] == ["INTENTION::TRANSACTION"]
            # the first call's cloud id is stored with the record still pending
            assert await outbox_row(1) == ("pending", sim.records[0]["id"])
            assert p.uplink("till-1").state == OFFLINE  # probed again in 15-30 s only
            records = await chain_records(gw)  # the sale and the alert its failure raised
            assert records[0] == record and records[1].payload["event"] == "SYNC_ALERT"
            assert len(records) == 2
            sim.advance(25 * 3600)  # the cloud forgot the idempotency keys (24 h)
            (run,) = await gw.engine.process_pending()  # the retry, after the expiry
            assert (run.accepted, run.failed, run.rejected) == (2, 0, 0)
            assert p.uplink("till-1").state == ONLINE
            assert sim.duplicates == 0
            assert [r["cloud_type"] for r in sim.records if r["seq"] == 1] == [
                "INTENTION::TRANSACTION",
                "TRANSACTION::RECEIPT",
            ]
            assert await chain_records(gw) == records  # nothing else was signed
            check_upstream(sim, records, exact_remaining=False)
            await wait_for(lambda: all_written(gw), 10, "accepted marks written")
            assert await outbox_row(1) == ("done", sim.records[0]["id"])


# ---------------------------------------------------------------------- budget


async def test_sync_budget_block_policy_refuses_in_writer_then_recovers(
    db_path: Path, signer: SoftwareSigner
) -> None:
    limits = BudgetLimits(
        max_records=5, warn_records=3, max_age_s=3600, warn_age_s=600, policy="block"
    )
    async with make_sim() as sim:
        await sim.down()
        async with gateway(db_path, signer, sim.url, limits=limits) as gw:
            await cloud_down_then_sign(gw, 5)
            budget = await gw.engine.budget("till-1")
            assert budget is not None and budget.level == "hard" and budget.refusal
            # the sixth is refused inside the writer: nothing signed, no seq consumed
            out = await gw.ledger.submit_many([gw.engine.guard(sale_entry("six"))], atomic=False)
            assert isinstance(out[0], OfflineLimitReached)
            assert "max_pending_records = 5" in out[0].message
            assert gw.ledger.heads()["till-1"].seq == 5
            await sim.up()
            p = gw.processor
            await wait_for(lambda: p.uplink("till-1").state == ONLINE, 20, "caught up")
            (rec,) = await gw.sign(1, prefix="seven")
            assert rec.seq == 6 and not rec.offline


async def test_sync_budget_age_warning_and_block_by_age(
    db_path: Path, signer: SoftwareSigner
) -> None:
    offset = [0]

    def clock() -> int:
        return time.time_ns() // 1_000_000 + offset[0]

    limits = BudgetLimits(
        max_records=100, warn_records=50, max_age_s=120, warn_age_s=60, policy="block"
    )
    async with make_sim() as sim:
        await sim.down()
        async with gateway(db_path, signer, sim.url, limits=limits, clock_ms=clock) as gw:
            await cloud_down_then_sign(gw, 1)
            offset[0] = 61_000
            b = await gw.engine.budget("till-1")
            assert (
                b is not None and b.level == "warning" and b.remaining_s == pytest.approx(59, abs=1)
            )
            offset[0] = 121_000
            out = await gw.ledger.submit_many([gw.engine.guard(sale_entry("late"))], atomic=False)
            assert isinstance(out[0], OfflineLimitReached)
            assert "max_offline_age_s" in out[0].message


# ---------------------------------------------------------------------- stats and admin API


async def test_admin_batch_stats_cover_last_24_hours_only(
    db_path: Path, signer: SoftwareSigner
) -> None:
    now = [1_800_000_000_000]
    async with (
        make_sim() as sim,
        gateway(db_path, signer, sim.url, clock_ms=lambda: now[0], run_loop=False) as gw,
    ):
        await gw.sign(3, prefix="a")
        first = await gw.engine.process_pending()
        assert first[0].accepted == 3
        now[0] += 23 * 3600 * 1000
        await gw.sign(2, prefix="b")
        await gw.engine.process_pending()
        (stats,) = await gw.engine.batch_stats()
        assert (stats["accepted"], stats["batches_created"]) == (5, 2)
        now[0] += 2 * 3600 * 1000  # the first run is now 25 h old
        (stats,) = await gw.engine.batch_stats()
        assert (stats["accepted"], stats["batches_created"]) == (2, 1)
        assert stats["since"] == "2027-01-15T09:00:00Z"  # now - 24 h
        assert list(stats) == [
            "processor",
            "batches_created",
            "batches_retried",
            "accepted",
            "rejected",
            "failed",
            "failure_rate",
            "alerts_triggered",  # our addition to the seed's fields (docs/sync.md)
            "since",
        ]


async def serve_admin(api: AdminApi) -> tuple[web.AppRunner, str]:
    app = web.Application()
    api.add_routes(app)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def test_admin_api_200_207_and_401_changes_nothing(
    db_path: Path, signer: SoftwareSigner
) -> None:
    token = "admin-token-0123456789abcdef"
    async with make_sim() as sim, gateway(db_path, signer, sim.url, run_loop=False) as gw:
        runner, url = await serve_admin(AdminApi(gw.engine, token))
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                await gw.sign(4)
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": token}):
                    async with http.post(url + "/v1/admin/process-pending", headers=headers) as r:
                        assert r.status == 401
                    async with http.get(url + "/v1/admin/batch-stats", headers=headers) as r:
                        assert r.status == 401
                assert sim.records == [] and await gw.outbox("pending") == 4  # nothing ran
                auth = {"Authorization": f"Bearer {token}"}
                async with http.post(url + "/v1/admin/process-pending", headers=auth) as r:
                    assert r.status == 200
                    body = await r.json()
                (result,) = body["results"]
                assert list(result) == [
                    "processor",
                    "batches_created",
                    "batches_retried",
                    "accepted",
                    "rejected",
                    "failed",
                    "failure_rate",
                    "alert_triggered",
                    "errors_count",
                    "duration_ms",
                ]
                assert (result["processor"], result["accepted"], result["failed"]) == (
                    PROCESSOR,
                    4,
                    0,
                )
                await sim.down()
                await gw.sign(1, prefix="x")
                async with http.post(url + "/v1/admin/process-pending", headers=auth) as r:
                    assert r.status == 207
                    (result,) = (await r.json())["results"]
                    assert result["errors_count"] >= 1
                async with http.get(url + "/v1/admin/batch-stats", headers=auth) as r:
                    assert r.status == 200
                    (stats,) = (await r.json())["stats"]
                    assert stats["accepted"] == 4 and stats["processor"] == PROCESSOR
        finally:
            await runner.cleanup()


async def test_admin_api_without_configured_token_refuses_everyone(
    db_path: Path, signer: SoftwareSigner
) -> None:
    async with make_sim() as sim, gateway(db_path, signer, sim.url, run_loop=False) as gw:
        runner, url = await serve_admin(AdminApi(gw.engine, None))
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                headers = {"Authorization": "Bearer "}
                async with http.post(url + "/v1/admin/process-pending", headers=headers) as r:
                    assert r.status == 401
        finally:
            await runner.cleanup()


async def test_sync_restart_resumes_from_database_state(
    db_path: Path, signer: SoftwareSigner
) -> None:
    async with make_sim() as sim:
        await sim.down()
        async with gateway(db_path, signer, sim.url) as gw:
            records = await cloud_down_then_sign(gw, 50)
        # a new engine on the same database: still offline, records still pending
        async with gateway(
            db_path,
            signer,
            sim.url,
            processor=ProcessorSettings(interval_s=30, probe_min_s=0.02, probe_max_s=0.2),
        ) as gw:
            assert gw.processor.acked["till-1"] == 0
            more = await gw.sign(5, prefix="b")
            assert all(r.offline for r in more)
            await sim.up()
            await wait_for(lambda: gw.processor.uplink("till-1").state == ONLINE, 30, "online")
            check_upstream(sim, records + more)
    await asyncio.sleep(0)
