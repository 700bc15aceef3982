"""``/v1/status``, ``/v1/health`` and ``/metrics`` against real state, and the access rules of
the maintenance routes: 401 without credentials, 403 on a missing or wrong CSRF token, login
rate limit, and the actions that need no browser (close the day, export, public key)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from sync_support import API_KEY, API_SECRET, SYSTEM_ID, make_sim

from gateway.export import verify_export

TOKEN = "status-api-admin-token-0123456789"
ADMIN_POSTS = [
    "process-pending",
    "retry",
    "test-page",
    "reprint",
    "close-day",
    "export",
    "archive",
]
V1_ADMIN = [
    ("POST", "/v1/admin/process-pending"),
    ("GET", "/v1/admin/batch-stats"),
    ("POST", "/v1/admin/sync/resume"),
    ("POST", "/v1/admin/archive"),
]


def config(tmp_path: Path) -> str:
    token = tmp_path / "admin.token"
    token.write_text(TOKEN, "utf-8")
    return f'[http]\nadmin_token_file = "{token}"\n'


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert m, f"{name} not in metrics"
    return float(m.group(1))


async def test_status_json_and_metrics_match_real_state(
    start_daemon: Any, make_pos_sale: Any, tmp_path: Path
) -> None:
    d = await start_daemon(config(tmp_path))
    held = d.held_events()  # START, KEY_GENERATED: the chain's first records
    for i in range(5):
        assert (await d.request(make_pos_sale(f"m{i}", 630)))["ok"]
    status, st = await d.http_get("/v1/status")
    assert status == 200
    (chain,) = st["chains"]
    assert (chain["chain"], chain["seq"], chain["totals"]["gross"]) == ("till-1", held + 5, 3150)
    assert chain["counters"] == {"TRANSACTION::RECEIPT": 5, "INTENTION::EVENT": held}
    assert [(r["chain"], r["seq"]) for r in st["recent_records"]][:2] == [
        ("till-1", held + 5),
        ("till-1", held + 4),
    ]
    assert st["review"] == [] and st["disk"]["free_bytes"] > 0
    # the fingerprint is what openssl computes from the exported public key
    async with d.session().get(
        d.http_url + "/admin/public-key", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as resp:
        assert resp.status == 200
        pem = await resp.text()
    proc = await asyncio.create_subprocess_exec(
        "openssl", "pkey", "-pubin", "-outform", "DER",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    der, _ = await proc.communicate(pem.encode())
    assert proc.returncode == 0
    digest = hashlib.sha256(der).hexdigest()
    assert st["key"]["fingerprint_sha256"].replace(":", "") == digest
    assert st["signing"] == {"ok": True, "halted_reason": None, "key_id": st["signing"]["key_id"]}

    async with d.session().get(d.http_url + "/metrics") as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    assert metric(text, "fiscal_gateway_sign_latency_seconds_count") == 5
    assert metric(text, "fiscal_gateway_records_signed_total") == st["writer"]["records"]
    assert metric(text, 'fiscal_gateway_chain_head_seq{chain="till-1"}') == held + 5
    assert metric(text, 'fiscal_gateway_printer_state{state="ready"}') == 1
    assert metric(text, "fiscal_gateway_mqtt_connected") == 0
    assert metric(text, 'fiscal_gateway_health{level="green"}') == 1
    assert metric(text, "fiscal_gateway_writer_group_size_max") >= 1
    status, health = await d.http_get("/v1/health")
    assert (status, health) == (200, {"ok": True})


async def test_admin_routes_without_credentials_are_refused(
    start_daemon: Any, make_pos_sale: Any, tmp_path: Path
) -> None:
    d = await start_daemon(config(tmp_path))
    held = d.held_events()
    assert (await d.request(make_pos_sale("a1")))["ok"]
    url = d.http_url
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        for name in ADMIN_POSTS:
            async with http.post(f"{url}/admin/{name}", data={"chain": "till-1"}) as r:
                assert r.status == 401, name
            async with http.post(
                f"{url}/admin/{name}", headers={"Authorization": "Bearer wrong-token-wrong"}
            ) as r:
                assert r.status == 401, name
        async with http.get(f"{url}/admin/public-key") as r:
            assert r.status == 401
        for method, path in V1_ADMIN:
            async with http.request(method, url + path) as r:
                assert r.status == 401, path

        # a session without the form's CSRF token: 403, and nothing is signed
        async with http.post(f"{url}/login", data={"token": TOKEN}, allow_redirects=False) as r:
            assert r.status == 303
            cookie = r.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        for name in ADMIN_POSTS:
            for form in ({"chain": "till-1", "seq": "1"}, {"csrf": "forged", "chain": "till-1"}):
                async with http.post(f"{url}/admin/{name}", data=form) as r:
                    assert r.status == 403, name
        assert d.query("SELECT count(*) FROM records") == [(held + 1,)]
        async with http.get(url + "/") as r:
            page = await r.text()
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)
        assert csrf
        async with http.post(
            f"{url}/admin/close-day",
            data={"csrf": csrf.group(1), "chain": "till-1"},
            allow_redirects=False,
        ) as r:
            assert r.status == 303
        assert d.query("SELECT type FROM records WHERE type LIKE 'CLOSING::%'") == [
            ("CLOSING::DAILY",)
        ]

    # failed logins are rate-limited per client address
    async with aiohttp.ClientSession() as http:
        codes = []
        for _ in range(7):
            async with http.post(f"{url}/login", data={"token": "not-the-token"}) as r:
                codes.append(r.status)
        assert codes == [401] * 5 + [429] * 2
        async with http.post(f"{url}/login", data={"token": TOKEN}, allow_redirects=False) as r:
            assert r.status == 429  # even the right token waits out the window


async def test_admin_export_with_token_downloads_the_date_range(
    start_daemon: Any, make_pos_sale: Any, tmp_path: Path
) -> None:
    d = await start_daemon(config(tmp_path))
    for i in range(3):
        assert (await d.request(make_pos_sale(f"e{i}")))["ok"]
    today = datetime.now(UTC).date().isoformat()
    auth = {"Authorization": f"Bearer {TOKEN}"}
    form = {"chain": "till-1", "from": today, "to": today}
    async with d.session().post(d.http_url + "/admin/export", data=form, headers=auth) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/gzip"
        body = await r.read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        tar.extractall(tmp_path / "download", filter="data")
    out = tmp_path / "download" / "export"
    lines = (out / "records.jsonl").read_bytes().splitlines()
    assert [json.loads(line)["body"]["seq"] for line in lines][:3] == [1, 2, 3]
    check = verify_export(out)  # the auditor's check (raises ExportInvalid if broken)
    assert check.records >= 3 and check.chains == 1
    form = {"chain": "till-1", "from": "2001-01-01", "to": "2001-01-02"}
    async with d.session().post(d.http_url + "/admin/export", data=form, headers=auth) as r:
        assert r.status == 409
        assert "no records" in (await r.json())["message"]


def fiskaly_config(tmp_path: Path, sim: Any) -> str:
    key, secret = tmp_path / "fiskaly.key", tmp_path / "fiskaly.secret"
    key.write_text(API_KEY)
    secret.write_text(API_SECRET)
    for p in (key, secret):
        p.chmod(0o600)
    return config(tmp_path) + (
        f'[fiskaly]\nenabled = true\nbase_url = "{sim.url}"\napi_key_file = "{key}"\n'
        f'api_secret_file = "{secret}"\nsystem_id = "{SYSTEM_ID}"\ninterval_s = 600.0\n'
        "connect_timeout_s = 1.0\nread_timeout_s = 0.5\ntotal_timeout_s = 2.0\n"
        "retry_attempts = 2\nretry_min_s = 0.002\nretry_max_s = 0.05\n"
        "probe_min_s = 0.05\nprobe_max_s = 0.2\n[sync]\nflush_interval_s = 0.1\n"
    )


async def test_status_offline_replay_and_sync_metrics_follow_the_cloud(
    start_daemon: Any, make_pos_sale: Any, tmp_path: Path
) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with make_sim() as sim:
        await sim.down()
        d = await start_daemon(fiskaly_config(tmp_path, sim))
        unsent = d.held_events() + 3  # the held START, KEY_GENERATED open the chain
        for i in range(3):
            reply = await d.request(make_pos_sale(f"o{i}"))
            assert reply["ok"] and reply["record"]["offline"], reply
        # till-1 was born offline: the sync engine records UPLINK_OFFLINE in it as well
        up_sql = (
            "SELECT count(*) FROM records WHERE chain = 'till-1' AND "
            "json_extract(CAST(body AS TEXT), '$.payload.event') = 'UPLINK_OFFLINE'"
        )
        deadline = time.monotonic() + 20
        while d.query(up_sql) != [(1,)]:
            assert time.monotonic() < deadline, "no UPLINK_OFFLINE record"
            await asyncio.sleep(0.05)
        (unsent,) = d.query("SELECT count(*) FROM records WHERE chain = 'till-1'")[0]
        async with d.session().get(d.http_url + "/metrics") as r:
            text = await r.text()
        assert metric(text, 'fiscal_gateway_outbox_depth{processor="france/fiskaly"}') == unsent
        assert (
            metric(
                text, 'fiscal_gateway_replay_remaining{chain="till-1",processor="france/fiskaly"}'
            )
            == unsent
        )
        assert metric(text, 'fiscal_gateway_health{level="amber"}') == 1
        async with d.session().get(d.http_url + "/fragment") as r:
            html = await r.text()
        assert 'data-level="amber"' in html and "france/fiskaly: cloud offline" in html
        assert f"{unsent} unsent" in html and 'class="last-sync">never<' in html

        await sim.up()
        async with d.session().post(d.http_url + "/admin/process-pending", headers=auth) as r:
            assert r.status == 200, await r.text()
            assert "france/fiskaly: ok" in (await r.json())["message"]
        _, st = await d.http_get("/v1/status")
        assert st["last_sync_ok"]["france/fiskaly"].endswith("Z")
        # the technical events of the reconnection (UPLINK_ONLINE) are records too and go
        # through the outbox after the sales: wait until it is drained
        deadline = time.monotonic() + 20
        while True:
            async with d.session().get(d.http_url + "/metrics") as r:
                text = await r.text()
            depth = metric(text, 'fiscal_gateway_outbox_depth{processor="france/fiskaly"}')
            if depth == 0:
                break
            assert time.monotonic() < deadline, f"outbox depth stays {depth}"
            await asyncio.sleep(0.2)
        labels = '{processor="france/fiskaly",result="accepted"}'
        assert metric(text, "fiscal_gateway_sync_items_24h" + labels) >= 3
        assert d.query(
            "SELECT count(*) FROM outbox WHERE processor = 'france/fiskaly' AND state = 'pending'"
        ) == [(0,)]


async def test_admin_api_process_pending_records_admin_action_event_bad_token_nothing(
    start_daemon: Any, make_pos_sale: Any, tmp_path: Path
) -> None:
    d = await start_daemon(config(tmp_path))
    assert (await d.request(make_pos_sale("a1", 630)))["ok"]

    def admin_actions() -> list[dict[str, Any]]:
        rows = d.query("SELECT body FROM records WHERE type = 'INTENTION::EVENT' ORDER BY seq")
        events = [json.loads(body)["payload"] for (body,) in rows]
        return [e for e in events if e.get("event") == "ADMIN_ACTION"]

    url = d.http_url + "/v1/admin/process-pending"
    async with d.session().post(url, headers={"Authorization": "Bearer wrong"}) as resp:
        assert resp.status == 401
    async with d.session().post(url, headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
        assert resp.status == 200
    for _ in range(100):  # events are signed by the journal's worker, shortly after
        if admin_actions():
            break
        await asyncio.sleep(0.05)
    (action,) = admin_actions()  # the refused call left nothing
    assert (action["who"], action["action"], action["outcome"]) == (
        "admin-api",
        "process-pending",
        "ok",
    )
