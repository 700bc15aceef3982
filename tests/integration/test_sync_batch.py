"""The batch uplinks (``peppol/goroute``, ``paraguay/sifen``) against their strict loopback
simulators: real ledger, real HTTP, an injectable clock for the rate limit and timeouts."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from batch_support import (
    API_KEY,
    ISSUER,
    RUC,
    SIFEN_TOKEN,
    FakeClock,
    batch_gateway,
    invoice_request,
)

from drivers.cloud.goroute_sim import GoRouteSim
from drivers.cloud.sifen import cdc_of
from drivers.cloud.sifen_sim import SifenSim
from drivers.signers.software import SoftwareSigner
from gateway.admin import AdminApi
from gateway.batch_sync import BatchSettings
from gateway.core.batch_policy import Limits
from gateway.core.cdc import valid_cdc
from gateway.core.ubl import NS, missing_elements

pytestmark = pytest.mark.timeout(120)

GR = "peppol/goroute"
SF = "paraguay/sifen"


def _dec(root: ET.Element, path: str) -> Decimal:
    el = root.find(path, NS)
    assert el is not None and el.text is not None, path
    return Decimal(el.text)


def check_ubl_totals(xml: bytes, payload: dict) -> None:
    """The invoice parses, has every mandatory element, and its totals are the record's."""
    assert missing_elements(xml) == []
    root = ET.fromstring(xml)
    cent = Decimal("0.01")
    vat = payload["vat"]
    assert _dec(root, "cac:TaxTotal/cbc:TaxAmount") == sum(v["vat"] for v in vat) * cent
    subs = root.findall("cac:TaxTotal/cac:TaxSubtotal", NS)
    assert len(subs) == len(vat)
    for st, v in zip(subs, vat, strict=True):
        assert _dec(st, "cbc:TaxableAmount") == v["net"] * cent
        assert _dec(st, "cbc:TaxAmount") == v["vat"] * cent
        assert _dec(st, "cac:TaxCategory/cbc:Percent") == Decimal(v["rate"])
    net = sum(v["net"] for v in vat) * cent
    assert _dec(root, "cac:LegalMonetaryTotal/cbc:LineExtensionAmount") == net
    assert _dec(root, "cac:LegalMonetaryTotal/cbc:TaxExclusiveAmount") == net
    gross = payload["total"] * cent
    assert _dec(root, "cac:LegalMonetaryTotal/cbc:TaxInclusiveAmount") == gross
    assert _dec(root, "cac:LegalMonetaryTotal/cbc:PayableAmount") == gross
    lines = root.findall("cac:InvoiceLine", NS)
    assert len(lines) == len(payload["lines"])
    assert sum(_dec(ln, "cbc:LineExtensionAmount") for ln in lines) == net
    assert root.findtext("cbc:InvoiceTypeCode", namespaces=NS) == "380"


# ---------------------------------------------------------------------- GoRoute


async def test_goroute_1050_invoices_11_batches_never_over_10_per_minute(
    db_path: Path, signer: SoftwareSigner
) -> None:
    clock = FakeClock()
    async with (
        GoRouteSim(api_keys={API_KEY}, clock=clock.now_s) as sim,
        batch_gateway(db_path, signer, clock=clock, goroute_url=sim.url) as gw,
    ):
        records = await gw.sign([invoice_request(f"inv{i}", incl=i % 2 == 0) for i in range(1050)])
        first = await gw.processor(GR).run_once("admin")
        assert first.batches_created == 10 and first.accepted == 1000
        # the bucket is empty: another run within the minute sends nothing
        clock.advance(30)
        assert (await gw.processor(GR).run_once("admin")).batches_created == 0
        clock.advance(30.001)
        results = await gw.engine.process_pending()
        assert [r.batches_created for r in results] == [1]
        assert results[0].accepted == 50 and results[0].succeeded
        assert len(sim.batch_times) == 11 and sim.max_in_window() <= 10
        assert sim.violations == [] and sim.duplicates == 0
        assert await gw.states(GR) == {"done": 1050}
        refs = await gw.refs(GR)
        assert all(refs[(r.chain, r.seq)] == sim.accepted[f"{r.chain}:{r.seq}"] for r in records)
        stats = {s["processor"]: s for s in await gw.engine.batch_stats()}
        assert stats[GR]["batches_created"] == 11 and stats[GR]["accepted"] == 1050
        # every UBL invoice sent parses, is complete and adds up to its signed record
        for rec in records:
            check_ubl_totals(sim.documents[f"{rec.chain}:{rec.seq}"], rec.payload)


