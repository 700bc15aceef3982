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

from drivers.cloud.fiskaly_sim import FaultPlan
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
        assert len(sim.sent_times) == 11 and sim.max_in_window() <= 10
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
        # 4 of 6 did not get through, above the 0.5 threshold: the alert, as fiskaly's
        assert run.alert_triggered and row["alert"] and run.result_json()["alert_triggered"]
        alerts = await gw.events("SYNC_ALERT")
        assert [(a["chain"], a["processor"], a["failure_rate"], a["items"]) for a in alerts] == [
            ("till-1", GR, "0.667", 6)
        ]
        rejected = await gw.events("SYNC_REJECTED")
        assert [(e["processor"], e["seq"], e["error"]) for e in rejected] == [
            (GR, recs[1].seq, "VALIDATION_ERROR: Missing BuyerReference"),
            (GR, recs[2].seq, "RECIPIENT_NOT_FOUND: no such participant"),
        ]
        # the failed ones go into a later batch, counted as retried
        del sim.outcomes[ids[3]]
        clock.advance(1)
        again = await gw.processor(GR).run_once("admin")
        assert (again.accepted, again.batches_created, again.batches_retried) == (2, 1, 1)
        # a run with items below the threshold ends the episode; no second SYNC_ALERT
        assert not again.alert_triggered and not gw.processor(GR).alerting
        assert len(await gw.events("SYNC_ALERT")) == 1
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


async def test_goroute_failure_rate_alert_red_status_event_and_batch_stats(
    db_path: Path, signer: SoftwareSigner
) -> None:
    """Items that fail (retriable: nothing for review) above the threshold raise the alert
    like fiskaly's: SYNC_ALERT in each chain of the run, once per episode, red status,
    ``alert_triggered`` in the result and counted in batch-stats; a good run ends it."""
    clock = FakeClock()
    async with (
        GoRouteSim(api_keys={API_KEY}, clock=clock.now_s) as sim,
        batch_gateway(db_path, signer, clock=clock, goroute_url=sim.url) as gw,
    ):
        recs = await gw.sign(
            [invoice_request(f"a{i}") for i in range(2)]
            + [invoice_request(f"b{i}", till="till-2") for i in range(2)]
        )
        for r in recs[1:]:
            sim.outcomes[f"{r.chain}:{r.seq}"] = ("failed", "DELIVERY_FAILED", "AP down")
        proc = gw.processor(GR)
        run = await proc.run_once("admin")
        assert (run.accepted, run.failed, run.alert_triggered) == (1, 3, True)
        status = await gw.engine.status()
        row = next(p for p in status["sync"]["processors"] if p["processor"] == GR)
        assert row["alert"] and row["needs_review"] == 0 and status["sync"]["health"] == "red"
        alerts = await gw.events("SYNC_ALERT")
        assert sorted((a["chain"], a["failure_rate"], a["failed"]) for a in alerts) == [
            ("till-1", "0.750", 3),
            ("till-2", "0.750", 3),
        ]
        # still failing: the same episode, no new records
        for r in recs[1:]:
            sim.outcomes[f"{r.chain}:{r.seq}"] = ("failed", "DELIVERY_FAILED", "AP down")
        clock.advance(1)
        assert (await proc.run_once("admin")).alert_triggered
        assert len(await gw.events("SYNC_ALERT")) == 2
        clock.advance(1)
        good = await proc.run_once("admin")
        assert (good.accepted, good.alert_triggered) == (3, False) and not proc.alerting
        assert (await gw.engine.status())["sync"]["health"] == "green"
        stats = {s["processor"]: s for s in await gw.engine.batch_stats()}
        assert stats[GR]["alerts_triggered"] == 2 and stats[GR]["failed"] == 6


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


async def test_goroute_batches_cut_by_bytes_within_the_simulators_byte_limit(
    db_path: Path, signer: SoftwareSigner
) -> None:
    """With a byte limit that a handful of invoices fill, batches are cut by bytes (not by the
    100-document count) and the strict simulator, holding the same limit, refuses none."""
    clock = FakeClock()
    limits = Limits(max_docs=100, max_batch_bytes=40_000, max_doc_bytes=20_000)
    async with (
        GoRouteSim(
            api_keys={API_KEY}, clock=clock.now_s, max_batch_bytes=40_000, max_doc_bytes=20_000
        ) as sim,
        batch_gateway(
            db_path, signer, clock=clock, goroute_url=sim.url, goroute_overrides={"limits": limits}
        ) as gw,
    ):
        await gw.sign([invoice_request(f"inv{i}") for i in range(40)])
        run = await gw.processor(GR).run_once("admin")
        assert run.accepted == 40 and run.batches_created > 1
        assert max(len(b["results"]) for b in sim.batches.values()) < 40
        assert sim.violations == [] and sim.statuses[413] == 0


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
            sent_before = len(sim.sent_times)
            run = await gw.processor(GR).run_once("admin")
            assert run.rejected == 1 and run.batches_created == 0
            assert len(sim.sent_times) == sent_before
            review = await gw.processor(GR).review()
            assert any("over the 1000-byte limit" in r["error"] for r in review)


