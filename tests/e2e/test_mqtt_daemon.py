"""The daemon with MQTT on, as a real subprocess, against a real Mosquitto (DESIGN.md §8).

What only the whole daemon shows: the retained status is the app's status and follows it, the
Last Will marks a SIGKILLed gateway offline, alerts reach the events topic, requests published
while the gateway is dead wait in its persistent session and are each signed exactly once after
the restart, and a broker that is down changes nothing for the POS socket.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from mqtt_support import Broker, Till, sale, subscribe_once, wait_until

pytestmark = pytest.mark.timeout(180)

STATUS = "fiscal/gw-1/status"
EVENTS = "fiscal/gw-1/events"


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Broker]:
    b = Broker(tmp_path / "broker")
    await b.start()
    try:
        yield b
    finally:
        await b.kill()


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
    assert {"outbox", "offline"} <= first.keys()

    async with Till(broker.port) as till:
        signed = await till.request(sale("s1"))
        assert signed["ok"], signed
        # the retained status follows the chain head (on change, not only periodically)
        after = await subscribe_once(broker.port, STATUS, predicate=online(lambda s: head(s) == 1))
        assert after["chains"][0]["hash"] == signed["record"]["hash"]
        # the status op over MQTT is the app's status too
        status = await till.request({"id": "q1", "op": "status", "till": "till-1"})
        assert status["status"]["mqtt"]["connected"] is True
        assert status["status"]["chains"][0]["seq"] == 1
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
    await broker.kill()
    for i in range(5):
        reply = await asyncio.wait_for(d.request(sale(f"pos-{i}")), 5.0)
        assert reply["ok"], reply
    status = await d.status()
    assert status["mqtt"]["connected"] is False and status["mqtt"]["last_error"]
    await broker.start()
    back = await subscribe_once(broker.port, STATUS, predicate=online(lambda s: head(s) == 5))
    assert back["mqtt"]["connects"] >= 2
    async with Till(broker.port) as till:
        reply = await till.request(sale("mqtt-1"))
    assert reply["ok"] and reply["record"]["seq"] == 6
