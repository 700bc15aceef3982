"""The fiscal journal of the daemon as a subprocess: a clock that jumps, a box that was off
over a closing time, a kill -9, the close op over the socket.

The daemon's wall clock is moved with the test-only ``FISCAL_GATEWAY_TEST_CLOCK_OFFSET_FILE``
(gateway/clock.py): the system clock plus the milliseconds written in that file.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import verify_db
from gateway.clock import TEST_CLOCK_ENV
from gateway.core.record import parse_time

Daemon = Any  # tests/e2e/conftest.py
StartDaemon = Callable[..., Any]
HOUR = 3_600_000

NO_SCHEDULE = '[journal]\nclosing_time = ""\narchive_period = ""\n'


@pytest.fixture
def offset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """``offset(ms)``: move the daemon's wall clock to system clock + ms (starts at 0)."""
    path = tmp_path / "clock-offset"
    path.write_text("0")
    monkeypatch.setenv(TEST_CLOCK_ENV, str(path))

    def move(ms: int) -> None:
        tmp = path.with_name("clock-offset.tmp")
        tmp.write_text(str(ms))
        os.replace(tmp, path)

    return move


def events(d: Daemon, code: str | None = None, chain: str = "till-1") -> list[dict[str, Any]]:
    bodies = [
        json.loads(bytes(b))
        for (b,) in d.query(
            "SELECT body FROM records WHERE chain = ? AND type = 'INTENTION::EVENT' ORDER BY seq",
            (chain,),
        )
    ]
    return [b for b in bodies if code is None or b["payload"]["event"] == code]


async def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"no {what} in {timeout_s} s"
        await asyncio.sleep(0.05)


def journal_ok(d: Daemon) -> None:
    report = verify_db(d.db_path)
    assert report.ok, [c.failure.to_json() for c in report.chains if c.failure]


async def test_daemon_clock_jumps_back_and_forward_times_monotonic_and_events_recorded(
    start_daemon: StartDaemon, offset: Callable[[int], None], make_pos_sale: Any
) -> None:
    d = await start_daemon(NO_SCHEDULE)
    first = (await d.request(make_pos_sale("s1")))["record"]
    offset(-HOUR)  # the clock is set back an hour
    behind = [(await d.request(make_pos_sale(f"b{i}")))["record"] for i in range(3)]
    back = await wait_for(lambda: events(d, "CLOCK_JUMP"), "backward CLOCK_JUMP")
    offset(2 * HOUR)  # then three hours forward
    ahead = (await d.request(make_pos_sale("f1")))["record"]
    jumps = await wait_for(
        lambda: len(events(d, "CLOCK_JUMP")) == 2 and events(d, "CLOCK_JUMP"), "forward CLOCK_JUMP"
    )
    assert await d.stop() == 0

    times = [parse_time(r["time"]) for r in (first, *behind)]
    assert times == sorted(times) and len(set(times)) == len(times)  # +1 ms each, not back
    assert times[1] == times[0] + 1
    assert back[0]["payload"]["direction"] == "BACKWARD"
    assert -HOUR - 5_000 < back[0]["payload"]["jump_ms"] < -HOUR + 5_000
    fwd = jumps[1]["payload"]
    assert fwd["direction"] == "FORWARD" and 3 * HOUR - 5_000 < fwd["jump_ms"] < 3 * HOUR + 5_000
    assert parse_time(ahead["time"]) > times[-1] + 2 * HOUR - 5_000
    all_times = [parse_time(t) for (t,) in d.query("SELECT time FROM records ORDER BY seq")]
    assert all_times == sorted(all_times)
    start = events(d, "START")
    assert start == [] or start[0]["payload"]["clock"].startswith("test-offset-file:")
    journal_ok(d)


