"""``verify`` while the ledger keeps signing: one consistent snapshot, never a false alarm."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gateway.audit import verify_db
from gateway.ledger import Ledger


async def test_verify_db_while_signing_sees_consistent_snapshot(
    ledger: Ledger, db_path: Path, make_entry: Any
) -> None:
    stop = asyncio.Event()

    async def sign_forever() -> int:
        n = 0
        while not stop.is_set():
            await ledger.submit(make_entry(f"live-{n}", till=f"till-{n % 3}"))
            n += 1
        return n

    signer_task = asyncio.create_task(sign_forever())
    try:
        await asyncio.sleep(0.2)
        for _ in range(15):
            report = await asyncio.to_thread(verify_db, db_path, workers=0)
            assert report.ok, [c.failure for c in report.chains if c.failure]
    finally:
        stop.set()
        signed = await signer_task
    assert signed > 0
    final = await asyncio.to_thread(verify_db, db_path, workers=0)
    assert final.ok and final.records == signed
