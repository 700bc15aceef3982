"""The MQTT transport against a real Mosquitto, a real ledger on disk and real MQTT tills.

Each test starts ``mosquitto`` on a free port (tests/mqtt_support.py), runs
:class:`gateway.mqtt.MqttTransport` in-process in front of a real :class:`Dispatcher` and
:class:`Ledger`, and talks to it only as a till would: aiomqtt clients, ``mosquitto_rr`` and
``mosquitto_pub``/``mosquitto_sub``. What the daemon adds (the app's status, the Last Will on
SIGKILL, restarts with a queued session) is tested end to end in tests/e2e/test_mqtt_daemon.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import sys
import threading
import tomllib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from mqtt_support import Broker, Till, make_pki, sale, wait_until

from gateway.audit import verify_db
from gateway.config import Config, parse_config
from gateway.core.request import Rules
from gateway.dispatch import Dispatcher
from gateway.ledger import Ledger
from gateway.mqtt import MqttTransport

pytestmark = pytest.mark.timeout(120)

BASE = "fiscal/gw-1/tills"


def gateway_cfg(broker: Broker, extra: str = "", **mqtt: Any) -> Config:
    return parse_config(tomllib.loads(broker.gateway_config(**mqtt) + extra))


async def ledger_status(ledger: Ledger) -> dict[str, Any]:
    """The chain heads part of the app's status (the whole status is tested end to end)."""
    return {
        "signing": {"ok": ledger.halted is None, "halted_reason": ledger.halted},
        "chains": [{"chain": c, "seq": h.seq} for c, h in sorted(ledger.heads().items())],
    }


@asynccontextmanager
async def serving(ledger: Ledger, cfg: Config, *, connected: bool = True) -> AsyncIterator[Any]:
    """The transport running in front of a dispatcher on ``ledger``; stopped on exit."""
    async with asyncio.TaskGroup() as tg:
        dispatcher = Dispatcher(
            ledger,
            rules=Rules(cfg.ledger.vat_rates, cfg.ledger.currencies),
            allowed_tills=cfg.tills.allowed,
            status=lambda: ledger_status(ledger),
            spawn=lambda coro: tg.create_task(coro),
        )
        transport = MqttTransport(
            cfg.mqtt,
            gateway_id=cfg.gateway.id,
            dispatcher=dispatcher,
            status=lambda: ledger_status(ledger),
            resolve_path=cfg.path,
        )
        task = tg.create_task(transport.run())
        try:
            if connected:
                await wait_until(lambda: transport.state()["connected"], what="gateway connected")
            yield transport
        finally:
            await transport.stop(5.0)
            await asyncio.wait_for(task, 10.0)


def records(db: Path, till: str = "till-1") -> list[tuple[int, str]]:
    """(seq, request_id) of every record on a till's chain."""
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT seq, body FROM records WHERE chain = ? ORDER BY seq", (till,))
        return [(seq, json.loads(body)["request_id"]) for seq, body in rows]


# ---------------------------------------------------------------------- the operations


async def test_mqtt_v5_operations_reply_on_response_topic_with_correlation(
    broker: Broker, ledger: Ledger, db_path: Path
) -> None:
    cfg = gateway_cfg(broker)
    async with serving(ledger, cfg), Till(broker.port) as till:
        signed = await till.request(sale("s1"))
        assert signed["ok"] and signed["replayed"] is False, signed
        assert signed["record"]["seq"] == 1 and signed["record"]["request_id"] == "s1"
        assert signed["receipt"]["number"] == "till-1-R-00000001"

        cancelled = await till.request(
            {"id": "c1", "op": "cancel", "till": "till-1", "ref": {"chain": "till-1", "seq": 1}}
        )
        assert cancelled["ok"], cancelled
        assert cancelled["record"]["type"] == "TRANSACTION::CANCELLATION"

        batch = await till.request(
            {
                "id": "b1",
                "op": "batch",
                "till": "till-1",
                "operations": [
                    {"operation": "sign", "referenceId": "r1",
                     "data": _data(sale("x", amount=900))},
                    {"operation": "reprint", "referenceId": "r2",
                     "data": {"ref": {"chain": "till-1", "seq": 1}}},
                ],
            }
        )  # fmt: skip
        assert batch["ok"] and batch["batch"]["status"] == "completed", batch
        assert [r["record"]["seq"] for r in batch["batch"]["results"]] == [3, 4]

        status = await till.request({"id": "q1", "op": "status", "till": "till-1"})
        assert status["ok"] and status["status"]["chains"] == [{"chain": "till-1", "seq": 4}]

        again = await till.request(sale("s1"))
        assert again["ok"] and again["replayed"] is True
        assert again["record"] == signed["record"]

    # every reply came on the request's response topic, with its id as correlation data
    assert [(t, c) for t, _, c in till.replies] == [
        (till.response_topic, rid.encode()) for rid in ("s1", "c1", "b1", "q1", "s1")
    ]
    assert records(db_path) == [(1, "s1"), (2, "c1"), (3, "b1#r1"), (4, "b1#r2")]
    assert verify_db(db_path).ok


