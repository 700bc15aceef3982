"""Shared pieces of the sync tests: the loopback fiskaly simulator, a ledger wired to a sync
engine with the real ``france/fiskaly`` uplink, and helpers to sign and to wait.

Everything is real (DESIGN.md §8): SQLite on disk, the ledger writer thread, HTTP on loopback
to :class:`drivers.cloud.fiskaly_sim.FiskalySim`. Timeouts and backoffs are short so faults
cost milliseconds, not seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.cloud.fiskaly import FiskalyClient, FiskalySettings, FiskalyUplink
from drivers.cloud.fiskaly_sim import FaultPlan, FiskalySim
from drivers.signers.software import SoftwareSigner
from gateway.core.offline_budget import BudgetLimits
from gateway.core.record import Record
from gateway.core.request import request_fingerprint, validate_sale
from gateway.events import EventJournal
from gateway.ledger import Entry, Ledger, Signed
from gateway.reads import ReadPool
from gateway.sync import EngineSettings, ProcessorSettings, RealtimeProcessor, SyncEngine

SYSTEM_ID = "0189f7ea-ae2c-7809-8aeb-b819cf5e9e7f"
API_KEY = "test-api-key"
API_SECRET = "test-api-secret-0123456789"
PROCESSOR = "france/fiskaly"


def client_settings(url: str, **overrides: Any) -> FiskalySettings:
    values: dict[str, Any] = {
        "base_url": url,
        "api_key": API_KEY,
        "api_secret": API_SECRET,
        "system_id": SYSTEM_ID,
        "connect_timeout_s": 1.0,
        "read_timeout_s": 0.5,
        "total_timeout_s": 2.0,
        "token_refresh_margin_s": 60.0,
        "retry_attempts": 4,
        "retry_min_s": 0.002,
        "retry_max_s": 0.05,
        "busy_max_wait_s": 5.0,
    }
    values.update(overrides)
    return FiskalySettings(**values)


def make_sim(**kwargs: Any) -> FiskalySim:
    kwargs.setdefault("api_keys", {API_KEY: API_SECRET})
    kwargs.setdefault("system_ids", {SYSTEM_ID})
    return FiskalySim(**kwargs)


def every_fault(rate: float = 0.2, *, stall_s: float = 0.7, seed: int = 7) -> FaultPlan:
    """Every kind of fault; stalls (the slowest) rarer, and longer than the read timeout."""
    return FaultPlan(
        rate=rate,
        weights={
            "refuse": 1.0,
            "error500": 1.0,
            "stall": 0.1,
            "drop_after": 1.0,
            "conflict": 0.5,
            "throttle": 0.05,
        },
        stall_s=stall_s,
        refuse_window_s=0.01,
        retry_after_s=0,  # the wait itself is tested on its own (a 1 s minimum otherwise)
        seed=seed,
    )


def sale_entry(request_id: str, till: str = "till-1", amount: int = 630) -> Entry:
    first = amount - 130
    request = {
        "id": request_id,
        "op": "sign",
        "till": till,
        "type": "RECEIPT",
        "currency": "EUR",
        "lines": [
            {"text": "Café", "qty": "1", "unit_price": first, "vat_rate": "10.00", "amount": first},
            {"text": "Croissant", "qty": "1", "unit_price": 130, "vat_rate": "5.50", "amount": 130},
        ],
        "payments": [{"method": "CARD", "amount": amount}],
        "total": amount,
    }
    sale = validate_sale(request)
    return Entry(
        sale.till,
        sale.till,
        sale.request_id,
        request_fingerprint(request),
        sale.record_type,
        sale.payload(),
    )


@dataclass
class Gateway:
    """A ledger with a sync engine and the fiskaly uplink (no daemon around them)."""

    ledger: Ledger
    reads: ReadPool
    engine: SyncEngine
    client: FiskalyClient
    clock_offset_ms: list[int] = field(default_factory=lambda: [0])
    events: EventJournal | None = None

    @property
    def processor(self) -> RealtimeProcessor:
        return self.engine.processors[PROCESSOR]

    async def sign(self, n: int, *, prefix: str = "s", till: str = "till-1") -> list[Record]:
        """Sign ``n`` sales through the engine's guard, in groups of up to 500."""
        out: list[Record] = []
        for start in range(0, n, 500):
            entries = [
                self.engine.guard(sale_entry(f"{prefix}{i}", till))
                for i in range(start, min(n, start + 500))
            ]
            for o in await self.ledger.submit_many(entries, atomic=False):
                assert isinstance(o, Signed), o
                out.append(o.record)
        self.engine.signed(out)
        return out

    async def outbox(self, state: str | None = None) -> int:
        """Outbox rows of the fiskaly processor (in ``state``), as written to the database."""
        sql = "SELECT count(*) FROM outbox WHERE processor = ?"
        params: tuple[Any, ...] = (PROCESSOR,)
        if state is not None:
            sql += " AND state = ?"
            params += (state,)
        return int(await self.reads.run(lambda r: r.conn.execute(sql, params).fetchone()[0]))


