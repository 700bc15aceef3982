"""Batch uplinks at their edges: an item whose earlier submit is still without a verdict and
whose resend fails, a cloud answer of an unexpected shape, and a wall clock set back under a
429 hold. Real HTTP on loopback: the GoRoute simulator, or a bare aiohttp cloud where the
simulator is too well-behaved to give the answer."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

from aiohttp import web
from batch_support import API_KEY, FakeClock, batch_gateway, invoice_request

from drivers.cloud.fiskaly_sim import FaultPlan
from drivers.cloud.goroute_sim import GoRouteSim
from drivers.signers.software import SoftwareSigner
from gateway.core.batch_policy import rate_wait_ms

GR = "peppol/goroute"


def invoice_rows(db_path: Path) -> list[tuple[int, str, str | None, str | None]]:
    """(seq, state, cloud_ref, last_error) of GoRoute's outbox rows that are invoices."""
    with closing(sqlite3.connect(db_path)) as c:
        return c.execute(
            "SELECT o.seq, o.state, o.cloud_ref, o.last_error FROM outbox o JOIN records r "
            "ON r.chain = o.chain AND r.seq = o.seq "
            "WHERE o.processor = ? AND r.type != 'INTENTION::EVENT' ORDER BY o.seq",
            (GR,),
        ).fetchall()


async def test_unsure_item_whose_resend_fails_stays_unsure_duplicate_later_is_accepted(
    db_path: Path, signer: SoftwareSigner
) -> None:
    """B1 reaches the cloud but its answer is lost: the invoice is unsure. The resend B2
    fails for that item with a retriable error (the cloud has not finished B1). When B1 is
    accepted, B3's duplicate answer means "already ours": accepted, never set aside."""
    clock = FakeClock()
    plan = FaultPlan(script=["drop_after"])
    async with (
        GoRouteSim(api_keys={API_KEY}, clock=clock.now_s, faults=plan) as sim,
        batch_gateway(db_path, signer, clock=clock, goroute_url=sim.url) as gw,
    ):
        (rec,) = await gw.sign([invoice_request("inv0")])
        p = gw.processor(GR)
        await p.run_once("admin")
        assert [r[1:3] for r in invoice_rows(db_path)] == [("pending", "unsure")]
        # the cloud is still working on B1: its invoice is not known yet, and B2's copy of it
        # is answered with a retriable item failure
        number = f"{rec.chain}-{rec.number}"
        b1 = sim.invoices.pop(number)
        sim.outcomes[f"{rec.chain}:{rec.seq}"] = ("failed", "RATE_LIMITED", "busy, try later")
        clock.advance(1)
        await p.run_once("admin")
        ((_, state, ref, error),) = invoice_rows(db_path)
        assert (state, ref) == ("pending", "unsure") and "RATE_LIMITED" in (error or "")
        sim.invoices[number] = b1  # B1 is accepted now
        sim.outcomes.pop(f"{rec.chain}:{rec.seq}", None)
        clock.advance(1)
        await p.run_once("admin")
        assert [r[1] for r in invoice_rows(db_path)] == ["done"]
        assert p.review_count == 0 and sim.violations == []


class OddCloud:
    """A GoRoute-like cloud that takes a batch and answers every poll with ``results``."""

    def __init__(self, results: Any) -> None:
        self.results = results
        self.polls = 0
        self.url = ""

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[OddCloud]:
        async def send(_: web.Request) -> web.Response:
            return web.json_response({"batch_id": "b1", "status": "processing"})

        async def status(_: web.Request) -> web.Response:
            self.polls += 1
            body = {"batch_id": "b1", "status": "processing", "results": self.results}
            return web.json_response(body)

        app = web.Application()
        app.router.add_post("/api/v1/send/batch", send)
        app.router.add_get("/api/v1/batches/{batch_id}", status)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        try:
            yield self
        finally:
            await runner.cleanup()


async def test_poll_answer_of_unexpected_shape_is_a_failed_poll_timeout_still_applies(
    db_path: Path, signer: SoftwareSigner
) -> None:
    """``"results": null``, or items that are not objects: each such poll counts as failed
    and is tried again, nothing escapes the run, and once ``poll_timeout_s`` has passed the
    invoice goes back to pending, unsure (the cloud may still take that batch)."""
    for n, answer in enumerate((None, [["not", "an", "object"], {"id": "x", "status": {}}])):
        clock = FakeClock()
        db = db_path.with_name(f"odd-{n}.db")
        async with (
            OddCloud(answer).serving() as cloud,
            batch_gateway(db, signer, clock=clock, goroute_url=cloud.url, goroute_async=True) as gw,
        ):
            await gw.sign([invoice_request("inv0")])
            p = gw.processor(GR)
            run = asyncio.create_task(p.run_once("admin"))
            deadline = time.monotonic() + 20
            while cloud.polls < 3:  # polled again and again: each answer is a failed poll
                assert not run.done(), run.result()
                assert time.monotonic() < deadline, "no poll"
                await asyncio.sleep(0.01)
            assert [r[1] for r in invoice_rows(db)] == ["inflight"]
            clock.advance(p.settings.poll_timeout_s + 1)
            stats = await asyncio.wait_for(run, 20)
            ((_, state, ref, error),) = invoice_rows(db)
            assert (state, ref) == ("pending", "unsure"), (state, ref, error)
            assert "not final after" in (error or "")
            assert stats.failed == 1


async def test_hold_and_rate_bucket_survive_a_clock_set_back_only_up_to_their_bounds(
    db_path: Path, signer: SoftwareSigner
) -> None:
    """NTP sets back a clock that ran 6 h ahead while a 60 s Retry-After hold is on: the hold
    lasts at most ``retry_after_max_s`` from now, not 6 h more."""
    clock, cloud_clock = FakeClock(), FakeClock()  # the cloud's clock is not set back
    plan = FaultPlan(script=["throttle"], retry_after_s=60)
    async with (
        GoRouteSim(api_keys={API_KEY}, clock=cloud_clock.now_s, faults=plan) as sim,
        batch_gateway(db_path, signer, clock=clock, goroute_url=sim.url) as gw,
    ):
        await gw.sign([invoice_request("inv0")])
        p = gw.processor(GR)
        await p.run_once("admin")
        assert p.hold_until_ms > clock.ms
        clock.advance(-6 * 3600)
        held = await p.run_once("admin")  # still held, now for at most retry_after_max_s
        assert held.batches_created == 0
        assert p.hold_until_ms <= clock.ms + p.settings.retry_after_max_s * 1000
        clock.advance(p.settings.retry_after_max_s + 1)
        cloud_clock.advance(p.settings.retry_after_max_s + 1)
        run = await p.run_once("admin")
        assert run.batches_created == 1 and [r[1] for r in invoice_rows(db_path)] == ["done"]
        assert sim.early_requests == 0
    # send times "in the future" count as sent now: the bucket waits one window at most
    now, window = 1_000_000, 60_000
    future = [now + 6 * 3_600_000] * 10
    assert rate_wait_ms(future, now, limit=10, window_ms=window) == window
    assert rate_wait_ms(future[:9], now, limit=10, window_ms=window) == 0
