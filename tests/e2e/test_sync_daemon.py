"""The daemon as a subprocess with the ``france/fiskaly`` uplink, against the strict loopback
simulator running in the test (DESIGN.md §8): a replay under 20 % faults of every kind with
the daemon killed (SIGKILL) twice in the middle, the offline budget's warning and ``block``
policy end to end, and the admin API (docs/sync.md)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from sync_support import API_KEY, API_SECRET, SYSTEM_ID, check_upstream, every_fault, make_sim
from sync_support import wait_for as wait_until

from drivers.cloud.fiskaly_sim import FiskalySim
from gateway.core.record import Record

pytestmark = pytest.mark.timeout(300)

SaleData = Callable[..., dict[str, Any]]
Daemon = Any  # tests/e2e/conftest.py's Daemon
StartDaemon = Callable[..., Awaitable[Any]]


def sync_config(
    tmp: Path,
    sim: FiskalySim,
    sync: str = "",
    token: str | None = None,
    *,
    probe_s: tuple[float, float] = (0.02, 0.2),
) -> str:
    """``probe_s``: the offline probe's first and longest delay (large: only the admin API
    moves an offline uplink, so a test's steps are certain, not raced by the probe loop)."""
    key, secret = tmp / "fiskaly.key", tmp / "fiskaly.secret"
    key.write_text(API_KEY + "\n")
    secret.write_text(API_SECRET + "\n")
    for p in (key, secret):
        p.chmod(0o600)
    admin = ""
    if token is not None:
        tok = tmp / "admin.token"
        tok.write_text(token)
        tok.chmod(0o600)
        admin = f'[http]\nadmin_token_file = "{tok}"\n'
    return f"""
[fiskaly]
enabled = true
base_url = "{sim.url}"
api_key_file = "{key}"
api_secret_file = "{secret}"
system_id = "{SYSTEM_ID}"
interval_s = 5.0
connect_timeout_s = 1.0
read_timeout_s = 0.25
total_timeout_s = 2.0
retry_attempts = 4
retry_min_s = 0.002
retry_max_s = 0.05
busy_max_wait_s = 5.0
probe_min_s = {probe_s[0]}
probe_max_s = {probe_s[1]}
[sync]
flush_interval_s = 0.1
{sync}
{admin}
"""


async def uplink(d: Daemon) -> dict[str, Any]:
    """The till-1 chain of the fiskaly processor in the status (uplink state and budget)."""
    (proc,) = (await d.status())["offline"]["processors"]
    for c in proc["chains"]:
        if c["chain"] == "till-1":
            return dict(c)
    return {"uplink": proc["state"], "budget": None}


async def sign_batches(d: Daemon, n: int, make_sale_data: SaleData, prefix: str = "b") -> None:
    """``n`` sales in batches of 500 over the POS socket."""
    for start in range(0, n, 500):
        ops = [
            {"operation": "sign", "referenceId": f"r{i}", "data": make_sale_data(600 + i % 50)}
            for i in range(start, min(n, start + 500))
        ]
        reply = await d.request(
            {"id": f"{prefix}{start}", "op": "batch", "till": "till-1", "operations": ops}
        )
        assert reply["ok"] and reply["batch"]["successfulRecords"] == len(ops), reply


def journal(d: Daemon) -> list[Record]:
    import sqlite3

    with closing(sqlite3.connect(f"file:{d.db_path}?mode=ro", uri=True, timeout=10)) as conn:
        rows = conn.execute(
            "SELECT body, hash, sig FROM records WHERE chain = 'till-1' ORDER BY seq"
        ).fetchall()
    return [Record.from_body(json.loads(b), h, s) for b, h, s in rows]


async def test_sync_daemon_killed_twice_mid_replay_20pct_faults_exactly_once(
    start_daemon: StartDaemon, tmp_path: Path, make_sale_data: SaleData
) -> None:
    async with make_sim(faults=every_fault(0.2, stall_s=0.4)) as sim:
        await sim.down()
        d = await start_daemon(sync_config(tmp_path, sim))
        await wait_until(lambda: _state(d, "offline"), 20, "the uplink offline")
        await sign_batches(d, 5000, make_sale_data)
        await sim.up()
        for threshold in (1500, 3200):  # SIGKILL in the middle of the replay, twice
            await wait_until(lambda t=threshold: len(sim.final_seqs("till-1")) >= t, 120)
            await d.kill()
            await d.start()
        await wait_until(lambda: _settled(d, sim), 180, "the replay finished, all upstream")
        # what is upstream (a record signed since, e.g. a burst of repeated events at the end
        # of its window, is checked by the simulator's rules when it goes up)
        last_up = sim.final_seqs("till-1")[-1]
        records = [r for r in journal(d) if r.seq <= last_up]
        assert len(records) >= 5000 and all(r.offline for r in records[:5000])
        check_upstream(sim, records, exact_remaining=False)
        assert sim.duplicates == 0 and sim.violations == []
        assert sim.replayed_answers > 0  # resent after the kills: answered from the cache
        assert set(sim.faults_injected) >= {"refuse", "error500", "stall", "drop_after"}
        await wait_until(lambda: _full_budget(d), 60, "the budget full again, online")


async def _full_budget(d: Daemon) -> bool:
    u = await uplink(d)
    b = u["budget"]
    return (u["uplink"], b["pending_records"], b["remaining_records"]) == ("online", 0, 9999)


async def _events(d: Daemon, code: str) -> bool:
    return any(r.type == "INTENTION::EVENT" and r.payload["event"] == code for r in journal(d))


