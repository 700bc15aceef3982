"""The status page's lists (recent records, recent technical events) read each chain's newest
rows and merge them: the same rows, in the same order (time DESC, chain, seq DESC), as one
sort of the whole records table — which is what the page showed before and what it means."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path

from gateway import store
from gateway.core.record import format_time
from gateway.core.sync_policy import RunStats
from gateway.store import Reader
from gateway.sync_report import insert_run
from gateway.technician import (
    RECENT_EVENTS,
    RECENT_RECORDS,
    _last_sync_ok,
    _recent_records,
    _review_and_events,
)

EVENT = "INTENTION::EVENT"
SALE = "TRANSACTION::RECEIPT"


def journal(path: Path, chains: dict[str, list[tuple[str, str]]]) -> None:
    """Rows as the ledger stores them (only the columns the lists read matter here)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        store.migrate(conn)
        conn.execute("BEGIN")
        for chain, rows in chains.items():
            for seq, (type_, time) in enumerate(rows, start=1):
                payload = {"event": "START"} if type_ == EVENT else {"total": seq, "lines": []}
                conn.execute(
                    "INSERT INTO records VALUES (?, ?, ?, ?, ?, 'c', ?, 'k', 'h', 's', ?)",
                    (chain, seq, type_, seq, time, f"r{seq}", json.dumps({"payload": payload})),
                )
            conn.execute("INSERT INTO heads VALUES (?, ?, 'h')", (chain, len(rows)))
        conn.execute("COMMIT")


def oracle(path: Path, where: str, limit: int) -> list[tuple[str, int]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(
            f"SELECT chain, seq FROM records WHERE {where} "
            "ORDER BY time DESC, chain, seq DESC LIMIT ?",
            (limit,),
        ).fetchall()


def t(second: int) -> str:
    return f"2026-11-22T10:{second // 60:02d}:{second % 60:02d}.000Z"


def test_technician_lists_merge_chains_like_one_sort_of_the_table(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    chains: dict[str, list[tuple[str, str]]] = {}
    for i, chain in enumerate(("till-b", "till-a", "till-c")):
        rows = []
        for n in range(400):
            # equal times across chains and within a chain (same millisecond), events sparse
            # and in runs, one chain with no event at all
            kind = EVENT if chain != "till-c" and (n % 37 in (0, 1) or n > 390) else SALE
            rows.append((kind, t(n // 2 + i * (n % 3))))
        rows.sort(key=lambda row: row[1])  # a chain's time never goes backward
        chains[chain] = rows
    journal(db, chains)

    with Reader(db) as r:
        records = [(x["chain"], x["seq"]) for x in _recent_records(r)]
        events = [(x["chain"], x["seq"]) for x in _review_and_events(r)[1]]

    assert records == oracle(db, f"type != '{EVENT}'", RECENT_RECORDS)
    assert events == oracle(db, f"type = '{EVENT}'", RECENT_EVENTS)
    assert len(records) == RECENT_RECORDS and len(events) == RECENT_EVENTS


def test_technician_events_use_the_partial_index(tmp_path: Path) -> None:
    db = tmp_path / "journal.db"
    journal(db, {"till-1": [(SALE, t(0))] * 50})
    with closing(sqlite3.connect(db)) as conn:
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT chain, seq, time, body FROM records "
            f"WHERE chain = ? AND type = '{EVENT}' ORDER BY seq DESC LIMIT ?",
            ("till-1", 5),
        ).fetchall()
    assert any("records_events" in row[-1] for row in plan), plan


def test_last_sync_ok_is_the_last_run_that_delivered_and_succeeded(tmp_path: Path) -> None:
    """A run whose retries overcame a refused connection (the cloud came back during its
    probe) still delivered everything: it is a successful sync. One with an item failed or
    rejected, a run error, or nothing delivered is not."""
    db = tmp_path / "journal.db"
    journal(db, {})
    runs = [
        ("p", 1_000, RunStats("p", accepted=3)),
        ("p", 2_000, RunStats("p", accepted=3, errors_count=2)),  # retried, then fine
        ("p", 3_000, RunStats("p", accepted=2, failed=1)),
        ("p", 4_000, RunStats("p", accepted=2, rejected=1)),
        ("p", 5_000, RunStats("p", accepted=1, run_error="CLOUD_UNAVAILABLE: x")),
        ("p", 6_000, RunStats("p")),  # an admin run with nothing to send
        ("q", 1_500, RunStats("q", failed=4)),
    ]
    with closing(sqlite3.connect(db, isolation_level=None)) as conn:
        for processor, started, stats in runs:
            insert_run(conn, processor, stats, started, "timer")
    with Reader(db) as r:
        assert _last_sync_ok(r) == {"p": format_time(2_000)}
