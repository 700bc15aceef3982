"""A journal built on a controllable clock, for tests that need more time than they can wait
for (a first fiscal year longer than twelve months)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.core.request import Rules
from gateway.dispatch import Dispatcher
from gateway.ledger import Ledger, Signer

DAY_MS = 86_400_000


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


async def long_first_year(
    db: Path,
    signer: Signer,
    make_sale: Callable[..., dict[str, Any]],
    *,
    start: str = "2025-09-01T10:00:00+00:00",
    months: int = 13,
) -> dict[str, Any]:
    """A shop opened on ``start`` that closes each of ``months`` 31-day months, then its
    first fiscal year (``CLOSING::YEARLY`` 1, spanning ``months * 31`` days). The journal is
    closed afterwards; returns the yearly closing record."""
    now = [ms(start)]
    ledger = await Ledger.open(db, signer, clock_ms=lambda: now[0])
    try:
        dispatcher = Dispatcher(ledger, rules=Rules(), clock_ms=lambda: now[0])

        async def ask(request: dict[str, Any]) -> dict[str, Any]:
            reply = await dispatcher.handle(request)
            assert reply["ok"], reply
            return reply

        await ask(make_sale("s0", "till-1", 500))
        for m in range(1, months + 1):
            now[0] += 31 * DAY_MS
            await ask(make_sale(f"s{m}", "till-1", 100 * m))
            await ask({"id": f"m{m}", "op": "close", "till": "till-1", "period": "MONTHLY"})
        now[0] += DAY_MS
        reply = await ask({"id": "y1", "op": "close", "till": "till-1", "period": "YEARLY"})
        record: dict[str, Any] = reply["record"]
        return record
    finally:
        await ledger.close()
