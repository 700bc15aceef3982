"""A fresh install's gateway-wide events (START, KEY_GENERATED, STOP, UNCLEAN_STOP) with the
daemon as a subprocess: held in the journal file across stops, crashes and starts until the
first sale, then that chain's first records, in time order with their own times
(docs/events.md, "Which chain")."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.audit import verify_db
from gateway.core.record import format_time, parse_time

Daemon = Any  # tests/e2e/conftest.py
StartDaemon = Callable[..., Any]
RunCli = Callable[..., subprocess.CompletedProcess[str]]

NO_SCHEDULE = '[journal]\nclosing_time = ""\narchive_period = ""\n'


def held(d: Daemon) -> list[tuple[int, dict[str, Any]]]:
    rows = d.query("SELECT time_ms, payload FROM held_events ORDER BY id")
    return [(t, json.loads(p)) for t, p in rows]


def chain_bodies(d: Daemon, chain: str = "till-1") -> list[dict[str, Any]]:
    rows = d.query("SELECT body FROM records WHERE chain = ? ORDER BY seq", (chain,))
    return [json.loads(bytes(b)) for (b,) in rows]


async def test_daemon_fresh_start_stop_start_then_sale_chain_opens_with_every_event(
    start_daemon: StartDaemon, make_pos_sale: Any, run_cli: RunCli, tmp_path: Path
) -> None:
    d = await start_daemon(NO_SCHEDULE)
    assert (await d.status())["chains"] == []
    assert [p["event"] for _, p in held(d)] == ["START", "KEY_GENERATED"]
    assert (await d.status())["journal"]["events_held"] == 2
    assert await d.stop() == 0
    await d.start()
    before = held(d)  # what the first sale must put in front of itself, exactly
    assert [p["event"] for _, p in before] == ["START", "KEY_GENERATED", "STOP", "START"]
    assert before[0][1]["config_sha256"] == before[3][1]["config_sha256"]  # no CONFIG_CHANGED
    waiting = run_cli("verify", "--db", d.db_path)  # an auditor sees them waiting
    assert waiting.returncode == 0, waiting.stdout + waiting.stderr
    assert "4 gateway-wide event(s) held for the first chain" in waiting.stdout

    sale = (await d.request(make_pos_sale("s1")))["record"]
    assert await d.stop() == 0

    bodies = chain_bodies(d)
    assert sale["seq"] == 5 and bodies[4]["request_id"] == "s1"
    assert [(b["time"], b["payload"]) for b in bodies[:4]] == [
        (format_time(t), p) for t, p in before
    ]
    times = [parse_time(b["time"]) for b in bodies]
    assert times == sorted(times)
    assert [b["payload"]["event"] for b in bodies[5:]] == ["STOP"]
    assert held(d) == []
    report = verify_db(d.db_path)
    assert report.ok, [c.failure.to_json() for c in report.chains if c.failure]

    # the chain's export holds them: complete on its own, and the auditor's check passes
    out = tmp_path / "export"
    done = run_cli("export", "--db", d.db_path, "--out", out, "--chain", "till-1")
    assert done.returncode == 0, done.stderr
    checked = run_cli("verify-export", out)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    exported = [json.loads(x)["body"] for x in (out / "records.jsonl").read_text().splitlines()]
    assert [b["seq"] for b in exported] == [b["seq"] for b in bodies]


async def test_daemon_fresh_start_killed_then_started_unclean_stop_reaches_the_chain(
    start_daemon: StartDaemon, make_pos_sale: Any
) -> None:
    d = await start_daemon(NO_SCHEDULE)
    await d.kill()  # kill -9 before any sale: the held events are already durable
    await d.start()
    assert (await d.request(make_pos_sale("s1")))["ok"]
    assert await d.stop() == 0

    codes = [b["payload"].get("event", b["type"]) for b in chain_bodies(d)]
    assert codes == [
        "START",
        "KEY_GENERATED",
        "UNCLEAN_STOP",
        "START",
        "TRANSACTION::RECEIPT",
        "STOP",
    ]
    report = verify_db(d.db_path)
    assert report.ok, [c.failure.to_json() for c in report.chains if c.failure]
