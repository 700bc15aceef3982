"""The listener shared by the batch simulators (GoRoute, SIFEN): an aiohttp app on loopback,
a clock that tests can inject, and the fault injection of the fiskaly simulator
(:class:`drivers.cloud.fiskaly_sim.FaultPlan`) applied to the submit call.

Faults: ``error500`` (an answer 500, nothing taken), ``throttle`` (429 with ``Retry-After``),
``stall`` (processed after ``stall_s``), ``drop_after`` (processed, then the connection is
cut before the answer: the client cannot know it went through), ``refuse`` (the connection
is cut before anything is processed), ``conflict`` (409).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from drivers.cloud.fiskaly_sim import FaultPlan


class LoopbackServer:
    def __init__(
        self, *, clock: Callable[[], float] = time.time, faults: FaultPlan | None = None
    ) -> None:
        self._clock = clock
        self.faults = faults or FaultPlan()
        self.faults_injected: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.violations: list[str] = []
        self.host = "127.0.0.1"
        self.port = 0
        self._runner: web.AppRunner | None = None

    def now(self) -> float:
        return self._clock()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self, port: int = 0) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self.routes(app)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def answer(self, status: int, body: Any, *, violation: str | None = None) -> web.Response:
        self.statuses[status] += 1
        if violation is not None:
            self.violations.append(violation)
        return web.json_response(body, status=status)

    async def with_faults(
        self, request: web.Request, process: Callable[[], Awaitable[web.Response]]
    ) -> web.Response:
        """Run ``process`` (the submit) under the fault plan."""
        fault = self.faults.draw()
        if fault is not None:
            self.faults_injected[fault] += 1
        if fault == "refuse":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        if fault == "error500":
            return self.answer(500, {"error": {"code": "INTERNAL_ERROR", "message": "injected"}})
        if fault == "conflict":
            return self.answer(409, {"error": {"code": "CONFLICT", "message": "injected"}})
        if fault == "throttle":
            resp = self.answer(429, {"error": {"code": "RATE_LIMITED", "message": "injected"}})
            resp.headers["Retry-After"] = str(self.faults.retry_after_s)
            return resp
        if fault == "stall":
            await asyncio.sleep(self.faults.stall_s)
        resp = await process()
        if fault == "drop_after" and request.transport is not None:
            request.transport.abort()
        return resp
