"""Shared pieces of the batch-uplink tests: a ledger wired to a sync engine with the real
``peppol/goroute`` and ``paraguay/sifen`` uplinks against their strict loopback simulators.

Everything is real (DESIGN.md §8): SQLite on disk, the ledger writer thread, HTTP on
loopback. The clock is injectable (:class:`FakeClock`): the rate limit and the poll timeout
read it, so a minute passes without sleeping.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.cloud.goroute import GoRouteSettings, GoRouteUplink
from drivers.cloud.sifen import SifenSettings, SifenUplink
from drivers.signers.software import SoftwareSigner
from gateway.batch_sync import BatchProcessor, BatchSettings
from gateway.core.cdc import Issuer
from gateway.core.record import Record
from gateway.core.request import request_fingerprint, validate_sale
from gateway.core.ubl import Party
from gateway.ledger import Entry, Ledger, Signed
from gateway.reads import ReadPool
from gateway.sync import EngineSettings, SyncEngine

API_KEY = "goroute-test-key"
SIFEN_TOKEN = "sifen-test-token"
RUC = "80069563-1"  # the RUC of the CDC example in SIFEN's Manual Técnico (DV 1)
SELLER = Party(
    name="Boulangerie Test",
    endpoint_id="0009:12345678900011",
    country="FR",
    vat_id="FR12345678901",
    address="1 rue du Pain, Paris",
)
ISSUER = Issuer(
    ruc=RUC, establishment="001", expedition_point="001", expedition_points=(("till-2", "002"),)
)


class FakeClock:
    """Epoch time that moves only when told (starts at the real time)."""

    def __init__(self) -> None:
        self.ms = time.time_ns() // 1_000_000

    def now_ms(self) -> int:
        return self.ms

    def now_s(self) -> float:
        return self.ms / 1000.0

    def advance(self, seconds: float) -> None:
        self.ms += round(seconds * 1000)


def invoice_request(
    request_id: str,
    *,
    till: str = "till-1",
    endpoint: str | None = "0208:0123456789",
    incl: bool = True,
    qty: str = "3",
    text: str = "Pain <complet> & co",
) -> dict[str, Any]:
    customer: dict[str, str] = {
        "name": "Client SA",
        "country": "BE",
        "vat_id": "BE0123456789",
        "address": "2 Grand-Place, Bruxelles",
    }
    if endpoint is not None:
        customer["endpoint_id"] = endpoint
    lines = [
        {"text": text, "qty": qty, "unit_price": 333, "vat_rate": "20.00", "amount": 999},
        {"text": "Croissant", "qty": "1", "unit_price": 130, "vat_rate": "5.50", "amount": 130},
        {"text": "Brioche", "qty": "2", "unit_price": 251, "vat_rate": "20.00", "amount": 502},
    ]
    total = 999 + 130 + 502
    if not incl:
        total = 999 + 502 + round((999 + 502) * 0.2) + 130 + round(130 * 0.055)
    return {
        "id": request_id,
        "op": "sign",
        "till": till,
        "type": "INVOICE",
        "currency": "EUR",
        "lines": lines,
        "prices_include_vat": incl,
        "payments": [{"method": "TRANSFER", "amount": total}],
        "total": total,
        "customer": customer,
    }


def entry_of(request: dict[str, Any]) -> Entry:
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
class BatchGateway:
    ledger: Ledger
    reads: ReadPool
    engine: SyncEngine

    def processor(self, pid: str) -> BatchProcessor:
        return self.engine.batch_processors[pid]

    async def sign(self, requests: list[dict[str, Any]]) -> list[Record]:
        out: list[Record] = []
        for start in range(0, len(requests), 500):
            entries = [entry_of(r) for r in requests[start : start + 500]]
            for o in await self.ledger.submit_many(entries, atomic=False):
                assert isinstance(o, Signed), o
                out.append(o.record)
        return out

    async def states(self, pid: str) -> dict[str, int]:
        """Outbox states of the processor's rows, technical-event records left out (a run
        signs SYNC_REJECTED / SYNC_ALERT; the next run marks them skipped)."""
        rows = await self.reads.run(
            lambda r: r.conn.execute(
                "SELECT o.state, count(*) FROM outbox o JOIN records r ON r.chain = o.chain "
                "AND r.seq = o.seq WHERE o.processor = ? AND r.type != 'INTENTION::EVENT' "
                "GROUP BY o.state",
                (pid,),
            ).fetchall()
        )
        return dict(rows)

    async def events(self, code: str) -> list[dict[str, Any]]:
        """The payloads of the technical-event records with this code, in signing order."""
        rows = await self.reads.run(
            lambda r: r.conn.execute(
                "SELECT chain, body FROM records WHERE type = 'INTENTION::EVENT' "
                "ORDER BY time, chain, seq"
            ).fetchall()
        )
        out = []
        for chain, body in rows:
            payload = json.loads(body)["payload"]
            if payload.get("event") == code:
                out.append({"chain": chain, **payload})
        return out

    async def refs(self, pid: str) -> dict[tuple[str, int], str | None]:
        rows = await self.reads.run(
            lambda r: r.conn.execute(
                "SELECT chain, seq, cloud_ref FROM outbox WHERE processor = ? AND state = 'done'",
                (pid,),
            ).fetchall()
        )
        return {(c, s): ref for c, s, ref in rows}


@asynccontextmanager
async def batch_gateway(
    db_path: Path,
    signer: SoftwareSigner,
    *,
    clock: FakeClock,
    goroute_url: str | None = None,
    sifen_url: str | None = None,
    goroute_async: bool = False,
    settings: BatchSettings | None = None,
    sifen_settings: BatchSettings | None = None,
    goroute_overrides: dict[str, Any] | None = None,
) -> AsyncIterator[BatchGateway]:
    """A ledger + engine with the batch uplinks; no processor loop runs (tests drive
    ``run_once`` / ``process_pending`` themselves, as the admin API does)."""
    engine = SyncEngine(EngineSettings(alert_failure_rate=0.5), clock_ms=clock.now_ms)
    fast = BatchSettings(interval_s=30.0, poll_interval_s=0.01, poll_timeout_s=300.0)
    if goroute_url is not None:
        gs = GoRouteSettings(
            base_url=goroute_url,
            api_key=API_KEY,
            seller=SELLER,
            async_mode=goroute_async,
            total_timeout_s=5.0,
            **(goroute_overrides or {}),
        )
        engine.register_batch(BatchProcessor(engine, GoRouteUplink(gs), settings or fast))
    if sifen_url is not None:
        ss = SifenSettings(
            base_url=sifen_url, token=SIFEN_TOKEN, issuer=ISSUER, total_timeout_s=5.0
        )
        engine.register_batch(BatchProcessor(engine, SifenUplink(ss), sifen_settings or fast))
    ledger = await Ledger.open(
        db_path,
        signer,
        processors=engine.processor_ids(),
        is_offline=engine.is_offline,
        clock_ms=clock.now_ms,
    )
    reads = ReadPool(db_path)
    try:
        await engine.start(ledger, reads)
        yield BatchGateway(ledger, reads, engine)
    finally:
        await engine.close()
        await ledger.close()
        reads.close()
