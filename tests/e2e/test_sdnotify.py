"""sd_notify as systemd sees it: the daemon as a real subprocess talking to a datagram socket
the test binds as ``$NOTIFY_SOCKET``, with ``WATCHDOG_USEC=1000000`` (1 s) and no
``WATCHDOG_PID`` — what a ``Type=notify`` unit with a watchdog gets.

The watchdog must also be *withheld* when the ledger writer stops making progress. That is
provoked honestly from outside: the test takes SQLite's write lock on the journal (``BEGIN
IMMEDIATE`` on its own connection) and then sends a sale, so the writer thread blocks in its
own ``BEGIN IMMEDIATE`` (busy timeout 10 s) exactly as on a wedged disk, while the event loop
stays healthy.
"""

from __future__ import annotations

import itertools
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from pathlib import Path

import pytest
from gateway_process import (
    GatewayProcess,
    free_port,
    held_events,
    pos_request,
    sale,
    short_tempdir,
    socket_accepts,
)

WATCHDOG_USEC = 1_000_000
WAIT_S = 30.0


class NotifyListener:
    """The systemd side: receives sd_notify datagrams in a thread, each with its arrival time.

    On every datagram it also records whether the POS socket accepted a connection at that
    moment, so "READY=1 only once the socket accepts" is checked when READY arrives.
    """

    def __init__(self, path: Path, pos_socket: Path) -> None:
        self.path = path
        self.pos_socket = pos_socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, dict[str, str], bool]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-listener")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            arrived = time.monotonic()
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
            accepting = socket_accepts(self.pos_socket)
            with self._cond:
                self.messages.append((arrived, fields, accepting))
                self._cond.notify_all()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def snapshot(self) -> list[tuple[float, dict[str, str], bool]]:
        with self._cond:
            return list(self.messages)

    def wait_for(self, key: str, value: str | None = None, *, after: float = 0.0) -> float:
        """Arrival time of the first message after ``after`` carrying ``key`` (= value)."""
        deadline = time.monotonic() + WAIT_S
        with self._cond:
            while True:
                for t, fields, _ in self.messages:
                    if t > after and key in fields and (value is None or fields[key] == value):
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {key}={value} in {WAIT_S} s: {self.messages}")
                self._cond.wait(left)

    def times(self, key: str, value: str, start: float, end: float) -> list[float]:
        return [
            t for t, fields, _ in self.snapshot() if start <= t <= end and fields.get(key) == value
        ]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    with short_tempdir() as path:
        yield path


@pytest.fixture
def listener(short_dir: Path) -> Iterator[NotifyListener]:
    n = NotifyListener(short_dir / "notify.sock", short_dir / "state" / "pos.sock")
    try:
        yield n
    finally:
        n.close()


def start(short_dir: Path, tmp_path: Path, listener: NotifyListener) -> GatewayProcess:
    return GatewayProcess(
        tmp_path / "daemon.log",
        state_dir=short_dir / "state",
        http=f"127.0.0.1:{free_port()}",
        env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": str(WATCHDOG_USEC)},
    )


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_sdnotify_ready_after_socket_accepts_then_watchdog_then_stopping_exit_0(
    short_dir: Path, tmp_path: Path, listener: NotifyListener
) -> None:
    with start(short_dir, tmp_path, listener) as gw:
        ready_at = listener.wait_for("READY", "1")
        first = listener.snapshot()
        ready = [(fields, accepting) for t, fields, accepting in first if t == ready_at]
        fields, accepting = ready[0]
        assert accepting, "READY=1 sent before the POS socket accepted connections"
        assert fields.get("STATUS", "").startswith("signing"), fields
        assert not any("READY" in f for t, f, _ in first if t < ready_at)

        # the daemon works, and the watchdog keeps coming at WATCHDOG_USEC / 2 (0.5 s)
        held = held_events(short_dir / "state" / "gateway.db")  # signed with the first sale
        assert pos_request(short_dir / "state" / "pos.sock", sale("n-1"))["ok"]
        time.sleep(3.2)
        now = time.monotonic()
        pings = listener.times("WATCHDOG", "1", ready_at, now)
        assert len(pings) >= 4, listener.snapshot()
        assert max(gaps([ready_at, *pings])) < WATCHDOG_USEC / 1e6, gaps([ready_at, *pings])
        assert all("STATUS" in f for t, f, _ in listener.snapshot() if f.get("WATCHDOG") == "1"), (
            "every watchdog ping carries a STATUS line"
        )
        assert f"{held + 1} records since start" in listener.snapshot()[-1][1]["STATUS"]

        gw.send_signal(signal.SIGTERM)
        assert gw.wait() == 0, gw.log_text()

    stopping = [f for _, f, _ in listener.snapshot() if f.get("STOPPING") == "1"]
    assert stopping and stopping[0].get("STATUS") == "stopping", listener.snapshot()
    last_stopping = max(t for t, f, _ in listener.snapshot() if f.get("STOPPING") == "1")
    assert not any(f.get("READY") for t, f, _ in listener.snapshot() if t > last_stopping)


