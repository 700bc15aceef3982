"""Low-priority writes (``Ledger.write_soon``): they ride in the next group commit's
transaction instead of a commit of their own, get their own once ``defer_max_s`` passed
without a group, are undone alone when they fail, and are written at a clean stop.

The sync engine's accepted-marks use it so a replay never puts an fsync in a sale's way
(docs/performance.md, "Sync"). Real ledger, real SQLite file.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import closing
from pathlib import Path

import pytest

from drivers.signers.software import SoftwareSigner
from gateway.core.record import Record
from gateway.ledger import Ledger

SignSales = Callable[..., Awaitable[list[Record]]]


def count_records(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM records").fetchone()[0])


async def test_write_soon_rides_in_the_next_group_commit(
    db_path: Path, signer: SoftwareSigner, sign_sales: SignSales
) -> None:
    # a minute before it may have a transaction of its own: done within seconds only if a
    # group commit took it along
    ledger = await Ledger.open(db_path, signer, defer_max_s=60.0)
    try:
        soon = asyncio.create_task(ledger.write_soon(count_records))
        await asyncio.sleep(0)  # queued before the sale
        await sign_sales(ledger, 3)
        # it ran in the group's transaction, after the group's records
        assert await asyncio.wait_for(soon, 10) == 3
    finally:
        await ledger.close()


async def test_write_soon_alone_after_defer_max_s_without_sales(
    db_path: Path, signer: SoftwareSigner, sign_sales: SignSales
) -> None:
    ledger = await Ledger.open(db_path, signer, defer_max_s=0.05)
    try:
        await sign_sales(ledger, 2)

        def mark(conn: sqlite3.Connection) -> int:
            conn.execute("CREATE TABLE IF NOT EXISTS probe_mark (n INTEGER)")
            conn.execute("INSERT INTO probe_mark VALUES (?)", (count_records(conn),))
            return 1

        assert await asyncio.wait_for(ledger.write_soon(mark), 10) == 1
    finally:
        await ledger.close()
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT n FROM probe_mark").fetchall() == [(2,)]


async def test_write_soon_failure_undoes_only_its_own_changes(
    db_path: Path, signer: SoftwareSigner, sign_sales: SignSales
) -> None:
    ledger = await Ledger.open(db_path, signer, defer_max_s=60.0)
    try:

        def tamper_then_fail(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE records SET hash = 'x'")
            raise RuntimeError("broken low-priority write")

        soon = asyncio.create_task(ledger.write_soon(tamper_then_fail))
        await asyncio.sleep(0)
        records = await sign_sales(ledger, 2)
        with pytest.raises(RuntimeError, match="broken low-priority write"):
            await asyncio.wait_for(soon, 10)
        assert ledger.halted is None
        more = await sign_sales(ledger, 1, prefix="after")
    finally:
        await ledger.close()
    with closing(sqlite3.connect(db_path)) as conn:
        stored = conn.execute("SELECT hash FROM records ORDER BY seq").fetchall()
    assert stored == [(r.hash,) for r in [*records, *more]]


async def test_write_soon_still_waiting_is_written_at_close(
    db_path: Path, signer: SoftwareSigner
) -> None:
    ledger = await Ledger.open(db_path, signer, defer_max_s=60.0)

    def mark(conn: sqlite3.Connection) -> str:
        conn.execute("CREATE TABLE probe_close (v TEXT)")
        conn.execute("INSERT INTO probe_close VALUES ('written')")
        return "ok"

    soon = asyncio.create_task(ledger.write_soon(mark))
    await asyncio.sleep(0)
    await ledger.close()
    assert await asyncio.wait_for(soon, 10) == "ok"
    with closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT v FROM probe_close").fetchall() == [("written",)]


async def test_work_asked_once_close_began_is_refused_not_left_waiting(
    db_path: Path, signer: SoftwareSigner, make_entry: Callable[..., object]
) -> None:
    """While close() finishes what was queued (a slow deferred write here), a new
    write_soon, control (held events) or submit would land behind the stop marker where the
    writer never looks: each is refused at once; what was queued before still completes."""
    import time as _time

    from gateway.core.errors import SigningHalted

    led = await Ledger.open(db_path, signer, defer_max_s=60.0)

    def slow(conn: sqlite3.Connection) -> str:
        _time.sleep(0.3)  # a big accepted-mark update, say
        return "slow done"

    queued = asyncio.create_task(led.write_soon(slow))
    await asyncio.sleep(0.05)
    closing_task = asyncio.create_task(led.close())
    await asyncio.sleep(0.1)  # the writer is busy with its final deferred write
    late: list[Awaitable[object]] = [
        led.write_soon(lambda conn: "late"),
        led.hold_events([("late-ev", {"event": "STOP"})]),
        led.submit(make_entry("late-sale")),  # type: ignore[arg-type]
    ]
    for call in late:
        with pytest.raises(SigningHalted):
            await asyncio.wait_for(call, 5)
    assert await asyncio.wait_for(queued, 5) == "slow done"
    await asyncio.wait_for(closing_task, 5)
    with pytest.raises(SigningHalted):  # and after close
        await asyncio.wait_for(led.hold_events([("x", {"event": "STOP"})]), 5)
