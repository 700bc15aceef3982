"""Benchmark an archive made while the daemon runs: what it costs the POS.

Starts ``fiscal-gateway run`` as a subprocess on a fresh state directory (fsync on, no
scheduled closings or archives), signs ``--n`` sales into one chain with 32 clients, closes
the month (``close`` op, ``MONTHLY``), then measures over the real Unix socket and HTTP:
- 1 client, one sale at a time, with nothing else going on: p50 / p99 latency;
- ``POST /v1/admin/archive`` (the archive of that month: export, check, EXPORT::RECORDS
  record) and how long it takes, while the same client keeps signing one sale at a time:
  p50 / p99 / max latency of the sales signed during the archive.

    python bench/bench_archive.py [--n 20000] [--n1 1000]

Prints numbers; asserts nothing (results: docs/performance.md, "Archive while running").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_socket import Client, pct
from workload import machine, sale

TOKEN = "bench-archive-token-0123456789"


def start_daemon(state: Path, config: Path, port: int) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).with_name("fiscal-gateway")
    cmd = [str(exe), "run", "--state-dir", str(state), "--config", str(config)]
    proc = subprocess.Popen([*cmd, "--http", f"127.0.0.1:{port}"], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2):
                return proc
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise
            time.sleep(0.05)


def post_archive(port: int) -> tuple[float, dict[str, object]]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/admin/archive",
        data=json.dumps({"period": "MONTHLY"}).encode(),
        headers={"Authorization": f"Bearer {TOKEN}"},
        method="POST",
    )
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=900) as resp:
        body: dict[str, object] = json.loads(resp.read())
    return time.perf_counter() - t, body


def summary(lat: list[float]) -> str:
    lat = sorted(lat)
    return (
        f"{len(lat)} sales, p50 {pct(lat, 0.5) * 1e3:.2f} ms, p99 {pct(lat, 0.99) * 1e3:.2f} ms, "
        f"max {lat[-1] * 1e3:.2f} ms"
    )


async def run(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fg-bench-archive-"))
    state = tmp / "state"
    token = tmp / "admin.token"
    token.write_text(TOKEN)
    port = args.port
    config = tmp / "bench.toml"
    config.write_text(
        f'[http]\nadmin_token_file = "{token}"\n[journal]\nclosing_time = ""\narchive_period = ""\n'
    )
    proc = start_daemon(state, config, port)
    sock = state / "pos.sock"
    print(machine())
    try:
        per = args.n // 32

        async def client(k: int) -> None:
            async with Client(sock) as c:
                for i in range(per):
                    await c.call(sale(1_000_000 * (k + 1) + i, "till-1"))

        t = time.perf_counter()
        await asyncio.gather(*(client(k) for k in range(32)))
        print(f"signed {per * 32} sales in {time.perf_counter() - t:.1f} s")
        async with Client(sock) as c:
            await c.call({"id": "z1", "op": "close", "till": "till-1", "period": "MONTHLY"})
            idle = []
            for i in range(args.n1):
                t = time.perf_counter()
                await c.call(sale(50_000_000 + i))
                idle.append(time.perf_counter() - t)
            print(f"1 client, idle:            {summary(idle)}")

            job = asyncio.get_running_loop().run_in_executor(None, post_archive, port)
            during = []
            i = 0
            while not job.done():
                t = time.perf_counter()
                await c.call(sale(60_000_000 + i))
                during.append(time.perf_counter() - t)
                i += 1
            took_s, body = await job
        (made,) = body["archives"]  # type: ignore[misc]
        print(
            f"archive of {made['records']} records: {took_s:.2f} s "  # type: ignore[index]
            f"(POST /v1/admin/archive, written, checked and recorded)"
        )
        print(f"1 client, during archive:  {summary(during)}")
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=20_000, help="sales in the archived month")
    p.add_argument("--n1", type=int, default=1000, help="sales timed with nothing else going on")
    p.add_argument("--port", type=int, default=18480)
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