async def test_goroute_rate_bucket_persists_across_restart_no_burst(
    db_path: Path, signer: SoftwareSigner
) -> None:
    clock = FakeClock()
    async with GoRouteSim(api_keys={API_KEY}, clock=clock.now_s) as sim:
        async with batch_gateway(db_path, signer, clock=clock, goroute_url=sim.url) as gw:
            await gw.sign([invoice_request(f"inv{i}") for i in range(1100)])
            assert (await gw.processor(GR).run_once("admin")).batches_created == 10
        clock.advance(10)
        async with batch_gateway(db_path, signer, clock=clock, goroute_url=sim.url) as gw:
            assert (await gw.processor(GR).run_once("admin")).batches_created == 0
            clock.advance(50.001)
            assert (await gw.processor(GR).run_once("admin")).batches_created == 1
        assert sim.violations == [] and sim.max_in_window() <= 10


async def test_goroute_mixed_results_classified_accepted_review_failed(
    db_path: Path, signer: SoftwareSigner
) -> None:
    clock = FakeClock()
    async with (
        GoRouteSim(api_keys={API_KEY}, clock=clock.now_s) as sim,
        batch_gateway(db_path, signer, clock=clock, goroute_url=sim.url) as gw,
    ):
        recs = await gw.sign([invoice_request(f"inv{i}") for i in range(6)])
        ids = [f"{r.chain}:{r.seq}" for r in recs]
        sim.outcomes[ids[1]] = ("rejected", "VALIDATION_ERROR", "Missing BuyerReference")
        sim.outcomes[ids[2]] = ("rejected", "RECIPIENT_NOT_FOUND", "no such participant")
        sim.outcomes[ids[3]] = ("rejected", "SERVICE_UNAVAILABLE", "try later")
        sim.outcomes[ids[4]] = ("failed", "DELIVERY_FAILED", "AP down")
        run = await gw.processor(GR).run_once("admin")
        assert (run.accepted, run.rejected, run.failed) == (2, 2, 2)
        assert not run.succeeded
        assert await gw.states(GR) == {"done": 2, "review": 2, "pending": 2}
        review = await gw.processor(GR).review()
        assert [(r["seq"], r["error"].split(":")[0]) for r in review] == [
            (recs[1].seq, "VALIDATION_ERROR"),
            (recs[2].seq, "RECIPIENT_NOT_FOUND"),
        ]
        status = await gw.engine.status()
        row = next(p for p in status["sync"]["processors"] if p["processor"] == GR)
        assert row["needs_review"] == 2 and status["sync"]["health"] == "red"
        assert [r["seq"] for r in row["review"]] == [recs[1].seq, recs[2].seq]
        # the failed ones go into a later batch, counted as retried
        del sim.outcomes[ids[3]]
        clock.advance(1)
        again = await gw.processor(GR).run_once("admin")
        assert (again.accepted, again.batches_created, again.batches_retried) == (2, 1, 1)
        # a reviewed item is sent again after correction, when asked
        del sim.outcomes[ids[1]]
        assert await gw.processor(GR).retry(recs[1].chain, recs[1].seq)
        assert not await gw.processor(GR).retry(recs[0].chain, recs[0].seq)
        third = await gw.processor(GR).run_once("admin")
        assert third.accepted == 1
        assert await gw.states(GR) == {"done": 5, "review": 1}
        stats = {s["processor"]: s for s in await gw.engine.batch_stats()}
        assert stats[GR]["batches_retried"] == 2 and stats[GR]["rejected"] == 2
        assert sim.duplicates == 0 and sim.violations == []


