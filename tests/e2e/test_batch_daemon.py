"""The daemon with ``[peppol]`` and ``[sifen]`` enabled against the strict simulators: invoices
signed over the POS socket go up in batches / lotes, a rejected one is listed for review on
the status and the admin API, and batch-stats sums both processors."""

from __future__ import annotations

import json
import secrets
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from batch_support import API_KEY, RUC, SIFEN_TOKEN, invoice_request
from sync_support import wait_for

from drivers.cloud.goroute_sim import GoRouteSim
from drivers.cloud.sifen_sim import SifenSim

pytestmark = pytest.mark.timeout(120)
StartDaemon = Callable[..., Awaitable[Any]]


def config(tmp: Path, goroute: GoRouteSim, sifen: SifenSim, token: str) -> str:
    files = {"goroute.key": API_KEY, "sifen.token": SIFEN_TOKEN, "admin.token": token}
    for name, value in files.items():
        (tmp / name).write_text(value + "\n")
        (tmp / name).chmod(0o600)
    return f"""
[http]
admin_token_file = "{tmp / "admin.token"}"
[peppol]
enabled = true
base_url = "{goroute.url}"
api_key_file = "{tmp / "goroute.key"}"
async_mode = true
seller_name = "Boulangerie Test"
seller_endpoint_id = "0009:12345678900011"
seller_country = "FR"
poll_interval_s = 0.05
[sifen]
enabled = true
base_url = "{sifen.url}"
token_file = "{tmp / "sifen.token"}"
ruc = "{RUC}"
poll_interval_s = 0.05
"""


def outbox(db_path: Path) -> dict[tuple[str, str], int]:
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)) as conn:
        rows = conn.execute(
            "SELECT processor, state, count(*) FROM outbox GROUP BY processor, state"
        ).fetchall()
    return {(p, s): n for p, s, n in rows}


async def test_batch_daemon_invoices_up_review_listed_stats_summed(
    start_daemon: StartDaemon, tmp_path: Path
) -> None:
    token = secrets.token_hex(16)
    async with (
        GoRouteSim(api_keys={API_KEY}, async_polls=2) as goroute,
        SifenSim(tokens={SIFEN_TOKEN}, emisor=RUC) as sifen,
    ):
        goroute.outcomes["till-1:3"] = ("rejected", "RECIPIENT_NOT_FOUND", "no participant")
        d = await start_daemon(config(tmp_path, goroute, sifen, token))
        for i in range(12):
            reply = await d.request(invoice_request(f"inv{i}"))
            assert reply["ok"], reply

        def settled() -> bool:
            o = outbox(d.db_path)
            return (
                o.get(("peppol/goroute", "done"), 0) == 11
                and o.get(("paraguay/sifen", "done"), 0) == 12
            )

        await wait_for(settled, 30, "both processors done")
        assert outbox(d.db_path)[("peppol/goroute", "review")] == 1
        st = await d.status()
        rows = {p["processor"]: p for p in st["sync"]["processors"]}
        assert rows["peppol/goroute"]["needs_review"] == 1
        assert rows["paraguay/sifen"]["needs_review"] == 0
        assert st["sync"]["health"] == "red"
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            async with http.get(d.http_url + "/v1/admin/sync/review", headers=auth) as r:
                review = (await r.json())["review"]
            assert [(x["processor"], x["chain"], x["seq"]) for x in review] == [
                ("peppol/goroute", "till-1", 3)
            ]
            assert review[0]["error"] == "RECIPIENT_NOT_FOUND: no participant"

            def rejected_events() -> list[tuple[str, str, int]]:
                rows = d.query("SELECT chain, body FROM records WHERE type = 'INTENTION::EVENT'")
                payloads = [(c, json.loads(b)["payload"]) for c, b in rows]
                return [
                    (c, p["processor"], p["seq"])
                    for c, p in payloads
                    if p.get("event") == "SYNC_REJECTED"
                ]

            await wait_for(lambda: bool(rejected_events()), 10, "SYNC_REJECTED recorded")
            assert rejected_events() == [("till-1", "peppol/goroute", 3)]
            async with http.post(d.http_url + "/v1/admin/process-pending", headers=auth) as r:
                assert r.status == 200
            async with http.get(d.http_url + "/v1/admin/batch-stats", headers=auth) as r:
                stats = {x["processor"]: x for x in (await r.json())["stats"]}
        assert stats["peppol/goroute"]["accepted"] == 11
        assert stats["peppol/goroute"]["rejected"] == 1
        assert stats["paraguay/sifen"]["accepted"] == 12
        assert stats["paraguay/sifen"]["batches_created"] >= 1
        assert goroute.violations == [] and sifen.violations == []
        assert goroute.duplicates == 0 and sifen.duplicates == 0
        # a technician dealt with the refused invoice outside the gateway: mark it reviewed
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            url = d.http_url + "/v1/admin/sync/review/mark-reviewed"
            item = {"processor": "peppol/goroute", "chain": "till-1", "seq": 3}
            async with http.post(url, json={**item, "note": "sent by e-mail"}) as r:
                assert r.status == 401  # no token: nothing changes
            assert outbox(d.db_path)[("peppol/goroute", "review")] == 1
            async with http.post(url, json={**item, "note": "sent by e-mail"}, headers=auth) as r:
                assert r.status == 200 and (await r.json())["state"] == "reviewed"
            async with http.post(url, json=item, headers=auth) as r:
                assert r.status == 404  # no longer in review
            async with http.get(d.http_url + "/v1/admin/sync/review", headers=auth) as r:
                assert (await r.json())["review"] == []
        o = outbox(d.db_path)
        assert o.get(("peppol/goroute", "review"), 0) == 0
        assert o[("peppol/goroute", "reviewed")] == 1
        rows = {p["processor"]: p for p in (await d.status())["sync"]["processors"]}
        assert rows["peppol/goroute"]["needs_review"] == 0
        await wait_for(
            lambda: any(
                json.loads(b)["payload"].get("action") == "mark-reviewed"
                for (b,) in d.query("SELECT body FROM records WHERE type = 'INTENTION::EVENT'")
            ),
            10,
            "ADMIN_ACTION mark-reviewed recorded",
        )
