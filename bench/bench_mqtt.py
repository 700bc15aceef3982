"""Benchmark MQTT round trips: till → Mosquitto → gateway → signed (fsync) → reply → till.

Starts ``mosquitto`` on a free loopback port and ``fiscal-gateway run`` as a subprocess with
``[mqtt] enabled`` (fsync on, everything else default), then measures with aiomqtt tills
(MQTT v5, response topic + correlation data, QoS 1 both ways):
- 1 till, one request at a time: p50 / p99 / p99.9 round trip;
- N tills (default 32), each on its own connection and chain, one request at a time:
  records/s;
- beside it, the same daemon over its POS Unix socket (1 client p50/p99, N clients records/s),
  so the broker's share of the latency is visible.

    python bench/bench_mqtt.py [--n1 2000] [--tills 32] [--n 10000] [--protocol 5|3.1.1]

Prints numbers; asserts nothing (issue 8 targets: p50 <= 2 ms, >= 2,000 records/s, 32 tills).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from mqtt_support import Broker, Till, subscribe_once  # noqa: E402
from workload import sale  # noqa: E402


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p))]


def latency_line(label: str, lat: list[float]) -> str:
    lat = sorted(lat)
    return (
        f"{label}: {len(lat)} records, p50 {pct(lat, 0.5) * 1e3:.3f} ms, "
        f"p99 {pct(lat, 0.99) * 1e3:.3f} ms, p99.9 {pct(lat, 0.999) * 1e3:.3f} ms"
    )


def start_daemon(tmp: Path, config: str) -> subprocess.Popen[bytes]:
    cfg = tmp / "gateway.toml"
    cfg.write_text(config)
    exe = Path(sys.executable).with_name("fiscal-gateway")
    return subprocess.Popen(
        [str(exe), "run", "--config", str(cfg), "--state-dir", str(tmp / "state"), "--http", ""],
        stderr=open(tmp / "gateway.log", "wb"),
    )


async def wait_socket(path: Path, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _, w = await asyncio.open_unix_connection(str(path))
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        w.close()
        await w.wait_closed()
        return


async def socket_call(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, req: dict[str, object]
) -> None:
    w.write(json.dumps(req).encode() + b"\n")
    await w.drain()
    reply = json.loads(await r.readline())
    if not reply.get("ok"):
        raise RuntimeError(f"request failed: {reply}")


async def mqtt_bench(args: argparse.Namespace, port: int, gateway_pid: int) -> None:
    async with Till(port, "till-0", protocol=args.protocol) as till:
        for i in range(200):  # warm-up
            await till.request(sale(10_000_000 + i, "till-0"))
        lat = []
        for i in range(args.n1):
            t = time.perf_counter()
            reply = await till.request(sale(i, "till-0"))
            lat.append(time.perf_counter() - t)
            if not reply["ok"]:
                raise RuntimeError(reply)
    print(latency_line(f"MQTT {args.protocol}, 1 till", lat), flush=True)

    per = args.n // args.tills
    tills = [Till(port, f"till-{k + 1}", protocol=args.protocol) for k in range(args.tills)]
    for t in tills:
        await t.connect()
    try:

        async def run(t: Till, k: int) -> None:
            for i in range(per):
                reply = await t.request(sale(1_000_000 * (k + 1) + i, t.till))
                if not reply["ok"]:
                    raise RuntimeError(reply)

        gw0, me0 = cpu_s(gateway_pid), time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*(run(t, k) for k, t in enumerate(tills)))
        dt = time.perf_counter() - t0
        gw_cpu, me_cpu = cpu_s(gateway_pid) - gw0, time.process_time() - me0
    finally:
        for t in tills:
            await t.disconnect()
    print(
        f"MQTT {args.protocol}, {args.tills} tills: {per * args.tills} records in {dt:.2f} s = "
        f"{per * args.tills / dt:,.0f} records/s (CPU: gateway {gw_cpu / dt:.0%}, "
        f"tills {me_cpu / dt:.0%})",
        flush=True,
    )


async def socket_bench(args: argparse.Namespace, sock: Path) -> None:
    r, w = await asyncio.open_unix_connection(str(sock), limit=1 << 22)
    lat = []
    try:
        for i in range(args.n1):
            t = time.perf_counter()
            await socket_call(r, w, sale(20_000_000 + i, "sock-0"))
            lat.append(time.perf_counter() - t)
    finally:
        w.close()
        await w.wait_closed()
    print(latency_line("POS socket, 1 client", lat), flush=True)
    per = args.n // args.tills

    async def client(k: int) -> None:
        r, w = await asyncio.open_unix_connection(str(sock), limit=1 << 22)
        try:
            for i in range(per):
                await socket_call(r, w, sale(30_000_000 + 100_000 * k + i, f"sock-{k + 1}"))
        finally:
            w.close()
            await w.wait_closed()

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(args.tills)))
    dt = time.perf_counter() - t0
    print(
        f"POS socket, {args.tills} clients: {per * args.tills} records in {dt:.2f} s = "
        f"{per * args.tills / dt:,.0f} records/s",
        flush=True,
    )


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fg-bench-mqtt-"))
    broker = Broker(tmp / "broker")
    await broker.start()
    proc = start_daemon(
        tmp,
        broker.gateway_config(
            protocol=args.protocol,
            max_inflight_per_till=64,
            max_queued_per_till=1024,
            receive_maximum=1024,
            status_check_s=1.0,
        ),
    )
    try:
        await wait_socket(tmp / "state" / "pos.sock")
        await subscribe_once(broker.port, "fiscal/gw-1/status", predicate=lambda s: s["online"])
        print(f"broker mosquitto on 127.0.0.1:{broker.port}; gateway pid {proc.pid}", flush=True)
        await mqtt_bench(args, broker.port, proc.pid)
        if not args.no_socket:
            await socket_bench(args, tmp / "state" / "pos.sock")
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 30)
        await broker.stop()
        print(f"daemon exit code {rc}")
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n1", type=int, default=2000, help="requests for the 1-till latency")
    p.add_argument("--tills", type=int, default=32)
    p.add_argument("--n", type=int, default=10000, help="requests for the N-till throughput")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    p.add_argument("--no-socket", action="store_true", help="skip the POS socket baseline")
    socket.setdefaulttimeout(None)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
