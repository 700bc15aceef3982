"""Archives while the daemon runs: ``POST /v1/admin/archive`` (bearer token) and the
``fiscal-gateway archive`` command, which asks the running daemon through it. The archive is
made by the daemon's ledger writer and checked from outside with ``verify-export``."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from tests.journal_support import long_first_year

Daemon = Any  # tests/e2e/conftest.py
StartDaemon = Callable[..., Any]
RunCli = Callable[..., subprocess.CompletedProcess[str]]

TOKEN = "archive-admin-token-0123456789"
URL = "/v1/admin/archive"
EXPORTS = "SELECT count(*) FROM records WHERE type = 'EXPORT::RECORDS'"


def config(tmp_path: Path) -> tuple[str, Path]:
    token = tmp_path / "admin.token"
    token.write_text(TOKEN, "utf-8")
    # no scheduled closings and no automatic archives: only what the test asks for
    text = (
        f'[http]\nadmin_token_file = "{token}"\n[journal]\nclosing_time = ""\narchive_period = ""\n'
    )
    return text, token


async def post(d: Daemon, body: Any, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with d.session().post(d.http_url + URL, data=data, headers=headers) as resp:
        return resp.status, await resp.json()


def admin_actions(d: Daemon) -> list[dict[str, Any]]:
    rows = d.query("SELECT body FROM records WHERE type = 'INTENTION::EVENT' ORDER BY seq")
    events = [json.loads(bytes(b))["payload"] for (b,) in rows]
    return [e for e in events if e["event"] == "ADMIN_ACTION" and e.get("action") == "archive"]


async def recorded_actions(d: Daemon, timeout_s: float = 20.0) -> list[dict[str, Any]]:
    """The archive ADMIN_ACTION events, once the event worker has signed one."""
    deadline = time.monotonic() + timeout_s
    while not (found := admin_actions(d)):
        assert time.monotonic() < deadline, "no ADMIN_ACTION recorded"
        await asyncio.sleep(0.05)
    return found


def count(d: Daemon) -> int:
    return int(d.query("SELECT count(*) FROM records")[0][0])


async def test_admin_archive_api_running_daemon_archive_verifies_byte_change_names_record(
    start_daemon: StartDaemon, make_pos_sale: Any, run_cli: RunCli, tmp_path: Path
) -> None:
    text, _ = config(tmp_path)
    d = await start_daemon(text)
    for i in range(3):
        assert (await d.request(make_pos_sale(f"s{i}", 400 + i)))["ok"]

    # nothing closed yet: a clear refusal, nothing changes
    before = count(d)
    status, reply = await post(d, {"period": "MONTHLY"})
    assert (status, reply["error"]["code"]) == (409, "CONFLICT")
    assert "nothing to archive" in reply["error"]["message"]
    assert reply["error"]["details"][0]["field"] == "period"
    # no token, a wrong token: 401 before anything is looked at
    assert (await post(d, {"period": "MONTHLY"}, token=None))[0] == 401
    assert (await post(d, {"period": "MONTHLY"}, token="wrong-token-wrong-token"))[0] == 401
    # bad input: 400/404 naming the field
    status, reply = await post(d, {"period": "WEEKLY", "extra": 1})
    assert (status, reply["error"]["code"]) == (400, "VALIDATION_ERROR")
    assert {x["field"] for x in reply["error"]["details"]} == {"period", "extra"}
    status, reply = await post(d, b"{not json")
    assert (status, reply["error"]["details"][0]["field"]) == (400, "$")
    status, reply = await post(d, {"period": "MONTHLY", "chain": "till-9"})
    assert (status, reply["error"]["code"]) == (404, "NOT_FOUND")
    assert reply["error"]["details"][0]["field"] == "chain"
    assert count(d) == before and admin_actions(d) == []

    closing = await d.request({"id": "z1", "op": "close", "till": "till-1", "period": "MONTHLY"})
    assert closing["ok"], closing
    status, reply = await post(d, {"period": "MONTHLY", "chain": "till-1"})
    assert status == 200, reply
    (made,) = reply["archives"]
    assert made["closing"]["seq"] == closing["record"]["seq"]
    assert made["archive"] == "till-1/MONTHLY-000001"
    out = Path(made["path"])
    assert out == d.state_dir / "archives" / "till-1" / "MONTHLY-000001"
    (recorded,) = d.query(
        "SELECT seq, body FROM records WHERE type = 'EXPORT::RECORDS' AND chain = 'till-1'"
    )
    assert recorded[0] == made["recorded_seq"]
    assert json.loads(bytes(recorded[1]))["payload"]["manifest_hash"] == made["manifest_hash"]
    # each closing is archived once
    status, reply = await post(d, {"period": "MONTHLY"})
    assert (status, reply["error"]["code"]) == (409, "CONFLICT")
    actions = await recorded_actions(d)
    assert [(a["who"], a["outcome"]) for a in actions] == [("admin-api", "ok")]
    assert actions[0]["input"]["archives"] == ["till-1/MONTHLY-000001"]

    # the auditor's check, from outside, while the daemon still runs
    ok = run_cli("verify-export", out, "--db", d.db_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"recorded in the journal as till-1 seq {made['recorded_seq']}" in ok.stdout
    assert await d.stop() == 0

    lines = (out / "records.jsonl").read_bytes().splitlines(keepends=True)
    i = next(n for n, ln in enumerate(lines) if b'"amount":401' in ln)
    victim = json.loads(lines[i])["body"]
    lines[i] = lines[i].replace(b'"amount":401', b'"amount":402', 1)  # one byte
    (out / "records.jsonl").write_bytes(b"".join(lines))
    bad = run_cli("verify-export", out)
    assert bad.returncode == 1, bad.stdout
    assert f"chain 'till-1' seq {victim['seq']}" in bad.stdout


async def test_archive_cli_while_daemon_runs_asks_it_or_says_how(
    start_daemon: StartDaemon, make_pos_sale: Any, run_cli: RunCli, tmp_path: Path
) -> None:
    text, token = config(tmp_path)
    d = await start_daemon(text)
    assert (await d.request(make_pos_sale("s1")))["ok"]
    assert (await d.request({"id": "z1", "op": "close", "till": "till-1", "period": "YEARLY"}))[
        "ok"
    ]

    # without the daemon's address and token: it says what to do, and changes nothing
    before = count(d)
    lost = run_cli("archive", "--db", d.db_path, "--period", "YEARLY")
    assert lost.returncode == 1
    assert "the daemon is running" in lost.stderr and "/v1/admin/archive" in lost.stderr
    assert count(d) == before

    args = ("--db", d.db_path, "--url", d.http_url, "--token-file", token)
    done = run_cli("archive", *args, "--period", "YEARLY")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CLOSING::YEARLY 1" in done.stdout and "by the running daemon" in done.stdout
    again = run_cli("archive", *args, "--period", "YEARLY")
    assert again.returncode == 0 and "nothing to archive" in again.stdout
    # the status page's maintenance action does the same (bearer token: a JSON answer)
    form = {"period": "MONTHLY", "chain": "till-1"}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with d.session().post(d.http_url + "/admin/archive", data=form, headers=auth) as r:
        page = await r.json()
    assert (r.status, page["outcome"]) == (200, "ok"), page
    assert "till-1/MONTHLY-000001 recorded as seq" in page["message"]
    monthly = run_cli("archive", *args, "--period", "MONTHLY", "--chain", "till-1")
    assert monthly.returncode == 0 and "nothing to archive" in monthly.stdout

    archive = d.state_dir / "archives" / "till-1" / "YEARLY-000001"
    checked = run_cli("verify-export", archive, "--db", d.db_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_admin_archive_api_unwritable_archive_dir_500_records_nothing_then_retry_works(
    start_daemon: StartDaemon, make_pos_sale: Any, run_cli: RunCli, tmp_path: Path
) -> None:
    text, _ = config(tmp_path)
    d = await start_daemon(text)
    assert (await d.request(make_pos_sale("s1")))["ok"]
    assert (await d.request({"id": "z1", "op": "close", "till": "till-1", "period": "MONTHLY"}))[
        "ok"
    ]
    blocker = d.state_dir / "archives"
    blocker.write_text("not a directory")  # the archive root cannot be made

    status, reply = await post(d, {"period": "MONTHLY"})
    assert (status, reply["error"]["code"]) == (500, "STORAGE_ERROR")
    (failed,) = reply["failed"]
    assert failed["chain"] == "till-1" and failed["closing"]["type"] == "CLOSING::MONTHLY"
    assert reply["archives"] == []
    assert d.query("SELECT count(*) FROM records WHERE type = 'EXPORT::RECORDS'") == [(0,)]
    assert [a["outcome"] for a in await recorded_actions(d)] == ["failed"]

    blocker.unlink()  # the technician fixes it; the same request now archives
    status, reply = await post(d, {"period": "MONTHLY"})
    assert status == 200 and len(reply["archives"]) == 1
    checked = run_cli("verify-export", reply["archives"][0]["path"], "--db", d.db_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_admin_archive_api_yearly_over_366_days_409_skipped_monthly_200(
    start_daemon: StartDaemon,
    make_sale: Any,
    signer: Any,
    key_path: Path,
    run_cli: RunCli,
    tmp_path: Path,
) -> None:
    """A journal whose first fiscal year ran thirteen months (made beforehand on a clock
    thirteen months back): the YEARLY archive is refused as a conflict naming the closing,
    changes nothing, and says to archive the months, which works."""
    db = tmp_path / "long.db"
    yearly = await long_first_year(db, signer, make_sale)
    text, token = config(tmp_path)
    text += f'[ledger]\ndatabase = "{db}"\n[signing]\nkey_file = "{key_path}"\n'
    d = await start_daemon(text)

    def exports() -> int:  # the daemon's journal is the one made above, not d.db_path
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10.0)) as conn:
            return int(conn.execute(EXPORTS).fetchone()[0])

    status, reply = await post(d, {"period": "YEARLY"})
    assert (status, reply["error"]["code"]) == (409, "CONFLICT"), reply
    assert "span more than 366 days" in reply["error"]["message"]
    (detail,) = reply["error"]["details"]
    assert (detail["field"], detail["code"]) == ("period", "PERIOD_TOO_LONG")
    (skipped,) = reply["skipped"]
    assert skipped["closing"]["seq"] == yearly["seq"] and skipped["chain"] == "till-1"
    assert "--period MONTHLY" in skipped["reason"]
    assert exports() == 0 and not (d.state_dir / "archives").exists()
    # the command through the daemon and the status page's action say the same
    args = ("--db", db, "--url", d.http_url, "--token-file", token, "--period", "YEARLY")
    cli = run_cli("archive", *args)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "skipped: till-1 CLOSING::YEARLY 1 spans 404 days" in cli.stdout
    auth = {"Authorization": f"Bearer {TOKEN}"}
    form = {"period": "YEARLY"}
    async with d.session().post(d.http_url + "/admin/archive", data=form, headers=auth) as r:
        page = await r.json()
    assert (r.status, page["outcome"]) == (409, "refused"), page
    assert "nothing archived; skipped: till-1 CLOSING::YEARLY 1" in page["message"]
    assert exports() == 0

    status, reply = await post(d, {"period": "MONTHLY"})
    assert status == 200 and len(reply["archives"]) == 14 and "skipped" not in reply, reply
    assert exports() == 14
    status, reply = await post(d, {"period": "YEARLY"})  # still refused, the same way
    assert status == 409 and reply["skipped"][0]["closing"]["number"] == 1
    assert exports() == 14
    assert await d.stop() == 0
