"""The daemon with MQTT on, as a real subprocess, against a real Mosquitto (DESIGN.md §8).

What only the whole daemon shows: the retained status is the app's status and follows it, the
Last Will marks a SIGKILLed gateway offline, alerts reach the events topic, requests published
while the gateway is dead wait in its persistent session and are each signed exactly once after
the restart, and a broker that is down changes nothing for the POS socket.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mqtt_support import Broker, Till, sale, subscribe_once, wait_until

pytestmark = pytest.mark.timeout(180)

STATUS = "fiscal/gw-1/status"
EVENTS = "fiscal/gw-1/events"


def online(pred: Callable[[dict[str, Any]], bool] = lambda s: True) -> Any:
    return lambda s: s.get("online") is True and pred(s)


def head(status: dict[str, Any], chain: str = "till-1") -> int:
    return next((c["seq"] for c in status.get("chains", []) if c["chain"] == chain), 0)


async def test_mqtt_daemon_status_retained_last_will_and_alerts_seen_by_subscriber(
    broker: Broker, start_daemon: Any
) -> None:
    d = await start_daemon(broker.gateway_config())
    first = await subscribe_once(broker.port, STATUS, predicate=online())
    assert first["gateway"]["id"] == "gw-1" and first["signing"]["ok"] is True
    assert first["chains"] == [] and first["printer"]["kind"] == "virtual"
    assert {"outbox", "offline", "review", "disk"} <= first.keys()
    # not the status page's lists: each would scan the records table every status_check_s
    assert not {"recent_records", "events"} & first.keys()
    s1 = d.held_events() + 1  # the chain opens with the held START, KEY_GENERATED

    async with Till(broker.port) as till:
        signed = await till.request(sale("s1"))
        assert signed["ok"], signed
        # the retained status follows the chain head (on change, not only periodically)
        after = await subscribe_once(broker.port, STATUS, predicate=online(lambda s: head(s) == s1))
        assert after["chains"][0]["hash"] == signed["record"]["hash"]
        # the status op over MQTT is the app's status too
        status = await till.request({"id": "q1", "op": "status", "till": "till-1"})
        assert status["status"]["mqtt"]["connected"] is True
        assert status["status"]["chains"][0]["seq"] == s1
        assert {"recent_records", "events"} <= status["status"].keys()  # the full status
        # an async batch and its job, over MQTT
        job = await till.request(
            {
                "id": "b1",
                "op": "batch",
                "till": "till-1",
                "options": {"async": True},
                "operations": [
                    {"operation": "sign", "referenceId": f"r{i}",
                     "data": {k: v for k, v in sale("x", amount=300 + i).items()
                              if k not in ("id", "op", "till")}}
                    for i in range(3)
                ],
            }
        )  # fmt: skip
        job_id = job["job"]["jobId"]
        for i in range(200):
            polled = await till.request({"id": f"j{i}", "op": "job", "jobId": job_id})
            if polled["job"]["status"] == "completed":
                break
            await asyncio.sleep(0.05)
        assert polled["job"]["batch"]["successfulRecords"] == 3, polled

    # SIGKILL: the broker publishes the Last Will, retained
    await d.kill()
    gone = await subscribe_once(broker.port, STATUS)
    assert gone == {"online": False}

    # a printer that fails after the restart: an alert on the events topic
    printer_file = d.state_dir / "printer" / "virtual-printer.txt"
    printer_file.unlink()
    printer_file.mkdir()
    events: asyncio.Task[dict[str, Any]] = asyncio.create_task(
        subscribe_once(broker.port, EVENTS, predicate=lambda e: e["alert"] == "printer_fault")
    )
    await asyncio.sleep(0.3)
    await d.start()
    back = await subscribe_once(broker.port, STATUS, predicate=online())
    assert head(back) >= 6  # 4 sales, then the UNCLEAN_STOP and START events of the restart
    async with Till(broker.port) as till:
        assert (await till.request(sale("s2")))["ok"]
    alert = await events
    assert alert["gateway"] == "gw-1" and alert["severity"] == "warning"
    assert "IsADirectoryError" in alert["message"] or "directory" in alert["message"]
    shutil.rmtree(printer_file)

    # a clean stop publishes the offline status itself (no Will on a normal DISCONNECT)
    assert await d.stop() == 0
    assert await subscribe_once(broker.port, STATUS) == {"online": False}


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
async def test_mqtt_daemon_sigkilled_with_requests_queued_signs_each_once_and_answers_all(
    broker: Broker, start_daemon: Any, journal_check: Any, protocol: str
) -> None:
    d = await start_daemon(broker.gateway_config(protocol=protocol))
    await subscribe_once(broker.port, STATUS, predicate=online())
    tills = [Till(broker.port, f"till-{i}", protocol=p) for i, p in enumerate(("5", "3.1.1", "5"))]
    per_till = 30
    ids = {t.till: [f"{t.till}-r{i}" for i in range(per_till)] for t in tills}
    sent_while_dead = 0
    killed = asyncio.Event()
    restarted = asyncio.Event()

    async def stream(t: Till) -> None:
        nonlocal sent_while_dead
        for rid in ids[t.till]:
            await t.send(sale(rid, till=t.till))
            if killed.is_set() and not restarted.is_set():
                sent_while_dead += 1
            await asyncio.sleep(0.01)

    for t in tills:
        await t.connect()
    try:
        streams = [asyncio.create_task(stream(t)) for t in tills]
        await wait_until(lambda: sum(len(t.by_id) for t in tills) >= 20, what="20 replies")
        await d.kill()
        killed.set()
        await asyncio.sleep(0.4)  # the tills keep publishing into the gateway's session
        await d.start()
        restarted.set()
        await asyncio.gather(*streams)
        await wait_until(
            lambda: all(set(t.by_id) == set(ids[t.till]) for t in tills),
            what="a reply to every request",
            timeout_s=60,
        )
    finally:
        for t in tills:
            await t.disconnect()

    assert sent_while_dead > 0, "some requests must have waited in the session"
    replies = [r for t in tills for rs in t.by_id.values() for r in rs]
    assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3]
    for t in tills:
        rows = d.query(  # the restart's UNCLEAN_STOP and START events fall between
            "SELECT seq, request_id FROM records WHERE chain = ? "
            "AND type != 'INTENTION::EVENT' ORDER BY seq",
            (t.till,),
        )
        assert len(rows) == per_till
        assert sorted(rid for _, rid in rows) == sorted(ids[t.till]), "each signed exactly once"
        # a request answered twice (redelivered after the kill) got the same record both times
        for rs in t.by_id.values():
            assert len({r["record"]["hash"] for r in rs}) == 1
    journal_check(d.db_path, [r["record"] for r in replies])


async def test_mqtt_daemon_broker_down_socket_signing_unaffected(
    broker: Broker, start_daemon: Any
) -> None:
    d = await start_daemon(broker.gateway_config())
    await subscribe_once(broker.port, STATUS, predicate=online())
    held = d.held_events()
    await broker.kill()
    for i in range(5):
        reply = await asyncio.wait_for(d.request(sale(f"pos-{i}")), 5.0)
        assert reply["ok"], reply
    status = await d.status()
    assert status["mqtt"]["connected"] is False and status["mqtt"]["last_error"]
    await broker.start()
    back = await subscribe_once(
        broker.port, STATUS, predicate=online(lambda s: head(s) == held + 5)
    )
    assert back["mqtt"]["connects"] >= 2
    async with Till(broker.port) as till:
        reply = await till.request(sale("mqtt-1"))
    assert reply["ok"] and reply["record"]["seq"] == held + 6


# ---------------------------------------------------------------------- docs/mqtt.md, "Try it"

DOCS = Path(__file__).resolve().parents[2] / "docs" / "mqtt.md"


def try_it_commands() -> list[str]:
    """The shell commands of docs/mqtt.md's "Try it" block, continuation lines joined."""
    text = DOCS.read_text("utf-8")
    block = text.split("## Try it", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            commands.append(current.strip())
            current = ""
    return commands


async def test_mqtt_docs_try_it_commands_work_as_written(broker: Broker, start_daemon: Any) -> None:
    # Every command of the "Try it" block, as written but for the broker's port, against the
    # daemon: background ones (`&`, subscribers without -C) keep running until checked. The
    # words are split as the shell splits them (shlex), and run without a shell.
    await start_daemon(broker.gateway_config())
    await subscribe_once(broker.port, STATUS, predicate=online())
    commands = try_it_commands()
    assert [c.split()[0] for c in commands] == [
        "mosquitto_rr", "mosquitto_sub", "mosquitto_pub", "mosquitto_pub",
        "mosquitto_sub", "mosquitto_sub", "mosquitto_rr",
    ]  # fmt: skip
    outputs: list[str] = []
    background: list[asyncio.subprocess.Process] = []
    try:
        for command in commands:
            shell = command.replace("-h localhost", f"-h 127.0.0.1 -p {broker.port}")
            assert shell != command, command
            argv = shlex.split(shell.rstrip("& "))
            if shell.endswith("&") or (shell.startswith("mosquitto_sub") and " -C " not in shell):
                proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
                background.append(proc)
                await asyncio.sleep(0.3)  # let the subscription reach the broker
                outputs.append("")
                continue
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode == 0, (command, err)
            outputs.append(out.decode())
        signed = json.loads(outputs[0])
        assert signed["ok"] and signed["record"]["request_id"] == "t-000123", signed
        assert json.loads(outputs[4])["online"] is True  # the retained status
        bad = json.loads(outputs[6])
        assert (bad["id"], bad["ok"], bad["error"]["code"]) == (None, False, "PROTOCOL_ERROR")
        # the 3.1.1 listener got the cancel's and the status op's replies
        replies_of = background[0].stdout
        assert replies_of is not None
        got = {}
        while len(got) < 2:
            line = await asyncio.wait_for(replies_of.readline(), 20)
            reply = json.loads(line)
            got[reply["id"]] = reply
        assert got["t-000124"]["ok"], got["t-000124"]
        assert got["t-000124"]["record"]["payload"]["ref"]["hash"] == signed["record"]["hash"]
        assert got["q-1"]["ok"] and got["q-1"]["status"]["signing"]["ok"]
        # "Sending the first command again answers the same record with replayed: true"
        shell = commands[0].replace("-h localhost", f"-h 127.0.0.1 -p {broker.port}")
        proc = await asyncio.create_subprocess_exec(
            *shlex.split(shell), stdout=asyncio.subprocess.PIPE
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 20)
        again = json.loads(out)
        assert again["replayed"] is True and again["record"] == signed["record"]
        assert all(p.returncode is None for p in background), "a listener exited early"
    finally:
        for p in background:
            if p.returncode is None:
                p.terminate()
                await asyncio.wait_for(p.wait(), 10)


async def test_mqtt_daemon_sighup_reloads_acl_live_rest_of_mqtt_needs_restart(
    broker: Broker, start_daemon: Any
) -> None:
    """``[mqtt.acl]`` changes apply on SIGHUP, from the next request on, without dropping the
    broker connection; another ``[mqtt]`` change in the same file is reported, not applied.
    (This broker has no acl_file: the gateway's own check is what refuses.)"""
    base = broker.gateway_config()
    d = await start_daemon(base + '[mqtt.acl]\nacct-1 = ["till-1"]\n')
    assert d.config_path is not None and d.proc is not None

    def log_lines() -> list[str]:
        lines = [json.loads(x) for x in d.stderr_text().splitlines() if x.startswith("{")]
        return [str(r.get("msg", "")) for r in lines]

    async with Till(broker.port, "till-1") as t1, Till(broker.port, "till-2") as t2:
        assert (await t1.request(sale("a1")))["ok"]
        refused = await t2.request(sale("b1", till="till-2"))
        assert refused["error"]["code"] == "UNKNOWN_TILL", refused
        connects = (await t1.request({"id": "q1", "op": "status", "till": "till-1"}))["status"][
            "mqtt"
        ]["connects"]

        d.config_path.write_text(base + '[mqtt.acl]\nacct-1 = ["till-1"]\nstore = ["till-2"]\n')
        d.proc.send_signal(signal.SIGHUP)
        await wait_until(
            lambda: "mqtt.acl reloaded: 2 account(s), 2 till(s)" in log_lines(),
            what="the ACL reloaded",
        )
        signed = await t2.request(sale("b2", till="till-2"))
        assert signed["ok"] and signed["record"]["chain"] == "till-2", signed
        mqtt = (await t1.request({"id": "q2", "op": "status", "till": "till-1"}))["status"]["mqtt"]
        assert mqtt["acl"] == {"tills": 2, "refused": 1} and mqtt["connects"] == connects
        assert not any("restart to apply" in m for m in log_lines())

        # the ACL goes, and keepalive_s changes in the same file: the first applies, the
        # second is only reported
        d.config_path.write_text(broker.gateway_config(keepalive_s=45))
        d.proc.send_signal(signal.SIGHUP)
        await wait_until(
            lambda: "config section [mqtt] changed; restart to apply it" in log_lines(),
            what="the restart warning",
        )
        assert "mqtt.acl reloaded: none (any till the broker lets through)" in log_lines()
        async with Till(broker.port, "till-3") as t3:  # no ACL: any till is served again
            assert (await t3.request(sale("c1", till="till-3")))["ok"]
        mqtt = (await t1.request({"id": "q3", "op": "status", "till": "till-1"}))["status"]["mqtt"]
        assert mqtt["acl"] is None and mqtt["connects"] == connects