async def test_goroute_async_batches_polled_to_completion(
    db_path: Path, signer: SoftwareSigner
) -> None:
    clock = FakeClock()
    async with (
        GoRouteSim(api_keys={API_KEY}, clock=clock.now_s, async_polls=3) as sim,
        batch_gateway(db_path, signer, clock=clock, goroute_url=sim.url, goroute_async=True) as gw,
    ):
        recs = await gw.sign([invoice_request(f"inv{i}") for i in range(250)])
        sim.outcomes[f"{recs[7].chain}:{recs[7].seq}"] = ("rejected", "SCHEMA_ERROR", "bad")
        run = await gw.processor(GR).run_once("admin")
        assert (run.batches_created, run.accepted, run.rejected) == (3, 249, 1)
        assert sim.polls >= 3 * 4
        assert await gw.states(GR) == {"done": 249, "review": 1}


async def test_goroute_oversize_and_endpointless_refused_locally_nothing_sent(
    db_path: Path, signer: SoftwareSigner
) -> None:
    clock = FakeClock()
    async with GoRouteSim(api_keys={API_KEY}, clock=clock.now_s) as sim:
        limits = Limits(max_docs=100, max_batch_bytes=50_000, max_doc_bytes=6_000)
        async with batch_gateway(
            db_path,
            signer,
            clock=clock,
            goroute_url=sim.url,
            goroute_overrides={"limits": limits},
        ) as gw:
            await gw.sign(
                [
                    invoice_request("big", text="x" * 190),
                    invoice_request("noend", endpoint=None),
                ]
            )
            run = await gw.processor(GR).run_once("admin")
            assert run.rejected == 1 and run.accepted == 1
            review = await gw.processor(GR).review()
            assert len(review) == 1 and "refused locally" in review[0]["error"]
            assert "endpoint_id" in review[0]["error"]
            assert sim.violations == []
        limits = Limits(max_docs=100, max_batch_bytes=50_000, max_doc_bytes=1_000)
        async with batch_gateway(
            db_path,
            signer,
            clock=clock,
            goroute_url=sim.url,
            goroute_overrides={"limits": limits},
        ) as gw:
            await gw.sign([invoice_request("big2")])
            sent_before = len(sim.batch_times)
            run = await gw.processor(GR).run_once("admin")
            assert run.rejected == 1 and run.batches_created == 0
            assert len(sim.batch_times) == sent_before
            review = await gw.processor(GR).review()
            assert any("over the 1000-byte limit" in r["error"] for r in review)


async def test_goroute_submit_500_then_429_items_stay_pending_no_duplicate(
    db_path: Path, signer: SoftwareSigner
) -> None:
    from drivers.cloud.fiskaly_sim import FaultPlan

    clock = FakeClock()
    plan = FaultPlan(script=["error500", "throttle", "drop_after"], retry_after_s=0)
    async with (
        GoRouteSim(api_keys={API_KEY}, clock=clock.now_s, faults=plan) as sim,
        batch_gateway(db_path, signer, clock=clock, goroute_url=sim.url) as gw,
    ):
        await gw.sign([invoice_request(f"inv{i}") for i in range(5)])
        for _ in range(3):
            run = await gw.processor(GR).run_once("admin")
            assert run.failed == 5 and run.run_error is not None
        assert await gw.states(GR) == {"pending": 5}
        run = await gw.processor(GR).run_once("admin")
        assert run.accepted == 5 and run.batches_retried == 1
        # the dropped answer's batch had gone through: the cloud saw each id twice
        assert sim.duplicates == 5


# ---------------------------------------------------------------------- SIFEN