async def test_goroute_submit_500_429_dropped_answer_resend_reconciled_not_reviewed(
    db_path: Path, signer: SoftwareSigner
) -> None:
    clock = FakeClock()
    plan = FaultPlan(script=["error500", "throttle", "drop_after"], retry_after_s=0)
    async with (
        GoRouteSim(api_keys={API_KEY}, clock=clock.now_s, faults=plan) as sim,
        batch_gateway(db_path, signer, clock=clock, goroute_url=sim.url) as gw,
    ):
        recs = await gw.sign([invoice_request(f"inv{i}") for i in range(5)])
        run = await gw.processor(GR).run_once("admin")  # 500: nothing taken, items failed
        assert (run.failed, run.batches_created) == (5, 1) and run.run_error is not None
        run = await gw.processor(GR).run_once("admin")  # 429: not taken, nothing failed
        assert (run.failed, run.batches_created) == (0, 0)
        assert run.run_error is not None and "429" in run.run_error
        run = await gw.processor(GR).run_once("admin")  # taken, but the answer is lost
        assert run.failed == 5 and run.run_error is not None
        assert await gw.states(GR) == {"pending": 5}
        run = await gw.processor(GR).run_once("admin")
        # the resend is answered DUPLICATE_DOCUMENT per item: the cloud has them, and they
        # had been sent before, so they are accepted under the first transaction ids
        assert (run.accepted, run.rejected, run.batches_retried) == (5, 0, 1)
        assert await gw.states(GR) == {"done": 5}
        refs = await gw.refs(GR)
        assert [refs[(r.chain, r.seq)] for r in recs] == [
            sim.accepted[f"{r.chain}:{r.seq}"] for r in recs
        ]
        assert sim.duplicates == 5 and len(set(sim.accepted.values())) == 5
        assert sim.violations == [] and sim.early_requests == 0


async def test_goroute_duplicate_of_a_document_never_sent_goes_to_review(
    db_path: Path, signer: SoftwareSigner
) -> None:
    """A duplicate answer for a document this gateway never sent means someone else used the
    invoice number: not "already accepted", a person must look."""
    clock = FakeClock()
    async with (
        GoRouteSim(api_keys={API_KEY}, clock=clock.now_s) as sim,
        batch_gateway(db_path, signer, clock=clock, goroute_url=sim.url) as gw,
    ):
        recs = await gw.sign([invoice_request(f"inv{i}") for i in range(2)])
        sim.invoices[f"{recs[1].chain}-{recs[1].number}"] = "txn_elsewhere"
        run = await gw.processor(GR).run_once("admin")
        assert (run.accepted, run.rejected) == (1, 1)
        review = await gw.processor(GR).review()
        assert [r["seq"] for r in review] == [recs[1].seq]
        assert review[0]["error"].startswith("DUPLICATE_DOCUMENT:")
        rejected = await gw.events("SYNC_REJECTED")
        assert [(e["chain"], e["processor"], e["seq"]) for e in rejected] == [
            (recs[1].chain, GR, recs[1].seq)
        ]
        # sent again by a technician, still someone else's: review again, never "accepted"
        assert await gw.processor(GR).retry(recs[1].chain, recs[1].seq)
        clock.advance(1)
        again = await gw.processor(GR).run_once("admin")
        assert (again.accepted, again.rejected, again.batches_retried) == (0, 1, 1)
        assert await gw.states(GR) == {"done": 1, "review": 1}
        assert len(await gw.events("SYNC_REJECTED")) == 2


