"""Benchmark MQTT round trips: till → Mosquitto → gateway → signed (fsync) → reply → till.

Starts ``mosquitto`` on a free loopback port and the real daemon, ``fiscal-gateway run``, as a
subprocess with ``[mqtt] enabled`` (fsync on, printer as chosen, everything else default), then
drives it with tills in **separate processes** (bench/mqtt_load.py: a minimal MQTT client, so
that the load generator costs far less CPU than the gateway it measures):
- 1 till, one request at a time: p50 / p99 / p99.9 round trip (MQTT v5: response topic +
  correlation data; QoS 1 both ways);
- N tills (default 32) spread over P processes (default 4), each till on its own connection
  and chain, one request at a time: signed records/s, with the CPU share of gateway, broker
  and tills;
- beside it, the same daemon over its POS Unix socket (1 client p50/p99, N clients records/s).

    flock /tmp/bench.lock python bench/bench_mqtt.py [--printer none|virtual] [--tills 32]
        [--procs 4] [--n 16000] [--n1 2000] [--protocol 5|3.1.1] [--repeat 1]

Prints numbers and the load average before and after; asserts nothing (issue 8 targets:
p50 <= 2 ms with 1 till, >= 2,000 records/s with 32 tills).
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
from mqtt_support import Broker, subscribe_once  # noqa: E402
from workload import sale  # noqa: E402

STEP_TIMEOUT_S = 600.0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p))]


def latency_line(label: str, lat: list[float]) -> str:
    lat = sorted(lat)
    return (
        f"{label}: {len(lat)} records, p50 {pct(lat, 0.5) * 1e3:.3f} ms, "
        f"p99 {pct(lat, 0.99) * 1e3:.3f} ms, p99.9 {pct(lat, 0.999) * 1e3:.3f} ms"
    )


def start_daemon(tmp: Path, config: str, src: Path | None) -> subprocess.Popen[bytes]:
    cfg = tmp / "gateway.toml"
    cfg.write_text(config)
    exe = Path(sys.executable).with_name("fiscal-gateway")
    env = dict(os.environ)
    if src is not None:  # the daemon's gateway/ and drivers/ from another tree (A/B runs)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(src), env.get("PYTHONPATH"))))
    return subprocess.Popen(
        [str(exe), "run", "--config", str(cfg), "--state-dir", str(tmp / "state"), "--http", ""],
        stderr=open(tmp / "gateway.log", "wb"),
        env=env,
        cwd=tmp,
    )


async def wait_socket(path: Path, timeout_s: float = 60.0) -> None:
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


async def load(
    args: argparse.Namespace,
    port: int,
    *,
    tills: int,
    procs: int,
    per_till: int,
    id_base: int,
    latencies: bool = False,
) -> tuple[list[dict[str, object]], float, float]:
    """Run ``tills`` tills in ``procs`` mqtt_load.py processes, all started at once.
    Returns each process's result, the wall time from go to the last reply, the tills' CPU."""
    procs = max(1, min(procs, tills))
    children = []
    first = 1
    for k in range(procs):
        n = tills // procs + (1 if k < tills % procs else 0)
        cmd = [
            sys.executable, str(HERE / "mqtt_load.py"), "--port", str(port),
            "--first", str(first), "--tills", str(n), "--requests", str(per_till),
            "--protocol", args.protocol, "--id-base", str(id_base),
        ]  # fmt: skip
        if latencies:
            cmd.append("--latencies")
        children.append(
            await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE
            )
        )
        first += n
    try:
        for c in children:
            assert c.stdout is not None
            line = await asyncio.wait_for(c.stdout.readline(), STEP_TIMEOUT_S)
            if line.strip() != b"ready":
                raise RuntimeError(f"load process did not start: {line!r}")
        for c in children:
            assert c.stdin is not None
            c.stdin.write(b"go\n")
            await c.stdin.drain()
        results = []
        for c in children:
            assert c.stdout is not None
            results.append(json.loads(await asyncio.wait_for(c.stdout.readline(), STEP_TIMEOUT_S)))
            await asyncio.wait_for(c.wait(), STEP_TIMEOUT_S)
    finally:
        for c in children:
            if c.returncode is None:
                c.kill()
                await c.wait()
    start = min(float(r["start"]) for r in results)  # type: ignore[arg-type]
    end = max(float(r["end"]) for r in results)  # type: ignore[arg-type]
    return results, end - start, sum(float(r["cpu_s"]) for r in results)  # type: ignore[arg-type]


async def writer_totals(sock: Path) -> tuple[int, int]:
    """(groups, records) the daemon's ledger writer has committed so far (status op)."""
    r, w = await asyncio.open_unix_connection(str(sock), limit=1 << 24)
    try:
        w.write(b'{"id":"bench-status","op":"status"}\n')
        await w.drain()
        status = json.loads(await asyncio.wait_for(r.readline(), STEP_TIMEOUT_S))["status"]
    finally:
        w.close()
        await w.wait_closed()
    return int(status["writer"]["groups"]), int(status["writer"]["records"])


def group_note(before: tuple[int, int], after: tuple[int, int]) -> str:
    groups, recs = after[0] - before[0], after[1] - before[1]
    return f"average group {recs / groups:.1f}" if groups else "no groups"


