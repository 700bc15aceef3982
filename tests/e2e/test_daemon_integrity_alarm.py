"""``INTEGRITY_ALARM`` with the daemon as a subprocess: a run that finds the journal damaged
halts signing (and records nothing); once the damage is repaired, the next run records the
alarm — why and since when — in the chain before it serves the POS (docs/events.md)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from contextlib import closing
from typing import Any

from gateway.audit import verify_db
from gateway.core.record import parse_time

StartDaemon = Callable[..., Any]

NO_SCHEDULE = '[journal]\nclosing_time = ""\narchive_period = ""\n'


async def test_daemon_halted_run_then_repaired_records_integrity_alarm_with_reason(
    start_daemon: StartDaemon, make_pos_sale: Any
) -> None:
    d = await start_daemon(NO_SCHEDULE)
    sale = (await d.request(make_pos_sale("s1")))["record"]
    assert (await d.request(make_pos_sale("s2")))["ok"]
    assert await d.stop() == 0

    # damage: the first sale's signature is replaced by the second's (a bad signature)
    with closing(sqlite3.connect(d.db_path)) as conn:
        (good,) = conn.execute(
            "SELECT sig FROM records WHERE chain = 'till-1' AND seq = ?", (sale["seq"],)
        ).fetchone()
        conn.execute(
            "UPDATE records SET sig = (SELECT sig FROM records WHERE request_id = 's2') "
            "WHERE chain = 'till-1' AND seq = ?",
            (sale["seq"],),
        )
        conn.commit()
    before = d.query("SELECT count(*) FROM records")

    await d.start(wait_ready=False)
    mark = d.db_path.with_name(d.db_path.name + ".halted")
    deadline = time.monotonic() + 30
    while not mark.exists():  # the halt is remembered for the next run that can sign
        assert d.alive() and time.monotonic() < deadline, d.stderr_text()
        await asyncio.sleep(0.05)
    status, health = await d.http_get("/v1/health")
    refused = await d.request(make_pos_sale("s3"))
    assert await d.stop() == 0
    assert (status, health["ok"]) == (503, False)
    assert refused["error"]["code"] == "SIGNING_HALTED"
    assert d.query("SELECT count(*) FROM records") == before  # a halted journal takes nothing
    reason = json.loads(mark.read_text())["reason"]
    assert f"seq {sale['seq']}" in reason

    with closing(sqlite3.connect(d.db_path)) as conn:  # the technician restores the record
        conn.execute(
            "UPDATE records SET sig = ? WHERE chain = 'till-1' AND seq = ?", (good, sale["seq"])
        )
        conn.commit()
    await d.start()
    assert (await d.request(make_pos_sale("s3")))["ok"]
    assert await d.stop() == 0

    bodies = [
        json.loads(bytes(b))
        for (b,) in d.query("SELECT body FROM records WHERE chain = 'till-1' ORDER BY seq")
    ]
    codes = [b["payload"].get("event") for b in bodies if b["type"] == "INTENTION::EVENT"]
    (alarm,) = [b for b in bodies if b["payload"].get("event") == "INTEGRITY_ALARM"]
    assert alarm["payload"]["reason"] == reason
    assert parse_time(alarm["payload"]["since"]) <= parse_time(alarm["time"])
    # the halted run signed nothing, not even its STOP: the repaired run finds no clean
    # close, then records the alarm, then starts
    assert codes[-4:] == ["UNCLEAN_STOP", "INTEGRITY_ALARM", "START", "STOP"]
    assert not mark.exists()
    report = verify_db(d.db_path)
    assert report.ok, [c.failure.to_json() for c in report.chains if c.failure]
