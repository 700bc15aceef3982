"""A real Mosquitto for the tests, a test PKI made with openssl, and a till that only knows MQTT.

:class:`Broker` writes a mosquitto.conf into a directory, runs ``mosquitto -c`` on a free
loopback port (optionally a TLS listener, a Unix socket, a password file and an ACL), and can
be stopped, killed (SIGKILL) and started again on the same port with the same persistence file.
:func:`make_pki` makes a CA, a server certificate for 127.0.0.1/localhost and a client
certificate with the ``openssl`` command line. :class:`Till` is an aiomqtt client publishing POS
requests the way docs/mqtt.md says a till does, and collecting the replies.

Used by tests/integration/test_mqtt_*.py, tests/e2e/test_mqtt_*.py and bench/bench_mqtt.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MOSQUITTO = "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else "mosquitto"
START_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 15.0


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self, *, with_cert: bool = True) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if with_cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        return ctx


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def make_pki(directory: Path) -> Pki:
    """CA → server certificate (IP 127.0.0.1, DNS localhost) and client certificate (P-256)."""
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", d / "ca.key", "-out", d / "ca.pem", "-days", "2",
        "-subj", "/CN=fiscal-gateway test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    for name, cn, ext in (
        ("server", "localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
         "extendedKeyUsage=serverAuth\n"),
        ("client", "fiscal-gateway", "extendedKeyUsage=clientAuth\n"),
    ):  # fmt: skip
        (d / f"{name}.ext").write_text(
            ext + "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\n"
            "authorityKeyIdentifier=keyid\n"
        )
        _openssl("req", *ec, "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr",
                 "-subj", f"/CN={cn}")  # fmt: skip
        _openssl(
            "x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
            "-CAcreateserial", "-out", d / f"{name}.pem", "-days", "2",
            "-extfile", d / f"{name}.ext",
        )  # fmt: skip
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


# ---------------------------------------------------------------------- broker


class Broker:
    """One ``mosquitto`` process with a generated config (see the module docstring)."""

    def __init__(
        self,
        directory: Path,
        *,
        pki: Pki | None = None,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        unix_socket: bool = False,
    ) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.pki = pki
        self.socket_path = self.dir / "mqtt.sock" if unix_socket else None
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        lines = [
            "per_listener_settings false",
            # Replies are small single packets: without it Nagle delays each by ~40 ms.
            "set_tcp_nodelay true",
            # CI and the sandboxes run as root; keep root so the broker can read tmp files.
            "user root",
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            "max_queued_messages 100000",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            f"log_dest file {self.dir}/mosquitto.log",
        ]
        if users:
            pw = self.dir / "passwords"
            for i, (user, password) in enumerate(users.items()):
                subprocess.run(
                    ["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), pw, user, password],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if acl is not None:
            (self.dir / "acl").write_text(acl)
            lines.append(f"acl_file {self.dir / 'acl'}")
        lines.append(f"listener {self.port} 127.0.0.1")
        if pki is not None:
            lines += [
                f"cafile {pki.ca}",
                f"certfile {pki.server_cert}",
                f"keyfile {pki.server_key}",
                "require_certificate true",
                "tls_version tlsv1.2",
            ]
        if self.socket_path is not None:
            lines.append(f"listener 0 {self.socket_path}")
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def log_text(self) -> str:
        p = self.dir / "mosquitto.log"
        return p.read_text("utf-8", "replace") if p.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> None:
        assert not self.alive()
        self.starts += 1
        self.proc = self._spawn()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited {self.proc.returncode}:\n{self.log_text}")
            if self._accepts():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"mosquitto did not listen in time:\n{self.log_text}")
            await asyncio.sleep(0.02)

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.dir / f"stderr.{self.starts}.log", "wb") as err:
            return subprocess.Popen(
                [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=err
            )

    def _accepts(self) -> bool:
        with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
            s.settimeout(0.5)
            try:
                s.connect(("127.0.0.1", self.port))
            except OSError:
                return False
        return self.socket_path is None or self.socket_path.exists()

    async def stop(self) -> None:
        """SIGTERM (the broker saves its sessions) and wait."""
        await self._end(signal.SIGTERM)

    async def kill(self) -> None:
        """SIGKILL: whatever the broker had not saved is gone."""
        await self._end(signal.SIGKILL)

    async def _end(self, sig: signal.Signals) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            await asyncio.to_thread(self.proc.wait, 10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)

    def gateway_config(self, **overrides: Any) -> str:
        """The ``[mqtt]`` TOML section of a gateway using this broker (fast test timings)."""
        values: dict[str, Any] = {
            "enabled": True,
            "host": "127.0.0.1",
            "port": self.port,
            "prefix": "fiscal",
            "status_check_s": 0.1,
            "reconnect_min_s": 0.05,
            "reconnect_max_s": 0.5,
            "connect_timeout_s": 5.0,
            "publish_timeout_s": 5.0,
        }
        values.update(overrides)
        return "[mqtt]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


# ---------------------------------------------------------------------- a till


async def wait_until(cond: Callable[[], bool], *, what: str, timeout_s: float = 15.0) -> None:
    """Poll ``cond`` every 20 ms until it holds; AssertionError naming ``what`` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        if cond():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _props(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]


