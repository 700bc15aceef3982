"""Fixtures shared by the integration and end-to-end tests.

Everything here uses the real components (DESIGN.md §8): keys are real P-256 files made by
``generate_key``, databases are SQLite files in ``tmp_path``, and the command line runs as a
subprocess of the installed ``fiscal-gateway`` entry point.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from mqtt_support import Broker

from drivers.signers.software import SoftwareSigner, generate_key
from gateway.core.record import Record
from gateway.core.request import request_fingerprint, validate_sale
from gateway.ledger import Entry, Ledger, Signed, Stats

CLI_TIMEOUT_S = 60


# ---------------------------------------------------------------------- keys and files


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "keys" / "signing.pem"


@pytest.fixture
def signer(key_path: Path) -> SoftwareSigner:
    """A fresh signing key, written to ``key_path`` (0600) with its public PEM next to it."""
    return generate_key(key_path)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "gateway.db"


# ---------------------------------------------------------------------- requests


SaleFactory = Callable[..., dict[str, Any]]
EntryFactory = Callable[..., Entry]


def _sale(request_id: str, till: str = "till-1", amount: int = 630) -> dict[str, Any]:
    """A valid ``sign`` request: two lines at two VAT rates, paid by card."""
    first = amount - 130
    return {
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


def _entry(request: dict[str, Any], *, client: str | None = None, **overrides: Any) -> Entry:
    """The ledger entry the dispatcher makes of a sale request (the till is the client)."""
    sale = validate_sale(request)
    fields: dict[str, Any] = {
        "chain": sale.till,
        "client": client if client is not None else sale.till,
        "request_id": sale.request_id,
        "fingerprint": request_fingerprint(request),
        "record_type": sale.record_type,
        "payload": sale.payload(),
        "print_job": True,
    }
    fields.update(overrides)
    return Entry(**fields)


@pytest.fixture
def make_sale() -> SaleFactory:
    """``make_sale(request_id, till="till-1", amount=630)`` → a valid sign request dict."""
    return _sale


@pytest.fixture
def make_entry() -> EntryFactory:
    """``make_entry(request_or_id, till=..., amount=..., client=..., **Entry fields)``."""

    def make(
        request: dict[str, Any] | str,
        *,
        till: str = "till-1",
        amount: int = 630,
        client: str | None = None,
        **overrides: Any,
    ) -> Entry:
        if isinstance(request, str):
            request = _sale(request, till, amount)
        return _entry(request, client=client, **overrides)

    return make


# ---------------------------------------------------------------------- ledgers


@pytest.fixture
async def ledger(db_path: Path, signer: SoftwareSigner) -> AsyncIterator[Ledger]:
    """An open ledger on ``db_path``, closed after the test."""
    led = await Ledger.open(db_path, signer)
    try:
        yield led
    finally:
        await led.close()


SignSales = Callable[..., Awaitable[list[Record]]]


@pytest.fixture
def sign_sales() -> SignSales:
    """``await sign_sales(ledger, n, chains=("till-1",), prefix="r")`` → the new records.

    Request ``{prefix}{i}`` goes to ``chains[i % len(chains)]`` with amount ``200 + i``; all
    are submitted as one non-atomic batch (one group commit).
    """

    async def sign(
        led: Ledger, n: int, chains: Sequence[str] = ("till-1",), prefix: str = "r"
    ) -> list[Record]:
        entries = [
            _entry(_sale(f"{prefix}{i}", chains[i % len(chains)], 200 + i)) for i in range(n)
        ]
        outcomes = await led.submit_many(entries, atomic=False)
        records = []
        for o in outcomes:
            assert isinstance(o, Signed), o
            records.append(o.record)
        return records

    return sign


HoldWriter = Callable[[Ledger], AbstractAsyncContextManager[None]]


@asynccontextmanager
async def _writer_held(led: Ledger) -> AsyncIterator[None]:
    """Park the writer thread so that everything submitted inside the block forms one group.

    A control call blocks the writer between groups; jobs queued meanwhile are drained
    together when it returns. Submissions must be started as tasks inside the block.
    """
    entered = threading.Event()
    release = threading.Event()

    def park(conn: object) -> None:
        entered.set()
        release.wait(30)

    parked = asyncio.create_task(led.control(park))
    try:
        assert await asyncio.to_thread(entered.wait, 30), "writer thread did not park"
        yield
        await asyncio.sleep(0)  # let the submitting tasks run up to their queue put
    finally:
        release.set()
        await parked


@pytest.fixture
def hold_writer() -> HoldWriter:
    """``async with hold_writer(ledger): <create submit tasks>`` → one group commit."""
    return _writer_held


SettledStats = Callable[[Ledger], Awaitable[Stats]]


@pytest.fixture
def settled_stats() -> SettledStats:
    """``await settled_stats(ledger)`` → a copy of ``ledger.stats`` read in the writer thread.

    The writer wakes the callers before it updates its stats; a control call runs only once
    the group before it is fully done, so what it reads is settled.
    """

    async def read(led: Ledger) -> Stats:
        stats: Stats = await led.control(lambda conn: dataclasses.replace(led.stats))
        return stats

    return read


# ---------------------------------------------------------------------- command line


def _cli_command() -> list[str]:
    entry_point = Path(sys.executable).parent / "fiscal-gateway"
    if entry_point.exists():
        return [str(entry_point)]
    return [sys.executable, "-m", "gateway.cli"]


@pytest.fixture
def cli_command() -> list[str]:
    """argv prefix that runs the installed ``fiscal-gateway`` command."""
    return _cli_command()


RunCli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_cli() -> RunCli:
    """``run_cli("verify", "--db", path)`` → CompletedProcess (text; never raises on rc)."""

    def run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_cli_command(), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
            cwd=cwd,
            check=False,
        )

    return run


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    """A real Mosquitto on a free port (tests/mqtt_support.py), killed at teardown."""
    b = Broker(tmp_path / "broker")
    await b.start()
    try:
        yield b
    finally:
        await b.kill()
