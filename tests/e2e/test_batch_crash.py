"""SIGKILL between a batch's submit and its final status: after a restart the batch (GoRoute)
or lote (SIFEN) is polled, never submitted again, and no document is accepted twice. SIGKILL
between the submit's answer and writing the batch id: the documents are sent again, the
cloud answers them as duplicates, and the gateway reconciles them as accepted."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from batch_support import API_KEY, RUC, SIFEN_TOKEN, FakeClock, batch_gateway, invoice_request

from drivers.cloud.goroute_sim import GoRouteSim
from drivers.cloud.loopback import LoopbackServer
from drivers.cloud.sifen_sim import SifenSim
from drivers.signers.software import SoftwareSigner

pytestmark = pytest.mark.timeout(60)
WORKER = Path(__file__).with_name("batch_crash_worker.py")


def _sim(processor: str) -> LoopbackServer:
    if processor == "peppol/goroute":
        return GoRouteSim(api_keys={API_KEY}, async_polls=10**9)
    sim = SifenSim(tokens={SIFEN_TOKEN}, emisor=RUC)
    sim.stuck = True
    return sim


def _batches(sim: LoopbackServer) -> int:
    return len(sim.batches) if isinstance(sim, GoRouteSim) else len(sim.lotes)  # type: ignore[attr-defined]


def _finish(sim: LoopbackServer) -> None:
    if isinstance(sim, GoRouteSim):
        sim.async_polls = 0
    else:
        assert isinstance(sim, SifenSim)
        sim.stuck = False
        for lote in sim.lotes.values():
            lote["stuck"] = False


async def _worker(
    db_path: Path, key_path: Path, processor: str, url: str, crash_at: str
) -> asyncio.subprocess.Process:
    """tests/e2e/batch_crash_worker.py on DB for PROCESSOR at URL, with a crash point."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WORKER),
        str(db_path),
        str(key_path),
        processor,
        url,
        crash_at,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.parametrize("processor", ["peppol/goroute", "paraguay/sifen"])
async def test_batch_sigkill_after_submit_restart_polls_not_resubmits(
    processor: str, db_path: Path, signer: SoftwareSigner, key_path: Path
) -> None:
    clock = FakeClock()
    async with _sim(processor) as sim:
        kw = {"goroute_url": sim.url} if processor == "peppol/goroute" else {"sifen_url": sim.url}
        async with batch_gateway(db_path, signer, clock=clock, **kw) as gw:  # type: ignore[arg-type]
            await gw.sign([invoice_request(f"inv{i}") for i in range(30)])
        proc = await _worker(db_path, key_path, processor, sim.url, "none")
        try:
            deadline = time.monotonic() + 20
            # submitted, and polled twice: the batch id is on disk (written before polling)
            while _batches(sim) < 1 or sim.statuses[200] < 3:  # type: ignore[attr-defined]
                assert time.monotonic() < deadline, "the worker never submitted"
                assert proc.returncode is None
                await asyncio.sleep(0.02)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)
            assert proc.stderr is not None
            await proc.stderr.read()
        assert proc.returncode == -signal.SIGKILL
        submitted = _batches(sim)
        _finish(sim)
        async with batch_gateway(db_path, signer, clock=clock, goroute_async=True, **kw) as gw:  # type: ignore[arg-type]
            run = await gw.processor(processor).run_once("admin")
            assert run.batches_created == 0 and run.accepted == 30
            assert await gw.states(processor) == {"done": 30}
        assert _batches(sim) == submitted == 1
        assert sim.duplicates == 0 and sim.violations == []  # type: ignore[attr-defined]


@pytest.mark.parametrize("processor", ["peppol/goroute", "paraguay/sifen"])
async def test_batch_sigkill_before_batch_id_stored_resend_reconciled_as_accepted(
    processor: str, db_path: Path, signer: SoftwareSigner, key_path: Path
) -> None:
    clock = FakeClock()
    sim: LoopbackServer
    if processor == "peppol/goroute":
        sim = GoRouteSim(api_keys={API_KEY}, async_polls=1)
    else:
        sim = SifenSim(tokens={SIFEN_TOKEN}, emisor=RUC)
    async with sim:
        kw = {"goroute_url": sim.url} if processor == "peppol/goroute" else {"sifen_url": sim.url}
        async with batch_gateway(db_path, signer, clock=clock, **kw) as gw:  # type: ignore[arg-type]
            recs = await gw.sign([invoice_request(f"inv{i}") for i in range(30)])
        proc = await _worker(db_path, key_path, processor, sim.url, "after-submit")
        assert proc.stderr is not None
        await asyncio.wait_for(proc.stderr.read(), 30)
        await asyncio.wait_for(proc.wait(), 10)
        assert proc.returncode == -signal.SIGKILL
        # it died in the window: the cloud has the batch, the gateway only its intent
        assert _batches(sim) == 1
        with closing(sqlite3.connect(db_path)) as conn:
            assert conn.execute(
                "SELECT state, count(*) FROM sync_batches WHERE processor = ? GROUP BY state",
                (processor,),
            ).fetchall() == [("submitting", 1)]
        async with batch_gateway(db_path, signer, clock=clock, goroute_async=True, **kw) as gw:  # type: ignore[arg-type]
            run = await gw.processor(processor).run_once("admin")
            assert (run.batches_created, run.accepted, run.rejected) == (1, 30, 0)
            assert await gw.states(processor) == {"done": 30}
            assert await gw.events("SYNC_REJECTED") == []
            refs = await gw.refs(processor)
        # sent twice, taken once: every resent document was answered as a duplicate
        assert _batches(sim) == 2 and sim.duplicates == 30  # type: ignore[attr-defined]
        assert sim.violations == []
        if isinstance(sim, GoRouteSim):
            assert len(sim.accepted) == 30
            assert all(refs[(r.chain, r.seq)] == sim.accepted[f"{r.chain}:{r.seq}"] for r in recs)
        else:
            assert isinstance(sim, SifenSim)
            assert len(sim.approved) == 30
            assert {refs[(r.chain, r.seq)] for r in recs} == sim.approved