@pytest.mark.parametrize("retry_after_format", ["seconds", "date"])
async def test_goroute_429_retry_after_held_for_submits_and_polls_across_restart(
    retry_after_format: str, db_path: Path, signer: SoftwareSigner
) -> None:
    """Another client of the account spent 8 of its 10 batches a minute: the third batch is
    answered 429 + Retry-After. Nothing — no submit, no poll of the open async batches —
    goes before it has passed, also after a restart; then everything completes."""
    clock = FakeClock()
    clock.ms -= clock.ms % 1000  # a whole second: an HTTP date then names the exact end
    async with GoRouteSim(
        api_keys={API_KEY}, clock=clock.now_s, async_polls=1, retry_after_format=retry_after_format
    ) as sim:
        kw = {"clock": clock, "goroute_url": sim.url, "goroute_async": True}
        async with batch_gateway(db_path, signer, **kw) as gw:  # type: ignore[arg-type]
            await gw.sign([invoice_request(f"inv{i}") for i in range(300)])
            clock.advance(1)
            sim.spend_quota(8)
            clock.advance(20)
            run = await gw.processor(GR).run_once("admin")
            assert run.batches_created == 2 and run.accepted == 0
            assert run.run_error is not None and "429" in run.run_error
            assert sim.statuses[429] == 1 and sim.polls == 0
            proc = gw.processor(GR)
            # the foreign batches leave the window 60 s after they were sent, 40 s from now
            assert proc.hold_until_ms == clock.ms + 40_000
            assert proc.status()["hold_until"] is not None
            clock.advance(20)
            again = await proc.run_once("admin")
            assert again.batches_created == 0 and sim.polls == 0
        requests_before = sum(sim.statuses.values())
        clock.advance(10)  # restarted 10 s before the hold ends: it is still held
        async with batch_gateway(db_path, signer, **kw) as gw:  # type: ignore[arg-type]
            run = await gw.processor(GR).run_once("admin")
            assert run.batches_created == 0 and sum(sim.statuses.values()) == requests_before
            clock.advance(10)
            run = await gw.processor(GR).run_once("admin")
            assert run.batches_created == 1 and run.accepted == 300 and run.succeeded
            assert await gw.states(GR) == {"done": 300}
            assert gw.processor(GR).status()["hold_until"] is None
        assert sim.early_requests == 0 and sim.violations == []
        assert sim.statuses[429] == 1 and sim.max_in_window() <= 10


async def test_goroute_retry_after_over_the_maximum_is_cut_to_it(
    db_path: Path, signer: SoftwareSigner
) -> None:
    clock = FakeClock()
    plan = FaultPlan(script=["throttle"], retry_after_s=86_400)
    settings = BatchSettings(poll_interval_s=0.01, retry_after_max_s=120.0)
    async with (
        GoRouteSim(api_keys={API_KEY}, clock=clock.now_s, faults=plan) as sim,
        batch_gateway(db_path, signer, clock=clock, goroute_url=sim.url, settings=settings) as gw,
    ):
        await gw.sign([invoice_request("inv0")])
        run = await gw.processor(GR).run_once("admin")
        assert run.batches_created == 0 and run.failed == 0
        assert gw.processor(GR).hold_until_ms == clock.ms + 120_000
        clock.advance(119.999)
        assert (await gw.processor(GR).run_once("admin")).batches_created == 0
        assert sum(sim.statuses.values()) == 1


async def test_sifen_429_over_the_lote_rate_retry_after_honoured(
    db_path: Path, signer: SoftwareSigner
) -> None:
    clock = FakeClock()
    async with (
        SifenSim(tokens={SIFEN_TOKEN}, emisor=RUC, clock=clock.now_s, rate_limit=10) as sim,
        batch_gateway(db_path, signer, clock=clock, sifen_url=sim.url) as gw,
    ):
        await gw.sign([invoice_request(f"inv{i}") for i in range(3)])
        sim.spend_quota(10)
        clock.advance(15)
        run = await gw.processor(SF).run_once("admin")
        assert run.batches_created == 0 and run.run_error is not None
        assert gw.processor(SF).hold_until_ms == clock.ms + 45_000
        clock.advance(44.999)
        assert (await gw.processor(SF).run_once("admin")).batches_created == 0
        clock.advance(0.001)
        run = await gw.processor(SF).run_once("admin")
        assert (run.batches_created, run.accepted) == (1, 3)
        assert sim.early_requests == 0 and sim.violations == [] and sim.statuses[429] == 1


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
        # 1001 for a CDC this gateway never sent before: someone else's, so needs review
        assert review[0]["error"] == "1001: CDC duplicado"
        rejected = await gw.events("SYNC_REJECTED")
        assert [(e["processor"], e["seq"]) for e in rejected] == [(SF, recs[3].seq)]
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
        # SIFEN had processed the first lote after all: the second one's CDCs are answered
        # 1001 "CDC duplicado", and since the first lote's fate was unknown, that is accepted
        assert sim.duplicates == 4 and await gw.states(SF) == {"done": 4}


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