def _data(request: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in request.items() if k not in ("id", "op", "till")}


@pytest.mark.parametrize("gateway_protocol", ["5", "3.1.1"])
async def test_mqtt_v311_till_gets_replies_on_res_topic_matched_by_id(
    broker: Broker, ledger: Ledger, db_path: Path, gateway_protocol: str
) -> None:
    cfg = gateway_cfg(broker, protocol=gateway_protocol)
    async with serving(ledger, cfg), Till(broker.port, protocol="3.1.1") as till:
        replies = [await till.request(sale(f"s{i}", amount=500 + i)) for i in range(3)]
        cancel = await till.request(
            {"id": "c1", "op": "cancel", "till": "till-1", "ref": {"chain": "till-1", "seq": 2}}
        )
        status = await till.request({"id": "q1", "op": "status"})
    assert [r["record"]["seq"] for r in replies] == [1, 2, 3]
    assert cancel["ok"] and status["ok"]
    assert {t for t, _, _ in till.replies} == {f"{BASE}/till-1/res"}
    assert [c for _, _, c in till.replies] == [None] * 5
    assert records(db_path) == [(1, "s0"), (2, "s1"), (3, "s2"), (4, "c1")]


async def test_mqtt_v311_correction_reprint_and_closing_like_the_socket(
    broker: Broker, ledger: Ledger, db_path: Path
) -> None:
    # The operations the socket has beyond sign/cancel/batch/status, from a 3.1.1 till.
    async with serving(ledger, gateway_cfg(broker)), Till(broker.port, protocol="3.1.1") as till:
        assert (await till.request(sale("s1", amount=900)))["ok"]
        ref = {"chain": "till-1", "seq": 1}
        fields = {k: v for k, v in sale("k", amount=700).items() if k not in ("id", "op", "type")}
        corrected = await till.request({**fields, "id": "k1", "op": "correction", "ref": ref})
        assert corrected["ok"], corrected
        assert corrected["record"]["type"] == "TRANSACTION::CORRECTION"
        copy = await till.request({"id": "p1", "op": "reprint", "till": "till-1", "ref": ref})
        assert copy["ok"] and copy["record"]["type"] == "INTENTION::DUPLICATE", copy
        closing = {"id": "z1", "op": "close", "till": "till-1", "period": "MONTHLY"}
        closed = await till.request(closing)
        assert closed["ok"], closed
        assert [c["type"] for c in closed["closings"]] == ["CLOSING::DAILY", "CLOSING::MONTHLY"]
        again = await till.request(closing)
        assert again["replayed"] is True and again["record"] == closed["record"]
    assert records(db_path) == [(1, "s1"), (2, "k1"), (3, "p1"), (4, "z1#daily"), (5, "z1")]
    assert verify_db(db_path).ok


async def _run(*argv: str, timeout_s: float = 20.0) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode == 0, (argv, out, err)
    return out.decode()