async def mqtt_bench(
    args: argparse.Namespace, broker: Broker, gateway_pid: int, rep: int, sock: Path
) -> None:
    port = broker.port
    base = 10_000_000 * (rep + 1)
    await load(args, port, tills=1, procs=1, per_till=200, id_base=base + 9_000_000)  # warm-up
    results, _, _ = await load(
        args, port, tills=1, procs=1, per_till=args.n1, id_base=base, latencies=True
    )
    lat = [float(x) for x in results[0]["latencies"]]  # type: ignore[union-attr]
    print(latency_line(f"MQTT {args.protocol}, 1 till", lat), flush=True)

    per = args.n // args.tills
    assert broker.proc is not None
    writer0 = await writer_totals(sock)
    gw0, br0 = cpu_s(gateway_pid), cpu_s(broker.proc.pid)
    results, dt, tills_cpu = await load(
        args, port, tills=args.tills, procs=args.procs, per_till=per, id_base=base + 5_000_000
    )
    gw_cpu, br_cpu = cpu_s(gateway_pid) - gw0, cpu_s(broker.proc.pid) - br0
    groups = group_note(writer0, await writer_totals(sock))
    n = sum(int(r["records"]) for r in results)  # type: ignore[call-overload]
    failed = sum(int(r["failures"]) for r in results)  # type: ignore[call-overload]
    print(
        f"MQTT {args.protocol}, {args.tills} tills in {args.procs} processes: {n} records in "
        f"{dt:.2f} s = {n / dt:,.0f} records/s ({failed} failed; CPU: gateway {gw_cpu / dt:.0%}, "
        f"mosquitto {br_cpu / dt:.0%}, tills {tills_cpu / dt:.0%}; "
        f"gateway {gw_cpu / n * 1e6:.0f} µs/record; {groups})",
        flush=True,
    )


async def socket_call(
    r: asyncio.StreamReader, w: asyncio.StreamWriter, req: dict[str, object]
) -> None:
    w.write(json.dumps(req).encode() + b"\n")
    await w.drain()
    reply = json.loads(await asyncio.wait_for(r.readline(), STEP_TIMEOUT_S))
    if not reply.get("ok"):
        raise RuntimeError(f"request failed: {reply}")


async def socket_bench(args: argparse.Namespace, sock: Path, rep: int, gateway_pid: int) -> None:
    base = 100_000_000 * (rep + 1)
    r, w = await asyncio.open_unix_connection(str(sock), limit=1 << 22)
    lat = []
    try:
        for i in range(args.n1):
            t = time.perf_counter()
            await socket_call(r, w, sale(base + i, "sock-0"))
            lat.append(time.perf_counter() - t)
    finally:
        w.close()
        await w.wait_closed()
    print(latency_line("POS socket, 1 client (in the bench process)", lat), flush=True)
    per = args.n // args.tills

    async def client(k: int) -> None:
        r, w = await asyncio.open_unix_connection(str(sock), limit=1 << 22)
        try:
            for i in range(per):
                await socket_call(r, w, sale(base + 1_000_000 * (k + 1) + i, f"sock-{k + 1}"))
        finally:
            w.close()
            await w.wait_closed()

    writer0 = await writer_totals(sock)
    gw0 = cpu_s(gateway_pid)
    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(args.tills)))
    dt = time.perf_counter() - t0
    n = per * args.tills
    gw_cpu = cpu_s(gateway_pid) - gw0
    groups = group_note(writer0, await writer_totals(sock))
    print(
        f"POS socket, {args.tills} clients (in the bench process): {n} records in "
        f"{dt:.2f} s = {n / dt:,.0f} records/s (CPU: gateway {gw_cpu / dt:.0%}, "
        f"{gw_cpu / n * 1e6:.0f} µs/record; {groups})",
        flush=True,
    )


async def main_async(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fg-bench-mqtt-"))
    broker = Broker(tmp / "broker")
    await broker.start()
    config = broker.gateway_config(protocol=args.protocol, status_check_s=1.0)
    config += f'[printer]\nkind = "{args.printer}"\n'
    proc = start_daemon(tmp, config, args.daemon_src)
    try:
        await wait_socket(tmp / "state" / "pos.sock")
        await subscribe_once(broker.port, "fiscal/gw-1/status", predicate=lambda s: s["online"])
        print(
            f"load average {loadavg()}; mosquitto on 127.0.0.1:{broker.port}; gateway pid "
            f"{proc.pid} (fiscal-gateway run, printer {args.printer}, MQTT {args.protocol}"
            + (f", code from {args.daemon_src}" if args.daemon_src else "")
            + ")",
            flush=True,
        )
        for rep in range(args.repeat):
            await mqtt_bench(args, broker, proc.pid, rep, tmp / "state" / "pos.sock")
            if not args.no_socket:
                await socket_bench(args, tmp / "state" / "pos.sock", rep, proc.pid)
        print(f"load average {loadavg()}", flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 30)
        await broker.stop()
        print(f"daemon exit code {rc}")
        if rc == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp} (gateway.log)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n1", type=int, default=2000, help="requests for the 1-till latency")
    p.add_argument("--tills", type=int, default=32)
    p.add_argument("--procs", type=int, default=4, help="processes the tills are spread over")
    p.add_argument("--n", type=int, default=16000, help="requests for the N-till throughput")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    p.add_argument(
        "--printer",
        choices=("none", "virtual"),
        default="none",
        help="none: signing only (as bench_socket.py --printer none); virtual: the embedded "
        "default, every receipt rendered and written to files",
    )
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument(
        "--daemon-src",
        type=Path,
        default=None,
        help="run the daemon's gateway/ and drivers/ from this directory, for A/B runs against "
        "another commit (git archive COMMIT gateway drivers | tar -x -C DIR)",
    )
    p.add_argument("--no-socket", action="store_true", help="skip the POS socket baseline")
    socket.setdefaulttimeout(None)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
