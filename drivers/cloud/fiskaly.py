"""fiskaly SIGN FR (seed 004): the HTTP client and the mapping of our records to its records.

:class:`FiskalyClient` speaks the API: a token from ``POST /tokens`` (``{"content": {"type":
"API_KEY", "key", "secret"}}``), kept until shortly before it expires and fetched again on a
401; ``X-Api-Version`` on every call; ``X-Idempotency-Key`` on every POST; ``POST /records``
with the replay headers. Every call has connect, read and total timeouts. Library errors are
mapped at the edge into the gateway's cloud errors (gateway.core.errors), most specific first;
what an answer means is decided by gateway.core.sync_policy. Retries of one call run in place
with ``tenacity``: transient failures a few times with exponential backoff and jitter, 409
(the same key still in flight) and 429 (``Retry-After``) waiting up to ``busy_max_wait_s``,
401 once after a new token. What is left over is raised, and the sync engine decides
(offline, probe later; or reject and stop the chain).

:class:`FiskalyUplink` is the ``france/fiskaly`` sender: it turns one signed record into one
or two cloud records (:data:`CLOUD_CALLS`) — a sale is an ``INTENTION::TRANSACTION`` then a
``TRANSACTION::RECEIPT`` linked to it — each with its own fixed idempotency key
(gateway.core.replay.call_key), and every cloud record carries the local chain, seq, hash and
offline flag in its ``metadata`` (the full signed record in ``content.data``) so the cloud
side can be reconciled with the journal. The body layout is our choice where the seed is
silent (its request samples are collapsed); docs/sync.md describes it.

Not here: queues, ordering, uplink state, persistence (gateway.sync).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_exponential_jitter

from gateway.core.errors import (
    CloudAuthFailed,
    CloudBusy,
    CloudError,
    CloudRejected,
    CloudUnavailable,
)
from gateway.core.record import Record
from gateway.core.replay import call_key
from gateway.core.sync_policy import (
    AUTH,
    BUSY,
    OK,
    TRANSIENT,
    PartialSend,
    SendOutcome,
    classify_status,
    retry_after_s,
)

log = logging.getLogger("gateway.cloud.fiskaly")

PROCESSOR_ID = "france/fiskaly"
DEFAULT_API_VERSION = "2026-02-03"

#: The cloud records one of our records becomes, in order (docs/sync.md, "Record types").
CLOUD_CALLS: dict[str, tuple[str, ...]] = {
    "TRANSACTION::RECEIPT": ("INTENTION::TRANSACTION", "TRANSACTION::RECEIPT"),
    "TRANSACTION::INVOICE": ("INTENTION::TRANSACTION", "TRANSACTION::INVOICE"),
    "TRANSACTION::CANCELLATION": ("INTENTION::TRANSACTION", "TRANSACTION::CANCELLATION"),
    "TRANSACTION::CORRECTION": ("INTENTION::TRANSACTION", "TRANSACTION::CORRECTION"),
    "INTENTION::DUPLICATE": ("INTENTION::DUPLICATE",),
    "INTENTION::EVENT": ("INTENTION::EVENT",),
    "CLOSING::DAILY": ("INTENTION::CLOSING", "CLOSING::DAILY"),
    "CLOSING::MONTHLY": ("INTENTION::CLOSING", "CLOSING::MONTHLY"),
    "CLOSING::YEARLY": ("INTENTION::CLOSING", "CLOSING::YEARLY"),
    "EXPORT::RECORDS": ("INTENTION::EXPORT", "EXPORT::RECORDS"),
}


def cloud_calls(record_type: str) -> tuple[str, ...]:
    try:
        return CLOUD_CALLS[record_type]
    except KeyError:
        raise CloudRejected(f"no fiskaly record type for {record_type}") from None


def record_metadata(record: Record) -> dict[str, str]:
    """What every cloud record of ``record`` carries to reconcile it with the journal
    (metadata values are strings: at most 20 keys of <= 40 characters, values <= 500)."""
    return {
        "fg_chain": record.chain,
        "fg_seq": str(record.seq),
        "fg_hash": record.hash,
        "fg_type": record.type,
        "fg_offline": "true" if record.offline else "false",
    }


def call_body(
    record: Record, call_index: int, cloud_type: str, system_id: str, intention_id: str | None
) -> dict[str, Any]:
    """The JSON body of call ``call_index`` of ``record`` (deterministic: retries must send
    the same payload under the same key)."""
    content: dict[str, Any] = {"type": cloud_type, "system": {"id": system_id}}
    last = call_index == len(cloud_calls(record.type)) - 1
    if call_index > 0:
        content["record"] = {"id": intention_id}
    if last:
        content["data"] = record.to_json()
    return {"content": content, "metadata": record_metadata(record)}


def encode_body(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class FiskalySettings:
    base_url: str
    api_key: str
    api_secret: str
    system_id: str
    api_version: str = DEFAULT_API_VERSION
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    total_timeout_s: float = 30.0
    token_refresh_margin_s: float = 60.0
    retry_attempts: int = 3
    retry_min_s: float = 0.2
    retry_max_s: float = 5.0
    busy_max_wait_s: float = 60.0


@dataclass(frozen=True, slots=True)
class CallResult:
    status: int
    record_id: str
    replayed: bool


class _Retry(Exception):
    """One attempt failed in a way worth retrying in place (``kind``: sync_policy class)."""

    def __init__(self, kind: str, cause: CloudError, wait_s: float | None = None) -> None:
        super().__init__(cause.message)
        self.kind = kind
        self.cause = cause
        self.wait_s = wait_s


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _parse_time_ms(value: Any) -> int | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value * 1000)
    if isinstance(value, str):
        try:
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
        except ValueError:
            return None
    return None


class FiskalyClient:
    """One API client (one aiohttp session). ``await start()`` … ``await close()``."""

    def __init__(
        self,
        settings: FiskalySettings,
        *,
        clock_ms: Callable[[], int] = _now_ms,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.clock_ms = clock_ms
        self.sleep = sleep
        self.rand = rand
        self.base_url = settings.base_url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(
            total=settings.total_timeout_s,
            connect=settings.connect_timeout_s,
            sock_connect=settings.connect_timeout_s,
            sock_read=settings.read_timeout_s,
        )
        self._session: aiohttp.ClientSession | None = None
        self._bearer: str | None = None
        self._refresh_at_ms = 0
        self._token_lock = asyncio.Lock()
        #: failed HTTP exchanges so far, retried ones included (errors_count of a run)
        self.errors = 0
        self.calls = 0
        self.tokens_fetched = 0

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=self.timeout,
                connector=aiohttp.TCPConnector(limit=32, enable_cleanup_closed=True),
            )

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    @property
    def has_token(self) -> bool:
        return self._bearer is not None and self.clock_ms() < self._refresh_at_ms

    # ------------------------------------------------------------------ one exchange

    async def _exchange(
        self, path: str, body: bytes | None, headers: dict[str, str], method: str = "POST"
    ) -> tuple[int, Any, bytes]:
        """One request: (status, headers, body); CloudUnavailable when no answer came."""
        if self._session is None:
            await self.start()
        assert self._session is not None
        self.calls += 1
        what = f"{method} {path}"
        try:
            async with self._session.request(
                method, self.base_url + path, data=body, headers=headers, timeout=self.timeout
            ) as resp:
                return resp.status, resp.headers, await resp.read()
        except TimeoutError as exc:
            self.errors += 1
            raise CloudUnavailable(f"{what}: no answer in time (timeout)") from exc
        except aiohttp.ClientConnectorError as exc:
            self.errors += 1
            raise CloudUnavailable(f"{what}: cannot connect: {exc.os_error}") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            self.errors += 1
            raise CloudUnavailable(f"{what}: connection dropped: {exc}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            self.errors += 1
            raise CloudUnavailable(f"{what}: {type(exc).__name__}: {exc}") from exc

    def _headers(self, key: str) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "X-Api-Version": self.settings.api_version,
            "X-Idempotency-Key": key,
        }

    # ------------------------------------------------------------------ token

    async def ensure_token(self) -> None:
        """Have a valid token (the probe of an offline uplink)."""
        await self._token()

    async def check_system(self) -> None:
        """``GET /systems/{system_id}`` (seed 004, "Retrieve a system"): the cheapest call that
        proves the cloud answers *and* takes our token — the liveness probe. Retried in place
        like any call (``retry_attempts``, backoff with jitter: a keep-alive connection the
        cloud closed meanwhile must not count as an outage); a 401 gets one new token.
        Raises CloudUnavailable / CloudAuthFailed."""
        s = self.settings
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(CloudUnavailable),
            stop=stop_after_attempt(s.retry_attempts),
            wait=wait_exponential_jitter(
                multiplier=s.retry_min_s, max=s.retry_max_s, jitter=s.retry_min_s
            ),
            sleep=self.sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await self._get_system()

    async def _get_system(self) -> None:
        path = f"/systems/{self.settings.system_id}"
        for auth_attempt in range(2):
            bearer = await self._token()
            headers = {
                "Accept": "application/json",
                "X-Api-Version": self.settings.api_version,
                "Authorization": f"Bearer {bearer}",
            }
            status, _, data = await self._exchange(path, None, headers, method="GET")
            kind = classify_status(status)
            if kind == OK:
                return
            self.errors += 1
            what = f"GET {path} answered {status} ({_snippet(data)})"
            if kind == AUTH and auth_attempt == 0:
                self.drop_token()
                continue
            if kind in (TRANSIENT, BUSY):
                raise CloudUnavailable(what)
            # 401 twice, or 404: the system id is not (or no longer) ours. The cloud answers
            # but takes no record from us: as good as unreachable until a technician acts
            raise CloudAuthFailed(what)

    def drop_token(self) -> None:
        self._bearer = None
        self._refresh_at_ms = 0

    async def _token(self) -> str:
        if self._bearer is not None and self.clock_ms() < self._refresh_at_ms:
            return self._bearer
        async with self._token_lock:
            if self._bearer is not None and self.clock_ms() < self._refresh_at_ms:
                return self._bearer
            s = self.settings
            body = encode_body(
                {"content": {"type": "API_KEY", "key": s.api_key, "secret": s.api_secret}}
            )
            # the API ignores the key on /tokens for now but requires it on every POST
            status, _, data = await self._exchange(
                "/tokens", body, self._headers(str(uuid.uuid4()))
            )
            kind = classify_status(status)
            if kind != OK:
                self.errors += 1
                if kind in (TRANSIENT, BUSY):
                    raise CloudUnavailable(f"POST /tokens answered {status}")
                raise CloudAuthFailed(
                    f"POST /tokens answered {status}: the API key or secret was refused "
                    f"({_snippet(data)})"
                )
            self._bearer, self._refresh_at_ms = self._read_token(data)
            self.tokens_fetched += 1
            return self._bearer

    def _read_token(self, data: bytes) -> tuple[str, int]:
        try:
            content = json.loads(data)["content"]
            # the seed's response sample is collapsed: read the bearer and expiry either
            # at the top of ``content`` or under ``content.authentication``
            auth = content.get("authentication") if isinstance(content, dict) else None
            src = auth if isinstance(auth, dict) and "bearer" in auth else content
            bearer = src["bearer"]
            expires_ms = _parse_time_ms(src.get("expires_at"))
            issued_ms = _parse_time_ms(src.get("issued_at", content.get("issued_at")))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CloudAuthFailed(f"POST /tokens: unexpected answer ({_snippet(data)})") from exc
        if not isinstance(bearer, str) or not bearer or expires_ms is None:
            raise CloudAuthFailed(f"POST /tokens: no bearer or expiry ({_snippet(data)})")
        now = self.clock_ms()
        # lifetime by the cloud's own clock when it says when it issued the token: a till's
        # clock may be minutes off, the difference of two cloud times is not
        lifetime_ms = expires_ms - (issued_ms if issued_ms is not None else now)
        margin_ms = int(self.settings.token_refresh_margin_s * 1000)
        usable_ms = max(lifetime_ms - margin_ms, lifetime_ms // 2)
        return bearer, now + max(0, usable_ms)

    # ------------------------------------------------------------------ records

    async def create_record(
        self, body: dict[str, Any], key: str, extra_headers: dict[str, str] | None = None
    ) -> CallResult:
        """``POST /records`` with retries in place; raises what is left over."""
        data = encode_body(body)
        try:
            return await self._attempt("/records", data, key, extra_headers)
        except _Retry as first:
            return await self._retry("/records", data, key, extra_headers, first)

    async def _attempt(
        self, path: str, data: bytes, key: str, extra: dict[str, str] | None
    ) -> CallResult:
        try:
            bearer = await self._token()
        except CloudUnavailable as exc:
            raise _Retry(TRANSIENT, exc) from exc
        headers = self._headers(key)
        headers["Authorization"] = f"Bearer {bearer}"
        if extra:
            headers.update(extra)
        try:
            status, resp_headers, payload = await self._exchange(path, data, headers)
        except CloudUnavailable as exc:
            raise _Retry(TRANSIENT, exc) from exc
        kind = classify_status(status)
        if kind == OK:
            try:
                record_id = str(json.loads(payload)["content"]["id"])
            except (ValueError, KeyError, TypeError) as exc:
                raise CloudRejected(f"POST {path}: answer without an id", status) from exc
            replayed = resp_headers.get("X-Idempotency-Replayed", "").lower() == "true"
            return CallResult(status, record_id, replayed)
        self.errors += 1
        what = f"POST {path} answered {status} ({_snippet(payload)})"
        if kind == AUTH:
            self.drop_token()
            raise _Retry(AUTH, CloudAuthFailed(what))
        if kind == BUSY:
            wait = retry_after_s(resp_headers.get("Retry-After"), self.clock_ms())
            raise _Retry(BUSY, CloudBusy(what), wait if status == 429 else None)
        if kind == TRANSIENT:
            raise _Retry(TRANSIENT, CloudUnavailable(what))
        raise CloudRejected(what, status)

    async def _retry(
        self, path: str, data: bytes, key: str, extra: dict[str, str] | None, first: _Retry
    ) -> CallResult:
        s = self.settings
        counts = {first.kind: 1}
        busy_waited = [0.0]
        backoff = wait_exponential_jitter(
            multiplier=s.retry_min_s, max=s.retry_max_s, jitter=s.retry_min_s
        )

        def last(rs: RetryCallState) -> _Retry:
            exc = rs.outcome.exception() if rs.outcome is not None else None
            return exc if isinstance(exc, _Retry) else first

        def wait(rs: RetryCallState) -> float:
            r = last(rs)
            if r.kind == AUTH:
                return 0.0
            if r.kind == BUSY and r.wait_s is not None:
                return r.wait_s
            return float(backoff(rs))

        def stop(rs: RetryCallState) -> bool:
            r = last(rs)
            n = counts.get(r.kind, 0)
            if r.kind == AUTH:
                return n >= 2
            if r.kind == BUSY:  # 409/429: wait as long as the cloud asks, within the bound
                return busy_waited[0] + wait(rs) > s.busy_max_wait_s
            return n >= s.retry_attempts

        def before_sleep(rs: RetryCallState) -> None:
            if last(rs).kind == BUSY:
                busy_waited[0] += rs.upcoming_sleep

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_Retry),
            stop=stop,
            wait=wait,
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )
        pending: _Retry | None = first
        try:
            async for attempt in retrying:
                with attempt:
                    if pending is not None:  # the first failure happened before tenacity
                        exc, pending = pending, None
                        raise exc
                    try:
                        return await self._attempt(path, data, key, extra)
                    except _Retry as again:
                        counts[again.kind] = counts.get(again.kind, 0) + 1
                        raise
        except _Retry as exhausted:
            raise exhausted.cause from None
        raise AssertionError("unreachable")  # pragma: no cover


def _snippet(data: bytes, limit: int = 200) -> str:
    text = data[:limit].decode("utf-8", "replace").strip()
    return text or "empty body"


class FiskalyUplink:
    """The ``france/fiskaly`` real-time sender (gateway.sync.Sender)."""

    processor_id = PROCESSOR_ID

    def __init__(self, client: FiskalyClient) -> None:
        self.client = client

    @property
    def errors(self) -> int:
        return self.client.errors

    async def start(self) -> None:
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()

    async def probe(self) -> None:
        """A token if none is valid, then ``GET /systems/{id}`` (a real round trip even
        when the token is still good: this is what notices an outage while idle)."""
        await self.client.check_system()

    async def send(
        self, record: Record, key: str, replay: dict[str, str], cloud_ref: str | None
    ) -> SendOutcome:
        """Send ``record`` (all its calls, in order); ``cloud_ref``: its first call's cloud
        id if that went through before. Raises CloudError, or PartialSend after the first
        of two calls went through."""
        calls = cloud_calls(record.type)
        system_id = self.client.settings.system_id
        intention_id = cloud_ref if len(calls) > 1 else None
        replayed = True
        result: CallResult | None = None
        for i, cloud_type in enumerate(calls):
            if i == 0 and intention_id is not None:
                continue
            body = call_body(record, i, cloud_type, system_id, intention_id)
            try:
                result = await self.client.create_record(body, call_key(key, i, cloud_type), replay)
            except CloudError as exc:
                if i > 0 and intention_id is not None:
                    raise PartialSend(intention_id, exc) from exc
                raise
            replayed = replayed and result.replayed
            if i == 0:
                intention_id = result.record_id
        assert result is not None or intention_id is not None
        return SendOutcome(
            cloud_id=result.record_id if result else str(intention_id),
            replayed=replayed,
            calls=len(calls),
        )
