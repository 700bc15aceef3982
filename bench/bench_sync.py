"""Benchmark the offline replay of the ``france/fiskaly`` uplink, end to end.

The fiskaly simulator (drivers/cloud/fiskaly_sim.py) and the daemon each run as their own
process; this process is the POS. With the cloud down it signs ``--records`` sales spread
over ``--chains`` tills (a chain holds at most 9,999 unsent records: the replay counter has
four digits; no printer, so that receipts being printed do not blur the numbers), measures
the sign latency of one till signing one sale at a time, paced like a busy till (~100/s;
idle: nothing is being sent), then brings the cloud up and measures:

- replay throughput: offline records accepted upstream per second (two calls per sale:
  ``INTENTION::TRANSACTION`` then ``TRANSACTION::RECEIPT``);
- sign latency p50/p99 on another till while the replay runs (same pacing), against the
  idle value;
- the daemon's RSS (VmRSS) sampled through the replay (flat = no growth with the backlog).

The replay's progress is read from the simulator (``/_sim/stats``, another process), not
from the daemon's status, so that watching does not load the daemon being measured; the
daemon's status is read once at the end to check every chain is online with nothing pending.
Machines are shared and noisy: run it under ``flock /tmp/bench.lock`` and note ``uptime``.

    python bench/bench_sync.py                          # 10,000 records, 2 chains
    python bench/bench_sync.py --records 9900 --chains 1   # one chain (the strict case)
    python bench/bench_sync.py --records 100000 --chains 20 --latency 0   # memory soak

Prints numbers; asserts nothing (docs/performance.md, "Sync").
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
import urllib.request
from contextlib import closing
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import sale

SYSTEM_ID = "0189f7ea-ae2c-7809-8aeb-b819cf5e9e7f"


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def request(reader: Any, writer: Any, req: dict[str, Any]) -> dict[str, Any]:
    writer.write(json.dumps(req).encode() + b"\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 60)
    return dict(json.loads(line))


async def status(sock: Path) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(sock), limit=1 << 26)
    try:
        reply = await request(reader, writer, {"id": "st", "op": "status"})
        return dict(reply["status"])
    finally:
        writer.close()
        await writer.wait_closed()


def pending_total(st: dict[str, Any]) -> tuple[int, list[str]]:
    (proc,) = st["offline"]["processors"]
    total = sum((c["budget"] or {}).get("pending_records", 0) for c in proc["chains"])
    return total, [c["uplink"] for c in proc["chains"]]


async def latencies(sock: Path, till: str, n: int, stop: asyncio.Event | None) -> list[float]:
    """Sign one sale at a time, 10 ms apart (a busy till, not a flood: ~100 sales/s at
    most); ``n`` of them, or until ``stop`` is set."""
    reader, writer = await asyncio.open_unix_connection(str(sock), limit=1 << 26)
    out: list[float] = []
    try:
        i = 0
        while (stop is None and i < n) or (stop is not None and not stop.is_set()):
            req = sale(f"{till}-{time.monotonic_ns()}-{i}", till)
            t0 = time.perf_counter()
            reply = await request(reader, writer, req)
            out.append((time.perf_counter() - t0) * 1000)
            assert reply.get("ok"), reply
            i += 1
            await asyncio.sleep(0.01)
    finally:
        writer.close()
        await writer.wait_closed()
    return out


async def sign_offline(sock: Path, records: int, chains: int) -> float:
    reader, writer = await asyncio.open_unix_connection(str(sock), limit=1 << 28)
    t0 = time.perf_counter()
    try:
        per_chain = -(-records // chains)
        for c in range(chains):
            till = f"till-{c + 1}"
            left = min(per_chain, records - c * per_chain)
            start = 0
            while start < left:
                n = min(500, left - start)
                ops = [
                    {
                        "operation": "sign",
                        "referenceId": f"r{start + i}",
                        "data": {
                            k: v
                            for k, v in sale("x", till).items()
                            if k not in ("id", "op", "till")
                        },
                    }
                    for i in range(n)
                ]
                reply = await request(
                    reader,
                    writer,
                    {"id": f"{till}-b{start}", "op": "batch", "till": till, "operations": ops},
                )
                assert reply["ok"] and reply["batch"]["successfulRecords"] == n, reply
                start += n
    finally:
        writer.close()
        await writer.wait_closed()
    return time.perf_counter() - t0


def spawn(
    tmp: Path, sim_nice: int = 0
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes], int, Path]:
    """The simulator (cloud down) and the daemon pointed at it. ``sim_nice``: the simulator's
    niceness (it stands in for a cloud on another machine; on a 2-core box its CPU competes
    with the daemon's, which a real cloud's does not)."""
    sim_port = free_port()
    key, secret = tmp / "k", tmp / "s"
    key.write_text("sim-key")
    secret.write_text("sim-secret")
    config = tmp / "gw.toml"
    config.write_text(
        f"""[fiskaly]
