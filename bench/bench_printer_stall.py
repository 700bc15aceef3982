"""Sign latency while the receipt printer is stalled vs with no printer (issue 5).

Starts the daemon twice as a subprocess: once with ``[printer] kind = "none"``, once with a
serial printer on a real pseudo-terminal whose other end is held open and never read or
answered (a printer that hangs: status queries time out, writes block). Each time one client
signs ``--n`` receipts one at a time over the POS socket; prints p50/p99 per run. Printing
must never make signing wait, so the two should match (within noise).

    python bench/bench_printer_stall.py [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_socket import Client, pct, start_daemon
from workload import sale


async def measure(sock: Path, n: int) -> list[float]:
    lat = []
    async with Client(sock) as c:
        for i in range(100):
            await c.call(sale(9_000_000 + i, "warm"))
        for i in range(n):
            t = time.perf_counter()
            await c.call(sale(i))
            lat.append(time.perf_counter() - t)
    return sorted(lat)


async def run(n: int) -> None:
    print(f"load average {os.getloadavg()[0]:.2f}")
    master, slave = os.openpty()  # the stalled printer: nobody reads `master`
    try:
        for label, printer in (
            ("no printer", 'kind = "none"'),
            ("stalled serial printer", f'kind = "serial"\ndevice = "{os.ttyname(slave)}"'),
        ):
            tmp = Path(tempfile.mkdtemp(prefix="fg-stall-"))
            config = tmp / "bench.toml"
            config.write_text(f"[printer]\n{printer}\n")
            proc, _ = start_daemon(tmp / "state", {}, config)
            try:
                lat = await measure(tmp / "state" / "pos.sock", n)
            finally:
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(60)
            print(
                f"{label}: {n} records, p50 {pct(lat, 0.5) * 1e3:.3f} ms, "
                f"p99 {pct(lat, 0.99) * 1e3:.3f} ms, max {lat[-1] * 1e3:.1f} ms (exit {rc})"
            )
    finally:
        os.close(master)
        os.close(slave)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=2000)
    asyncio.run(run(p.parse_args().n))


if __name__ == "__main__":
    main()
