"""``fiscal-gateway run`` as a real subprocess, driven synchronously (no event loop).

Used by the configuration, systemd and sd_notify tests, which need what the end-to-end
fixture (tests/e2e/conftest.py) keeps fixed: their own argv and environment (``--config``,
``NOTIFY_SOCKET``, ``CREDENTIALS_DIRECTORY``, a wrapper such as ``prctl``), daemons that must
fail to start, and the log read while the daemon runs. The daemon's stderr (its JSON log)
goes to a file so a chatty daemon can never block on a full pipe.

Unix socket paths are limited to 107 bytes: put state directories under
:func:`short_tempdir`, not ``tmp_path``.
"""

from __future__ import annotations

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
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
REPLY_TIMEOUT_S = 30.0


def gateway_command() -> list[str]:
    """argv prefix of the installed ``fiscal-gateway`` entry point (or the module)."""
    entry_point = Path(sys.executable).parent / "fiscal-gateway"
    if entry_point.exists():
        return [str(entry_point)]
    return [sys.executable, "-m", "gateway.cli"]


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def short_tempdir() -> Iterator[Path]:
    """A fresh directory with a short path (for sockets), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="fg-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def sale(request_id: str, till: str = "till-1") -> dict[str, Any]:
    """The sign request of docs/protocol.md: two coffees paid cash."""
    return {
        "id": request_id,
        "op": "sign",
        "till": till,
        "type": "RECEIPT",
        "currency": "EUR",
        "lines": [
            {"text": "Café", "qty": "2", "unit_price": 250, "vat_rate": "10.00", "amount": 500}
        ],
        "payments": [{"method": "CASH", "amount": 500}],
        "total": 500,
    }


def pos_request(
    socket_path: Path, request: dict[str, Any], timeout_s: float = REPLY_TIMEOUT_S
) -> dict[str, Any]:
    """Send one request on a fresh connection to the POS socket and return the reply."""
    with closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as s:
        s.settimeout(timeout_s)
        s.connect(str(socket_path))
        s.sendall(json.dumps(request).encode("utf-8") + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed before a full reply: {data[:200]!r}")
            data += chunk
    reply = json.loads(data)
    assert isinstance(reply, dict), reply
    return reply


def held_events(db_path: Path) -> int:
    """Gateway-wide events held for the first chain (docs/events.md, "Which chain"): the
    first record of a fresh daemon's first chain comes after them (seq ``held + 1``)."""
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10.0)) as conn:
        return int(conn.execute("SELECT count(*) FROM held_events").fetchone()[0])


def socket_accepts(socket_path: Path) -> bool:
    with closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(socket_path))
        except OSError:
            return False
        return True


class GatewayProcess:
    """One ``fiscal-gateway run`` subprocess. Use as a context manager: on exit a daemon still
    running is stopped with SIGTERM (and killed if that does not work)."""

    def __init__(
        self,
        log_path: Path,
        *,
        config: Path | None = None,
        state_dir: Path | None = None,
        http: str | None = None,
        env: dict[str, str] | None = None,
        wrapper: Sequence[str] = (),
        cwd: Path | None = None,
    ) -> None:
        argv = [*wrapper, *gateway_command(), "run"]
        if config is not None:
            argv += ["--config", str(config)]
        if state_dir is not None:
            argv += ["--state-dir", str(state_dir)]
        if http is not None:
            argv += ["--http", http]
        self.argv = argv
        self.log_path = log_path
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NOTIFY_", "WATCHDOG_", "CREDENTIALS_DIRECTORY"))
        }
        self.env = {**base, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> GatewayProcess:
        with open(self.log_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv, stdout=subprocess.DEVNULL, stderr=err, env=self.env, cwd=self.cwd
            )
        return self

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (non-JSON lines are skipped)."""
        out = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict):
                    out.append(rec)
        return out

    def wait_for_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = START_TIMEOUT_S
    ) -> dict[str, Any]:
        """The first log record matching ``predicate``, waiting for it to be written."""
        deadline = time.monotonic() + timeout_s
        while True:
            for rec in self.log_records():
                if predicate(rec):
                    return rec
            if not self.alive():
                raise AssertionError(f"daemon exited; log:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no such log record in {timeout_s} s; log:\n{self.log_text()}"
                )
            time.sleep(0.05)

    def wait_socket(self, socket_path: Path, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until the POS socket accepts connections."""
        deadline = time.monotonic() + timeout_s
        while not socket_accepts(socket_path):
            if not self.alive():
                raise AssertionError(f"daemon exited while starting; log:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"POS socket not accepting; log:\n{self.log_text()}")
            time.sleep(0.05)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """Wait for the exit and return the exit code."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"daemon did not exit in {timeout_s} s; log:\n{self.log_text()}"
            ) from None

    def stop(self) -> int:
        """SIGTERM, then the exit code."""
        self.send_signal(signal.SIGTERM)
        return self.wait()
