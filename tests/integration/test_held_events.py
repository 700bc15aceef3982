"""Gateway-wide events on a fresh install: held in the journal file until the first chain
exists, then written as that chain's first records, in the opening record's transaction.

Real ledger on a real SQLite file, real P-256 key, a controllable clock (docs/events.md,
"Which chain").
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

from drivers.signers.software import SoftwareSigner
from gateway.audit import verify_db
from gateway.core.errors import Conflict, GatewayError
from gateway.core.record import format_time, parse_time
from gateway.core.request import Rules
from gateway.dispatch import Dispatcher
from gateway.events import EventJournal, spool_event
from gateway.export import export, verify_export
from gateway.journal import last_config_hash
from gateway.ledger import Entry, Ledger, Signed
from gateway.store import Reader

SaleFactory = Callable[..., dict[str, Any]]
EntryFactory = Callable[..., Entry]

T0 = 1_795_000_000_000  # 2026-11-18T...Z


class Clock:
    def __init__(self, now_ms: int) -> None:
        self.now = now_ms

    def __call__(self) -> int:
        return self.now


def chain_bodies(db: Path, chain: str = "till-1") -> list[dict[str, Any]]:
    with Reader(db) as r:
        return [json.loads(x.body) for x in r.iter_records(chain)]


def held_rows(db: Path) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute("SELECT time_ms, request_id, payload FROM held_events").fetchall()


def verify_ok(db: Path) -> None:
    report = verify_db(db)
    assert report.ok, [c.failure.to_json() for c in report.chains if c.failure]


async def open_run(db: Path, signer: SoftwareSigner, clock: Clock) -> tuple[Ledger, EventJournal]:
    ledger = await Ledger.open(db, signer, clock_ms=clock)
    events = EventJournal(window_s=60, clock_ms=clock)
    events.bind(ledger)
    return ledger, events


@asynccontextmanager
async def started(
    db: Path, signer: SoftwareSigner, clock: Clock
) -> AsyncIterator[tuple[Ledger, EventJournal]]:
    """A fresh journal whose START is held (no chain yet); closed on the way out."""
    ledger, events = await open_run(db, signer, clock)
    try:
        await events.write("START", version="1", key_id=signer.key_id)
        yield ledger, events
    finally:
        await ledger.close()


async def test_held_events_survive_restarts_and_open_the_first_chain_in_time_order(
    db_path: Path, signer: SoftwareSigner, make_sale: SaleFactory
) -> None:
    clock = Clock(T0)
    ledger, events = await open_run(db_path, signer, clock)
    assert await events.write("START", version="1", key_id=signer.key_id) == []
    await events.write("KEY_GENERATED", key_id=signer.key_id)
    clock.now = T0 + 60_000
    await events.write("STOP", uptime_s=60, clean=True)
    await ledger.close()
    assert [json.loads(p)["event"] for _, _, p in held_rows(db_path)] == [
        "START",
        "KEY_GENERATED",
        "STOP",
    ]

    clock.now = T0 + 120_000
    ledger, events = await open_run(db_path, signer, clock)
    assert len(ledger.held()) == 3 and ledger.latest_time_ms() == T0 + 60_000
    await events.write("START", version="1", key_id=signer.key_id)
    clock.now = T0 + 30_000  # the wall clock went back: the sale must not go back in time
    reply = await Dispatcher(ledger, rules=Rules(), clock_ms=clock).handle(make_sale("s1"))
    assert reply["ok"], reply
    assert ledger.held() == ()
    await ledger.close()

    bodies = chain_bodies(db_path)
    events_ = [(b["payload"]["event"], parse_time(b["time"])) for b in bodies[:-1]]
    assert events_ == [
        ("START", T0),
        ("KEY_GENERATED", T0),
        ("STOP", T0 + 60_000),
        ("START", T0 + 120_000),
    ]
    assert reply["record"]["seq"] == 5 == bodies[-1]["seq"]
    assert parse_time(reply["record"]["time"]) == T0 + 120_001  # previous + 1 ms
    assert [b["request_id"].endswith(":till-1") for b in bodies[:-1]] == [True] * 4
    assert held_rows(db_path) == []
    verify_ok(db_path)


async def test_held_events_refused_opening_request_writes_nothing_and_keeps_them(
    db_path: Path, signer: SoftwareSigner, make_entry: EntryFactory
) -> None:
    clock = Clock(T0)
    async with started(db_path, signer, clock) as (ledger, _):

        def refuse(view: Any) -> dict[str, Any]:
            raise Conflict("refused in the writer")

        bad = Entry("till-1", "till-1", "bad", "bad", "TRANSACTION::RECEIPT", prepare=refuse)
        (alone,) = await ledger.submit_many([bad], atomic=False)
        atomic = await ledger.submit_many([make_entry("a1"), bad], atomic=True)
        assert alone.code == "CONFLICT" and all(o.code == "CONFLICT" for o in atomic)
        assert ledger.heads() == {} and len(held_rows(db_path)) == 1
        with Reader(db_path) as r:
            assert r.count() == 0

        ok = await ledger.submit(make_entry("a1"))
        assert ok.record.seq == 2 and held_rows(db_path) == []
    assert [b["type"] for b in chain_bodies(db_path)] == [
        "INTENTION::EVENT",
        "TRANSACTION::RECEIPT",
    ]
    verify_ok(db_path)


async def test_held_events_two_chains_opened_in_one_group_both_get_them_later_ones_not(
    db_path: Path, signer: SoftwareSigner, make_entry: EntryFactory
) -> None:
    clock = Clock(T0)
    async with started(db_path, signer, clock) as (ledger, events):
        out = await ledger.submit_many(
            [make_entry("a", till="till-1"), make_entry("b", till="till-2")], atomic=False
        )
        assert [o.record.seq for o in out if isinstance(o, Signed)] == [2, 2]
        later = await ledger.submit(make_entry("c", till="till-3"))
        assert later.record.seq == 1
        # with chains, a gateway-wide event goes into each of them at once
        clock.now = T0 + 1000
        written = await events.write("STOP", uptime_s=1, clean=True)
        assert sorted(r.chain for r in written) == ["till-1", "till-2", "till-3"]
    for chain in ("till-1", "till-2"):
        first = chain_bodies(db_path, chain)[0]
        assert (first["seq"], first["payload"]["event"]) == (1, "START")
        assert first["request_id"].endswith(f":{chain}")
    verify_ok(db_path)


async def test_held_events_close_op_opening_a_chain_sums_them_in_its_period(
    db_path: Path, signer: SoftwareSigner
) -> None:
    clock = Clock(T0)
    async with started(db_path, signer, clock) as (ledger, _):
        clock.now = T0 + 5000
        dispatcher = Dispatcher(ledger, rules=Rules(), clock_ms=clock)
        reply = await dispatcher.handle(
            {"id": "z1", "op": "close", "till": "till-1", "period": "DAILY"}
        )
    assert reply["ok"], reply
    period = reply["record"]["payload"]["period"]
    assert (period["from_seq"], period["to_seq"], period["from_time"]) == (1, 1, format_time(T0))
    assert reply["record"]["payload"]["counts"] == {"INTENTION::EVENT": 1}
    verify_ok(db_path)


async def test_held_events_spooled_event_held_once_and_chain_export_complete(
    db_path: Path,
    signer: SoftwareSigner,
    make_entry: EntryFactory,
    tmp_path: Path,
) -> None:
    clock = Clock(T0)
    spool = tmp_path / "events"
    ledger = await Ledger.open(db_path, signer, clock_ms=clock)
    events = EventJournal(window_s=60, clock_ms=clock, spool_dir=spool)
    events.bind(ledger)
    try:
        path = spool_event(spool, "EXPORT_MADE", out="/x", records=0)
        data = path.read_bytes()
        assert await events.ingest_spool() == 1
        path.write_bytes(data)  # as if the daemon died before removing the file
        assert await events.ingest_spool() == 1
        assert len(held_rows(db_path)) == 1
        await events.write("START", version="1", key_id=signer.key_id)
        with Reader(db_path) as r:
            assert last_config_hash(r) is None  # START without config_sha256
        await ledger.submit(make_entry("s1"))
    finally:
        await ledger.close()

    out = tmp_path / "export"
    export(db_path, out, signer, chain="till-1")
    checked = verify_export(out)
    assert checked.records == 3
    lines = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    assert [x["body"]["payload"].get("event") for x in lines] == ["EXPORT_MADE", "START", None]


async def test_held_start_config_hash_is_the_last_one_seen(
    db_path: Path, signer: SoftwareSigner
) -> None:
    clock = Clock(T0)
    ledger, events = await open_run(db_path, signer, clock)
    try:
        await events.write("START", config_sha256="a" * 64)
        await events.write("START", config_sha256="b" * 64)
    finally:
        await ledger.close()
    with Reader(db_path) as r:
        assert last_config_hash(r) == "b" * 64


async def test_held_events_filling_a_block_budget_are_written_though_the_opener_is_refused(
    db_path: Path, signer: SoftwareSigner
) -> None:
    # a fresh till offline, policy block, room for 2 unsent records: the 2 held events fill
    # it. The first sale is refused, but the events are written (else the chain could never
    # open: nothing to send, no room); once the cloud is back they go up and sales resume.
    from sync_support import gateway, make_sim, sale_entry, wait_for

    from gateway.core.offline_budget import BudgetLimits

    limits = BudgetLimits(max_records=2, warn_records=1, policy="block")
    async with make_sim() as sim:
        await sim.down()
        async with gateway(db_path, signer, sim.url, limits=limits) as gw:
            events = EventJournal(window_s=60, clock_ms=lambda: T0)
            events.bind(gw.ledger, guard=gw.engine.guard, on_signed=gw.engine.signed)
            await events.write("START", version="1", key_id=signer.key_id)
            await events.write("KEY_GENERATED", key_id=signer.key_id)

            (refused,) = await gw.ledger.submit_many(
                [gw.engine.guard(sale_entry("s1"))], atomic=False
            )
            assert isinstance(refused, GatewayError) and refused.code == "OFFLINE_LIMIT_REACHED"
            assert gw.ledger.heads()["till-1"].seq == 2 and gw.ledger.held() == ()
            assert held_rows(db_path) == []

            await sim.up()
            await wait_for(lambda: sim.final_seqs("till-1") == [1, 2], 30, "the events sent")
            await wait_for(lambda: gw.processor.acked.get("till-1") == 2, 30, "acked")
            sold = await gw.ledger.submit(gw.engine.guard(sale_entry("s1")))
            assert sold.record.seq == 3
    codes = [b["payload"].get("event", b["type"]) for b in chain_bodies(db_path)]
    assert codes == ["START", "KEY_GENERATED", "TRANSACTION::RECEIPT"]
    verify_ok(db_path)


async def test_held_event_that_cannot_be_signed_is_refused_alone_signing_goes_on(
    db_path: Path, signer: SoftwareSigner, make_entry: EntryFactory, tmp_path: Path
) -> None:
    """An event with a float in it cannot be a record: holding it fails by itself (no
    transaction left open behind it), and the next sale signs. A spooled event written by
    another process with a float is made record-safe like any event (a decimal string)."""
    clock = Clock(T0)
    spool = tmp_path / "events"
    ledger = await Ledger.open(db_path, signer, clock_ms=clock)
    events = EventJournal(window_s=60, clock_ms=clock, spool_dir=spool)
    events.bind(ledger)
    try:
        bad = {"event": "EXPORT_MADE", "mb": 1.5}
        try:
            await ledger.hold_events([("float-1", bad)])
        except GatewayError:
            pass
        else:
            raise AssertionError("an event with a float was held")
        assert ledger.halted is None and held_rows(db_path) == []
        spool.mkdir(mode=0o700)
        (spool / "0001-other.json").write_text(
            json.dumps({"chain": None, "payload": {"event": "EXPORT_MADE", "mb": 1.5}})
        )
        assert await events.ingest_spool() == 1
        assert [json.loads(p)["mb"] for _, _, p in held_rows(db_path)] == ["1.500"]
        sale = await ledger.submit(make_entry("s1"))
        assert sale.record.seq == 2 and ledger.halted is None
    finally:
        await ledger.close()
    verify_ok(db_path)


async def test_no_chain_yet_a_key_other_than_the_held_key_generated_halts_at_open(
    db_path: Path, signer: SoftwareSigner, make_entry: EntryFactory, tmp_path: Path
) -> None:
    """The first chain must not open saying one key and be signed by another: after a
    rotate-key cut short before it switched the key files (the held KEY_GENERATED names the
    new key, ``by: rotate-key``), the old key halts at open with the way out, and the
    announced key signs. A generated key lost before anything was signed is not that: the
    next key opens the journal (the daemon announces it in turn)."""
    from drivers.signers.software import generate_key

    other = generate_key(tmp_path / "other" / "signing.pem")
    lost = generate_key(tmp_path / "lost" / "signing.pem")
    ledger = await Ledger.open(db_path, lost)
    try:
        await ledger.hold_events([("gen-1", {"event": "KEY_GENERATED", "key_id": lost.key_id})])
    finally:
        await ledger.close()
    ledger = await Ledger.open(db_path, other)
    try:
        assert ledger.halted is None  # the lost generated key does not bind the journal
        await ledger.hold_events(
            [
                (
                    "rot-1",
                    {
                        "event": "KEY_GENERATED",
                        "key_id": signer.key_id,
                        "replaces_key_id": other.key_id,
                        "by": "rotate-key",
                    },
                )
            ]
        )
    finally:
        await ledger.close()
    wrong = await Ledger.open(db_path, other)
    try:
        assert wrong.halted is not None
        assert f"its key is {signer.key_id}" in wrong.halted and "rotate-key" in wrong.halted
    finally:
        await wrong.close()
    right = await Ledger.open(db_path, signer)
    try:
        assert right.halted is None and right.held_key_id() == signer.key_id
        assert (await right.submit(make_entry("s1"))).record.key_id == signer.key_id
    finally:
        await right.close()
    verify_ok(db_path)