async def test_sifen_lote_en_cola_procesando_then_aprobado_rechazado(
    db_path: Path, signer: SoftwareSigner
) -> None:
    clock = FakeClock()
    async with (
        SifenSim(tokens={SIFEN_TOKEN}, emisor=RUC, clock=clock.now_s, processing_polls=2) as sim,
        batch_gateway(db_path, signer, clock=clock, sifen_url=sim.url) as gw,
    ):
        recs = await gw.sign([invoice_request(f"inv{i}") for i in range(60)])
        cdcs = [cdc_of(ISSUER, r) for r in recs]
        assert all(valid_cdc(c) for c in cdcs) and len(set(cdcs)) == 60
        sim.rejections[cdcs[3]] = (1001, "CDC duplicado")
        run = await gw.engine.process_pending()
        assert (run[0].batches_created, run[0].accepted, run[0].rejected) == (2, 59, 1)
        assert {"En Cola", "Procesando", "Aprobado", "Rechazado"} <= sim.estados_seen
        review = await gw.processor(SF).review()
        assert review[0]["error"] == "1001: CDC duplicado"
        refs = await gw.refs(SF)
        assert refs[(recs[0].chain, recs[0].seq)] == cdcs[0]
        assert sim.violations == [] and sim.duplicates == 0


async def test_sifen_500_on_poll_is_not_a_verdict(db_path: Path, signer: SoftwareSigner) -> None:
    clock = FakeClock()
    async with (
        SifenSim(tokens={SIFEN_TOKEN}, emisor=RUC, clock=clock.now_s) as sim,
        batch_gateway(db_path, signer, clock=clock, sifen_url=sim.url) as gw,
    ):
        await gw.sign([invoice_request(f"inv{i}") for i in range(3)])
        sim.poll_errors = 3
        run = await gw.processor(SF).run_once("admin")
        assert run.accepted == 3 and run.failed == 0 and run.errors_count == 3
        assert sim.statuses[500] == 3


async def test_sifen_lote_timeout_items_failed_then_retried_in_new_lote(
    db_path: Path, signer: SoftwareSigner
) -> None:
    clock = FakeClock()
    settings = BatchSettings(poll_interval_s=0.01, poll_timeout_s=300.0)
    async with (
        SifenSim(tokens={SIFEN_TOKEN}, emisor=RUC, clock=clock.now_s) as sim,
        batch_gateway(
            db_path, signer, clock=clock, sifen_url=sim.url, sifen_settings=settings
        ) as gw,
    ):
        await gw.sign([invoice_request(f"inv{i}") for i in range(4)])
        sim.stuck = True
        proc = gw.processor(SF)
        real_poll = proc.sender.poll
        polls = 0

        async def poll_and_tick(batch_id: str, doc_ids: list[str]):  # type: ignore[no-untyped-def]
            nonlocal polls
            polls += 1
            clock.advance(60)  # each poll, a minute passes on the injected clock
            return await real_poll(batch_id, doc_ids)

        proc.sender.poll = poll_and_tick  # type: ignore[method-assign]
        run = await proc.run_once("admin")
        assert run.failed == 4 and polls == 5
        assert await gw.states(SF) == {"pending": 4}
        sim.stuck = False
        again = await proc.run_once("admin")
        assert (again.accepted, again.batches_retried) == (4, 1)
        assert len(sim.lotes) == 2


async def test_sifen_over_limit_docs_split_into_lotes_of_50(
    db_path: Path, signer: SoftwareSigner
) -> None:
    clock = FakeClock()
    async with (
        SifenSim(tokens={SIFEN_TOKEN}, emisor=RUC, clock=clock.now_s) as sim,
        batch_gateway(db_path, signer, clock=clock, sifen_url=sim.url) as gw,
    ):
        await gw.sign([invoice_request(f"inv{i}") for i in range(120)])
        run = await gw.processor(SF).run_once("admin")
        assert run.batches_created == 3 and run.accepted == 120
        assert sorted(len(lo["cdcs"]) for lo in sim.lotes.values()) == [20, 50, 50]
        assert sim.violations == []


