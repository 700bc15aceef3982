"""SIGKILL between a batch's submit and its final status: after a restart the batch (GoRoute)
or lote (SIFEN) is polled, never submitted again, and no document is accepted twice."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
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


@pytest.mark.parametrize("processor", ["peppol/goroute", "paraguay/sifen"])
async def test_batch_sigkill_after_submit_restart_polls_not_resubmits(
    processor: str, db_path: Path, signer: SoftwareSigner, key_path: Path
) -> None:
    clock = FakeClock()
    async with _sim(processor) as sim:
        kw = {"goroute_url": sim.url} if processor == "peppol/goroute" else {"sifen_url": sim.url}
        async with batch_gateway(db_path, signer, clock=clock, **kw) as gw:  # type: ignore[arg-type]
            await gw.sign([invoice_request(f"inv{i}") for i in range(30)])
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            str(db_path),
            str(key_path),
            processor,
            sim.url,
            stderr=asyncio.subprocess.PIPE,
        )
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