enabled = true
base_url = "http://127.0.0.1:{sim_port}"
api_key_file = "{key}"
api_secret_file = "{secret}"
system_id = "{SYSTEM_ID}"
probe_min_s = 0.2
probe_max_s = 1.0
[sync]
max_pending_records = 9999
[printer]
kind = "none"
"""
    )
    sim = subprocess.Popen(
        [sys.executable, "-m", "drivers.cloud.fiskaly_sim", "--port", str(sim_port), "--down"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        preexec_fn=(lambda: os.nice(sim_nice)) if sim_nice else None,
    )
    assert sim.stdout is not None
    sim.stdout.readline()  # "fiskaly simulator on ..."
    state = tmp / "state"
    exe = Path(sys.executable).with_name("fiscal-gateway")
    with open(tmp / "daemon.log", "wb") as log:
        gw = subprocess.Popen(
            [str(exe), "run", "--state-dir", str(state), "--http", "", "--config", str(config)],
            stderr=log,
        )
    return sim, gw, sim_port, state / "pos.sock"


def sim_stats(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_sim/stats", timeout=10) as r:
        return dict(json.loads(r.read()))


async def main_async(
    args: argparse.Namespace,
    sim: subprocess.Popen[bytes],
    gw: subprocess.Popen[bytes],
    sim_port: int,
    sock: Path,
) -> None:
    for _ in range(600):  # until the daemon answers on its socket
        try:
            await status(sock)
            break
        except OSError:
            await asyncio.sleep(0.05)
    t_sign = await sign_offline(sock, args.records, args.chains)
    print(
        f"signed {args.records} offline records on {args.chains} chain(s) in "
        f"{t_sign:.1f} s ({args.records / t_sign:,.0f}/s)"
    )
    idle: list[float] = []
    if args.latency:
        idle = await latencies(sock, "lat-idle", args.latency, None)
        print(
            f"sign latency idle (cloud down, nothing sending): p50 {pct(idle, 0.5):.2f} ms"
            f"  p99 {pct(idle, 0.99):.2f} ms  (n={len(idle)})"
        )
    st0 = await status(sock)
    pending0, _ = pending_total(st0)
    # the backlog: every chain up to its head now (the busy till below is not part of it)
    targets = {f"{SYSTEM_ID}/{c['chain']}": c["seq"] for c in st0["chains"]}
    rss: list[float] = [rss_mb(gw.pid)]
    stop = asyncio.Event()
    during_task = (
        asyncio.create_task(latencies(sock, "lat-busy", 0, stop)) if args.latency else None
    )
    os.kill(sim.pid, signal.SIGUSR2)  # the cloud comes back: the replay starts
    t0 = time.perf_counter()
    last_sample = 0.0
    while True:
        await asyncio.sleep(0.1)
        up = await asyncio.to_thread(sim_stats, sim_port)
        now = time.perf_counter()
        if now - last_sample >= 1.0:
            rss.append(rss_mb(gw.pid))
            last_sample = now
        seen = {k: v["last_seq"] or 0 for k, v in up["chains"].items()}
        if all(seen.get(k, 0) >= seq for k, seq in targets.items()):
            break
        if now - t0 > args.timeout_s:
            print(f"gave up after {args.timeout_s} s")
            break
    elapsed = time.perf_counter() - t0
    stop.set()
    during = await during_task if during_task is not None else []
    for _ in range(600):  # the daemon's own view: every chain online, nothing pending
        pending, states = pending_total(await status(sock))
        if pending == 0 and all(s == "online" for s in states):
            break
        await asyncio.sleep(0.1)
    else:
        print(f"the daemon still has {pending} pending: {states}")
    up = await asyncio.to_thread(sim_stats, sim_port)
    print(
        f"replayed {pending0} records in {elapsed:.1f} s: {pending0 / elapsed:,.0f} records/s "
        f"({2 * pending0 / elapsed:,.0f} calls/s); upstream: {up['final_records']} records, "
        f"{up['duplicates']} duplicates, {len(up['violations'])} violations"
    )
    if during:
        print(
            f"sign latency during the replay: p50 {pct(during, 0.5):.2f} ms  "
            f"p99 {pct(during, 0.99):.2f} ms  (n={len(during)}); p99 ratio to idle "
            f"{pct(during, 0.99) / pct(idle, 0.99):.2f}"
        )
    quarters = [rss[min(len(rss) - 1, len(rss) * q // 4)] for q in range(1, 5)]
    print(
        f"daemon RSS during the replay: start {rss[0]:.1f} MB, at 25/50/75/100 %: "
        + ", ".join(f"{v:.1f}" for v in quarters)
        + f" MB, max {max(rss):.1f} MB ({len(rss)} samples, one per second)"
    )
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=10_000)
    p.add_argument("--chains", type=int, default=2)
    p.add_argument("--latency", type=int, default=1000, help="idle samples (0: skip latency)")
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument(
        "--sim-nice", type=int, default=0, help="niceness of the simulator process (0-19)"
    )
    args = p.parse_args()
    sim, gw, sim_port, sock = spawn(Path(tempfile.mkdtemp(prefix="fg-bs-")), args.sim_nice)
    try:
        asyncio.run(main_async(args, sim, gw, sim_port, sock))
    finally:
        gw.send_signal(signal.SIGTERM)
        gw.wait(60)
        sim.send_signal(signal.SIGTERM)
        sim.wait(30)


if __name__ == "__main__":
    main()
