"""Atomic ``submit_many``: all or nothing, no seq consumed, heads untouched (DESIGN.md §3.7)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager, closing
from pathlib import Path
from typing import Any

from gateway.core.errors import Detail, GatewayError, ValidationError
from gateway.core.record import Record
from gateway.ledger import Entry, Ledger, Signed, Stats, WriterView

EntryFactory = Callable[..., Entry]
SignSales = Callable[..., Awaitable[list[Record]]]
HoldWriter = Callable[[Ledger], AbstractAsyncContextManager[None]]
SettledStats = Callable[[Ledger], Awaitable[Stats]]


def refuse(view: WriterView) -> dict[str, Any]:
    """A ``prepare`` hook that finds the request invalid once it sees the chain."""
    raise ValidationError(
        "cannot cancel: nothing to cancel", [Detail("ref", "no such record", "NOT_ALLOWED")]
    )


def snapshot(db: Path) -> dict[str, Any]:
    """Everything an atomic failure must leave as it was, read from the file on disk."""
    with closing(sqlite3.connect(db)) as conn:
        return {
            table: conn.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
            for table in ("records", "requests", "heads", "outbox", "print_jobs")
        }


async def test_submit_many_atomic_one_invalid_entry_stores_nothing(
    ledger: Ledger, db_path: Path, make_entry: EntryFactory, sign_sales: SignSales
) -> None:
    existing = await sign_sales(ledger, 3, chains=("till-1",))
    before = snapshot(db_path)
    heads_before = ledger.heads()

    batch = [
        make_entry("b-1"),
        make_entry("b-2", till="till-new"),
        make_entry("b-3", prepare=refuse, payload=None, record_type="TRANSACTION::CANCELLATION"),
        make_entry("b-4"),
    ]
    outcomes = await ledger.submit_many(batch, atomic=True)

    assert len(outcomes) == 4
    assert all(isinstance(o, GatewayError) for o in outcomes)
    err = outcomes[0]
    assert isinstance(err, GatewayError)
    assert err.code == "VALIDATION_ERROR"
    assert "operation 2 failed, nothing was signed" in err.message
    assert err.details and err.details[0].field == "ref"
    assert snapshot(db_path) == before
    assert ledger.heads() == heads_before
    assert "till-new" not in ledger.heads()
    assert ledger.halted is None

    nxt = await ledger.submit(make_entry("b-1"))
    assert not nxt.replayed, "an aborted batch must not leave its request ids behind"
    assert nxt.record.seq == existing[-1].seq + 1
    assert nxt.record.prev_hash == existing[-1].hash
    new_chain = await ledger.submit(make_entry("b-2", till="till-new"))
    assert new_chain.record.seq == 1


async def test_submit_many_atomic_first_entry_invalid_on_new_chain_creates_no_head(
    ledger: Ledger, db_path: Path, make_entry: EntryFactory
) -> None:
    batch = [
        make_entry("x-1", prepare=refuse, payload=None, record_type="TRANSACTION::CANCELLATION"),
        make_entry("x-2"),
    ]
    outcomes = await ledger.submit_many(batch, atomic=True)

    assert [o.code for o in outcomes if isinstance(o, GatewayError)] == ["VALIDATION_ERROR"] * 2
    assert snapshot(db_path) == {
        t: [] for t in ("records", "requests", "heads", "outbox", "print_jobs")
    }
    first = await ledger.submit(make_entry("x-2"))
    assert first.record.seq == 1 and first.record.number == 1


async def test_submit_many_nonatomic_one_invalid_entry_stores_the_others(
    ledger: Ledger, make_entry: EntryFactory
) -> None:
    batch = [
        make_entry("n-1"),
        make_entry("n-2", prepare=refuse, payload=None, record_type="TRANSACTION::CANCELLATION"),
        make_entry("n-3"),
    ]
    outcomes = await ledger.submit_many(batch, atomic=False)

    assert isinstance(outcomes[0], Signed) and isinstance(outcomes[2], Signed)
    assert isinstance(outcomes[1], ValidationError)
    assert (outcomes[0].record.seq, outcomes[2].record.seq) == (1, 2)
    assert outcomes[2].record.prev_hash == outcomes[0].record.hash


async def test_submit_many_atomic_failure_in_shared_group_leaves_other_jobs_intact(
    ledger: Ledger,
    db_path: Path,
    make_entry: EntryFactory,
    sign_sales: SignSales,
    hold_writer: HoldWriter,
    settled_stats: SettledStats,
) -> None:
    await sign_sales(ledger, 2, chains=("till-1", "till-2"))
    groups_before = (await settled_stats(ledger)).groups
    async with hold_writer(ledger):
        before = asyncio.create_task(ledger.submit(make_entry("g-1")))
        failing = asyncio.create_task(
            ledger.submit_many(
                [
                    make_entry("g-2"),
                    make_entry("g-3", till="till-2"),
                    make_entry(
                        "g-4", prepare=refuse, payload=None, record_type="TRANSACTION::CANCELLATION"
                    ),
                ],
                atomic=True,
            )
        )
        after = asyncio.create_task(ledger.submit(make_entry("g-5")))
        other_chain = asyncio.create_task(ledger.submit(make_entry("g-6", till="till-2")))
    r_before, outcomes, r_after, r_other = await asyncio.gather(before, failing, after, other_chain)

    groups_after = (await settled_stats(ledger)).groups
    assert groups_after == groups_before + 1, "the jobs did not share one group commit"
    assert all(isinstance(o, GatewayError) for o in outcomes)
    # till-1 had seq 1; g-1 took 2, the aborted g-2 consumed nothing, so g-5 is 3.
    assert (r_before.record.seq, r_after.record.seq) == (2, 3)
    assert r_after.record.prev_hash == r_before.record.hash
    assert r_other.record.seq == 2  # till-2: the aborted g-3 consumed nothing either
    with closing(sqlite3.connect(db_path)) as conn:
        heads = dict(conn.execute("SELECT chain, seq || ':' || hash FROM heads"))
        ids = {r[0] for r in conn.execute("SELECT request_id FROM requests")}
    assert heads == {
        "till-1": f"3:{r_after.record.hash}",
        "till-2": f"2:{r_other.record.hash}",
    }
    assert ids.isdisjoint({"g-2", "g-3", "g-4"})
