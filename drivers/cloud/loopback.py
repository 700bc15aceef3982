"""What the batch simulators (GoRoute, SIFEN) share: an aiohttp app on loopback, a clock that
tests can inject, the rate limit with its 429 + ``Retry-After``, the check that a client
honours it, the fault injection of the fiskaly simulator
(:class:`drivers.cloud.fiskaly_sim.FaultPlan`) applied to the submit call, and the command
line that serves one.

Rate limit: at most ``rate_limit`` submits per ``rate_window_s`` per account, counting the
client's own (``sent_times``) and those of another client of the same account
(:meth:`LoopbackServer.spend_quota`). Over it the answer is 429 with ``Retry-After`` (the
seconds until the oldest submit of the window leaves it, rounded up; an HTTP date when
``retry_after_format = "date"``). It is a *violation* only if the client's own submits broke
the limit (a client cannot know what another one spent).

Retry-After: after any 429 carrying one, every request of that client (submits and polls)
that arrives before it has passed is counted in ``early_requests``, recorded as a violation
and answered 429 again.

Faults: ``error500`` (an answer 500, nothing taken), ``throttle`` (429 with ``Retry-After``),
``stall`` (processed after ``stall_s``), ``drop_after`` (processed, then the connection is
cut before the answer: the client cannot know it went through), ``refuse`` (the connection
is cut before anything is processed), ``conflict`` (409).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import Any, TypedDict

from aiohttp import web

from drivers.cloud.fiskaly_sim import FaultPlan


class LoopbackOptions(TypedDict, total=False):
    """What every simulator takes for :class:`LoopbackServer` (its own options aside)."""

    clock: Callable[[], float] | None
    faults: FaultPlan | None
    rate_limit: int
    rate_window_s: float
    retry_after_format: str


class LoopbackServer:
    def __init__(
        self,
        *,
        clock: Callable[[], float] | None = None,
        faults: FaultPlan | None = None,
        rate_limit: int = 10,
        rate_window_s: float = 60.0,
        retry_after_format: str = "seconds",
    ) -> None:
        if retry_after_format not in ("seconds", "date"):
            raise ValueError(f"retry_after_format must be seconds or date: {retry_after_format}")
        self._clock = clock or time.time
        self.rate_limit = rate_limit
        self.rate_window_s = rate_window_s
        self.retry_after_format = retry_after_format
        #: when the client's submits were taken; another client's, of the same account
        self.sent_times: list[float] = []
        self.foreign_times: list[float] = []
        #: per client (API key / token): no request before this (the last Retry-After)
        self.holds: dict[str, float] = {}
        self.early_requests = 0
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

    def throttle(
        self, client: str, wait_s: float, body: Any, *, violation: str | None = None
    ) -> web.Response:
        """429 with ``Retry-After`` (``wait_s`` rounded up); the client is held until then."""
        now = self.now()
        wait_s = round(wait_s, 6)  # 40 s computed from float times must say 40, not 41
        if wait_s <= 0:
            until, header = now, "0"
        elif self.retry_after_format == "date":
            until = float(math.ceil(now + wait_s))
            header = formatdate(until, usegmt=True)
        else:
            delta = math.ceil(wait_s)
            until, header = now + delta, str(delta)
        self.holds[client] = max(self.holds.get(client, 0.0), until)
        resp = self.answer(429, body, violation=violation)
        resp.headers["Retry-After"] = header
        return resp

    def early(self, client: str, body: Any) -> web.Response | None:
        """The answer to a request that came before the client's Retry-After had passed
        (a violation, answered 429 again); None when it may come."""
        now = self.now()
        until = self.holds.get(client, 0.0)
        if now >= until - 1e-6:  # the float's last digit, not a tolerance
            return None
        self.early_requests += 1
        return self.throttle(client, until - now, body, violation="request before Retry-After")

    def spend_quota(self, n: int) -> None:
        """Another client of the same account made ``n`` submits just now."""
        self.foreign_times.extend([self.now()] * n)

    def over_rate(self, client: str, body: Any) -> web.Response | None:
        """The 429 for a submit over the rate limit; None when it may be taken (the caller
        then appends to ``sent_times``)."""
        now = self.now()
        low = now - self.rate_window_s
        own = [t for t in self.sent_times if t > low]
        every = sorted(own + [t for t in self.foreign_times if t > low])
        if len(every) < self.rate_limit:
            return None
        wait_s = every[len(every) - self.rate_limit] + self.rate_window_s - now
        mine = len(own) >= self.rate_limit
        return self.throttle(client, wait_s, body, violation="over the rate" if mine else None)

    def max_in_window(self) -> int:
        """The most of the client's submits taken in any ``rate_window_s`` (for the tests)."""
        times = sorted(self.sent_times)
        best = 0
        j = 0
        for i, t in enumerate(times):
            while times[j] <= t - self.rate_window_s:
                j += 1
            best = max(best, i - j + 1)
        return best

    async def with_faults(
        self, request: web.Request, client: str, process: Callable[[], Awaitable[web.Response]]
    ) -> web.Response:
        """Run ``process`` (the submit of ``client``) under the fault plan."""
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
            body = {"error": {"code": "RATE_LIMITED", "message": "injected"}}
            return self.throttle(client, self.faults.retry_after_s, body)
        if fault == "stall":
            await asyncio.sleep(self.faults.stall_s)
        resp = await process()
        if fault == "drop_after" and request.transport is not None:
            request.transport.abort()
        return resp


def serve(sim: LoopbackServer, port: int, name: str) -> int:
    """Serve ``sim`` on ``port`` until interrupted (the simulators' command lines)."""

    async def run() -> None:
        await sim.start(port)
        print(f"{name} on {sim.url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await sim.stop()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    return 0