# ---------------------------------------------------------------------- admin API


async def test_admin_api_process_pending_207_review_listed_and_retried(
    db_path: Path, signer: SoftwareSigner
) -> None:
    token = "admin-token-0123456789abcdef"
    auth = {"Authorization": f"Bearer {token}"}
    clock = FakeClock()
    async with (
        GoRouteSim(api_keys={API_KEY}, clock=clock.now_s) as gsim,
        SifenSim(tokens={SIFEN_TOKEN}, emisor=RUC, clock=clock.now_s) as ssim,
        batch_gateway(db_path, signer, clock=clock, goroute_url=gsim.url, sifen_url=ssim.url) as gw,
    ):
        app = web.Application()
        AdminApi(gw.engine, token).add_routes(app)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
                recs = await gw.sign([invoice_request(f"inv{i}") for i in range(5)])
                bad = f"{recs[2].chain}:{recs[2].seq}"
                gsim.outcomes[bad] = ("rejected", "VALIDATION_ERROR", "x")
                async with http.post(url + "/v1/admin/process-pending", headers=auth) as r:
                    assert r.status == 207
                    results = {x["processor"]: x for x in (await r.json())["results"]}
                assert results[GR]["accepted"] == 4 and results[GR]["rejected"] == 1
                assert results[SF]["accepted"] == 5 and results[SF]["batches_created"] == 1
                async with http.get(url + "/v1/admin/batch-stats", headers=auth) as r:
                    stats = {x["processor"]: x for x in (await r.json())["stats"]}
                assert stats[GR]["failure_rate"] == 0.2 and stats[SF]["accepted"] == 5
                async with http.get(url + "/v1/admin/sync/review", headers=auth) as r:
                    review = (await r.json())["review"]
                assert [(x["processor"], x["seq"]) for x in review] == [(GR, recs[2].seq)]
                async with http.get(url + "/v1/admin/sync/review") as r:
                    assert r.status == 401
                del gsim.outcomes[bad]
                body = {"processor": GR, "chain": recs[2].chain, "seq": recs[2].seq}
                retry_url = url + "/v1/admin/sync/review/retry"
                async with http.post(retry_url, json=body, headers=auth) as r:
                    assert r.status == 200
                async with http.post(retry_url, json=body, headers=auth) as r:
                    assert r.status == 404
                async with http.post(url + "/v1/admin/process-pending", headers=auth) as r:
                    assert r.status == 200
                    results = {x["processor"]: x for x in (await r.json())["results"]}
                assert results[GR]["accepted"] == 1
                assert await gw.states(GR) == {"done": 5}
        finally:
            await runner.cleanup()


def test_sync_engine_config_registers_both_batch_processors(tmp_path: Path) -> None:
    import tomllib

    from gateway.app import sync_engine
    from gateway.config import parse_config

    (tmp_path / "goroute.key").write_text(API_KEY + "\n")
    (tmp_path / "sifen.token").write_text(SIFEN_TOKEN)
    cfg = parse_config(
        tomllib.loads(
            f"""
[gateway]
state_dir = "{tmp_path}"
[peppol]
enabled = true
base_url = "http://127.0.0.1:8710"
api_key_file = "goroute.key"
seller_name = "Boulangerie"
seller_endpoint_id = "0009:12345678900011"
seller_country = "FR"
[sifen]
enabled = true
base_url = "http://127.0.0.1:8720"
token_file = "sifen.token"
ruc = "{RUC}"
poll_interval_s = 45.0
"""
        )
    )
    engine = sync_engine(cfg)
    assert engine.processor_ids() == (GR, SF)
    sifen = engine.batch_processors[SF]
    assert sifen.settings.poll_interval_s == 45.0 and sifen.settings.poll_timeout_s == 300.0
    goroute = engine.batch_processors[GR]
    assert goroute.sender.limits.max_docs == 100 and goroute.settings.rate_limit == 10