def test_sdnotify_sighup_reloading_then_ready(
    short_dir: Path, tmp_path: Path, listener: NotifyListener
) -> None:
    with start(short_dir, tmp_path, listener) as gw:
        ready_at = listener.wait_for("READY", "1")
        gw.send_signal(signal.SIGHUP)
        reloading_at = listener.wait_for("RELOADING", "1", after=ready_at)
        again = listener.wait_for("READY", "1", after=reloading_at)
        msg = next(f for t, f, _ in listener.snapshot() if t == reloading_at)
        assert msg["MONOTONIC_USEC"].isdigit(), msg
        # CLOCK_MONOTONIC is system-wide: the daemon's timestamp lies within our window
        assert ready_at * 1e6 < int(msg["MONOTONIC_USEC"]) <= again * 1e6
        assert gw.stop() == 0, gw.log_text()


def test_sdnotify_writer_stalled_watchdog_withheld_until_it_progresses(
    short_dir: Path, tmp_path: Path, listener: NotifyListener
) -> None:
    state = short_dir / "state"
    with start(short_dir, tmp_path, listener) as gw:
        listener.wait_for("READY", "1")
        assert pos_request(state / "pos.sock", sale("w-1"))["ok"]  # the journal exists

        with closing(sqlite3.connect(state / "gateway.db", isolation_level=None)) as conn:
            conn.execute("BEGIN IMMEDIATE")  # SQLite's write lock: the writer must wait
            locked_at = time.monotonic()
            with ThreadPoolExecutor(1) as pool:
                pending = pool.submit(pos_request, state / "pos.sock", sale("w-2"), 60.0)
                # the daemon withholds WATCHDOG=1 once the writer has made no progress for
                # max(5 s, WATCHDOG_USEC): hold the lock 8 s, inside the 10 s busy timeout
                time.sleep(8.0)
                assert not pending.done(), "the sale was signed through a held write lock"
                released_at = time.monotonic()
                conn.execute("ROLLBACK")
                reply = pending.result(timeout=WAIT_S)
        assert reply["ok"], reply  # nothing lost: the stalled request completes afterwards

        resumed_at = listener.wait_for("WATCHDOG", "1", after=released_at)
        pings = listener.times("WATCHDOG", "1", locked_at, released_at)
        silence = max(gaps([locked_at, *pings, resumed_at]))
        assert silence >= 2.0, (silence, pings)  # systemd would have killed us at 1 s
        assert resumed_at - released_at < 2.0
        assert gw.wait_for_log(lambda r: "withholding watchdog" in r.get("msg", ""))["level"] == (
            "error"
        )
        # after the stall the pings are regular again
        time.sleep(2.0)
        after = listener.times("WATCHDOG", "1", resumed_at, time.monotonic())
        assert len(after) >= 3 and max(gaps([resumed_at, *after])) < 1.0, after
        assert gw.stop() == 0, gw.log_text()
