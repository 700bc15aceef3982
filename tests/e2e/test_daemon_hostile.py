"""Hostile clients (DESIGN.md §3.7: the daemon never crashes on input).

In every test a well-behaved client keeps signing on its own connection and must get a
correct reply to each request within a bound, while another client misbehaves; afterwards
the process is alive, ``/v1/health`` answers 200, and the journal verifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import resource
import socket
import time
from pathlib import Path
from typing import Any

import pytest

WRITE_TIMEOUT_S = 0.5
CONFIG = f"""
[pos]
write_timeout_s = {WRITE_TIMEOUT_S}
max_connections = 1024
"""
#: Bound on the good client's reply latency while others misbehave (2 slow CI cores).
MAX_LATENCY_S = 2.0


class GoodClient:
    """Signs a sale every few ms on its own connection and checks each reply."""

    def __init__(self, daemon: Any, make_pos_sale: Any) -> None:
        self.daemon = daemon
        self.make_pos_sale = make_pos_sale
        self.latencies: list[float] = []
        self.records: list[dict[str, Any]] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> GoodClient:
        self._task = asyncio.create_task(self._run())
        while len(self.latencies) < 3:  # flowing before the hostile part starts
            assert not self._task.done(), self._task
            await asyncio.sleep(0.01)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await asyncio.wait_for(self._task, 30)

    async def _run(self) -> None:
        async with await self.daemon.connect() as client:
            i = 0
            while not self._stop.is_set():
                request = self.make_pos_sale(f"good-{i}", 200 + i)
                t0 = time.monotonic()
                reply = await client.request(request, timeout_s=MAX_LATENCY_S * 5)
                self.latencies.append(time.monotonic() - t0)
                assert reply["ok"] is True, reply
                assert reply["record"]["request_id"] == request["id"]
                assert reply["record"]["payload"]["total"] == request["total"]
                self.records.append(reply["record"])
                i += 1
                await asyncio.sleep(0.01)

    def check(self) -> None:
        worst = max(self.latencies)
        print(f"good client: {len(self.latencies)} replies, worst latency {worst * 1000:.0f} ms")
        assert worst < MAX_LATENCY_S
        seqs = [r["seq"] for r in self.records]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


@pytest.fixture
async def hostile_daemon(start_daemon: Any) -> Any:
    return await start_daemon(CONFIG)


@pytest.fixture
async def good_client(hostile_daemon: Any, make_pos_sale: Any) -> Any:
    async with GoodClient(hostile_daemon, make_pos_sale) as good:
        yield good
    good.check()


async def assert_daemon_healthy(daemon: Any, journal_check: Any, good: GoodClient) -> None:
    assert daemon.alive()
    status, body = await daemon.http_get("/v1/health")
    assert (status, body) == (200, {"ok": True})
    reply = await daemon.request({"id": "after", "op": "status"})
    assert reply["ok"] is True
    assert "Traceback" not in daemon.stderr_text()
    assert "exception was never retrieved" not in daemon.stderr_text()
    journal_check(daemon.db_path, good.records[-3:])


async def expect_error(client: Any, code: str, rid: Any = None) -> dict[str, Any]:
    reply = await client.recv(timeout_s=10)
    assert reply["ok"] is False, reply
    assert (reply["id"], reply["error"]["code"]) == (rid, code), reply
    return reply


async def expect_usable(client: Any, rid: str) -> None:
    reply = await client.request({"id": rid, "op": "status"}, timeout_s=10)
    assert reply["ok"] is True, reply


async def test_hostile_malformed_lines_get_protocol_errors_connection_stays_usable(
    hostile_daemon: Any, good_client: GoodClient, journal_check: Any
) -> None:
    cases: list[tuple[bytes, str]] = [
        (b"\x00\x01\x02garbage\xff\xfe\x80 not json at all", "PROTOCOL_ERROR"),
        (b'{"id":"u8","op":"status","x":"\xff\xfe\xc3"}', "PROTOCOL_ERROR"),  # invalid UTF-8
        (b"[1, 2, 3]", "PROTOCOL_ERROR"),
        (b'"just a string"', "PROTOCOL_ERROR"),
        (b"42", "PROTOCOL_ERROR"),
        (b"null", "PROTOCOL_ERROR"),
        (b'{"id":"dupkey","op":"status","op":"status"}', "PROTOCOL_ERROR"),
        (b"[" * 200_000 + b"]" * 200_000, "PROTOCOL_ERROR"),  # nested far too deep
        (
            b'{"id":"deep","x":' + b'{"a":' * 100_000 + b"1" + b"}" * 100_000 + b"}",
            "PROTOCOL_ERROR",
        ),
        (b'{"id":"bigint","op":"status","n":' + b"7" * 5000 + b"}", "PROTOCOL_ERROR"),
        (b'{"id":"trunc","op":"sta', "PROTOCOL_ERROR"),
    ]
    async with await hostile_daemon.connect() as client:
        for i, (line, code) in enumerate(cases):
            await client.send_raw(line + b"\n")
            await expect_error(client, code)
            await expect_usable(client, f"ok-{i}")
        # JSON that parses but is no request: a validation error naming the field
        nested = b'{"id":"nest","op":"status","x":' + b"[" * 500 + b"]" * 500 + b"}"
        await client.send_raw(nested + b"\n")
        reply = await expect_error(client, "VALIDATION_ERROR", "nest")
        assert reply["error"]["details"][0]["field"] == "x"
        # strings that are not Unicode scalar values (lone surrogates) in an echoed id
        # and a field name: the reply still goes out, as valid UTF-8 JSON
        await client.send_raw(b'{"id":"\\ud800","op":"status","\\udc01":1}\n')
        reply = await client.recv(timeout_s=10)
        assert reply["ok"] is False and reply["error"]["code"] == "VALIDATION_ERROR", reply
        await expect_usable(client, "ok-surrogate")
        # a burst of random garbage lines in one write: one PROTOCOL_ERROR each, in any order
        rng = random.Random(7)
        garbage = [
            b"#" + rng.randbytes(rng.randrange(1, 300)).replace(b"\n", b"?") for _ in range(200)
        ]
        await client.send_raw(b"\n".join(garbage) + b"\n")
        for _ in garbage:
            await expect_error(client, "PROTOCOL_ERROR")
        await expect_usable(client, "ok-garbage")
        # blank lines and CRLF are fine
        await client.send_raw(b"\n\r\n  \n" + b'{"id":"crlf","op":"status"}\r\n')
        assert (await client.recv(timeout_s=10))["id"] == "crlf"
    await assert_daemon_healthy(hostile_daemon, journal_check, good_client)


async def test_hostile_10mb_line_gets_line_too_long_then_next_request_served(
    hostile_daemon: Any, good_client: GoodClient, journal_check: Any, make_pos_sale: Any
) -> None:
    big = b'{"id":"big","op":"sign","pad":"' + b"x" * 10_000_000 + b'"}\n'
    async with await hostile_daemon.connect() as client:
        await client.send_raw(big + json.dumps(make_pos_sale("after-big")).encode() + b"\n")
        await expect_error(client, "LINE_TOO_LONG")
        reply = await client.recv(timeout_s=10)
        assert reply["id"] == "after-big" and reply["ok"] is True, reply
        # an oversize line split across many writes is reported once, too
        await client.send_raw(b'{"id":"big2","pad":"')
        for _ in range(40):
            await client.send_raw(b"y" * 100_000)
        await client.send_raw(b'"}\n')
        await expect_error(client, "LINE_TOO_LONG")
        await expect_usable(client, "after-big2")
    assert hostile_daemon.query("SELECT count(*) FROM records WHERE request_id = 'big'") == [(0,)]
    await assert_daemon_healthy(hostile_daemon, journal_check, good_client)


async def test_hostile_half_written_line_then_disconnect_changes_nothing(
    hostile_daemon: Any, good_client: GoodClient, journal_check: Any, make_pos_sale: Any
) -> None:
    whole = json.dumps(make_pos_sale("half-1")).encode()
    for cut in (1, len(whole) // 2, len(whole) - 1, len(whole)):  # never the newline
        client = await hostile_daemon.connect()
        await client.send_raw(whole[:cut])
        await asyncio.sleep(0.05)
        await client.close()
    client = await hostile_daemon.connect()
    await client.send_raw(whole[:40])
    client.abort()
    await client.close()
    await asyncio.sleep(0.2)
    assert hostile_daemon.query("SELECT count(*) FROM records WHERE request_id = 'half-1'") == [
        (0,)
    ]
    status = await hostile_daemon.status()
    assert status["pos"]["connections"] == 2  # the good client and this status request
    await assert_daemon_healthy(hostile_daemon, journal_check, good_client)


def nofile_soft_limit(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text().splitlines()
    return int(next(ln.split()[3] for ln in limits if ln.startswith("Max open files")))


def _connect_many(path: Path, n: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    deadline = time.monotonic() + 30
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            socks.append(s)
            s.settimeout(10)
            while True:
                try:
                    s.connect(str(path))
                    break
                except BlockingIOError:  # the listen backlog is full: wait for accepts
                    assert time.monotonic() < deadline, "daemon stopped accepting"
                    time.sleep(0.005)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


async def test_hostile_500_idle_connections_good_client_still_served(
    hostile_daemon: Any, good_client: GoodClient, journal_check: Any
) -> None:
    n = 500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n + 512
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    # the daemon inherited the limit at start; it needs n descriptors plus its own
    daemon_soft = nofile_soft_limit(hostile_daemon.pid)
    if daemon_soft < want:
        pytest.skip(f"the daemon's RLIMIT_NOFILE soft limit {daemon_soft} is below {want}")
    socks = await asyncio.to_thread(_connect_many, hostile_daemon.socket_path, n)
    try:
        deadline = time.monotonic() + 10
        while (await hostile_daemon.status())["pos"]["connections"] < n:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        before = len(good_client.latencies)
        await asyncio.sleep(0.5)
        assert len(good_client.latencies) > before  # still served while they sit there
        status, _ = await hostile_daemon.http_get("/v1/health")
        assert status == 200
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 10
    while (await hostile_daemon.status())["pos"]["connections"] > 2:
        assert time.monotonic() < deadline, "idle connections were not cleaned up"
        await asyncio.sleep(0.05)
    await assert_daemon_healthy(hostile_daemon, journal_check, good_client)


async def test_hostile_slow_reader_pipelining_is_disconnected_by_write_timeout(
    hostile_daemon: Any, good_client: GoodClient, journal_check: Any
) -> None:
    n = 3000  # ~1.3 kB status replies: megabytes, far beyond the socket buffers
    client = await hostile_daemon.connect()
    try:
        # stop reading the socket at all (asyncio would otherwise buffer replies for us)
        client.writer.transport.pause_reading()
        await client.send_raw(b"".join(b'{"id":"slow-%d","op":"status"}\n' % i for i in range(n)))
        await asyncio.sleep(WRITE_TIMEOUT_S * 6)  # never read while the daemon writes
        client.writer.transport.resume_reading()
        got = 0
        with contextlib.suppress(EOFError, ConnectionError):
            while True:
                await client.recv(timeout_s=10)
                got += 1
    finally:
        await client.close()
    assert 0 < got < n, f"{got} replies: expected a disconnect part-way"
    log = hostile_daemon.stderr_text()
    assert log.count("not reading its replies") == 1, "one disconnect, logged once"
    assert "socket.send() raised exception" not in log  # nothing written after the abort
    await assert_daemon_healthy(hostile_daemon, journal_check, good_client)


async def status_ok(daemon: Any) -> bool:
    async with await daemon.connect() as client:
        await client.send({"id": "probe", "op": "status"})
        return (await client.recv(timeout_s=10))["ok"] is True


async def test_hostile_connections_over_limit_refused_with_error_others_unaffected(
    start_daemon: Any, make_pos_sale: Any, journal_check: Any
) -> None:
    limit = 8
    daemon = await start_daemon(f"[pos]\nmax_connections = {limit}\n")
    async with GoodClient(daemon, make_pos_sale) as good:
        clients = [await daemon.connect() for _ in range(limit - 1)]  # the good one is 1
        try:
            extra = await daemon.connect()
            refused = await expect_error(extra, "PROTOCOL_ERROR")
            assert "too many connections" in refused["error"]["message"]
            with pytest.raises(EOFError):
                await extra.recv(timeout_s=10)
            await extra.close()
            await expect_usable(clients[0], "still-served")
        finally:
            for c in clients:
                await c.close()
        deadline = time.monotonic() + 10
        while not await status_ok(daemon):  # freed slots are usable again
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    good.check()
    await assert_daemon_healthy(daemon, journal_check, good)
