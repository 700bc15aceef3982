"""MQTT transport: tills elsewhere in the store send POS requests through a broker.

Requests arrive on ``<prefix>/<gateway>/tills/<till>/req`` (docs/mqtt.md, topic scheme in
:mod:`gateway.core.mqtt_topics`) and carry exactly the JSON of docs/protocol.md; each goes through
the one :class:`~gateway.dispatch.Dispatcher` and its reply is published on the request's MQTT v5
*response topic* with its *correlation data*, or else on ``.../tills/<till>/res``. The retained
``.../status`` topic holds the app's status JSON with ``"online": true`` (the Last Will replaces it
with ``{"online": false}``); ``.../events`` carries alerts (:mod:`gateway.core.alerts`).

Exactly once (DESIGN.md §3.3). The gateway keeps a persistent session (fixed client id,
``clean_start``/``clean_session`` false, v5 session expiry) and acknowledges a request to the
broker (PUBACK) only after the dispatcher has committed it, right behind its reply on the same
connection (the broker reads a connection's packets in order: :meth:`MqttTransport._publish_reply`).
aiomqtt 2.5 has no public switch for manual acks (aiomqtt issue #345, draft PR #346), so this
module turns on paho-mqtt 2's ``manual_ack`` on the client aiomqtt wraps. A crash, a lost
connection or a stop at any point before the PUBACK makes the broker deliver the request again;
the ledger's ``(till, id)`` table then returns the stored record (``"replayed": true``) instead
of signing twice, and the till gets its reply.

Fairness and bad input. Requests of one till run at most ``max_inflight_per_till`` at a time, at
most ``max_queued_per_till`` more wait; beyond that the till gets ``BUSY`` (retry with the same
id) at once, so one flooding till holds a bounded share of the broker's in-flight window
(``receive_maximum``) and the others keep flowing. Oversize payloads, invalid JSON, a till in the
body that is not the topic's, a response topic outside the till's own, unknown ops: all get an
error reply on the reply topic and are acknowledged; nothing is dropped silently.

Connection. :meth:`MqttTransport.run` is the reconnect loop (``while True: async with Client``)
with capped, jittered backoff (:func:`gateway.core.backoff.backoff_s`). It never raises except
``CancelledError``: a broker that is down, refuses us or drops us is logged and retried, and
signing over the POS socket does not notice. This module does not sign, validate requests, or
authenticate tills: the dispatcher does the first two, the broker (TLS, passwords, the acl_file
rendered from ``[mqtt.acl]``) the last; the gateway refuses tills ``[mqtt.acl]`` gives to no
account (:mod:`gateway.core.mqtt_acl`). Per-message costs of paho-mqtt are cut in
:mod:`gateway.mqtt_io` (socket reads and writes) and :mod:`gateway.paho_tables` (v5 properties).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiomqtt
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY, MQTTMessage, mqtt_ms_queued
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.config import MqttSection
from gateway.core.alerts import alerts
from gateway.core.backoff import backoff_s
from gateway.core.errors import (
    Busy,
    GatewayError,
    LineTooLong,
    ProtocolError,
    UnknownTill,
)
from gateway.core.framing import decode_request
from gateway.core.mqtt_acl import TillAcl
from gateway.core.mqtt_topics import Topics
from gateway.core.record import format_time
from gateway.core.request import TILL_RE
from gateway.dispatch import Dispatcher, error_reply
from gateway.mqtt_io import install as install_loop_io
from gateway.paho_tables import share_tables
from gateway.wakeups import wait_event

log = logging.getLogger("gateway.mqtt")

StatusFn = Callable[[], Awaitable[dict[str, Any]]]
#: A request as read: paho's message (handed over by :meth:`MqttTransport._on_message`) or,
#: for anything that reached aiomqtt's own queue, aiomqtt's.
Request = MQTTMessage | aiomqtt.Message

#: The retained status after a clean stop, and the Last Will the broker publishes for us.
OFFLINE = b'{"online":false}'
#: Status sections that change on every request or every second; a change only there does not
#: republish the retained status before ``status_interval_s``.
_VOLATILE = ("time", "gateway", "writer", "pos", "jobs", "mqtt")
#: How long a clean stop waits to get the offline status and the DISCONNECT out.
_GOODBYE_TIMEOUT_S = 2.0
#: A ``till_refused`` event is raised at most once per till in this many seconds, and at most
#: this many wait to be published (a till id per request topic is the caller's to choose).
_REFUSED_EVENT_INTERVAL_S = 60.0
_MAX_PENDING_EVENTS = 100


def _encode(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def _properties(packet_type: int) -> Properties:
    """MQTT v5 properties for one packet type (paho's constructor is untyped)."""
    return Properties(packet_type)  # type: ignore[no-untyped-call]


#: v5 property identifiers (MQTT 5.0 §2.2.2.2) of what a reply carries.
_CONTENT_TYPE, _CORRELATION_DATA = 0x03, 0x09
_JSON_CONTENT_TYPE = b"application/json"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, b = n >> 7, n & 0x7F
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


class _ReplyProperties(Properties):
    """The v5 PUBLISH properties of a reply, packed once: content type and correlation data.

    paho's generic :class:`Properties` builds its name tables for every instance and packs by
    walking all of them (about 30 µs per reply); paho only calls ``pack()`` on the properties
    of a message it sends, so this subclass keeps the packed bytes and nothing else."""

    packed: bytes
    correlation: bytes | None

    def __init__(self, correlation: bytes | None) -> None:  # no tables: see the docstring
        body = bytes([_CONTENT_TYPE]) + len(_JSON_CONTENT_TYPE).to_bytes(2, "big")
        body += _JSON_CONTENT_TYPE
        if correlation is not None:
            body += bytes([_CORRELATION_DATA]) + len(correlation).to_bytes(2, "big") + correlation
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        object.__setattr__(self, "packed", _varint(len(body)) + body)
        object.__setattr__(self, "correlation", correlation)

    def pack(self) -> bytes:
        return self.packed

    def __str__(self) -> str:  # paho's debug log prints the properties of what it sends
        return f"[ContentType : application/json, CorrelationData : {self.correlation!r}]"


def _significant(status: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in status.items() if k not in _VOLATILE}, sort_keys=True)


