"""Crash-test worker for the batch uplinks: submits the pending invoices of DB to PROCESSOR
at URL, then polls until it is killed (SIGKILL) by tests/e2e/test_batch_crash.py::

    python batch_crash_worker.py DB KEY PROCESSOR URL [CRASH_AT]

The records are signed by the test beforehand; the worker only runs the processor (real
clock, polls every 50 ms, a timeout far beyond the test). Crash points (``CRASH_AT``):

- ``none`` (default): run, and wait for the test's SIGKILL.
- ``after-submit``: the worker SIGKILLs itself the moment the first submit call has
  answered, before its batch id / lote is written — the window between "the cloud has the
  batch" and "we know its id".
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batch_support import FakeClock, batch_gateway

from drivers.signers.software import load_signer
from gateway.batch_sync import BatchSettings


class RealClock(FakeClock):
    def now_ms(self) -> int:
        return time.time_ns() // 1_000_000

    def now_s(self) -> float:
        return time.time()


async def main(db: Path, key: Path, processor: str, url: str, crash_at: str) -> None:
    signer = load_signer(key)
    settings = BatchSettings(poll_interval_s=0.05, poll_timeout_s=3600.0)
    urls = {"goroute_url": url} if processor == "peppol/goroute" else {"sifen_url": url}
    async with batch_gateway(
        db,
        signer,
        clock=RealClock(),
        goroute_async=True,
        settings=settings,
        sifen_settings=settings,
        **urls,  # type: ignore[arg-type]
    ) as gw:
        proc = gw.processor(processor)
        if crash_at == "after-submit":
            submit = proc.sender.submit

            async def submit_then_die(docs):  # type: ignore[no-untyped-def]
                await submit(docs)
                os.kill(os.getpid(), signal.SIGKILL)

            proc.sender.submit = submit_then_die  # type: ignore[method-assign]
        elif crash_at != "none":
            raise SystemExit(f"unknown crash point {crash_at}")
        await proc.run_once("admin")
    await asyncio.sleep(3600)


if __name__ == "__main__":
    crash = sys.argv[5] if len(sys.argv) > 5 else "none"
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4], crash))