class Till:
    """A till on MQTT: publishes requests to ``<prefix>/<gateway>/tills/<till>/req`` at QoS 1.

    MQTT v5 (default): each request names the response topic ``.../res/<client id>`` and its
    id as correlation data. MQTT 3.1.1: replies come on ``.../res`` and are matched by ``id``.
    Replies are kept in ``replies`` (every one, in arrival order) and ``by_id``.
    """

    def __init__(
        self,
        port: int,
        till: str = "till-1",
        *,
        protocol: str = "5",
        gateway: str = "gw-1",
        prefix: str = "fiscal",
        client_id: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        persistent: bool = False,
        timeout_s: float = 5.0,
    ) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self.till = till
        self.protocol = protocol
        self.base = f"{prefix}/{gateway}/tills/{till}"
        self.client_id = client_id or f"{till}-{uuid.uuid4().hex[:8]}"
        self.response_topic = f"{self.base}/res/{self.client_id}"
        self.tls_context = tls_context
        self.username = username
        self.password = password
        self.persistent = persistent
        self.replies: list[tuple[str, dict[str, Any], bytes | None]] = []
        self.by_id: dict[str, list[dict[str, Any]]] = {}
        self._waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self.received = asyncio.Event()

    def new_client(self) -> aiomqtt.Client:
        v5 = self.protocol == "5"
        properties = None
        if v5 and self.persistent:
            properties = _props(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = 3600
        return aiomqtt.Client(
            "127.0.0.1",
            self.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else not self.persistent,
            clean_start=not self.persistent if v5 else MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            tls_context=self.tls_context,
            username=self.username,
            password=self.password,
            timeout=self.timeout_s,
            max_inflight_messages=1000,
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )

    async def connect(self) -> None:
        client = self.new_client()
        await client.__aenter__()
        try:
            await client.subscribe(f"{self.base}/res/#", qos=1, timeout=5.0)
        except BaseException:
            with contextlib.suppress(aiomqtt.MqttError):
                await client.__aexit__(None, None, None)
            raise
        self._client = client
        self._reader = asyncio.create_task(self._read(client))

    async def disconnect(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
                await self._reader
            self._reader = None
        if self._client is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.__aexit__(None, None, None)
            self._client = None

    async def __aenter__(self) -> Till:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            payload = message.payload
            assert isinstance(payload, bytes | bytearray), payload
            reply = json.loads(payload)
            correlation = getattr(message.properties, "CorrelationData", None)
            self.replies.append((str(message.topic), reply, correlation))
            key = correlation.decode() if correlation else reply.get("id")
            if isinstance(key, str):
                self.by_id.setdefault(key, []).append(reply)
                waiter = self._waiters.pop(key, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(reply)
            self.received.set()

    async def publish_raw(
        self,
        payload: bytes,
        *,
        topic: str | None = None,
        correlation: bytes | None = None,
        response_topic: str | None = None,
        qos: int = 1,
    ) -> None:
        assert self._client is not None, "not connected"
        properties = None
        if self.protocol == "5":
            properties = _props(PacketTypes.PUBLISH)
            properties.ResponseTopic = response_topic or self.response_topic
            if correlation is not None:
                properties.CorrelationData = correlation
        await self._client.publish(
            topic or f"{self.base}/req", payload, qos=qos, properties=properties, timeout=10.0
        )

    async def send(self, request: dict[str, Any], **kwargs: Any) -> None:
        rid = request.get("id")
        if isinstance(rid, str):
            kwargs.setdefault("correlation", rid.encode())
        await self.publish_raw(json.dumps(request).encode(), **kwargs)

    def expect(self, key: str) -> asyncio.Future[dict[str, Any]]:
        fut = asyncio.get_running_loop().create_future()
        self._waiters[key] = fut
        return fut

    async def request(
        self, request: dict[str, Any], timeout_s: float = REPLY_TIMEOUT_S, **kwargs: Any
    ) -> dict[str, Any]:
        """Publish one request and wait for its reply (matched by correlation data or id)."""
        key = request["id"]
        fut = self.expect(key)
        try:
            await self.send(request, **kwargs)
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._waiters.pop(key, None)

    async def raw_request(
        self, payload: bytes, key: str, timeout_s: float = REPLY_TIMEOUT_S, **kwargs: Any
    ) -> dict[str, Any]:
        """Publish arbitrary bytes with correlation data ``key`` and wait for the reply."""
        fut = self.expect(key)
        try:
            await self.publish_raw(payload, correlation=key.encode(), **kwargs)
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._waiters.pop(key, None)


async def subscribe_once(
    port: int, topic: str, *, predicate: Any = None, timeout_s: float = REPLY_TIMEOUT_S
) -> dict[str, Any]:
    """Connect a separate subscriber, return the first JSON message on ``topic`` that matches
    ``predicate`` (retained ones included)."""
    async with aiomqtt.Client("127.0.0.1", port, timeout=5.0) as client:
        await client.subscribe(topic, qos=1, timeout=5.0)
        async with asyncio.timeout(timeout_s):
            async for message in client.messages:
                assert isinstance(message.payload, bytes | bytearray)
                value = json.loads(message.payload)
                if predicate is None or predicate(value):
                    assert isinstance(value, dict)
                    return value
    raise AssertionError("unreachable")


def sale(request_id: str, till: str = "till-1", amount: int = 630) -> dict[str, Any]:
    """A valid ``sign`` request (docs/protocol.md)."""
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


def mosquitto_cli(*args: str | os.PathLike[str], timeout_s: float = 20.0) -> str:
    out = subprocess.run(
        [str(a) for a in args], check=True, capture_output=True, timeout=timeout_s, text=True
    )
    return out.stdout


def ids_of(replies: Iterable[dict[str, Any]]) -> list[str]:
    return [r["id"] for r in replies]
