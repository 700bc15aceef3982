"""The HTTP exchange shared by the batch clients (GoRoute, SIFEN): one aiohttp session, every
call under a total timeout, and the answer's status mapped to the error tree at the edge.

Mapping (gateway.core.sync_policy's classes): connect error, timeout, dropped connection,
5xx, 408 → :class:`CloudUnavailable`; 401 → :class:`CloudAuthFailed`; 429 →
:class:`CloudBusy` carrying the ``Retry-After`` header as sent (the engine reads it on its
clock and holds every request until then); any other 4xx → :class:`CloudRejected` (the
request itself is wrong: a bug, since the limits are checked before sending). What this
module leaves to the drivers: URLs, headers and bodies.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any, Protocol

import aiohttp

from gateway.core.batch_policy import Limits
from gateway.core.errors import CloudAuthFailed, CloudBusy, CloudRejected, CloudUnavailable
from gateway.core.sync_policy import AUTH, BUSY, OK, PERMANENT, classify_status


@contextlib.contextmanager
def reading(what: str) -> Iterator[None]:
    """Around the parsing of a cloud's answer: an answer of an unexpected shape (a ``null``
    list, an item that is not an object, ...) is an unusable answer — :class:`CloudUnavailable`,
    retried like one, the poll timeout still counting — never an exception that aborts the run.
    """
    try:
        yield
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CloudUnavailable(
            f"{what}: answer of an unexpected shape ({type(exc).__name__}: {exc})"
        ) from exc


class HttpSettings(Protocol):
    """What :class:`HttpBatchUplink` reads of a driver's settings."""

    @property
    def limits(self) -> Limits: ...
    @property
    def connect_timeout_s(self) -> float: ...
    @property
    def total_timeout_s(self) -> float: ...


class BatchHttp:
    def __init__(self, *, connect_timeout_s: float, total_timeout_s: float) -> None:
        self.timeout = aiohttp.ClientTimeout(total=total_timeout_s, connect=connect_timeout_s)
        self.session: aiohttp.ClientSession | None = None
        self.errors = 0

    async def start(self) -> None:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=self.timeout)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def call(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None = None
    ) -> tuple[int, Any]:
        """One exchange; the decoded JSON answer of a 2xx, else the mapped CloudError."""
        await self.start()
        assert self.session is not None
        try:
            async with self.session.request(method, url, headers=headers, data=body) as resp:
                raw = await resp.read()
                status = resp.status
                retry_after = resp.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.errors += 1
            raise CloudUnavailable(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        cls = classify_status(status)
        if cls == OK:
            try:
                return status, json.loads(raw)
            except ValueError as exc:
                self.errors += 1
                raise CloudUnavailable(f"{method} {url}: answer is not JSON") from exc
        self.errors += 1
        text = raw[:300].decode("utf-8", "replace")
        message = f"{method} {url}: HTTP {status}: {text}"
        if cls == AUTH:
            raise CloudAuthFailed(message)
        if cls == BUSY:
            raise CloudBusy(message, retry_after)
        if cls == PERMANENT:
            raise CloudRejected(message, status)
        raise CloudUnavailable(message)


class HttpBatchUplink:
    """The lifecycle every batch driver shares: its limits, one :class:`BatchHttp` (opened by
    ``start``, closed by ``close``) and its failed-exchange count (a run's ``errors_count``).
    A driver adds ``processor_id``, ``document``, ``submit`` and ``poll``."""

    def __init__(self, settings: HttpSettings) -> None:
        self.limits = settings.limits
        self.http = BatchHttp(
            connect_timeout_s=settings.connect_timeout_s, total_timeout_s=settings.total_timeout_s
        )

    @property
    def errors(self) -> int:
        return self.http.errors

    async def start(self) -> None:
        await self.http.start()

    async def close(self) -> None:
        await self.http.close()
