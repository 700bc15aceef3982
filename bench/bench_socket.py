"""Benchmark the daemon end to end: clients in this process, the daemon in another.

Starts ``fiscal-gateway run`` as a subprocess on a fresh state directory (fsync on, the
embedded defaults), then over the real Unix socket measures:
- cold start to READY (sd_notify READY=1 received on a socket of ours);
- 1 client, one request at a time: p50 / p99 / p99.9 latency per signed record;
- N concurrent clients (default 32), each one request at a time: records/s;
- the daemon's RSS (VmRSS) after the run, and optionally a soak at a fixed rate.

    python bench/bench_socket.py [--n1 3000] [--clients 32] [--n 20000]
    python bench/bench_socket.py --soak-s 3600 --rate 50      # memory after an hour

Prints numbers; asserts nothing (targets: docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import sale


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_daemon(
    state: Path, env_extra: dict[str, str], config: Path | None = None
) -> tuple[subprocess.Popen[bytes], float]:
    notify = state.parent / "notify.sock"
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(notify))
    ns.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(notify), **env_extra}
    exe = Path(sys.executable).with_name("fiscal-gateway")
    t0 = time.perf_counter()
    cmd = [str(exe), "run", "--state-dir", str(state), "--http", ""]
    if config is not None:
        cmd += ["--config", str(config)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL)
    try:
        while True:
            msg = ns.recv(4096).decode()
            if "READY=1" in msg:
                return proc, time.perf_counter() - t0
    finally:
        ns.close()


class Client:
    def __init__(self, path: Path) -> None:
        self.path = path

    async def __aenter__(self) -> Client:
        self.r, self.w = await asyncio.open_unix_connection(str(self.path), limit=1 << 22)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.w.close()
        await self.w.wait_closed()

    async def call(self, req: dict[str, object]) -> dict[str, object]:
        self.w.write(json.dumps(req).encode() + b"\n")
        await self.w.drain()
        reply: dict[str, object] = json.loads(await self.r.readline())
        if not reply.get("ok"):
            raise RuntimeError(f"request failed: {reply}")
        return reply


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p))]


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fg-bench-"))
    state = tmp / "state"
    config = None
    if args.printer != "virtual":
        config = tmp / "bench.toml"
        config.write_text(f'[printer]\nkind = "{args.printer}"\n')
    proc, ready_s = start_daemon(state, {}, config)
    print(f"printer: {args.printer}")
    sock = state / "pos.sock"
    print(f"cold start to READY: {ready_s * 1000:.0f} ms")
    try:
        async with Client(sock) as c:
            for i in range(200):  # warm-up
                await c.call(sale(10_000_000 + i, "warm"))
            lat = []
            for i in range(args.n1):
                t = time.perf_counter()
                await c.call(sale(i, "till-1"))
                lat.append(time.perf_counter() - t)
        lat.sort()
        print(
            f"1 client: {args.n1} records, p50 {pct(lat, 0.5) * 1e3:.3f} ms, "
            f"p99 {pct(lat, 0.99) * 1e3:.3f} ms, p99.9 {pct(lat, 0.999) * 1e3:.3f} ms"
        )

        per = args.n // args.clients

        async def client(k: int) -> None:
            async with Client(sock) as c:
                for i in range(per):
                    await c.call(sale(1_000_000 * (k + 1) + i, f"till-{k % 8}"))

        t = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(args.clients)))
        dt = time.perf_counter() - t
        print(
            f"{args.clients} clients: {per * args.clients} records in {dt:.2f} s = "
            f"{per * args.clients / dt:,.0f} records/s"
        )
        print(
            f"daemon RSS after {args.n1 + per * args.clients + 200} records: "
            f"{rss_mb(proc.pid):.1f} MB"
        )
        if args.soak_s:
            interval = 1 / args.rate
            n = 0
            t_end = time.monotonic() + args.soak_s
            async with Client(sock) as c:
                nxt = time.monotonic()
                while time.monotonic() < t_end:
                    await c.call(sale(50_000_000 + n, "soak"))
                    n += 1
                    nxt += interval
                    await asyncio.sleep(max(0.0, nxt - time.monotonic()))
                    if n % (args.rate * 300) == 0:
                        print(f"  soak {n} records, RSS {rss_mb(proc.pid):.1f} MB", flush=True)
            print(
                f"soak: {n} records over {args.soak_s} s at {args.rate}/s: "
                f"RSS {rss_mb(proc.pid):.1f} MB"
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        print(f"daemon exit code {rc}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n1", type=int, default=3000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--soak-s", type=float, default=0)
    p.add_argument("--rate", type=int, default=50)
    p.add_argument(
        "--printer",
        choices=["virtual", "none"],
        default="virtual",
        help="virtual (the embedded default) prints every receipt to files",
    )
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