async def test_daemon_off_over_closing_time_makes_missed_closings_at_start(
    start_daemon: StartDaemon, offset: Callable[[int], None], make_pos_sale: Any
) -> None:
    d = await start_daemon('[journal]\nclosing_time = "04:00"\ntime_zone = "UTC"\n')
    sale = (await d.request(make_pos_sale("s1")))["record"]
    assert await d.stop() == 0
    offset(2 * 24 * HOUR)  # the box stays off for two days
    await d.start()
    closings = await wait_for(
        lambda: d.query("SELECT seq, body FROM records WHERE type = 'CLOSING::DAILY' ORDER BY seq"),
        "catch-up closings",
    )
    status = await d.status()
    assert await d.stop() == 0

    dailies = [json.loads(bytes(b)) for _, b in closings]
    ends = [parse_time(b["payload"]["period"]["to_time"]) for b in dailies]
    assert len(dailies) == 2 or len(dailies) == 3  # 04:00 UTC passed two or three times
    assert all(e % (24 * HOUR) == 4 * HOUR for e in ends)  # each at 04:00 UTC: true periods
    assert [b - a for a, b in itertools.pairwise(ends)] == [24 * HOUR] * (len(ends) - 1)
    first = dailies[0]["payload"]
    assert first["period"]["from_seq"] == 1 and first["period"]["to_seq"] >= sale["seq"]
    assert first["period_total"]["gross"] == sale["payload"]["total"]
    assert all(parse_time(b["time"]) > ends[-1] for b in dailies)  # made late, at start-up
    start = events(d, "START")[-1]
    assert start["seq"] < dailies[0]["seq"]  # START, then the missed closings, then the POS
    assert status["journal"]["time_zone"] == "UTC"
    journal_ok(d)


async def test_daemon_sigkill_then_start_records_unclean_stop_clean_stop_does_not(
    start_daemon: StartDaemon, make_pos_sale: Any
) -> None:
    d = await start_daemon(NO_SCHEDULE)
    assert (await d.request(make_pos_sale("s1")))["ok"]
    await d.kill()
    await d.start()
    assert (await d.request(make_pos_sale("s2")))["ok"]
    await d.restart()  # a clean stop this time
    assert await d.stop() == 0

    codes = [e["payload"]["event"] for e in events(d)]
    # the first START and KEY_GENERATED were held for the first chain, before s1
    assert codes == ["START", "KEY_GENERATED", "UNCLEAN_STOP", "START", "STOP", "START", "STOP"]
    unclean = events(d, "UNCLEAN_STOP")[0]["payload"]
    assert unclean["reason"] == "no clean close recorded"
    assert events(d, "START")[0]["payload"]["key_id"] == events(d, "START")[1]["payload"]["key_id"]
    journal_ok(d)


async def test_daemon_close_op_over_socket_and_http_prints_z_report(
    start_daemon: StartDaemon, make_pos_sale: Any
) -> None:
    d = await start_daemon(NO_SCHEDULE)
    assert (await d.request(make_pos_sale("s1")))["ok"]
    reply = await d.request({"id": "z1", "op": "close", "till": "till-1", "period": "MONTHLY"})
    status, http = await d.http_post(
        {"id": "z1", "op": "close", "till": "till-1", "period": "MONTHLY"}
    )
    bad, refused = await d.http_post({"id": "z2", "op": "close", "till": "till-1", "period": "DAY"})
    printed = d.state_dir / "printer" / "virtual-printer.txt"
    await wait_for(lambda: printed.exists() and "CLOSING::MONTHLY" in printed.read_text(), "Z")
    assert await d.stop() == 0

    assert reply["ok"] and reply["record"]["type"] == "CLOSING::MONTHLY"
    assert [c["type"] for c in reply["closings"]] == ["CLOSING::DAILY", "CLOSING::MONTHLY"]
    assert reply["receipt"]["number"] == "till-1-ZM-00000001"
    assert status == 200 and http["replayed"] and http["record"] == reply["record"]
    assert (bad, refused["error"]["code"]) == (400, "VALIDATION_ERROR")
    text = printed.read_text()
    assert "CLOSING::DAILY" not in text  # only the closing asked for is printed
    journal_ok(d)


async def test_daemon_config_changed_on_reload_and_on_restart_recorded(
    start_daemon: StartDaemon, make_pos_sale: Any
) -> None:
    d = await start_daemon(NO_SCHEDULE)
    assert (await d.request(make_pos_sale("s1")))["ok"]
    await d.restart()  # START now has a chain to go to
    first = events(d, "START")[-1]["payload"]["config_sha256"]
    d.config_path.write_text(NO_SCHEDULE + "event_window_s = 30.0\n", "utf-8")
    d.proc.send_signal(signal.SIGHUP)
    reloaded = await wait_for(lambda: events(d, "CONFIG_CHANGED"), "CONFIG_CHANGED on SIGHUP")
    await d.restart()
    assert await d.stop() == 0

    changes = [e["payload"] for e in events(d, "CONFIG_CHANGED")]
    new = hashlib.sha256(d.config_path.read_bytes()).hexdigest()
    assert reloaded[0]["payload"] == {
        "event": "CONFIG_CHANGED",
        "config_sha256": new,
        "previous_sha256": first,
        "reloaded": True,
    }
    assert changes[1] == {"event": "CONFIG_CHANGED", "config_sha256": new, "previous_sha256": first}
    journal_ok(d)
