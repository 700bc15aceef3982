"""A strict loopback simulator of fiskaly SIGN FR (seed 004), for the tests, benchmarks and demo.

It speaks the two endpoints the gateway uses — ``POST /tokens`` and ``POST /records`` — and is
strict about every rule the seed states or docs/sync.md chose where the seed is silent:

- ``X-Api-Version`` on every call, ``YYYY-MM-DD``, one of the versions that support FR;
  ``X-Idempotency-Key`` on every POST, a UUID v3 or v4; ``Content-Type: application/json``;
  a JSON object body with ``content``; ``metadata`` of at most 20 string values, keys at most
  40 and values at most 500 characters.
- Tokens: ``{"content": {"type": "API_KEY", "key", "secret"}}`` → a JWT (HS256) with an
  expiry on the simulator's clock (:meth:`FiskalySim.advance` moves it); a missing, forged
  or expired bearer gets 401.
- Idempotency (24 h cache on the simulator's clock): the same key with the same method, path
  and body returns the cached answer with ``X-Idempotency-Replayed: true``; the same key with
  another body gets 422; the same key while its first request is still being processed
  gets 409. Every POST answer carries ``X-Idempotency-Replayed``.
- Records (docs/sync.md, "Cloud records"): the first call of a two-call record is an
  intention; the last call links to it (``content.record.id``) and carries the signed record
  in ``content.data``, whose hash is recomputed from its canonical bytes and must match
  ``metadata.fg_hash``. Per chain, final records must arrive in ``seq`` order, each linking
  to the previous hash (the first one seen starts the chain).
- Liveness probe: ``GET /systems/{system_id}`` (seed 004, "Retrieve a system") with
  ``X-Api-Version`` and a valid bearer; 404 for a system that is not known.
- The outage window (docs/sync.md, "Noticing an outage"): with ``outage_grace_s`` set, a
  record flagged *online* whose signing time lies more than ``outage_grace_s`` into an
  outage (:meth:`FiskalySim.down` … :meth:`FiskalySim.up`, on the wall clock) is a
  violation: the gateway must have noticed the outage by then and flagged it offline.
- Replay headers: present exactly on records flagged offline, both or neither;
  ``X-Replay-Remaining`` ``^\\d{1,4}$``, ``X-Replay-Hash`` base64 of the record's hash. Per
  chain, a replay stretch opens with any count and then counts down by one per record to 0;
  a count that grows (records were signed offline meanwhile) is allowed and counted in
  ``replay_extensions``; one that drops faster, or an online record while records are still
  announced, is a violation.

Every rule broken is answered 400 (or 401/409/422 as above) and appended to
``violations``; a record created twice for the same chain, seq and type (a new key for a
retry, or a retry after the cache expired) is accepted — as a real cloud would — and counted
in ``duplicates``. Faults are injected per ``POST /records`` by a seeded :class:`FaultPlan`:
refused connections (the listener closes for a moment), 500s, stalls longer than the client's
timeout (processed afterwards), connections dropped after the request was processed, 409s and
429s with ``Retry-After``. :meth:`FiskalySim.down` closes the listener (connection refused)
until :meth:`FiskalySim.up`.

Run standalone (benchmarks, demo): ``python -m drivers.cloud.fiskaly_sim --port 8700``;
``GET /_sim/stats`` and ``POST /_sim/control`` drive it from outside, and SIGUSR1 / SIGUSR2
close / reopen its listener (a cloud outage) even while nothing can reach it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import random
import re
import secrets
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.core.canonical import canonical_bytes

SUPPORTED_VERSIONS = ("2026-02-03", "2025-08-12")  # the versions with FR (seed's table)
_VERSION_RE = re.compile(r"^[0-9]{4}-(0[1-9]|1[012])-(0[1-9]|[12][0-9]|3[01])$")
_KEY_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[34][0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
_REMAINING_RE = re.compile(r"^(\d{1,4})$")

#: The seed's SystemRecordType enum.
RECORD_TYPES = frozenset(
    {
        "INTENTION::TRANSACTION",
        "INTENTION::EVENT",
        "INTENTION::EXPORT",
        "INTENTION::DUPLICATE",
        "INTENTION::CLOSING",
        "TRANSACTION::ABORT",
        "INTENTION::UPLOAD",
        "TRANSACTION::RECEIPT",
        "TRANSACTION::CANCELLATION",
        "TRANSACTION::CORRECTION",
        "TRANSACTION::DRAFT_RECEIPT",
        "TRANSACTION::ENRICHMENT",
        "TRANSACTION::INVOICE",
        "TRANSACTION::PROOF_OF_PAYMENT",
        "TRANSACTION::PRO_FORMA_INVOICE",
        "CLOSING::DAILY",
        "CLOSING::MONTHLY",
        "CLOSING::YEARLY",
        "EXPORT::RECORDS",
        "E_INVOICE::TRANSMISSION",
        "E_INVOICE::RECEPTION",
        "UPLOAD::PEPPOL_PROOF_OF_OWNERSHIP",
    }
)
#: Intentions that open a two-call record, and the types that may conclude each.
INTENTIONS = {
    "INTENTION::TRANSACTION": "TRANSACTION::",
    "INTENTION::CLOSING": "CLOSING::",
    "INTENTION::EXPORT": "EXPORT::",
}
#: Types made in one call.
SINGLE = frozenset({"INTENTION::EVENT", "INTENTION::DUPLICATE"})

FAULT_KINDS = ("refuse", "error500", "stall", "drop_after", "conflict", "throttle")


@dataclass
class FaultPlan:
    """Which ``POST /records`` requests fail, and how (seeded: runs are repeatable)."""

    rate: float = 0.0
    weights: dict[str, float] = field(
        default_factory=lambda: {
            "refuse": 1.0,
            "error500": 1.0,
            "stall": 1.0,
            "drop_after": 1.0,
            "conflict": 0.5,
            "throttle": 0.5,
        }
    )
    stall_s: float = 1.0
    refuse_window_s: float = 0.05
    retry_after_s: int = 1
    seed: int = 1

    #: faults (or "none") for the next requests, in order, before any random draw
    script: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)  # noqa: S311 (fault schedule, not crypto)

    def draw(self) -> str | None:
        if self.script:
            kind = self.script.pop(0)
            return None if kind == "none" else kind
        if self.rate <= 0 or self._rng.random() >= self.rate:
            return None
        kinds = [k for k in FAULT_KINDS if self.weights.get(k, 0) > 0]
        if not kinds:
            return None
        return self._rng.choices(kinds, [self.weights[k] for k in kinds])[0]


@dataclass
class _Cached:
    method: str
    path: str
    body_sha256: str
    status: int
    body: bytes
    created_s: float


@dataclass
class _ChainView:
    """What the simulator knows of one local chain (per system)."""

    last_seq: int | None = None
    last_hash: str | None = None
    open_remaining: int | None = None
    intentions: dict[str, tuple[int, str]] = field(default_factory=dict)


class _Violation(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def uuid7(now_s: float) -> str:
    """A UUID v7 (the seed's record ids): 48-bit ms timestamp, version 7, random rest."""
    ms = int(now_s * 1000) & ((1 << 48) - 1)
    rand_a, rand_b = secrets.randbits(12), secrets.randbits(62)
    return str(uuid.UUID(int=(ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(int(epoch_s), UTC).isoformat()


class FiskalySim:
    """The simulator. ``await start()`` → ``url``; ``await stop()``."""

    def __init__(
        self,
        *,
        api_keys: dict[str, str],
        system_ids: set[str] | frozenset[str],
        token_ttl_s: float = 3600.0,
        idempotency_ttl_s: float = 86400.0,
        faults: FaultPlan | None = None,
        clock: Callable[[], float] = time.time,
        outage_grace_s: float | None = None,
    ) -> None:
        self.api_keys = dict(api_keys)
        self.system_ids = set(system_ids)
        self.token_ttl_s = token_ttl_s
        self.idempotency_ttl_s = idempotency_ttl_s
        self.faults = faults or FaultPlan()
        self._clock = clock
        self.outage_grace_s = outage_grace_s
        #: (start, end or None) of every outage, wall clock (the gateway's clock too)
        self.outages: list[tuple[float, float | None]] = []
        self.offset_s = 0.0
        self._jwt_secret = secrets.token_bytes(32)
        self._cache: dict[str, _Cached] = {}
        self._inflight: set[str] = set()
        self._chains: dict[tuple[str, str], _ChainView] = {}
        self._created: set[tuple[str, str, int, str]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        # what the tests read
        self.records: list[dict[str, Any]] = []
        self.duplicates = 0
        self.violations: list[str] = []
        self.replay_extensions = 0
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.faults_injected: Counter[str] = Counter()
        self.replayed_answers = 0
        self.tokens_issued = 0
        # serving
        self.host = "127.0.0.1"
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._server: asyncio.base_events.Server | None = None
        self._held_down = False

    # ------------------------------------------------------------------ lifecycle

    def now(self) -> float:
        return self._clock() + self.offset_s

    def advance(self, seconds: float) -> None:
        """Move the simulator's clock (token expiry, idempotency cache) forward."""
        self.offset_s += seconds

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=4 << 20)
        app.router.add_post("/tokens", self._tokens)
        app.router.add_post("/records", self._records)
        app.router.add_get("/systems/{system_id}", self._system)
        app.router.add_get("/_sim/stats", self._stats)
        app.router.add_post("/_sim/control", self._control)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        self.host = host
        await self._listen(port)

    async def _listen(self, port: int) -> None:
        assert self._runner is not None and self._runner.server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._runner.server, self.host, port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        """Stop listening and drop every connection: clients get connection refused."""
        if not self._held_down:
            self.outages.append((self._clock(), None))
        self._held_down = True
        await self._close_listener()

    async def up(self) -> None:
        if self._held_down and self.outages and self.outages[-1][1] is None:
            self.outages[-1] = (self.outages[-1][0], self._clock())
        self._held_down = False
        await self._relisten()

    async def _close_listener(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self._abort_connections()

    def _abort_connections(self) -> None:
        if self._runner is None or self._runner.server is None:
            return
        for handler in self._runner.server.connections:
            if handler.transport is not None:
                handler.transport.abort()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._runner is not None:
            self._abort_connections()
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FiskalySim:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def stats(self) -> dict[str, Any]:
        finals = [r for r in self.records if r["final"]]
        return {
            "records": len(self.records),
            "final_records": len(finals),
            "duplicates": self.duplicates,
            "violations": list(self.violations),
            "replay_extensions": self.replay_extensions,
            "requests": dict(self.requests),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "faults_injected": dict(self.faults_injected),
            "replayed_answers": self.replayed_answers,
            "tokens_issued": self.tokens_issued,
            "chains": {
                f"{s}/{c}": {"last_seq": v.last_seq, "open_remaining": v.open_remaining}
                for (s, c), v in self._chains.items()
            },
        }

    def final_seqs(self, chain: str) -> list[int]:
        """Seqs of a chain's final records, in the order they were accepted."""
        return [r["seq"] for r in self.records if r["final"] and r["chain"] == chain]

    # ------------------------------------------------------------------ helpers

    def _answer(
        self, status: int, body: dict[str, Any], *, replayed: bool | None = None
    ) -> web.Response:
        self.statuses[status] += 1
        headers = {}
        if replayed is not None:
            headers["X-Idempotency-Replayed"] = "true" if replayed else "false"
        return web.Response(
            status=status,
            body=json.dumps(body).encode(),
            content_type="application/json",
            headers=headers,
        )

    def _error(self, status: int, message: str, *, violation: bool = True) -> web.Response:
        if violation:
            self.violations.append(f"{status}: {message}")
        return self._answer(
            status, {"error": {"status": status, "message": message}}, replayed=False
        )

    def _check_version(self, request: web.Request) -> None:
        version = request.headers.get("X-Api-Version")
        if version is None:
            raise _Violation(400, "X-Api-Version header is required")
        if len(version) != 10 or not _VERSION_RE.match(version):
            raise _Violation(400, f"X-Api-Version {version!r} is not YYYY-MM-DD")
        if version not in SUPPORTED_VERSIONS:
            raise _Violation(400, f"X-Api-Version {version} does not support FR")

    def _common(self, request: web.Request) -> str:
        """Checks every POST shares; returns the idempotency key."""
        self._check_version(request)
        key = request.headers.get("X-Idempotency-Key")
        if key is None:
            raise _Violation(400, "X-Idempotency-Key header is required on POST")
        if not _KEY_RE.match(key):
            raise _Violation(400, f"X-Idempotency-Key {key!r} is not a UUID v3/v4")
        if request.content_type != "application/json":
            raise _Violation(400, f"Content-Type {request.content_type!r} is not JSON")
        return key

    def _json(self, raw: bytes) -> dict[str, Any]:
        try:
            body = json.loads(raw)
        except ValueError:
            raise _Violation(400, "body is not JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("content"), dict):
            raise _Violation(400, "body must be an object with a content object")
        meta = body.get("metadata", {})
        if not isinstance(meta, dict) or len(meta) > 20:
            raise _Violation(400, "metadata must be an object of at most 20 properties")
        for k, v in meta.items():
            if not isinstance(k, str) or len(k) > 40:
                raise _Violation(400, f"metadata key {k!r} longer than 40 characters")
            if not isinstance(v, str) or len(v) > 500:
                raise _Violation(400, f"metadata {k}: a string of at most 500 characters")
        return body

    def _check_token(self, request: web.Request) -> None:
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            raise _Violation(401, "Authorization: Bearer <token> is required")
        token = auth.removeprefix("Bearer ")
        try:
            head, payload, sig = token.split(".")
            expected = _b64url(
                hmac.new(self._jwt_secret, f"{head}.{payload}".encode(), "sha256").digest()
            )
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (ValueError, binascii.Error):
            raise _Violation(401, "malformed bearer token") from None
        if not hmac.compare_digest(expected, sig):
            raise _Violation(401, "bearer token signature invalid")
        if claims.get("exp", 0) <= self.now():
            raise _Violation(401, "bearer token expired")

    # ------------------------------------------------------------------ /tokens

    async def _tokens(self, request: web.Request) -> web.Response:
        self.requests["/tokens"] += 1
        raw = await request.read()
        try:
            self._common(request)  # the key is required, but /tokens does not cache by it
            content = self._json(raw)["content"]
        except _Violation as v:
            return self._error(v.status, v.message)
        key, secret = content.get("key"), content.get("secret")
        if content.get("type") != "API_KEY" or not isinstance(key, str):
            return self._error(400, "content must be {type: API_KEY, key, secret}")
        if self.api_keys.get(key) != secret:
            return self._error(401, "API key or secret refused", violation=False)
        now = self.now()
        head = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = {"sub": key, "iat": int(now), "exp": int(now + self.token_ttl_s)}
        claims["jti"] = str(uuid.uuid4())
        payload = _b64url(json.dumps(claims).encode())
        sig = _b64url(hmac.new(self._jwt_secret, f"{head}.{payload}".encode(), "sha256").digest())
        self.tokens_issued += 1
        return self._answer(
            200,
            {
                "content": {
                    "id": str(uuid.uuid4()),
                    "bearer": f"{head}.{payload}.{sig}",
                    "issued_at": _iso(now),
                    "expires_at": _iso(now + self.token_ttl_s),
                    "subject": {"id": str(uuid.uuid5(uuid.NAMESPACE_OID, key))},
                },
                "metadata": {},
            },
            replayed=False,
        )

    # ------------------------------------------------------------------ /systems

    async def _system(self, request: web.Request) -> web.Response:
        """Retrieve a system (the gateway's liveness probe)."""
        self.requests["/systems"] += 1
        try:
            self._check_version(request)
            self._check_token(request)
        except _Violation as v:
            return self._error(v.status, v.message, violation=v.status != 401)
        system_id = request.match_info["system_id"]
        if system_id not in self.system_ids:
            return self._error(404, f"system {system_id} not found", violation=False)
        return self._answer(
            200,
            {"content": {"id": system_id, "state": "ACTIVE", "mode": "OPERATIVE"}, "metadata": {}},
        )

    def _check_outage(self, chain: str, seq: int, data: dict[str, Any]) -> None:
        """A record flagged online must not be signed well into an outage (outage_grace_s)."""
        grace = self.outage_grace_s
        if grace is None or not isinstance(data.get("time"), str):
            return
        try:
            signed_s = datetime.fromisoformat(data["time"].replace("Z", "+00:00")).timestamp()
        except ValueError:
            return  # the hash check names a broken record
        for start, end in self.outages:
            if start + grace < signed_s and (end is None or signed_s < end):
                raise _Violation(
                    400,
                    f"{chain} seq {seq}: flagged online but signed {signed_s - start:.1f} s "
                    f"into an outage (the gateway must notice one within {grace} s)",
                )

    # ------------------------------------------------------------------ /records

    async def _records(self, request: web.Request) -> web.StreamResponse:
        self.requests["/records"] += 1
        raw = await request.read()
        try:
            key = self._common(request)
            self._check_token(request)
        except _Violation as v:
            return self._error(v.status, v.message, violation=v.status != 401)
        now = self.now()
        fingerprint = hashlib.sha256(raw).hexdigest()
        if key in self._inflight:
            return self._error(409, f"request {key} is already being processed", violation=False)
        cached = self._cache.get(key)
        if cached is not None and now - cached.created_s > self.idempotency_ttl_s:
            del self._cache[key]
            cached = None
        if cached is not None:
            if (cached.method, cached.path, cached.body_sha256) != (
                request.method,
                request.path,
                fingerprint,
            ):
                self._reset_after_rejection(raw)
                return self._error(
                    422, f"idempotency key {key} was used with another payload", violation=False
                )
            self.replayed_answers += 1
            self.statuses[cached.status] += 1
            return web.Response(
                status=cached.status,
                body=cached.body,
                content_type="application/json",
                headers={"X-Idempotency-Replayed": "true"},
            )
        fault = self.faults.draw()
        if fault is not None:
            self.faults_injected[fault] += 1
        if fault == "refuse":
            if request.transport is not None:
                request.transport.abort()
            await self._close_listener()
            self._spawn(self._reopen_after(self.faults.refuse_window_s))
            return web.Response(status=500)  # never written: the connection is gone
        if fault == "error500":
            return self._error(500, "injected internal error", violation=False)
        if fault == "conflict":
            return self._error(409, "injected: request in flight", violation=False)
        if fault == "throttle":
            resp = self._error(429, "injected: too many requests", violation=False)
            resp.headers["Retry-After"] = str(self.faults.retry_after_s)
            return resp
        self._inflight.add(key)
        try:
            if fault == "stall":
                # processed after the client gave up; its retry meets 409 until then
                await asyncio.sleep(self.faults.stall_s)
            resp = self._create(request.headers, raw, now)
            if 200 <= resp.status < 300:
                assert isinstance(resp.body, bytes)
                self._cache[key] = _Cached(
                    request.method, request.path, fingerprint, resp.status, resp.body, now
                )
        finally:
            self._inflight.discard(key)
        if fault == "drop_after" and request.transport is not None:
            request.transport.abort()  # processed and cached, but no answer arrives
        return resp

    async def _reopen_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        await self._relisten()

    async def _relisten(self, timeout_s: float = 30.0) -> None:
        """Listen on our port again. While it was closed, a client's connection to it may
        have been given that very port as its source (a TCP self-connect: the kernel picks
        ephemeral ports from the range ours is in); it holds the port until the client gives
        up on it, so retry until then instead of staying down for good."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not self._held_down and self._server is None:
            try:
                await self._listen(self.port)
            except OSError:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.01)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _create(self, headers: Any, raw: bytes, now: float) -> web.Response:
        try:
            body = self._json(raw)
            record = self._validate(headers, body)
        except _Violation as v:
            self._reset_after_rejection(raw)
            return self._error(v.status, v.message)
        content = body["content"]
        meta = body["metadata"]
        record_id = uuid7(now)
        system_id = content["system"]["id"]
        chain, seq = meta["fg_chain"], int(meta["fg_seq"])
        dup_key = (system_id, chain, seq, content["type"])
        if dup_key in self._created:
            self.duplicates += 1
        self._created.add(dup_key)
        view = self._chains.setdefault((system_id, chain), _ChainView())
        if record["final"]:
            view.last_seq, view.last_hash = seq, meta["fg_hash"]
        else:
            view.intentions[record_id] = (seq, content["type"])
        record.update(id=record_id, chain=chain, seq=seq, cloud_type=content["type"])
        self.records.append(record)
        return self._answer(
            201,
            {
                "content": {
                    "id": record_id,
                    "type": content["type"],
                    "state": "COMPLETED" if record["final"] else "OPEN",
                    "system": {"id": system_id},
                    "created_at": _iso(now),
                },
                "metadata": meta,
            },
            replayed=False,
        )

    def _reset_after_rejection(self, raw: bytes) -> None:
        """After a rejected record the gateway stops that chain; when a technician resumes it
        the next record follows a gap: start the chain's order and replay checks afresh."""
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            body = json.loads(raw)
            view = self._chains.get((body["content"]["system"]["id"], body["metadata"]["fg_chain"]))
            if view is not None:
                view.last_seq = view.last_hash = view.open_remaining = None

    def _validate(self, headers: Any, body: dict[str, Any]) -> dict[str, Any]:
        content, meta = body["content"], body.get("metadata", {})
        ctype = content.get("type")
        if ctype not in RECORD_TYPES:
            raise _Violation(400, f"content.type {ctype!r} is not a record type")
        system = content.get("system")
        if not isinstance(system, dict) or system.get("id") not in self.system_ids:
            raise _Violation(400, "content.system.id is not a known system")
        for k in ("fg_chain", "fg_seq", "fg_hash", "fg_offline"):
            if k not in meta:
                raise _Violation(400, f"metadata.{k} is required (local chain, seq, hash)")
        chain, seq_s, hash_hex = meta["fg_chain"], meta["fg_seq"], meta["fg_hash"]
        if not seq_s.isdigit() or not re.fullmatch(r"[0-9a-f]{64}", hash_hex):
            raise _Violation(400, "metadata.fg_seq / fg_hash malformed")
        seq = int(seq_s)
        offline = meta["fg_offline"] == "true"
        view = self._chains.get((system["id"], chain), _ChainView())
        final = ctype not in INTENTIONS
        if final and ctype not in SINGLE:
            link = content.get("record")
            ref = link.get("id") if isinstance(link, dict) else None
            opened = view.intentions.get(ref) if isinstance(ref, str) else None
            if opened is None:
                raise _Violation(400, f"{ctype} must link to an open intention (content.record.id)")
            if opened[0] != seq or not ctype.startswith(INTENTIONS[opened[1]]):
                raise _Violation(400, f"{ctype} links to the intention of another record")
        if final:
            self._check_data(content.get("data"), chain, seq, hash_hex, offline)
            if not offline:
                self._check_outage(chain, seq, content["data"])
            if view.last_seq is not None and (
                seq != view.last_seq + 1 or content["data"]["prev_hash"] != view.last_hash
            ):
                raise _Violation(
                    400, f"{chain}: seq {seq} after {view.last_seq}: out of order or unlinked"
                )
        remaining = self._check_replay(headers, offline, hash_hex)
        if final:
            self._count_down(view, chain, seq, remaining)
            if ref_id := (content.get("record") or {}).get("id"):
                view.intentions.pop(ref_id, None)
        return {"final": final, "offline": offline, "remaining": remaining, "hash": hash_hex}

    def _check_data(self, data: Any, chain: str, seq: int, hash_hex: str, offline: bool) -> None:
        if not isinstance(data, dict):
            raise _Violation(400, "content.data (the signed record) is required")
        if (data.get("chain"), data.get("seq"), data.get("hash")) != (chain, seq, hash_hex):
            raise _Violation(400, "content.data does not match metadata chain/seq/hash")
        if data.get("offline") is not offline:
            raise _Violation(400, "metadata.fg_offline does not match the record's flag")
        unsigned = {k: v for k, v in data.items() if k not in ("hash", "sig")}
        try:
            actual = hashlib.sha256(canonical_bytes(unsigned)).hexdigest()
        except Exception as exc:
            raise _Violation(400, f"content.data is not canonicalizable: {exc}") from None
        if actual != hash_hex:
            raise _Violation(400, f"{chain} seq {seq}: hash does not match the record")

    def _check_replay(self, headers: Any, offline: bool, hash_hex: str) -> int | None:
        remaining_h = headers.get("X-Replay-Remaining")
        hash_h = headers.get("X-Replay-Hash")
        if (remaining_h is None) != (hash_h is None):
            raise _Violation(400, "X-Replay-Remaining and X-Replay-Hash go together")
        if remaining_h is None:
            if offline:
                raise _Violation(400, "a record signed offline needs the replay headers")
            return None
        if not offline:
            raise _Violation(400, "replay headers on a record not signed offline")
        if not _REMAINING_RE.match(remaining_h):
            raise _Violation(400, f"X-Replay-Remaining {remaining_h!r} is not 1-4 digits")
        if not 1 <= len(hash_h) <= 64:
            raise _Violation(400, "X-Replay-Hash must be 1-64 characters")
        try:
            raw_hash = base64.b64decode(hash_h, validate=True)
        except (binascii.Error, ValueError):
            raise _Violation(400, "X-Replay-Hash is not base64") from None
        if raw_hash != bytes.fromhex(hash_hex):
            raise _Violation(400, "X-Replay-Hash is not the record's hash")
        return int(remaining_h)

    def _count_down(self, view: _ChainView, chain: str, seq: int, remaining: int | None) -> None:
        if remaining is None:
            if view.open_remaining:
                raise _Violation(
                    400,
                    f"{chain} seq {seq}: online record while {view.open_remaining} offline "
                    "records are still announced",
                )
            return
        if view.open_remaining is not None:
            expected = view.open_remaining - 1
            if remaining < expected:
                raise _Violation(
                    400, f"{chain} seq {seq}: X-Replay-Remaining {remaining}, expected {expected}"
                )
            if remaining > expected:
                self.replay_extensions += 1
        view.open_remaining = remaining or None

    # ------------------------------------------------------------------ remote control

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _control(self, request: web.Request) -> web.Response:
        body = await request.json()
        if "fault_rate" in body:
            self.faults.rate = float(body["fault_rate"])
        if "advance_s" in body:
            self.advance(float(body["advance_s"]))
        if body.get("down") is True:
            self._spawn(self.down())
        elif body.get("down") is False:
            await self.up()
        return web.json_response({"ok": True})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="loopback fiskaly SIGN FR simulator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    p.add_argument("--api-key", default="sim-key")
    p.add_argument("--api-secret", default="sim-secret")
    p.add_argument("--system-id", default="0189f7ea-ae2c-7809-8aeb-b819cf5e9e7f")
    p.add_argument("--token-ttl-s", type=float, default=3600.0)
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--down", action="store_true", help="start with the listener closed")
    p.add_argument(
        "--outage-grace-s",
        type=float,
        default=None,
        help="refuse online records signed more than this into an outage (docs/sync.md)",
    )
    args = p.parse_args(argv)

    async def serve() -> None:
        sim = FiskalySim(
            api_keys={args.api_key: args.api_secret},
            system_ids={args.system_id},
            token_ttl_s=args.token_ttl_s,
            faults=FaultPlan(rate=args.fault_rate),
            outage_grace_s=args.outage_grace_s,
        )
        await sim.start(args.host, args.port)
        if args.down:
            await sim.down()
        print(f"fiskaly simulator on {sim.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        # from outside while the listener is closed: SIGUSR1 takes it down, SIGUSR2 up
        loop.add_signal_handler(signal.SIGUSR1, lambda: sim._spawn(sim.down()))
        loop.add_signal_handler(signal.SIGUSR2, lambda: sim._spawn(sim.up()))
        try:
            await stop.wait()
        finally:
            await sim.stop()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
