"""The fiscal journal on a real ledger: closings made in the writer (close op, schedule,
catch-up), technical events, archives — each checked by ``verify`` / ``verify-export``.

A controllable clock (a list holding "now") drives the ledger, the dispatcher and the
schedule, so days pass in milliseconds; everything else is real: SQLite on disk, P-256 keys,
the command line as a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC
from datetime import time as dtime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from drivers.signers.software import SoftwareSigner
from gateway.archive import Archiver, pending
from gateway.audit import verify_db
from gateway.closings import Scheduler
from gateway.core.closing import DAILY, MONTHLY, YEARLY, Schedule
from gateway.core.record import format_time, parse_time
from gateway.core.request import Rules
from gateway.dispatch import Dispatcher
from gateway.events import EventJournal, spool_event
from gateway.ledger import Ledger
from gateway.reads import ReadPool
from gateway.store import Reader
from tests.journal_support import long_first_year, ms

RunCli = Callable[..., subprocess.CompletedProcess[str]]
SaleFactory = Callable[..., dict[str, Any]]

DAY = 86_400_000


class Clock:
    def __init__(self, now_ms: int) -> None:
        self.now = now_ms

    def __call__(self) -> int:
        return self.now


class Shop:
    """A ledger, a dispatcher and a schedule on one controllable clock."""

    def __init__(self, ledger: Ledger, reads: ReadPool, clock: Clock, db: Path) -> None:
        self.ledger = ledger
        self.reads = reads
        self.clock = clock
        self.db = db
        self.dispatcher = Dispatcher(ledger, rules=Rules(), clock_ms=clock)
        self.scheduler = Scheduler(ledger, reads, Schedule(UTC, dtime(4, 0)), clock_ms=clock)
        self.n = 0

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        reply = await self.dispatcher.handle(request)
        assert reply["ok"], reply
        return reply

    async def sell(self, make_sale: SaleFactory, amount: int = 630, till: str = "till-1") -> Any:
        self.n += 1
        return (await self.ask(make_sale(f"s{self.n}", till, amount)))["record"]

    def records(self, rtype: str | None = None, chain: str = "till-1") -> list[dict[str, Any]]:
        with Reader(self.db) as r:
            bodies = [json.loads(x.body) for x in r.iter_records(chain)]
        return [b for b in bodies if rtype is None or b["type"] == rtype]


@pytest.fixture
async def shop(db_path: Path, signer: SoftwareSigner) -> AsyncIterator[Shop]:
    clock = Clock(ms("2026-11-20T10:00:00+00:00"))
    ledger = await Ledger.open(db_path, signer, clock_ms=clock)
    reads = ReadPool(db_path)
    try:
        yield Shop(ledger, reads, clock, db_path)
    finally:
        reads.close()
        await ledger.close()


def verified(db: Path) -> int:
    report = verify_db(db)
    assert report.ok, [c.failure.to_json() for c in report.chains if c.failure]
    return sum(c.closings for c in report.chains)


# ---------------------------------------------------------------------- the close op


async def test_close_op_yearly_makes_daily_monthly_yearly_that_verify(
    shop: Shop, make_sale: SaleFactory
) -> None:
    s1 = await shop.sell(make_sale, 1000)
    await shop.sell(make_sale, 2000)
    await shop.ask(
        {"id": "c1", "op": "cancel", "till": "till-1", "ref": {"chain": "till-1", "seq": 1}}
    )
    await shop.ask(
        {"id": "r1", "op": "reprint", "till": "till-1", "ref": {"chain": "till-1", "seq": 2}}
    )
    daily = await shop.ask({"id": "z1", "op": "close", "till": "till-1", "period": "DAILY"})
    shop.clock.now += 3_600_000
    await shop.sell(make_sale, 500)
    request = {"id": "z2", "op": "close", "till": "till-1", "period": "YEARLY"}
    reply = await shop.ask(request)

    p = daily["record"]["payload"]
    assert daily["record"]["type"] == DAILY and daily["receipt"]["number"] == "till-1-ZD-00000001"
    assert (p["period"]["from_seq"], p["period"]["to_seq"], p["records"]) == (1, 4, 4)
    assert p["period"]["from_time"] == s1["time"]
    assert p["period_total"]["gross"] == 2000 and p["period_total"]["gross_abs"] == 4000
    assert p["payments"] == [{"method": "CARD", "amount": 2000}]
    assert p["previous"] is None
    assert [c["type"] for c in reply["closings"]] == [DAILY, MONTHLY, YEARLY]
    assert reply["record"] == reply["closings"][-1] and reply["replayed"] is False
    yearly = reply["record"]["payload"]
    assert yearly["closings"] == {"type": MONTHLY, "from_number": 1, "to_number": 1}
    assert yearly["period_total"]["gross"] == 2500 and yearly["records"] == 6  # seq 1..6
    again = await shop.ask(request)  # exactly once: the same three records
    assert again["replayed"] and again["closings"] == reply["closings"]
    assert verified(shop.db) == 4


async def test_close_op_new_till_empty_period_is_recorded(shop: Shop) -> None:
    reply = await shop.ask({"id": "z1", "op": "close", "till": "till-9", "period": "DAILY"})
    p = reply["record"]["payload"]
    assert (reply["record"]["seq"], p["records"], p["period"]["to_seq"]) == (1, 0, 0)
    assert p["period_total"] == {"gross": 0, "net": 0, "vat": 0, "gross_abs": 0}
    assert verified(shop.db) == 1


async def test_close_op_bad_period_refused_changes_nothing(shop: Shop) -> None:
    reply = await shop.dispatcher.handle(
        {"id": "z1", "op": "close", "till": "till-1", "period": "WEEKLY"}
    )
    assert reply["ok"] is False and reply["error"]["code"] == "VALIDATION_ERROR"
    assert reply["error"]["details"][0]["field"] == "period"
    assert shop.ledger.heads() == {}


# ---------------------------------------------------------------------- the schedule


async def test_scheduler_box_off_three_days_makes_each_missed_daily_with_true_period(
    shop: Shop, make_sale: SaleFactory
) -> None:
    s1 = await shop.sell(make_sale, 100)  # 2026-11-20 10:00
    shop.clock.now = ms("2026-11-21T03:00:00+00:00")
    s2 = await shop.sell(make_sale, 200)
    shop.clock.now = ms("2026-11-23T09:00:00+00:00")  # the box was off two nights

    made = await shop.scheduler.catch_up()

    assert [(r.type, r.payload["period"]["to_time"]) for r in made] == [
        (DAILY, "2026-11-21T04:00:00.000Z"),
        (DAILY, "2026-11-22T04:00:00.000Z"),
        (DAILY, "2026-11-23T04:00:00.000Z"),
    ]
    first, second, third = (r.payload for r in made)
    assert first["period"]["from_time"] == s1["time"] and first["period"]["to_seq"] == s2["seq"]
    assert first["period_total"]["gross"] == 300
    assert second["records"] == 0 and third["records"] == 0  # empty days, recorded
    assert all(r.time == format_time(shop.clock.now) for r in made)
    assert await shop.scheduler.catch_up() == []  # once per boundary
    assert verified(shop.db) == 3


async def test_scheduler_month_end_makes_monthly_after_its_daily(
    shop: Shop, make_sale: SaleFactory
) -> None:
    shop.clock.now = ms("2026-11-30T12:00:00+00:00")
    await shop.sell(make_sale, 100)
    shop.clock.now = ms("2026-12-01T04:00:00.010+00:00")
    await shop.sell(make_sale, 200)  # after the boundary: next period, signed before it

    made = await shop.scheduler.run_due()

    assert [r.type for r in made] == [DAILY, MONTHLY]
    daily, monthly = (r.payload for r in made)
    assert daily["records"] == 1 and daily["period"]["to_seq"] == 1
    assert monthly["period"] == daily["period"] and monthly["period_total"]["gross"] == 100
    assert verified(shop.db) == 2


async def test_scheduler_fiscal_year_end_local_time_box_off_makes_yearly_summing_monthlies(
    shop: Shop, make_sale: SaleFactory
) -> None:
    # Paris, fiscal year ending 31 March; the box is off over the year end, which falls in
    # summer time (04:00 CEST = 02:00 UTC), the month before in winter time (03:00 UTC)
    paris = Scheduler(
        shop.ledger,
        shop.reads,
        Schedule(ZoneInfo("Europe/Paris"), dtime(4, 0), year_end=(3, 31)),
        clock_ms=shop.clock,
    )
    shop.clock.now = ms("2027-02-27T12:00:00+00:00")
    await shop.sell(make_sale, 100)
    shop.clock.now = ms("2027-03-01T09:00:00+00:00")
    february = await paris.catch_up()
    assert [r.type for r in february][-1] == MONTHLY
    assert february[-1].payload["period"]["to_time"] == "2027-03-01T03:00:00.000Z"
    shop.clock.now = ms("2027-03-15T12:00:00+00:00")
    await paris.catch_up()
    await shop.sell(make_sale, 250)
    shop.clock.now = ms("2027-04-02T12:00:00+00:00")  # off from 15 March to 2 April

    made = await paris.catch_up()

    kinds = [r.type for r in made]
    assert kinds.count(YEARLY) == 1 and kinds.count(MONTHLY) == 1
    yearly = next(r for r in made if r.type == YEARLY)
    march = next(r for r in made if r.type == MONTHLY)
    assert yearly.payload["period"]["to_time"] == "2027-04-01T02:00:00.000Z"  # true period
    assert kinds.index(YEARLY) == kinds.index(MONTHLY) + 1  # after the month it closes
    assert yearly.payload["closings"] == {"type": MONTHLY, "from_number": 1, "to_number": 2}
    monthly_totals = [february[-1].payload["period_total"], march.payload["period_total"]]
    assert yearly.payload["period_total"]["gross"] == 350 == sum(t["gross"] for t in monthly_totals)
    assert yearly.payload["period"]["from_seq"] == 1
    assert verified(shop.db) == len(shop.records(DAILY)) + 3


async def test_scheduler_requested_closing_after_boundary_wins_no_double(
    shop: Shop, make_sale: SaleFactory
) -> None:
    await shop.sell(make_sale, 100)
    shop.clock.now = ms("2026-11-21T04:00:05+00:00")
    await shop.ask({"id": "z1", "op": "close", "till": "till-1", "period": "DAILY"})
    assert await shop.scheduler.run_due() == []
    assert len(shop.records(DAILY)) == 1
    assert verified(shop.db) == 1


# ---------------------------------------------------------------------- events


async def test_event_journal_burst_is_first_plus_one_counted_record(
    shop: Shop, make_sale: SaleFactory
) -> None:
    await shop.sell(make_sale, 100)
    events = EventJournal(window_s=0.2, clock_ms=shop.clock)
    events.bind(shop.ledger)
    worker = asyncio.create_task(events.run())
    try:
        for _ in range(50):
            events.record("PRINTER_FAULT", state="paused", problem="paper out")
        events.record("NO_SUCH_CODE")  # logged, dropped
        for _ in range(100):
            await asyncio.sleep(0.01)
            if shop.records("INTENTION::EVENT"):
                break
        shop.clock.now += 1_000  # the window ends
        events._poke()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(shop.records("INTENTION::EVENT")) == 2:
                break
    finally:
        worker.cancel()
    first, burst = (b["payload"] for b in shop.records("INTENTION::EVENT"))
    assert first == {"event": "PRINTER_FAULT", "state": "paused", "problem": "paper out"}
    assert burst["count"] == 49 and burst["problem"] == "paper out"
    verified(shop.db)


async def test_event_journal_spooled_event_signed_once_in_every_chain(
    shop: Shop, make_sale: SaleFactory, tmp_path: Path
) -> None:
    await shop.sell(make_sale, 100, till="till-1")
    await shop.sell(make_sale, 100, till="till-2")
    spool = tmp_path / "events"
    spool_event(spool, "EXPORT_MADE", out="/x", records=2)
    events = EventJournal(window_s=1, clock_ms=shop.clock, spool_dir=spool)
    events.bind(shop.ledger)

    assert await events.ingest_spool() == 1
    assert await events.ingest_spool() == 0
    assert list(spool.iterdir()) == []
    for chain in ("till-1", "till-2"):
        (ev,) = shop.records("INTENTION::EVENT", chain)
        assert ev["payload"] == {"event": "EXPORT_MADE", "out": "/x", "records": 2}
    verified(shop.db)


# ---------------------------------------------------------------------- archives


async def month_of_sales(shop: Shop, make_sale: SaleFactory) -> None:
    """November: sales on three days, scheduled closings, a cancellation of an October sale."""
    shop.clock.now = ms("2026-10-31T12:00:00+00:00")
    await shop.sell(make_sale, 900)
    for day in ("2026-11-02", "2026-11-15", "2026-11-29"):
        shop.clock.now = ms(f"{day}T12:00:00+00:00")
        await shop.scheduler.catch_up()
        await shop.sell(make_sale, 400)
        await shop.sell(make_sale, 250)
    await shop.ask(
        {"id": "c1", "op": "cancel", "till": "till-1", "ref": {"chain": "till-1", "seq": 1}}
    )
    shop.clock.now = ms("2026-12-01T05:00:00+00:00")
    await shop.scheduler.catch_up()


async def test_archive_month_made_recorded_and_verified_byte_change_names_record(
    shop: Shop, make_sale: SaleFactory, tmp_path: Path, run_cli: RunCli
) -> None:
    await month_of_sales(shop, make_sale)
    archiver = Archiver(
        shop.ledger, shop.reads, tmp_path / "archives", MONTHLY, clock_ms=shop.clock
    )

    made = await archiver.run_due()

    assert [r.payload["closing"]["number"] for r in made] == [1, 2]  # October and November
    nov = made[1]
    out = tmp_path / "archives" / nov.payload["archive"]
    assert nov.type == "EXPORT::RECORDS" and out.name == "MONTHLY-000002"
    manifest = json.loads((out / "manifest.json").read_bytes())
    assert nov.payload["manifest_hash"] == manifest["hash"]
    assert manifest["body"]["archive"]["period"]["to_time"] == "2026-12-01T04:00:00.000Z"
    refs = [json.loads(x)["body"] for x in (out / "references.jsonl").read_bytes().splitlines()]
    assert {(b["type"], b["seq"]) for b in refs} >= {("TRANSACTION::RECEIPT", 1)}
    assert await archiver.run_due() == []  # each closing once
    assert verified(shop.db) > 0

    ok = run_cli("verify-export", out, "--db", shop.db)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "archive of till-1 CLOSING::MONTHLY 2" in ok.stdout
    assert f"recorded in the journal as till-1 seq {nov.seq}" in ok.stdout

    lines = (out / "records.jsonl").read_bytes().splitlines(keepends=True)
    i = next(n for n, ln in enumerate(lines) if b'"amount":400' in ln)
    victim = json.loads(lines[i])["body"]
    lines[i] = lines[i].replace(b'"amount":400', b'"amount":401', 1)  # one byte
    (out / "records.jsonl").write_bytes(b"".join(lines))
    bad = run_cli("verify-export", out)
    assert bad.returncode == 1, bad.stdout
    assert f"chain 'till-1' seq {victim['seq']}" in bad.stdout
    assert "HASH_MISMATCH" in bad.stdout


async def test_archive_cli_archives_pending_then_nothing(
    db_path: Path,
    signer: SoftwareSigner,
    make_sale: SaleFactory,
    key_path: Path,
    tmp_path: Path,
    run_cli: RunCli,
) -> None:
    clock = Clock(ms("2026-11-20T10:00:00+00:00"))
    ledger = await Ledger.open(db_path, signer, clock_ms=clock)
    reads = ReadPool(db_path)
    try:
        shop = Shop(ledger, reads, clock, db_path)
        await shop.sell(make_sale, 100)
        await shop.ask({"id": "y1", "op": "close", "till": "till-1", "period": "YEARLY"})
        busy = run_cli("archive", "--db", db_path, "--period", "YEARLY")
        # the journal is held (by a daemon, here by this ledger): the command says how to ask
        # the daemon through its admin API instead, and changes nothing
        assert busy.returncode == 1 and "the daemon is running" in busy.stderr
        assert "/v1/admin/archive" in busy.stderr
    finally:
        reads.close()
        await ledger.close()

    first = run_cli("archive", "--db", db_path, "--period", "YEARLY", "--key", key_path)
    second = run_cli("archive", "--db", db_path, "--period", "YEARLY", "--key", key_path)

    assert first.returncode == 0, first.stderr
    assert "YEARLY-000001: 4 records, CLOSING::YEARLY 1, recorded as till-1 seq 5" in first.stdout
    assert "nothing to archive" in second.stdout
    with Reader(db_path) as r:
        assert pending(r, YEARLY) == []
    assert (
        run_cli(
            "verify-export", db_path.parent / "archives" / "till-1" / "YEARLY-000001"
        ).returncode
        == 0
    )
    assert verified(db_path) == 3


async def test_export_cli_spools_export_made_event(
    shop: Shop, make_sale: SaleFactory, key_path: Path, tmp_path: Path, run_cli: RunCli
) -> None:
    await shop.sell(make_sale, 100)
    r = run_cli("export", "--db", shop.db, "--out", tmp_path / "x", "--key", key_path)
    assert r.returncode == 0, r.stderr
    (spooled,) = (shop.db.parent / "events").iterdir()
    data = json.loads(spooled.read_bytes())
    assert data["payload"]["event"] == "EXPORT_MADE" and data["payload"]["records"] == 1
    assert parse_time(format_time(shop.clock.now))  # the clock is untouched by the CLI


DOCS = Path(__file__).resolve().parents[2] / "docs" / "export-format.md"


def auditor_script(tmp_path: Path) -> Path:
    """The program of docs/export-format.md ("Checking an archive with openssl and RFC 8785
    alone"), exactly as written there."""
    text = DOCS.read_text("utf-8")
    after = text.split("<!-- auditor-script", 1)[1]
    block = after.split("```python\n", 1)[1].split("\n```", 1)[0]
    path = tmp_path / "check_archive.py"
    path.write_text(block + "\n", "utf-8")
    return path


async def test_archive_checked_by_the_docs_auditor_program_without_gateway_code(
    shop: Shop, make_sale: SaleFactory, tmp_path: Path
) -> None:
    await month_of_sales(shop, make_sale)
    shop.clock.now = ms("2026-12-02T10:00:00+00:00")
    await shop.scheduler.catch_up()
    sold = await shop.sell(make_sale, 800)
    fields = {k: v for k, v in make_sale("k", "till-1", 700).items() if k != "type"}
    ref = {"chain": "till-1", "seq": sold["seq"]}
    await shop.ask({**fields, "id": "k1", "op": "correction", "ref": ref})
    await shop.ask({"id": "y1", "op": "close", "till": "till-1", "period": "YEARLY"})
    root = tmp_path / "archives"
    for kind in (MONTHLY, YEARLY):
        await Archiver(shop.ledger, shop.reads, root, kind, clock_ms=shop.clock).run_due()
    script = auditor_script(tmp_path)
    archives = sorted(p for p in root.glob("till-1/*") if p.is_dir())
    names = [p.name for p in archives]
    assert names == ["MONTHLY-000001", "MONTHLY-000002", "MONTHLY-000003", "YEARLY-000001"]

    def audit(out: Path) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, str(script), str(out)]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)

    for out in archives:
        run = await asyncio.to_thread(audit, out)
        assert run.returncode == 0 and run.stdout.strip() == "archive OK", (out, run.stderr)

    data = (archives[1] / "records.jsonl").read_bytes()
    (archives[1] / "records.jsonl").write_bytes(data.replace(b'"amount":250', b'"amount":251', 1))
    run = await asyncio.to_thread(audit, archives[1])
    assert run.returncode != 0 and "archive INVALID" in run.stderr