async def _state(d: Daemon, state: str) -> bool:
    return (await uplink(d))["uplink"] == state


async def _settled(d: Daemon, sim: FiskalySim) -> bool:
    """Durable facts: every record of the chain up to its head is accepted upstream, nothing
    was signed meanwhile, and the daemon has nothing pending. (An event the end of the replay
    causes, UPLINK_ONLINE or a burst of repeated events at the end of its window, may be
    signed just after: the caller checks what is upstream and waits for the budget.) Cheap
    on purpose: the simulator runs on this test's event loop, and reading the whole journal
    every 20 ms kept its listener from reopening after a refused-connection fault."""
    u = await uplink(d)
    if u["uplink"] != "online" or u["budget"]["pending_records"] != 0:
        return False
    head = (await d.head())[0]
    if sim.final_seqs("till-1") != list(range(1, head + 1)):
        return False
    return (await d.head())[0] == head


async def test_sync_daemon_budget_warning_block_policy_and_admin_api(
    start_daemon: StartDaemon, tmp_path: Path, make_pos_sale: Callable[..., dict[str, Any]]
) -> None:
    token = secrets.token_hex(16)
    policy = (
        "max_pending_records = 12\nwarn_pending_records = 8\n"
        'max_offline_age_s = 3600.0\nwarn_offline_age_s = 600.0\noffline_policy = "block"'
    )
    # probes 60 s apart: after the start-up probe failed only the admin API reaches the cloud
    async with make_sim() as sim:
        await sim.down()
        d = await start_daemon(sync_config(tmp_path, sim, policy, token, probe_s=(60.0, 60.0)))
        await wait_until(lambda: _state(d, "offline"), 20, "the uplink offline")
        # Sales one at a time until the chain is full. The chain also takes event records
        # (START and the like, UPLINK_OFFLINE, OFFLINE_WARNING): each reply's budget must
        # agree with its own pending count, and the warning event must be written before
        # the next sale (so it is certain to fit)
        levels = []
        for i in range(13):
            reply = await d.request(make_pos_sale(f"s{i}"))
            if not reply["ok"]:
                break
            assert reply["record"]["offline"], reply
            b = reply["offline_budget"]
            expected = "hard" if b["pending_records"] >= 12 else "ok"
            if 8 <= b["pending_records"] < 12:
                expected = "warning"
            assert (b["level"], b["remaining_records"]) == (expected, 12 - b["pending_records"])
            levels.append(b["level"])
            if b["level"] == "warning":
                await wait_until(lambda: _events(d, "OFFLINE_WARNING"), 20, "OFFLINE_WARNING")
        assert (
            levels[-1] == "hard"
            and "warning" in levels
            and levels == sorted(levels, key=("ok", "warning", "hard").index)
        )
        assert b["blocked"] is True
        # the next sale is refused, over the socket and over HTTP, and nothing is signed
        refused = reply
        assert refused["error"]["code"] == "OFFLINE_LIMIT_REACHED", refused
        assert "max_pending_records = 12" in refused["error"]["message"]
        status, body = await d.http_post(make_pos_sale("s-http"))
        assert status == 503 and body["error"]["code"] == "OFFLINE_LIMIT_REACHED"
        head = (await d.head())[0]
        assert head == 12
        codes = [r.payload["event"] for r in journal(d) if r.type == "INTENTION::EVENT"]
        assert "UPLINK_OFFLINE" in codes and "OFFLINE_WARNING" in codes
        assert "OFFLINE_LIMIT" not in codes  # reached, but a full chain takes no record
        st = await d.status()
        assert st["offline"]["processors"][0]["limit"] == "hard"

        url = d.http_url
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            for bad in ({}, {"Authorization": "Bearer " + token[:-1] + "x"}):
                async with http.post(url + "/v1/admin/process-pending", headers=bad) as r:
                    assert r.status == 401
                async with http.get(url + "/v1/admin/batch-stats", headers=bad) as r:
                    assert r.status == 401
            assert sim.records == []
            auth = {"Authorization": f"Bearer {token}"}
            async with http.post(url + "/v1/admin/process-pending", headers=auth) as r:
                assert r.status == 207  # the cloud is down
                (res,) = (await r.json())["results"]
                assert res["processor"] == "france/fiskaly" and res["accepted"] == 0
            await sim.up()
            async with http.post(url + "/v1/admin/process-pending", headers=auth) as r:
                assert r.status == 200, await r.text()
                (res,) = (await r.json())["results"]
                assert (res["accepted"], res["failed"], res["rejected"]) == (head, 0, 0)
            async with http.get(url + "/v1/admin/batch-stats", headers=auth) as r:
                assert r.status == 200
                (stats,) = (await r.json())["stats"]
                assert stats["accepted"] == head and stats["since"].endswith("Z")
        # the replay is over when UPLINK_ONLINE is written (after the last offline record)
        await wait_until(lambda: _events(d, "UPLINK_ONLINE"), 20, "UPLINK_ONLINE")
        reply = await d.request(make_pos_sale("s-online"))
        assert reply["ok"] and not reply["record"]["offline"]
        assert reply["offline_budget"]["level"] == "ok"
        seq = reply["record"]["seq"]
        await wait_until(lambda: sim.final_seqs("till-1")[-1:] == [seq], 20, "the online sale")
        check_upstream(sim, [r for r in journal(d) if r.seq <= seq])
        assert (await d.status())["sync"]["health"] == "green"
