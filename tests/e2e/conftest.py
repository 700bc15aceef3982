"""End-to-end fixtures: the daemon as a real subprocess (DESIGN.md §8).

``start_daemon(config="...")`` runs ``python -m gateway.cli run`` with its own state
directory and a free HTTP port, waits until the POS socket accepts and ``/v1/health``
answers 200, and returns a :class:`Daemon` handle. At teardown every daemon still running
gets ``SIGTERM`` and must exit 0; a failing test shows each daemon's stderr (its JSON log).

The state directory is a short directory under the system temp dir rather than
``tmp_path``: a Unix socket path must stay under ~108 bytes, and test names are long.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from drivers.signers.software import KeyRing
from gateway.audit import verify_db
from gateway.core.canonical import canonical_bytes
from gateway.core.record import sha256_hex

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
REPLY_TIMEOUT_S = 30.0
#: Replies to big batches are long lines; the client accepts lines up to this size.
CLIENT_LINE_LIMIT = 256 * 1024 * 1024

DAEMONS = pytest.StashKey[list["Daemon"]]()


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------- POS socket client


class PosClient:
    """One JSON Lines connection to the POS socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: Path) -> PosClient:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=CLIENT_LINE_LIMIT), REPLY_TIMEOUT_S
        )
        return cls(reader, writer)

    async def send(self, request: dict[str, Any]) -> None:
        await self.send_raw(json.dumps(request, ensure_ascii=False).encode("utf-8") + b"\n")

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), REPLY_TIMEOUT_S)

    async def recv(self, timeout_s: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """The next reply line; EOFError when the daemon closed the connection."""
        line = await asyncio.wait_for(self.reader.readline(), timeout_s)
        if not line.endswith(b"\n"):
            raise EOFError(f"connection closed by the daemon (partial line {line[:80]!r})")
        reply = json.loads(line)
        assert isinstance(reply, dict), reply
        return reply

    async def request(
        self, request: dict[str, Any], timeout_s: float = REPLY_TIMEOUT_S
    ) -> dict[str, Any]:
        """Send one request and read one reply (only for a connection with nothing else
        in flight)."""
        await self.send(request)
        reply = await self.recv(timeout_s)
        assert reply.get("id") == request.get("id"), reply
        return reply

    def abort(self) -> None:
        """Drop the connection at once, without reading anything."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError, OSError):
            await asyncio.wait_for(self.writer.wait_closed(), 5.0)

    async def __aenter__(self) -> PosClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# ---------------------------------------------------------------------- the daemon


class Daemon:
    """A running ``fiscal-gateway run`` subprocess and ways to talk to it."""

    def __init__(self, name: str, state_dir: Path, log_dir: Path, config_path: Path | None):
        self.name = name
        self.state_dir = state_dir
        self.log_dir = log_dir
        self.config_path = config_path
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.killed = False
        self._session: aiohttp.ClientSession | None = None

    # paths and addresses
    @property
    def socket_path(self) -> Path:
        return self.state_dir / "pos.sock"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "gateway.db"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def stderr_path(self) -> Path:
        return self.log_dir / f"{self.name}.{self.starts}.stderr.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr_text(self) -> str:
        parts = []
        for i in range(1, self.starts + 1):
            p = self.log_dir / f"{self.name}.{i}.stderr.log"
            if p.exists():
                parts.append(f"--- start {i} ---\n" + p.read_text("utf-8", "replace"))
        return "\n".join(parts)

    # lifecycle
    async def start(self, *, wait_ready: bool = True) -> None:
        """Start the daemon; wait until it signs (health 200) unless ``wait_ready`` is false
        (a daemon expected to come up with signing halted)."""
        assert not self.alive(), "already running"
        self.starts += 1
        self.killed = False
        argv = [
            sys.executable,
            "-m",
            "gateway.cli",
            "run",
            "--state-dir",
            str(self.state_dir),
            "--http",
            f"127.0.0.1:{self.port}",
        ]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        self.proc = self._spawn(argv)
        if wait_ready:
            await self.wait_ready()

    def _spawn(self, argv: list[str]) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
        with open(self.stderr_path, "wb") as err:  # a file: a chatty daemon never blocks
            return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env=env)

    async def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.proc.returncode} while starting:\n"
                    + self.stderr_text()
                )
            if await self._ready():
                return
            if time.monotonic() > deadline:
                raise AssertionError("daemon not ready in time:\n" + self.stderr_text())
            await asyncio.sleep(0.05)

    async def _ready(self) -> bool:
        try:
            client = await PosClient.open(self.socket_path)
        except OSError:
            return False
        await client.close()
        try:
            status, _ = await self.http_get("/v1/health", timeout_s=2.0)
        except (aiohttp.ClientError, TimeoutError):
            return False
        return status == 200

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM and wait; returns the exit code (the process is killed after timeout_s)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            await asyncio.to_thread(self.proc.wait)
            raise AssertionError(
                f"daemon did not exit within {timeout_s} s of SIGTERM:\n" + self.stderr_text()
            ) from None

    async def kill(self) -> None:
        """SIGKILL (kill -9) and reap."""
        assert self.proc is not None
        self.killed = True
        self.proc.kill()
        await asyncio.to_thread(self.proc.wait)

    async def restart(self) -> None:
        if self.alive():
            rc = await self.stop()
            assert rc == 0, self.stderr_text()
        await self.start()

    # POS socket
    async def connect(self) -> PosClient:
        return await PosClient.open(self.socket_path)

    async def request(self, request: dict[str, Any]) -> dict[str, Any]:
        """One request on a fresh connection."""
        async with await self.connect() as client:
            return await client.request(request)

    async def status(self) -> dict[str, Any]:
        reply = await self.request({"id": "status", "op": "status"})
        assert reply["ok"], reply
        status: dict[str, Any] = reply["status"]
        return status

    async def head(self, chain: str = "till-1") -> tuple[int, str | None]:
        for c in (await self.status())["chains"]:
            if c["chain"] == chain:
                return c["seq"], c["hash"]
        return 0, None

    # HTTP
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def http_post(
        self, body: dict[str, Any] | bytes, timeout_s: float = REPLY_TIMEOUT_S
    ) -> tuple[int, dict[str, Any]]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
        async with self.session().post(
            self.http_url + "/v1/pos/requests",
            data=data,
            headers={"Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            return resp.status, await resp.json()

    async def http_get(
        self, path: str, timeout_s: float = REPLY_TIMEOUT_S
    ) -> tuple[int, dict[str, Any]]:
        async with self.session().get(
            self.http_url + path, timeout=aiohttp.ClientTimeout(total=timeout_s)
        ) as resp:
            return resp.status, await resp.json()

    # the journal, read directly (read-only; safe while the daemon runs: WAL)
    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with closing(
            sqlite3.connect(f"file:{self.db_path}?mode=ro", uri=True, timeout=10.0)
        ) as conn:
            return conn.execute(sql, params).fetchall()

    def held_events(self) -> int:
        """Gateway-wide events held for the first chain (docs/events.md, "Which chain"): a
        chain's first record comes after them, so on a fresh daemon the first sale's seq is
        ``held_events() + 1`` (after START and KEY_GENERATED: 3)."""
        return int(self.query("SELECT count(*) FROM held_events")[0][0])

    async def close_session(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


StartDaemon = Callable[..., Awaitable[Daemon]]


@pytest.fixture
async def start_daemon(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StartDaemon]:
    """``await start_daemon(config="[pos]\\nwrite_timeout_s = 0.5")`` → a running Daemon."""
    daemons: list[Daemon] = []
    request.node.stash[DAEMONS] = daemons
    state_root = Path(tempfile.mkdtemp(prefix="fg-e2e-"))

    async def start(config: str | None = None, *, name: str = "gw") -> Daemon:
        config_path = None
        if config is not None:
            config_path = tmp_path / f"{name}.toml"
            config_path.write_text(config, "utf-8")
        d = Daemon(name, state_root / name, tmp_path, config_path)
        daemons.append(d)
        await d.start()
        return d

    try:
        yield start
    finally:
        problems = []
        for d in daemons:
            await d.close_session()
            if d.proc is None:
                continue
            if d.alive():
                try:
                    rc = await d.stop()
                except AssertionError:  # killed after STOP_TIMEOUT_S
                    problems.append(f"{d.name}: no exit within {STOP_TIMEOUT_S} s of SIGTERM")
                    continue
                if rc != 0:
                    problems.append(f"{d.name}: exit code {rc} after SIGTERM")
            elif d.proc.returncode != 0 and not d.killed:
                problems.append(f"{d.name}: exited on its own with {d.proc.returncode}")
        shutil.rmtree(state_root, ignore_errors=True)
        if problems:
            pytest.fail("; ".join(problems) + "\n" + "\n".join(d.stderr_text() for d in daemons))


@pytest.fixture
async def daemon(start_daemon: StartDaemon) -> Daemon:
    """A daemon on the embedded default configuration."""
    return await start_daemon()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        for d in item.stash.get(DAEMONS, []):
            report.sections.append((f"daemon {d.name} stderr", d.stderr_text()[-20000:]))
    return report


# ---------------------------------------------------------------------- requests


def sale_data(amount: int = 630, *, rate: str = "10.00") -> dict[str, Any]:
    """The body of a valid sale (no id/op/till): two lines, paid by card."""
    first = amount - 130
    return {
        "type": "RECEIPT",
        "currency": "EUR",
        "lines": [
            {
                "text": "Café crème",
                "qty": "1",
                "unit_price": first,
                "vat_rate": rate,
                "amount": first,
            },
            {"text": "Croissant", "qty": "1", "unit_price": 130, "vat_rate": "5.50", "amount": 130},
        ],
        "payments": [{"method": "CARD", "amount": amount}],
        "total": amount,
    }


def sale(request_id: str, amount: int = 630, *, till: str = "till-1") -> dict[str, Any]:
    return {"id": request_id, "op": "sign", "till": till, **sale_data(amount)}


@pytest.fixture
def make_pos_sale() -> Callable[..., dict[str, Any]]:
    """``make_pos_sale(id, amount=630, till="till-1")`` → a valid sign request."""
    return sale


@pytest.fixture
def make_sale_data() -> Callable[..., dict[str, Any]]:
    """``make_sale_data(amount=630)`` → the fields of a sale without id/op/till (batches)."""
    return sale_data


# ---------------------------------------------------------------------- the journal


def check_journal(db_path: Path, records: list[dict[str, Any]]) -> None:
    """The whole journal verifies, and each record a reply carried is the stored one.

    For every reply record: its body hashes to its ``hash``, its ``sig`` verifies with the
    key stored in the journal, and the journal holds exactly those canonical bytes, hash and
    signature at that chain and seq.
    """
    report = verify_db(db_path)
    assert report.ok, [c.failure.to_json() for c in report.chains if c.failure]
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as conn:
        ring = KeyRing(pem for (pem,) in conn.execute("SELECT public_pem FROM keys"))
        for rec in records:
            body = {k: v for k, v in rec.items() if k not in ("hash", "sig")}
            data = canonical_bytes(body)
            assert sha256_hex(data) == rec["hash"], rec
            assert ring.check_sig(rec["key_id"], data, rec["sig"]), rec
            row = conn.execute(
                "SELECT body, hash, sig FROM records WHERE chain = ? AND seq = ?",
                (rec["chain"], rec["seq"]),
            ).fetchone()
            assert row is not None, f"{rec['chain']} seq {rec['seq']} is not in the journal"
            assert (bytes(row[0]), row[1], row[2]) == (data, rec["hash"], rec["sig"])


@pytest.fixture
def journal_check() -> Callable[[Path, list[dict[str, Any]]], None]:
    """``journal_check(db_path, reply_records)``: see :func:`check_journal`."""
    return check_journal
