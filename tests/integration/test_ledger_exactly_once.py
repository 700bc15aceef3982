"""Exactly once (DESIGN.md §3.3): a request id is signed at most once per client.

Real SQLite file, real signing key; the signer is wrapped only to count signatures, so
"nothing new signed" is observed directly rather than inferred.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, closing
from pathlib import Path

import pytest

from drivers.signers.software import SoftwareSigner
from gateway.core.errors import GatewayError, IdempotencyMismatch
from gateway.core.record import Record
from gateway.ledger import Entry, Ledger, Signed, Stats

EntryFactory = Callable[..., Entry]
SignSales = Callable[..., Awaitable[list[Record]]]
HoldWriter = Callable[[Ledger], AbstractAsyncContextManager[None]]
SettledStats = Callable[[Ledger], Awaitable[Stats]]


class CountingSigner:
    """A real signer that counts how often it signed."""

    def __init__(self, inner: SoftwareSigner) -> None:
        self.inner = inner
        self.key_id = inner.key_id
        self.public_pem = inner.public_pem
        self.signed = 0

    def sign(self, data: bytes) -> str:
        self.signed += 1
        return self.inner.sign(data)


@pytest.fixture
def counting(signer: SoftwareSigner) -> CountingSigner:
    return CountingSigner(signer)


@pytest.fixture
async def led(db_path: Path, counting: CountingSigner) -> AsyncIterator[Ledger]:
    ledger = await Ledger.open(db_path, counting)
    try:
        yield ledger
    finally:
        await ledger.close()


def table_counts(db: Path) -> tuple[int, int, int, int]:
    """(records, requests, outbox + print jobs, heads) as stored on disk."""
    with closing(sqlite3.connect(db)) as conn:
        return (
            conn.execute("SELECT count(*) FROM records").fetchone()[0],
            conn.execute("SELECT count(*) FROM requests").fetchone()[0],
            conn.execute("SELECT count(*) FROM print_jobs").fetchone()[0],
            conn.execute("SELECT count(*) FROM heads").fetchone()[0],
        )


async def test_submit_same_request_id_twice_returns_stored_record(
    led: Ledger,
    counting: CountingSigner,
    db_path: Path,
    make_entry: EntryFactory,
    settled_stats: SettledStats,
) -> None:
    first = await led.submit(make_entry("sale-1"))
    again = await led.submit(make_entry("sale-1"))

    assert first.replayed is False
    assert again.replayed is True
    assert again.record == first.record
    assert counting.signed == 1
    stats = await settled_stats(led)
    assert (stats.records, stats.replays) == (1, 1)
    assert table_counts(db_path) == (1, 1, 1, 1)


async def test_submit_same_id_other_client_signs_separately(
    led: Ledger, counting: CountingSigner, make_entry: EntryFactory
) -> None:
    a = await led.submit(make_entry("sale-1", client="pos-a"))
    b = await led.submit(make_entry("sale-1", client="pos-b"))

    assert not a.replayed and not b.replayed
    assert (a.record.seq, b.record.seq) == (1, 2)
    assert counting.signed == 2


async def test_submit_same_id_different_body_raises_mismatch_and_writes_nothing(
    led: Ledger, counting: CountingSigner, db_path: Path, make_entry: EntryFactory
) -> None:
    first = await led.submit(make_entry("sale-1", amount=630))
    before = table_counts(db_path)

    with pytest.raises(IdempotencyMismatch) as err:
        await led.submit(make_entry("sale-1", amount=631))

    assert err.value.code == "IDEMPOTENCY_MISMATCH"
    assert "sale-1" in err.value.message and "seq 1" in err.value.message
    assert counting.signed == 1
    assert table_counts(db_path) == before
    assert led.heads()["till-1"].hash == first.record.hash
    assert led.halted is None
    nxt = await led.submit(make_entry("sale-2"))
    assert nxt.record.seq == 2 and nxt.record.prev_hash == first.record.hash


@pytest.mark.parametrize("atomic", [False, True])
async def test_submit_many_duplicate_id_in_one_batch_signs_once(
    led: Ledger, counting: CountingSigner, db_path: Path, make_entry: EntryFactory, atomic: bool
) -> None:
    e = make_entry("sale-1")
    outcomes = await led.submit_many([e, make_entry("sale-2"), e], atomic=atomic)

    assert all(isinstance(o, Signed) for o in outcomes)
    first, second, dup = outcomes
    assert isinstance(first, Signed) and isinstance(second, Signed) and isinstance(dup, Signed)
    assert not first.replayed and not second.replayed and dup.replayed
    assert dup.record == first.record
    assert (first.record.seq, second.record.seq) == (1, 2)
    assert counting.signed == 2
    assert table_counts(db_path) == (2, 2, 2, 1)


async def test_submit_many_same_id_different_body_nonatomic_refuses_only_the_second(
    led: Ledger, counting: CountingSigner, db_path: Path, make_entry: EntryFactory
) -> None:
    outcomes = await led.submit_many(
        [make_entry("sale-1", amount=630), make_entry("sale-1", amount=999)], atomic=False
    )

    assert isinstance(outcomes[0], Signed) and not outcomes[0].replayed
    assert isinstance(outcomes[1], IdempotencyMismatch)
    assert counting.signed == 1
    assert table_counts(db_path) == (1, 1, 1, 1)


async def test_submit_many_same_id_different_body_atomic_writes_nothing(
    led: Ledger, counting: CountingSigner, db_path: Path, make_entry: EntryFactory
) -> None:
    outcomes = await led.submit_many(
        [make_entry("sale-1", amount=630), make_entry("sale-1", amount=999)], atomic=True
    )

    assert all(isinstance(o, GatewayError) for o in outcomes)
    assert {o.code for o in outcomes if isinstance(o, GatewayError)} == {"IDEMPOTENCY_MISMATCH"}
    assert table_counts(db_path) == (0, 0, 0, 0)
    assert led.heads() == {}
    fresh = await led.submit(make_entry("sale-1", amount=999))
    assert fresh.record.seq == 1 and not fresh.replayed


async def test_submit_concurrent_same_id_in_one_group_signs_once(
    led: Ledger,
    counting: CountingSigner,
    db_path: Path,
    make_entry: EntryFactory,
    hold_writer: HoldWriter,
    settled_stats: SettledStats,
) -> None:
    groups_before = (await settled_stats(led)).groups
    async with hold_writer(led):
        tasks = [asyncio.create_task(led.submit(make_entry("sale-1"))) for _ in range(20)]
    results = await asyncio.gather(*tasks)

    groups_after = (await settled_stats(led)).groups
    assert groups_after == groups_before + 1, "the submissions were not one group commit"
    assert [r.replayed for r in results] == [False] + [True] * 19
    assert {r.record.hash for r in results} == {results[0].record.hash}
    assert counting.signed == 1
    assert table_counts(db_path) == (1, 1, 1, 1)


async def test_submit_concurrent_same_id_different_bodies_signs_first_refuses_rest(
    led: Ledger,
    counting: CountingSigner,
    db_path: Path,
    make_entry: EntryFactory,
    hold_writer: HoldWriter,
) -> None:
    async with hold_writer(led):
        tasks = [
            asyncio.create_task(led.submit(make_entry("sale-1", amount=500 + i))) for i in range(5)
        ]
        others = [
            asyncio.create_task(led.submit(make_entry(f"other-{i}", till="till-2")))
            for i in range(5)
        ]
    results = await asyncio.gather(*tasks, return_exceptions=True)
    other_results = await asyncio.gather(*others)

    assert isinstance(results[0], Signed) and results[0].record.payload["total"] == 500
    assert all(isinstance(r, IdempotencyMismatch) for r in results[1:])
    assert [r.record.seq for r in other_results] == [1, 2, 3, 4, 5]
    assert counting.signed == 6
    assert table_counts(db_path) == (6, 6, 6, 2)


async def test_submit_concurrent_many_ids_across_groups_signs_each_once(
    led: Ledger, counting: CountingSigner, db_path: Path, make_entry: EntryFactory
) -> None:
    ids = [f"sale-{i % 40}" for i in range(200)]  # every id five times, interleaved
    results = await asyncio.gather(
        *(led.submit(make_entry(rid, till=f"till-{int(rid[5:]) % 3}")) for rid in ids)
    )

    by_id: dict[str, set[str]] = {}
    for rid, r in zip(ids, results, strict=True):
        by_id.setdefault(rid, set()).add(r.record.hash)
    assert all(len(hashes) == 1 for hashes in by_id.values())
    assert sum(not r.replayed for r in results) == 40
    assert counting.signed == 40
    assert table_counts(db_path)[:2] == (40, 40)


async def test_submit_after_close_and_reopen_replays_stored_record(
    db_path: Path, signer: SoftwareSigner, make_entry: EntryFactory, sign_sales: SignSales
) -> None:
    led = await Ledger.open(db_path, signer)
    try:
        await sign_sales(led, 10)
        original = await led.submit(make_entry("sale-x", amount=777))
    finally:
        await led.close()

    counting = CountingSigner(signer)
    led = await Ledger.open(db_path, counting)
    try:
        assert led.halted is None
        again = await led.submit(make_entry("sale-x", amount=777))
        with pytest.raises(IdempotencyMismatch):
            await led.submit(make_entry("sale-x", amount=778))
        nxt = await led.submit(make_entry("sale-y"))
    finally:
        await led.close()

    assert again.replayed and again.record == original.record
    assert nxt.record.seq == original.record.seq + 1
    assert nxt.record.prev_hash == original.record.hash
    assert counting.signed == 1
    assert table_counts(db_path)[:2] == (12, 12)