def test_config_journal_bad_values_named_with_their_field_path() -> None:
    from gateway.config import parse_config
    from gateway.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "journal": {
                    "time_zone": "Europe/Atlantis",
                    "closing_time": "4h",
                    "fiscal_year_end": "02-29",
                    "clock_jump_threshold_s": 0,
                    "archive_period": "WEEKLY",
                }
            }
        )
    assert {d.field for d in info.value.details} == {
        "journal.time_zone",
        "journal.closing_time",
        "journal.fiscal_year_end",
        "journal.clock_jump_threshold_s",
        "journal.archive_period",
    }
    ok = parse_config({"journal": {"time_zone": "Europe/Paris", "closing_time": ""}})
    assert ok.journal.time_zone == "Europe/Paris" and ok.journal.closing_time == ""


async def test_archive_yearly_over_366_days_skipped_monthlies_cover_it(
    db_path: Path,
    signer: SoftwareSigner,
    make_sale: SaleFactory,
    key_path: Path,
    tmp_path: Path,
    run_cli: RunCli,
) -> None:
    """A first fiscal year of thirteen months cannot be one archive (≤ 366 days): the run
    says so and records nothing, it is not a failure, and the monthly archives hold every
    record of that year."""
    yearly = await long_first_year(db_path, signer, make_sale)
    period = yearly["payload"]["period"]
    assert parse_time(period["to_time"]) - parse_time(period["from_time"]) > 366 * 86_400_000
    root = tmp_path / "archives"
    ledger = await Ledger.open(db_path, signer)
    reads = ReadPool(db_path)
    try:
        run = await Archiver(ledger, reads, root, YEARLY, clock_ms=_wall_ms).run()
        assert run.made == [] and run.failed == []
        ((target, why),) = run.skipped
        assert (target.kind, target.number, target.seq) == (YEARLY, 1, yearly["seq"])
        assert "spans 404 days" in why and "--period MONTHLY" in why
        assert not root.exists()  # nothing half-written
        monthly = await Archiver(ledger, reads, root, MONTHLY, clock_ms=_wall_ms).run()
        assert monthly.failed == [] and monthly.skipped == []
    finally:
        reads.close()
        await ledger.close()
    assert len(monthly.made) == 14  # thirteen months and the year's last day
    covered = {
        json.loads(line)["body"]["seq"]
        for d in (root / "till-1").iterdir()
        for line in (d / "records.jsonl").read_bytes().splitlines()
    }
    assert covered >= set(range(period["from_seq"], period["to_seq"] + 1))

    again = run_cli("archive", "--db", db_path, "--period", "YEARLY", "--key", key_path)
    assert again.returncode == 0, again.stderr
    assert "skipped: till-1 CLOSING::YEARLY 1 spans 404 days" in again.stdout
    assert "nothing to archive" not in again.stdout
    with Reader(db_path) as r:
        assert [t.number for t in pending(r, YEARLY)] == [1]  # still not archived, and said so
    assert verified(db_path) > 0


def _wall_ms() -> int:
    return ms("2026-11-22T10:00:00+00:00")


async def test_archive_cli_failed_archive_exits_1_names_it_records_nothing(
    shop: Shop, make_sale: SaleFactory, key_path: Path, tmp_path: Path, run_cli: RunCli
) -> None:
    """With the daemon stopped, an archive that cannot be written (``--out`` is a file) is
    an error on stderr and exit 1 — not "nothing to archive" — and nothing is recorded."""
    await shop.sell(make_sale, 100)
    await shop.ask({"id": "m1", "op": "close", "till": "till-1", "period": "MONTHLY"})
    await shop.ledger.close()
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the archive root should be")

    r = run_cli("archive", "--db", shop.db, "--key", key_path, "--out", blocked)

    assert r.returncode == 1, r.stdout + r.stderr
    assert "error: till-1 CLOSING::MONTHLY 1:" in r.stderr
    assert "nothing to archive" not in r.stdout
    with Reader(shop.db) as rd:
        assert [t.number for t in pending(rd, MONTHLY)] == [1]