def _request_id(request: dict[str, Any]) -> str | None:
    rid = request.get("id")
    return rid if isinstance(rid, str) and len(rid) <= 64 else None


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when the TLS handshake fails.

    paho-mqtt 2.2 drops the socket without closing it when the handshake fails (an untrusted
    broker certificate): the descriptor would wait for the garbage collector on every retry.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


class _Till:
    """Admission state of one till: a bounded number of requests running, a bounded queue."""

    __slots__ = ("pending", "slots")

    def __init__(self, inflight: int) -> None:
        self.slots = asyncio.Semaphore(inflight)
        self.pending = 0


class MqttTransport:
    def __init__(
        self,
        settings: MqttSection,
        *,
        gateway_id: str,
        dispatcher: Dispatcher,
        status: StatusFn,
        resolve_path: Callable[[str], Path],
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not share_tables():
            log.info("paho-mqtt is not a verified version: MQTT v5 properties cost more CPU")
        self.settings = settings
        self.dispatcher = dispatcher
        self.topics = Topics(settings.prefix, gateway_id)
        self.acl = TillAcl(settings.acl)
        self._refused_at: dict[str, float] = {}  # till → when its last till_refused was raised
        self._events: list[dict[str, Any]] = []  # events waiting for the status loop
        self.client_id = settings.client_id or f"fiscal-gateway-{gateway_id}"
        self._status = status
        self._resolve_path = resolve_path
        self._rand = rand
        self._client: aiomqtt.Client | None = None
        self._tg: asyncio.TaskGroup | None = None
        self._tills: dict[str, _Till] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._stop_event = asyncio.Event()
        self._finished = asyncio.Event()
        self._status_wake = asyncio.Event()
        self._status_fresh = False
        # counters for the status page
        self.connects = 0
        self.received = 0
        self.last_message_at: str | None = None
        self.replied = 0
        self.busy = 0
        self.refused_acl = 0
        self.last_error: str | None = None

    def reload_acl(self, entries: tuple[tuple[str, tuple[str, ...]], ...]) -> TillAcl:
        """Serve by a new ``[mqtt.acl]`` from the next request on (the daemon's SIGHUP); the
        broker's acl_file is reloaded apart (``fiscal-gateway mqtt-acl``, docs/mqtt.md)."""
        self.acl = TillAcl(entries)
        self.settings = dataclasses.replace(self.settings, acl=entries)
        self._refused_at.clear()  # a till refused again under the new table is news
        return self.acl

    @property
    def broker(self) -> str:
        m = self.settings
        return f"unix:{m.socket}" if m.socket else f"{m.host}:{m.port}"

    def state(self) -> dict[str, Any]:
        """The MQTT part of the status JSON."""
        return {
            "enabled": True,
            "connected": self._client is not None,
            "broker": self.broker,
            "protocol": self.settings.protocol,
            "client_id": self.client_id,
            "connects": self.connects,
            "received": self.received,
            "last_message_at": self.last_message_at,
            "replied": self.replied,
            "busy": self.busy,
            "acl": {"tills": len(self.acl.tills), "refused": self.refused_acl}
            if self.acl.configured
            else None,
            "inflight": len(self._tasks),
            "last_error": self.last_error,
        }

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Connect, serve, reconnect — until :meth:`stop`. Raises only CancelledError."""
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                status_task = tg.create_task(self._status_loop())
                try:
                    await self._connection_loop()
                finally:
                    status_task.cancel()
        finally:
            self._tg = None
            self._finished.set()

    async def stop(self, grace_s: float) -> None:
        """Take no new requests, let running ones reply (up to ``grace_s``), say goodbye.

        Requests that arrive meanwhile are left unacknowledged: the broker keeps them in the
        gateway's session and delivers them after the restart.
        """
        self._stopping = True
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for t in pending:
                t.cancel()
            if pending:
                log.warning("%d MQTT request(s) still running at the stop timeout", len(pending))
        self._stop_event.set()
        await wait_event(self._finished, _GOODBYE_TIMEOUT_S * 3)

    async def _connection_loop(self) -> None:
        m = self.settings
        attempt = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                client = await self._make_client()
                async with client:
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                self.last_error = str(exc)
                log.warning("MQTT broker %s: %s; will reconnect", self.broker, exc)
            except (OSError, ssl.SSLError, GatewayError) as exc:
                self.last_error = str(exc)
                log.error("MQTT cannot connect to %s: %s; will retry", self.broker, exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = repr(exc)
                log.exception("MQTT connection failed unexpectedly; will reconnect")
            if self._stopping:
                break
            # A session that lasted resets the backoff; one dropped at once keeps growing it
            # (e.g. another gateway with the same client id taking the session over).
            if time.monotonic() - started > m.reconnect_max_s:
                attempt = 0
            delay = backoff_s(
                attempt, min_s=m.reconnect_min_s, max_s=m.reconnect_max_s, rand=self._rand()
            )
            attempt += 1
            await wait_event(self._stop_event, delay)

    async def _make_client(self) -> aiomqtt.Client:
        m = self.settings
        password, tls_context = await asyncio.to_thread(self._load_secrets)
        v5 = m.protocol == "5"
        properties = None
        if v5:
            properties = _properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = m.session_expiry_s
            properties.ReceiveMaximum = m.receive_maximum
        # One request, one small packet each way: Nagle + delayed ACK would add ~40 ms.
        socket_options = () if m.socket else ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
        client = aiomqtt.Client(
            str(self._resolve_path(m.socket)) if m.socket else m.host,
            m.port,
            transport="unix" if m.socket else "tcp",
            username=m.username or None,
            password=password,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self.topics.status, OFFLINE, qos=1, retain=True),
            # A persistent session: what tills publish while we are away waits for us.
            clean_session=None if v5 else False,
            clean_start=False if v5 else MQTT_CLEAN_START_FIRST_ONLY,  # paho: v5-only flag
            properties=properties,
            tls_context=tls_context,
            timeout=m.connect_timeout_s,
            keepalive=m.keepalive_s,
            max_inflight_messages=m.receive_maximum,
            socket_options=socket_options,
            logger=logging.getLogger("gateway.mqtt.client"),
        )
        # Before connecting: requests queued in the session arrive right after CONNACK and
        # must not be auto-acknowledged. aiomqtt 2.5 does not expose this (issue #345).
        client._client.manual_ack_set(True)
        # Requests go from paho's callback straight to admission. aiomqtt's queue would add,
        # per message, a wrapper with topic validation, a queue hop and a task + asyncio.wait
        # in its iterator (about a tenth of the gateway's CPU per request); _read still waits
        # on that iterator, which is how a lost connection is noticed.
        client._client.on_message = functools.partial(self._on_message, client)
        install_loop_io(client, asyncio.get_running_loop(), socket_options)
        return client

    def _load_secrets(self) -> tuple[str | None, ssl.SSLContext | None]:
        """Read the password file and build the TLS context (in a thread: file IO)."""
        m = self.settings
        password = None
        if m.password_file:
            password = self._resolve_path(m.password_file).read_text("utf-8").rstrip("\r\n")
        context = None
        if m.tls:
            ca = str(self._resolve_path(m.ca_file)) if m.ca_file else None
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
            context.sslsocket_class = _ClosingSSLSocket
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            if m.cert_file:
                context.load_cert_chain(
                    self._resolve_path(m.cert_file), self._resolve_path(m.key_file)
                )
        return password, context

    async def _serve(self, client: aiomqtt.Client) -> None:
        """One connection: subscribe, announce status, take requests until it drops or stop."""
        m = self.settings
        # v5: a retained request (a till's mistake) is not re-sent on every reconnect.
        # (paho takes the QoS from the options when there are options.)
        if m.protocol == "5":
            options = SubscribeOptions(qos=1, retainHandling=2)
            await client.subscribe(
                self.topics.request_filter, options=options, timeout=m.publish_timeout_s
            )
        else:
            await client.subscribe(self.topics.request_filter, qos=1, timeout=m.publish_timeout_s)
        self.connects += 1
        self.last_error = None
        self._client = client
        self._status_fresh = True
        self._status_wake.set()
        log.info(
            "MQTT connected to %s (MQTT %s, client id %s), subscribed to %s",
            self.broker,
            m.protocol,
            self.client_id,
            self.topics.request_filter,
        )
        reader = asyncio.create_task(self._read(client))
        stopper = asyncio.create_task(self._stop_event.wait())
        try:
            await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._client = None
            for t in (reader, stopper):
                t.cancel()
            await asyncio.wait({reader, stopper})
        failure = None if reader.cancelled() else reader.exception()
        if failure is not None:
            raise failure
        with contextlib.suppress(aiomqtt.MqttError):
            await client.publish(
                self.topics.status, OFFLINE, qos=1, retain=True, timeout=_GOODBYE_TIMEOUT_S
            )
        log.info("MQTT disconnecting from %s", self.broker)

    # ------------------------------------------------------------------ requests

    def _on_message(
        self, client: aiomqtt.Client, _mqttc: Any, _userdata: Any, message: Any
    ) -> None:
        """paho's on_message, on the event loop (aiomqtt's read callback runs paho's reads)."""
        if self._stopping:
            return  # unacknowledged: delivered again after the restart
        try:
            self._accept(client, message)
        except Exception:  # not acknowledged: the broker delivers it again on reconnect
            log.exception("MQTT request could not be admitted")

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            if self._stopping:
                continue  # unacknowledged: delivered again after the restart
            self._accept(client, message)

    def _accept(self, client: aiomqtt.Client, message: Request) -> None:
        """Admit one request (never blocks: a slow till must not hold up the others)."""
        assert self._tg is not None
        self.received += 1
        self.last_message_at = format_time(time.time_ns() // 1_000_000)
        m = self.settings
        topic = str(message.topic)
        till = self.topics.till_of(topic)
        if till is None:  # not a request topic: only with overlapping subscriptions
            log.warning("MQTT message on unexpected topic %r ignored", topic[:200])
            self._ack(client, message)
            return
        state = self._tills.get(till)
        if state is None:
            state = self._tills[till] = _Till(m.max_inflight_per_till)
        if state.pending >= m.max_inflight_per_till + m.max_queued_per_till:
            self.busy += 1
            busy = Busy(
                f"till {till!r} has {state.pending} requests in flight; "
                "nothing was done, retry with the same id"
            )
            self._spawn(self._refuse(client, message, till, busy))
            return
        state.pending += 1
        self._spawn(self._handle(client, message, till, state))

    def _spawn(self, coro: Any) -> None:
        assert self._tg is not None
        task = self._tg.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(
        self, client: aiomqtt.Client, message: Request, till: str, state: _Till
    ) -> None:
        try:
            topic, properties, route_error = self._route(message, till)
            if route_error is not None:
                reply = error_reply(self._peek_id(message), route_error)
            else:
                async with state.slots:
                    reply = await self._answer(message, till)
            await self._reply(client, message, topic, properties, reply)
        finally:
            state.pending -= 1
            if state.pending == 0 and self._tills.get(till) is state:
                del self._tills[till]

    async def _refuse(
        self, client: aiomqtt.Client, message: Request, till: str, exc: GatewayError
    ) -> None:
        topic, properties, _ = self._route(message, till)
        await self._reply(
            client, message, topic, properties, error_reply(self._peek_id(message), exc)
        )

    def _peek_id(self, message: Request) -> str | None:
        """The request id of a request that is refused before it is dispatched, if readable."""
        try:
            return _request_id(self._decode(message))
        except GatewayError:
            return None

    def _route(
        self, message: Request, till: str
    ) -> tuple[str, Properties | None, GatewayError | None]:
        """Where the reply goes: (topic, v5 properties, error if the request's route is bad)."""
        default = self.topics.reply(till)
        if self.settings.protocol != "5":
            return default, None, None
        request_props = getattr(message, "properties", None)
        correlation = getattr(request_props, "CorrelationData", None)
        properties = _ReplyProperties(None if correlation is None else bytes(correlation))
        response_topic = getattr(request_props, "ResponseTopic", None)
        if response_topic is None:
            return default, properties, None
        if not self.topics.response_topic_allowed(till, response_topic):
            return (
                default,
                properties,
                ProtocolError(
                    f"response topic {response_topic[:200]!r} is not {default!r} or below it; "
                    "nothing was done"
                ),
            )
        return response_topic, properties, None

    def _decode(self, message: Request) -> dict[str, Any]:
        payload = message.payload
        if isinstance(payload, str):
            data = payload.encode("utf-8")
        elif isinstance(payload, bytes | bytearray):
            data = bytes(payload)
        else:
            data = b"" if payload is None else str(payload).encode("utf-8")
        limit = self.settings.max_payload_bytes
        if len(data) > limit:
            raise LineTooLong(
                f"MQTT payload of {len(data)} bytes exceeds mqtt.max_payload_bytes ({limit}); "
                "nothing was done"
            )
        return decode_request(data)

    async def _answer(self, message: Request, till: str) -> dict[str, Any]:
        rid = None
        try:
            request = self._decode(message)
            rid = _request_id(request)
            self._check_till(till, request)
        except GatewayError as exc:
            log.info("MQTT request refused: %s", exc.code, extra={"till": till, "code": exc.code})
            return error_reply(rid, exc)
        return await self.dispatcher.handle(request)

    def _check_till(self, till: str, request: dict[str, Any]) -> None:
        """The topic's till is the till: the broker's ACL on topics is an ACL on tills."""
        if not TILL_RE.match(till):
            raise UnknownTill(f"topic till {till[:64]!r} is not a valid till id")
        if not self.acl.allows(till):
            self._till_refused(till)
            raise UnknownTill(
                f"till {till!r} is not in mqtt.acl: no broker account may send requests for it"
            )
        allowed = self.dispatcher.allowed_tills
        if allowed and till not in allowed:
            raise UnknownTill(f"till {till!r} is not configured on this gateway")
        body_till = request.get("till")
        if body_till is not None and body_till != till:
            raise UnknownTill(
                f"request till {str(body_till)[:64]!r} does not match the topic's till {till!r}"
            )

    def _till_refused(self, till: str) -> None:
        """Count a request refused by the ACL; raise ``till_refused`` on the events topic
        (once per till per minute: a broker that lets such requests through is misconfigured,
        or an account is used for tills it was not given)."""
        self.refused_acl += 1
        now = time.monotonic()
        if now - self._refused_at.get(till, -float("inf")) < _REFUSED_EVENT_INTERVAL_S:
            return
        if len(self._refused_at) >= 1000:
            self._refused_at.clear()
        self._refused_at[till] = now
        if len(self._events) < _MAX_PENDING_EVENTS:
            self._events.append(
                {
                    "alert": "till_refused",
                    "severity": "warning",
                    "message": f"request for till {till!r} refused: not in mqtt.acl "
                    "(check the broker's acl_file: fiscal-gateway mqtt-acl)",
                    "till": till,
                }
            )
            self._status_wake.set()
        log.warning("MQTT request for till %r refused: not in mqtt.acl", till)

    async def _reply(
        self,
        client: aiomqtt.Client,
        message: Request,
        topic: str,
        properties: Properties | None,
        reply: dict[str, Any],
    ) -> None:
        try:
            await self._publish_reply(client, topic, _encode(reply), properties)
        except aiomqtt.MqttError as exc:
            # Not acknowledged: the broker delivers the request again on the next connection
            # and the ledger answers it from the stored record.
            log.warning(
                "MQTT reply not delivered (%s); the request stays unacknowledged",
                exc,
                extra={"request_id": reply.get("id")},
            )
            return
        self.replied += 1
        self._ack(client, message)

    async def _publish_reply(
        self, client: aiomqtt.Client, topic: str, payload: bytes, properties: Properties | None
    ) -> None:
        """Hand the reply (QoS 1) to the connection; return once the request may be acked.

        The request's PUBACK may follow the reply at once, without waiting for the broker's
        PUBACK of the reply: both go out on the one TCP connection in this order, and the
        broker handles a connection's packets in order, so it has taken the reply before it
        sees the acknowledgement — and if the connection breaks first, neither counts and the
        request is delivered again. Waiting would cost a broker round trip per request.
        Only a reply that paho holds back (its own in-flight window is full) would leave
        after the acknowledgement, so then this waits for the broker's PUBACK of the reply.
        """
        mqttc = client._client
        info = mqttc.publish(topic, payload, qos=1, properties=properties)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise aiomqtt.MqttCodeError(info.rc, "Could not publish the reply")
        held = mqttc._out_messages.get(info.mid)
        if held is None or held.state != mqtt_ms_queued:
            return
        confirmation = asyncio.Event()
        client._pending_publishes[info.mid] = confirmation  # set by aiomqtt's on_publish
        try:
            if not await wait_event(confirmation, self.settings.publish_timeout_s):
                raise aiomqtt.MqttError("the broker did not acknowledge the reply in time")
        finally:
            client._pending_publishes.pop(info.mid, None)

    @staticmethod
    def _ack(client: aiomqtt.Client, message: Request) -> None:
        # PUBACK on the connection the request came in on; after a reconnect that client is
        # closed and this is a no-op (the broker redelivers). QoS 0 requests have no ack.
        if message.qos > 0:
            client._client.ack(message.mid, message.qos)

    # ------------------------------------------------------------------ status and events

    async def _status_loop(self) -> None:
        """Retained status on change (checked every status_check_s) and every
        status_interval_s; alerts on ``events`` when the status turns bad (or good)."""
        m = self.settings
        announced: dict[str, Any] | None = None  # the snapshot alerts were last raised from
        last_key: str | None = None
        last_sent = -float("inf")
        while True:
            await wait_event(self._status_wake, m.status_check_s)
            self._status_wake.clear()
            client = self._client
            if client is None:
                continue
            try:
                status = await self._status()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("MQTT status: could not read the status")
                continue
            if self._client is not client or self._stopping:
                continue  # the offline status may already be out; do not overwrite it
            now_ms = time.time_ns() // 1_000_000
            key = _significant(status)
            try:
                if (
                    self._status_fresh
                    or key != last_key
                    or time.monotonic() - last_sent >= (m.status_interval_s)
                ):
                    self._status_fresh = False
                    payload = {"online": True, "time": format_time(now_ms), **status}
                    await client.publish(
                        self.topics.status,
                        _encode(payload),
                        qos=1,
                        retain=True,
                        timeout=m.publish_timeout_s,
                    )
                    last_key, last_sent = key, time.monotonic()
                for alert in alerts(announced, status):
                    event = {**alert, "gateway": self.topics.gateway, "time": format_time(now_ms)}
                    await client.publish(
                        self.topics.events, _encode(event), qos=1, timeout=m.publish_timeout_s
                    )
                    log.warning("alert %s: %s", alert["alert"], alert["message"])
                announced = status
                while self._events:  # raised by request handling (till_refused)
                    event = {
                        **self._events[0],
                        "gateway": self.topics.gateway,
                        "time": format_time(now_ms),
                    }
                    await client.publish(
                        self.topics.events, _encode(event), qos=1, timeout=m.publish_timeout_s
                    )
                    self._events.pop(0)  # only once the broker has it
            except aiomqtt.MqttError as exc:
                log.info("MQTT status not published: %s", exc)
                self._status_fresh = True