async def test_mqtt_command_line_tills_get_signed_replies(
    broker: Broker, ledger: Ledger, db_path: Path
) -> None:
    port = str(broker.port)
    async with serving(ledger, gateway_cfg(broker)):
        # MQTT v5: mosquitto_rr sets a response topic and waits for the reply there
        out = await _run(
            "mosquitto_rr", "-p", port, "-q", "1", "-W", "15",
            "-t", f"{BASE}/till-1/req", "-e", f"{BASE}/till-1/res/rr",
            "-m", json.dumps(sale("cli-1")),
        )  # fmt: skip
        reply = json.loads(out)
        assert reply["ok"] and reply["record"]["request_id"] == "cli-1", reply

        # MQTT 3.1.1: subscribe to the till's res topic, then publish at QoS 1
        sub = await asyncio.create_subprocess_exec(
            "mosquitto_sub", "-V", "mqttv311", "-p", port, "-q", "1", "-C", "1", "-W", "15",
            "-t", f"{BASE}/till-2/res",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(0.3)  # let the subscription reach the broker
        await _run(
            "mosquitto_pub", "-V", "mqttv311", "-p", port, "-q", "1",
            "-t", f"{BASE}/till-2/req", "-m", json.dumps(sale("cli-2", till="till-2")),
        )  # fmt: skip
        out_b, err_b = await asyncio.wait_for(sub.communicate(), 20)
        assert sub.returncode == 0, err_b
        reply2 = json.loads(out_b)
        assert reply2["id"] == "cli-2" and reply2["ok"], reply2
        assert reply2["record"]["chain"] == "till-2"
    assert records(db_path) == [(1, "cli-1")]
    assert records(db_path, "till-2") == [(1, "cli-2")]


# ---------------------------------------------------------------------- bad input


async def test_mqtt_garbage_payloads_get_error_replies_and_sign_nothing(
    broker: Broker, ledger: Ledger, db_path: Path
) -> None:
    cfg = gateway_cfg(broker, max_payload_bytes=4096, extra='[tills]\nallowed = ["till-1"]\n')
    async with serving(ledger, cfg), Till(broker.port) as till:
        cases: dict[str, tuple[bytes, dict[str, Any]]] = {
            "not-json": (b"{nope", {}),
            "not-utf8": (b"\xff\xfe{}", {}),
            "not-object": (b"[1, 2]", {}),
            "empty": (b"", {}),
            "oversize": (json.dumps({**sale("big"), "pad": "x" * 5000}).encode(), {}),
            "unknown-op": (json.dumps({"id": "u1", "op": "boom", "till": "till-1"}).encode(), {}),
            "float": (json.dumps({**sale("f1"), "total": 6.3}).encode(), {}),
            "mismatch": (json.dumps(sale("m1", till="till-9")).encode(), {}),
            "foreign-response-topic": (
                json.dumps(sale("rt1")).encode(),
                {"response_topic": "fiscal/gw-1/status"},
            ),
        }
        replies = {}
        for key, (payload, kwargs) in cases.items():
            replies[key] = await till.raw_request(payload, key, **kwargs)
        # a till that is not configured, on its own topic
        other = Till(broker.port, "till-7")
        async with other:
            replies["unknown-till"] = await other.request(sale("t7", till="till-7"))
        ok = await till.request(sale("good"))

    codes = {k: (r["ok"], r["error"]["code"]) for k, r in replies.items()}
    assert codes == {
        "not-json": (False, "PROTOCOL_ERROR"),
        "not-utf8": (False, "PROTOCOL_ERROR"),
        "not-object": (False, "PROTOCOL_ERROR"),
        "empty": (False, "PROTOCOL_ERROR"),
        "oversize": (False, "LINE_TOO_LONG"),
        "unknown-op": (False, "VALIDATION_ERROR"),
        "float": (False, "VALIDATION_ERROR"),
        "mismatch": (False, "UNKNOWN_TILL"),
        "foreign-response-topic": (False, "PROTOCOL_ERROR"),
        "unknown-till": (False, "UNKNOWN_TILL"),
    }
    assert "FLOAT_NOT_ALLOWED" in {d["code"] for d in replies["float"]["error"]["details"]}
    assert replies["mismatch"]["id"] == "m1"
    # the refused response topic was not used: the reply came on the till's own topic
    assert all(t.startswith(f"{BASE}/till-1/res") for t, _, _ in till.replies)
    assert ok["ok"] and ok["record"]["seq"] == 1
    assert records(db_path) == [(1, "good")]
    assert records(db_path, "till-9") == records(db_path, "till-7") == []


async def test_mqtt_flooding_till_gets_busy_and_other_till_is_served(
    broker: Broker, ledger: Ledger, db_path: Path
) -> None:
    cfg = gateway_cfg(broker, max_inflight_per_till=2, max_queued_per_till=3)
    n = 80
    async with (
        serving(ledger, cfg),
        Till(broker.port, "till-a") as a,
        Till(broker.port, "till-b") as b,
    ):
        ids = [f"a{i}" for i in range(n)]
        waiters = [a.expect(i) for i in ids]
        await asyncio.gather(*(a.send(sale(i, till="till-a")) for i in ids))
        b_reply = await b.request(sale("b1", till="till-b"))
        first = dict(zip(ids, await asyncio.gather(*waiters), strict=True))
        busy = [i for i, r in first.items() if not r["ok"]]
        # the till retries what was refused, with the same ids, until everything is signed
        while busy:
            retried = await asyncio.gather(*(a.request(sale(i, till="till-a")) for i in busy))
            busy = [r["id"] for r in retried if not r["ok"]]
    assert b_reply["ok"], b_reply
    refused = [r for r in first.values() if not r["ok"]]
    assert refused, "a flood of 80 requests at once must exceed 2 in flight + 3 queued"
    assert {r["error"]["code"] for r in refused} == {"BUSY"}
    assert sorted(rid for _, rid in records(db_path, "till-a")) == sorted(ids)
    assert [s for s, _ in records(db_path, "till-a")] == list(range(1, n + 1))
    assert records(db_path, "till-b") == [(1, "b1")]


# ---------------------------------------------------------------------- broker failures


async def _resilient_till(
    port: int, till: str, ids: list[str], answers: dict[str, dict[str, Any]], pace_s: float
) -> None:
    """A till that survives broker restarts: on every (re)connect, and every second, it
    re-sends each request that has no reply yet, with the same id.

    A killed broker forgets what it had not saved (sessions, queued messages): requests
    published before the gateway is subscribed again are lost at the broker, and only the
    till's retry brings them back. Dedup by (till, id) makes the retry safe."""
    t = Till(port, till, client_id=f"{till}-resilient", persistent=True)
    sent = 0
    while len(answers) < len(ids):
        try:
            await t.connect()
            try:
                for rid in ids[:sent]:
                    if rid not in answers:
                        await t.send(sale(rid, till=till))
                last_resend = asyncio.get_running_loop().time()
                while len(answers) < len(ids):
                    if sent < len(ids):
                        await t.send(sale(ids[sent], till=till))
                        sent += 1
                    await asyncio.sleep(pace_s)
                    for rid, got in t.by_id.items():
                        answers.setdefault(rid, got[0])
                    now = asyncio.get_running_loop().time()
                    if now - last_resend > 1.0:
                        last_resend = now
                        for rid in ids[:sent]:
                            if rid not in answers:
                                await t.send(sale(rid, till=till))
            finally:
                await t.disconnect()
        except aiomqtt.MqttError:
            await asyncio.sleep(0.1)


async def test_mqtt_broker_killed_mid_stream_each_request_signed_once_and_answered(
    broker: Broker, ledger: Ledger, db_path: Path
) -> None:
    tills = ("till-1", "till-2", "till-3")
    ids = {t: [f"{t}-r{i}" for i in range(40)] for t in tills}
    answers: dict[str, dict[str, dict[str, Any]]] = {t: {} for t in tills}
    async with serving(ledger, gateway_cfg(broker)) as transport:
        runs = [
            asyncio.create_task(_resilient_till(broker.port, t, ids[t], answers[t], 0.02))
            for t in tills
        ]
        await wait_until(lambda: sum(map(len, answers.values())) >= 30, what="30 replies")
        await broker.kill()
        await asyncio.sleep(0.5)
        await broker.start()
        async with asyncio.timeout(60):
            await asyncio.gather(*runs)
        assert transport.connects >= 2
    for t in tills:
        assert set(answers[t]) == set(ids[t])
        assert all(r["ok"] for r in answers[t].values()), answers[t]
        signed = records(db_path, t)
        assert sorted(rid for _, rid in signed) == sorted(ids[t]), "each request signed once"
        assert [s for s, _ in signed] == list(range(1, 41))
        by_rid = {rid: seq for seq, rid in signed}
        assert all(r["record"]["seq"] == by_rid[rid] for rid, r in answers[t].items())
    assert verify_db(db_path).ok


async def test_mqtt_requests_read_but_unanswered_at_stop_are_redelivered_and_signed_once(
    broker: Broker, ledger: Ledger, db_path: Path
) -> None:
    # Manual acks: a request the gateway has read but not answered is not acknowledged, so
    # the broker delivers it again to the next gateway session (auto-ack would lose it).
    cfg = gateway_cfg(broker, max_inflight_per_till=200, max_queued_per_till=200)
    ids = [f"r{i}" for i in range(150)]
    # The ledger writer is parked while the first session reads the requests, so none of them
    # can be answered before the stop (the condition under test, made certain, not raced).
    entered, release = threading.Event(), threading.Event()

    def park(conn: object) -> None:
        entered.set()
        release.wait(30)

    async with Till(broker.port) as till:
        parked = asyncio.create_task(ledger.control(park))
        try:
            assert await asyncio.to_thread(entered.wait, 30), "writer did not park"
            async with serving(ledger, cfg) as first:
                await asyncio.gather(*(till.send(sale(i)) for i in ids))
                await wait_until(lambda: first.received == len(ids), what="all requests read")
                await first.stop(0.0)  # in-flight requests are cancelled before replying
        finally:
            release.set()
            await parked
        unanswered = first.received - first.replied
        assert unanswered == len(ids), (first.received, first.replied)
        async with serving(ledger, cfg) as second:
            await wait_until(lambda: set(till.by_id) == set(ids), what="every reply")
            assert second.received >= unanswered
    replies = [r for rs in till.by_id.values() for r in rs]
    assert all(r["ok"] for r in replies)
    assert sorted(rid for _, rid in records(db_path)) == sorted(ids)
    assert [s for s, _ in records(db_path)] == list(range(1, len(ids) + 1))


async def test_mqtt_reply_held_by_a_full_window_is_acked_only_after_the_broker_took_it(
    broker: Broker, ledger: Ledger, db_path: Path
) -> None:
    # The request's PUBACK normally follows its reply at once (docs/mqtt.md "Exactly once").
    # When paho holds the reply back (its in-flight window, receive_maximum, is full), the
    # acknowledgement must wait for the broker's PUBACK of the reply; else it would overtake
    # the reply. Made certain: window 1, filled by a publish the stopped broker cannot answer.
    cfg = gateway_cfg(broker, receive_maximum=1)
    entered, release = threading.Event(), threading.Event()

    def park(conn: object) -> None:
        entered.set()
        release.wait(30)

    assert broker.proc is not None
    async with Till(broker.port) as till:
        async with serving(ledger, cfg) as first:
            parked = asyncio.create_task(ledger.control(park))
            try:
                assert await asyncio.to_thread(entered.wait, 30), "writer did not park"
                reply = till.expect("h1")
                await till.send(sale("h1"))
                await wait_until(lambda: first.received == 1, what="the request read")
                client = first._client
                assert client is not None
                broker.proc.send_signal(signal.SIGSTOP)
                try:
                    filler = asyncio.create_task(
                        client.publish("fiscal/gw-1/filler", b"x", qos=1, timeout=30)
                    )
                    await asyncio.sleep(0.1)
                    assert client._client._inflight_messages == 1  # the window is full
                    release.set()
                    await parked
                    await asyncio.sleep(0.3)  # committed; the reply waits in paho's queue
                    assert first.replied == 0 and not till.by_id
                finally:
                    broker.proc.send_signal(signal.SIGCONT)
                await filler
                answered = await asyncio.wait_for(reply, 15)
                await wait_until(lambda: first.replied == 1, what="the request acknowledged")
            finally:
                release.set()
                await parked
        assert answered["ok"] and answered["record"]["request_id"] == "h1", answered
        # acknowledged: a new session of the gateway is not handed the request again
        async with serving(ledger, cfg) as second:
            await asyncio.sleep(0.5)
            assert second.received == 0
    assert records(db_path) == [(1, "h1")]


async def test_mqtt_gateway_started_before_broker_connects_when_it_comes_up(
    tmp_path: Path, ledger: Ledger
) -> None:
    late = Broker(tmp_path / "late")
    cfg = gateway_cfg(late)
    try:
        async with serving(ledger, cfg, connected=False) as transport:
            await asyncio.sleep(0.5)
            assert transport.state()["connected"] is False
            assert transport.state()["last_error"]
            await late.start()
            await wait_until(lambda: transport.state()["connected"], what="connected")
            async with Till(late.port) as till:
                assert (await till.request(sale("late-1")))["ok"]
    finally:
        await late.kill()


async def test_mqtt_unix_socket_broker_connection_signs(tmp_path: Path, ledger: Ledger) -> None:
    b = Broker(Path(f"/tmp/fg-mqtt-{tmp_path.name[-20:]}"), unix_socket=True)
    try:
        await b.start()
        assert b.socket_path is not None
        cfg = gateway_cfg(b, socket=str(b.socket_path))
        async with serving(ledger, cfg) as transport, Till(b.port) as till:
            assert transport.state()["broker"] == f"unix:{b.socket_path}"
            assert (await till.request(sale("u1")))["ok"]
    finally:
        await b.kill()
        with contextlib.suppress(OSError):
            for p in b.dir.iterdir():
                p.unlink()
            b.dir.rmdir()


# ---------------------------------------------------------------------- TLS and ACL


async def test_mqtt_tls_with_test_ca_and_client_certificate_signs(
    tmp_path: Path, ledger: Ledger, db_path: Path
) -> None:
    pki = make_pki(tmp_path / "pki")
    b = Broker(tmp_path / "tls-broker", pki=pki)
    await b.start()
    try:
        cfg = gateway_cfg(
            b,
            tls=True,
            ca_file=str(pki.ca),
            cert_file=str(pki.client_cert),
            key_file=str(pki.client_key),
        )
        async with serving(ledger, cfg), Till(b.port, tls_context=pki.client_context()) as till:
            assert (await till.request(sale("tls-1")))["ok"]
            # a client without a certificate is refused by the broker
            with pytest.raises(aiomqtt.MqttError):
                no_cert = pki.client_context(with_cert=False)
                async with Till(b.port, "till-2", tls_context=no_cert, timeout_s=1.0):
                    pass
        # a gateway that does not trust the broker's CA never connects
        untrusted = gateway_cfg(b, tls=True, cert_file=str(pki.client_cert),
                                key_file=str(pki.client_key))  # fmt: skip
        async with serving(ledger, untrusted, connected=False) as transport:
            await wait_until(lambda: transport.state()["last_error"] is not None, what="an error")
            assert "CERTIFICATE_VERIFY_FAILED" in transport.state()["last_error"]
            assert transport.connects == 0
    finally:
        await b.kill()
    assert records(db_path) == [(1, "tls-1")]


async def _cli(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_mqtt_acl_rendered_from_config_enforced_by_broker_and_gateway(
    tmp_path: Path, ledger: Ledger, db_path: Path
) -> None:
    # The gateway's [mqtt.acl] is the one source: `fiscal-gateway mqtt-acl` renders the broker's
    # acl_file from it, and the gateway refuses tills it does not list.
    secret = tmp_path / "mqtt-password"
    secret.write_text("gw-secret\n")
    acl_section = '[mqtt.acl]\nacct-1 = ["till-1"]\nstore = ["till-2", "till-3"]\n'
    users = {"gateway": "gw-secret", "acct-1": "a1-secret", "store": "st-secret"}
    port_probe = Broker(tmp_path / "probe")  # only for a [mqtt] section to render from
    config = tmp_path / "gateway.toml"
    config.write_text(
        port_probe.gateway_config(username="gateway", password_file=str(secret)) + acl_section
    )
    rc, _, err = await _cli("mqtt-acl", "--config", str(config), "--out", str(tmp_path / "acl"))
    assert rc == 0, err
    assert "acl_file" in err and "mosquitto_passwd /etc/mosquitto/passwords store" in err
    acl_text = (tmp_path / "acl").read_text()
    assert "user store\ntopic write fiscal/gw-1/tills/till-2/req\n" in acl_text

    b = Broker(tmp_path / "acl-broker", users=users, acl=acl_text)
    await b.start()
    try:
        cfg = parse_config(
            tomllib.loads(
                b.gateway_config(username="gateway", password_file=str(secret)) + acl_section
            )
        )
        async with serving(ledger, cfg) as transport:
            events: list[dict[str, Any]] = []
            watcher = aiomqtt.Client(
                "127.0.0.1", b.port, username="acct-1", password="a1-secret", timeout=5.0
            )
            async with watcher:
                await watcher.subscribe("fiscal/gw-1/events", qos=1, timeout=5.0)

                async def watch() -> None:
                    async for message in watcher.messages:
                        assert isinstance(message.payload, bytes)
                        events.append(json.loads(message.payload))

                watching = asyncio.create_task(watch())
                t1 = Till(b.port, "till-1", username="acct-1", password="a1-secret")
                t3 = Till(b.port, "till-3", username="store", password="st-secret")
                # an account that shares the gateway's (full) rights: only the gateway's own
                # check stands between it and a till nobody configured
                t9 = Till(b.port, "till-9", username="gateway", password="gw-secret")
                async with t1, t3, t9:
                    assert (await t1.request(sale("own-1")))["ok"]
                    assert (await t3.request(sale("own-3", till="till-3")))["ok"]
                    # acct-1 publishing on till-2's request topic: the broker drops it
                    await t1.publish_raw(
                        json.dumps(sale("forged", till="till-2")).encode(),
                        topic=f"{BASE}/till-2/req",
                        response_topic=f"{BASE}/till-1/res/x",
                    )
                    refused = await t9.request(sale("t9", till="till-9"))
                    assert refused["ok"] is False, refused
                    assert refused["error"]["code"] == "UNKNOWN_TILL"
                    assert "mqtt.acl" in refused["error"]["message"]
                    # the store account, as a 3.1.1 command-line till on till-2's exact
                    # reply topic (the acl_file's res/# rule covers res itself)
                    port = str(b.port)
                    auth = ("-u", "store", "-P", "st-secret")
                    sub = await asyncio.create_subprocess_exec(
                        "mosquitto_sub", "-V", "mqttv311", "-p", port, *auth, "-q", "1",
                        "-C", "1", "-W", "15", "-t", f"{BASE}/till-2/res",
                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    )  # fmt: skip
                    await asyncio.sleep(0.3)  # let the subscription reach the broker
                    await _run(
                        "mosquitto_pub", "-V", "mqttv311", "-p", port, *auth, "-q", "1",
                        "-t", f"{BASE}/till-2/req", "-m", json.dumps(sale("cli-2", till="till-2")),
                    )  # fmt: skip
                    out, err_b = await asyncio.wait_for(sub.communicate(), 20)
                    assert sub.returncode == 0, err_b
                    assert json.loads(out)["record"]["request_id"] == "cli-2"
                    await wait_until(lambda: bool(events), what="the till_refused event")
                    await asyncio.sleep(0.3)  # a forged request would have been answered by now
                watching.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                    await watching
            assert not t1.by_id.get("forged")
            assert [(e["alert"], e["till"]) for e in events] == [("till_refused", "till-9")]
            assert transport.state()["acl"] == {"tills": 3, "refused": 1}
            # anonymous clients are not let in at all
            with pytest.raises(aiomqtt.MqttError):
                async with Till(b.port, "till-1", timeout_s=1.0):
                    pass
            # a wrong gateway password: refused by the broker, retried, never connected
            bad = tmp_path / "bad-password"
            bad.write_text("nope\n")
            wrong = gateway_cfg(b, username="gateway", password_file=str(bad), client_id="gw-x")
            async with serving(ledger, wrong, connected=False) as other:
                await wait_until(lambda: other.state()["last_error"] is not None, what="error")
                assert other.connects == 0
    finally:
        await b.kill()
    assert records(db_path, "till-1") == [(1, "own-1")]
    assert records(db_path, "till-2") == [(1, "cli-2")]
    assert records(db_path, "till-3") == [(1, "own-3")]
    assert records(db_path, "till-9") == []


async def test_mqtt_acl_command_refuses_config_without_acl_or_gateway_account(
    tmp_path: Path,
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[mqtt]\nenabled = true\n")
    rc, out, err = await _cli("mqtt-acl", "--config", str(config))
    assert (rc, out) == (1, "") and "no [mqtt.acl]" in err
    config.write_text('[mqtt]\nenabled = true\n[mqtt.acl]\nacct-1 = ["till-1"]\n')
    rc, out, err = await _cli("mqtt-acl", "--config", str(config))
    assert (rc, out) == (1, "") and "mqtt.username" in err
    rc, out, err = await _cli("mqtt-acl", "--config", str(config), "--gateway-user", "gw")
    assert rc == 0 and "user gw\ntopic readwrite fiscal/gw-1/#" in out
    config.write_text('[mqtt]\nenabled = true\n[mqtt.acl]\nacct-1 = ["not a till"]\n')
    rc, out, err = await _cli("mqtt-acl", "--config", str(config))
    assert rc == 78 and "mqtt.acl.acct-1[0]" in err