@asynccontextmanager
async def gateway(
    db_path: Path,
    signer: SoftwareSigner,
    url: str,
    *,
    limits: BudgetLimits | None = None,
    clock_ms: Callable[[], int] | None = None,
    processor: ProcessorSettings | None = None,
    run_loop: bool = True,
    events: bool = False,
    **client_overrides: Any,
) -> AsyncIterator[Gateway]:
    """Open a ledger + engine + client on ``url``; the processor loop runs in a task.
    ``events``: with the daemon's event journal wired as in gateway.app (the engine pushes
    uplink and budget events into it; its worker signs them into the chains)."""
    offset = [0]

    def now_ms() -> int:
        return time.time_ns() // 1_000_000 + offset[0]

    clock = clock_ms or now_ms
    engine = SyncEngine(
        EngineSettings(limits=limits or BudgetLimits(), flush_interval_s=0.05),
        clock_ms=clock,
    )
    client = FiskalyClient(client_settings(url, **client_overrides), clock_ms=clock)
    engine.register(
        FiskalyUplink(client),
        processor or ProcessorSettings(interval_s=30.0, probe_min_s=0.02, probe_max_s=0.2),
    )
    ledger = await Ledger.open(
        db_path,
        signer,
        processors=engine.processor_ids(),
        is_offline=engine.is_offline,
        clock_ms=clock,
    )
    reads = ReadPool(db_path)
    journal = EventJournal(window_s=60.0, clock_ms=clock) if events else None
    tasks: list[asyncio.Task[None]] = []
    try:
        if journal is not None:
            engine.on_event = journal.record
        await engine.start(ledger, reads)
        if journal is not None:
            journal.bind(ledger, guard=engine.guard, on_signed=engine.signed)
            tasks.append(asyncio.create_task(journal.run()))
        if run_loop:
            tasks.append(asyncio.create_task(engine.run()))
        yield Gateway(ledger, reads, engine, client, offset, journal)
    finally:
        for task in tasks:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        await engine.close()
        await ledger.close()
        reads.close()


async def wait_for(
    check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 60.0, what: str = ""
) -> None:
    """Poll ``check`` (sync or async) every 20 ms until true; AssertionError on timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or check}")
        await asyncio.sleep(0.02)


async def event_codes(gw: Gateway, chain: str = "till-1") -> list[str]:
    """The technical events recorded in ``chain``, in order (durable: signed records)."""

    def q(r: Any) -> list[str]:
        rows = r.conn.execute(
            "SELECT json_extract(CAST(body AS TEXT), '$.payload.event') FROM records "
            "WHERE chain = ? AND type = 'INTENTION::EVENT' ORDER BY seq",
            (chain,),
        ).fetchall()
        return [row[0] for row in rows]

    return list(await gw.reads.run(q))


def check_upstream(
    sim: FiskalySim, records: list[Record], chain: str = "till-1", *, exact_remaining: bool = True
) -> None:
    """Every record accepted exactly once, in order, with replay headers on exactly the
    offline ones. ``exact_remaining``: nothing was signed offline during the replay, so each
    ``X-Replay-Remaining`` is the number of offline records after it (otherwise the
    simulator's countdown rule, which allows announced counts to grow, is the check)."""
    assert sim.violations == [], sim.violations[:5]
    assert sim.duplicates == 0
    finals = [r for r in sim.records if r["final"] and r["chain"] == chain]
    assert [r["seq"] for r in finals] == [rec.seq for rec in records]
    offline = [rec for rec in records if rec.offline]
    if offline:
        assert [r for r in finals if r["offline"]][-1]["remaining"] == 0
    for rec, up in zip(records, finals, strict=True):
        assert up["hash"] == rec.hash
        assert up["offline"] == rec.offline
        if rec.offline and exact_remaining:
            assert up["remaining"] == sum(1 for o in offline if o.seq > rec.seq), rec.seq
        elif rec.offline:
            assert up["remaining"] is not None
        else:
            assert up["remaining"] is None
