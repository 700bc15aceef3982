"""Ledger writer benchmark: latency, throughput, group commit, memory, bytes on disk.

Everything goes through the real writer in-process (gateway.ledger.Ledger) on a real SQLite
file (WAL, synchronous=FULL: one fsync per group commit); a caller's time ends when its
future resolves, i.e. after the COMMIT. Prints numbers; asserts nothing.

    python bench/bench_ledger.py                     # defaults: a few minutes at most
    python bench/bench_ledger.py --n 2000 --n-conc 10000 --rss-n 20000   # quick look

Phases (each on a fresh database in --dir):
1. validation: ``validate_sale`` + ``request_fingerprint`` per request (done by the
   dispatcher before the ledger; reported apart, not included in the ledger numbers);
2. one caller: ``await ledger.submit(entry)`` one after the other, per-record latency;
3. concurrent callers: ``--callers`` tasks share ``--n-conc`` pre-built entries over
   ``--tills`` chains; records/s and the average group size (``ledger.stats``);
4. memory (a fresh subprocess, so nothing of phases 1-3 counts): ``--rss-n`` records made
   on the fly by 32 callers, then VmRSS from /proc/self/status, and DB bytes per record
   after the ledger is closed (WAL checkpointed and truncated).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from workload import (
    db_bytes,
    entries,
    entry,
    fill,
    machine,
    percentile,
    record_count,
    rss_kib,
    sale,
    signer_for,
    thread_cpu_s,
)

from gateway.core.request import request_fingerprint, validate_sale
from gateway.ledger import Ledger


def bench_validation(n: int) -> None:
    reqs = [sale(i) for i in range(n)]
    t0 = time.perf_counter()
    for r in reqs:
        validate_sale(r)
    t1 = time.perf_counter()
    for r in reqs:
        request_fingerprint(r)
    t2 = time.perf_counter()
    v_us, f_us = (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6
    print(
        f"validation   validate_sale {v_us:.1f} µs + request_fingerprint {f_us:.1f} µs "
        f"= {v_us + f_us:.1f} µs per request ({n:,} requests, one thread)"
    )


async def bench_one_caller(db: Path, n: int, warmup: int, processors: int) -> None:
    ledger = await Ledger.open(db, signer_for(db), **_ledger_kwargs(processors))
    try:
        for i in range(warmup):
            await ledger.submit(entry(i))
        todo = [entry(i) for i in range(warmup, warmup + n)]
        lat: list[float] = []
        cpu = _CpuMeter(ledger)
        for e in todo:
            t = time.perf_counter()
            await ledger.submit(e)
            lat.append(time.perf_counter() - t)
        cpu_text = cpu.per_record(n)
    finally:
        await ledger.close()
    lat.sort()
    ms = [x * 1e3 for x in lat]
    print(
        f"1 caller     p50 {percentile(ms, 50):.3f} ms  p99 {percentile(ms, 99):.3f} ms  "
        f"p99.9 {percentile(ms, 99.9):.3f} ms  max {ms[-1]:.3f} ms  "
        f"mean {sum(ms) / len(ms):.3f} ms  ({n:,} records, {warmup} warm-up not counted; "
        f"{cpu_text})"
    )


async def bench_concurrent(db: Path, n: int, callers: int, tills: int, processors: int) -> None:
    todo = list(entries(0, n, tills))
    ledger = await Ledger.open(db, signer_for(db), **_ledger_kwargs(processors))
    it = iter(todo)

    async def caller() -> None:
        for e in it:
            await ledger.submit(e)

    try:
        cpu = _CpuMeter(ledger)
        t0 = time.perf_counter()
        async with asyncio.TaskGroup() as tg:
            for _ in range(callers):
                tg.create_task(caller())
        dt = time.perf_counter() - t0
        st = ledger.stats
        cpu_text = cpu.per_record(n)
    finally:
        await ledger.close()
    print(
        f"{callers} callers   {n / dt:,.0f} records/s  ({n:,} records over {tills} chains in "
        f"{dt:.2f} s; {st.groups:,} commits, average group {st.avg_group:.1f}, "
        f"largest {st.max_group}; {cpu_text})"
    )


async def rss_phase(db: Path, n: int, tills: int, processors: int) -> dict[str, float]:
    ledger = await Ledger.open(db, signer_for(db), **_ledger_kwargs(processors))
    try:
        t0 = time.perf_counter()
        await fill(ledger, 0, n, tills=tills, callers=32)
        dt = time.perf_counter() - t0
        rss, hwm = rss_kib()
        avg_group = ledger.stats.avg_group
    finally:
        await ledger.close()
    count = record_count(db)
    return {
        "records": count,
        "rss_kib": rss,
        "hwm_kib": hwm,
        "rate": n / dt,
        "avg_group": avg_group,
        "db_bytes": db_bytes(db),
    }


def bench_rss(workdir: Path, n: int, tills: int, processors: int) -> None:
    db = workdir / "rss.db"
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            "--rss-phase",
            str(db),
            "--rss-n",
            str(n),
            "--tills",
            str(tills),
            "--processors",
            str(processors),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    r = json.loads(out.strip().splitlines()[-1])
    print(
        f"memory       VmRSS {r['rss_kib'] / 1024:.1f} MiB after {r['records']:,} records "
        f"(peak VmHWM {r['hwm_kib'] / 1024:.1f} MiB; 32 callers making entries on the fly, "
        f"validation included: {r['rate']:,.0f} records/s, average group {r['avg_group']:.1f})"
    )
    print(
        f"disk         {r['db_bytes'] / r['records']:,.0f} bytes per record "
        f"({r['db_bytes'] / 2**20:,.1f} MiB for {r['records']:,} records incl. requests, "
        f"print_jobs and {processors} outbox row(s) each; WAL checkpointed)"
    )


class _CpuMeter:
    """CPU time of the writer thread and of the event-loop thread over a phase."""

    def __init__(self, ledger: Ledger) -> None:
        assert ledger._thread is not None and ledger._thread.native_id is not None
        self.writer = ledger._thread.native_id
        self.loop = threading.get_native_id()
        self.start = (thread_cpu_s(self.writer), thread_cpu_s(self.loop))

    def per_record(self, n: int) -> str:
        w = (thread_cpu_s(self.writer) - self.start[0]) / n * 1e6
        lp = (thread_cpu_s(self.loop) - self.start[1]) / n * 1e6
        return f"CPU per record: writer thread {w:.0f} µs, event-loop thread {lp:.0f} µs"


_EXTRA: dict[str, object] = {}


def _ledger_kwargs(processors: int) -> dict[str, object]:
    return {"processors": tuple(f"bench/p{i}" for i in range(processors)), **_EXTRA}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000, help="records timed for 1-caller latency")
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--n-conc", type=int, default=50_000, help="records in the concurrent phase")
    ap.add_argument("--callers", type=int, default=32)
    ap.add_argument("--tills", type=int, default=4, help="chains in the concurrent phases")
    ap.add_argument("--rss-n", type=int, default=100_000, help="records before reading VmRSS")
    ap.add_argument("--processors", type=int, default=0, help="outbox rows per record")
    ap.add_argument("--dir", type=Path, default=None, help="work directory (default: a temp)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--only", choices=["validation", "latency", "concurrent", "memory"])
    ap.add_argument("--repeat", type=int, default=1, help="runs of the latency/concurrent phases")
    ap.add_argument(
        "--checkpoint-every", type=int, default=None, help="Ledger checkpoint_every_commits"
    )
    ap.add_argument("--rss-phase", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.checkpoint_every is not None:
        _EXTRA["checkpoint_every_commits"] = args.checkpoint_every

    if args.rss_phase is not None:
        r = asyncio.run(rss_phase(args.rss_phase, args.rss_n, args.tills, args.processors))
        print(json.dumps(r))
        return

    workdir = args.dir or Path(tempfile.mkdtemp(prefix="fgw-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"machine      {machine()}")
    print(f"database     {workdir} (WAL, synchronous=FULL, processors={args.processors})")
    try:
        if args.only in (None, "validation"):
            bench_validation(min(args.n, 20_000))
        for r in range(args.repeat):  # each run on a fresh database
            if args.only in (None, "latency"):
                asyncio.run(
                    bench_one_caller(
                        workdir / f"latency-{r}.db", args.n, args.warmup, args.processors
                    )
                )
            if args.only in (None, "concurrent"):
                asyncio.run(
                    bench_concurrent(
                        workdir / f"concurrent-{r}.db",
                        args.n_conc,
                        args.callers,
                        args.tills,
                        args.processors,
                    )
                )
        if args.only in (None, "memory"):
            bench_rss(workdir, args.rss_n, args.tills, args.processors)
    finally:
        if args.dir is None and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
