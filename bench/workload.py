"""The benchmarks' workload: sale requests, ledger entries, databases, machine facts.

Every bench script imports this module, so they all measure the same request shape: the
two-line café receipt that the smoke test and the integration tests use (two VAT rates, one
card payment), turned into an :class:`~gateway.ledger.Entry` exactly as the dispatcher does
(validate, fingerprint, payload, one print job).

Nothing here times anything; the scripts do, and print what they measured.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

from drivers.signers.software import SoftwareSigner, generate_key, load_signer
from gateway.core.request import request_fingerprint, validate_sale
from gateway.ledger import Entry, Ledger


def sale(i: int, till: str = "till-1") -> dict[str, Any]:
    """Request number ``i`` of a till: a valid two-line receipt paid by card."""
    return {
        "id": f"r{i}",
        "op": "sign",
        "till": till,
        "type": "RECEIPT",
        "currency": "EUR",
        "lines": [
            {"text": "Café", "qty": "2", "unit_price": 250, "vat_rate": "10.00", "amount": 500},
            {"text": "Croissant", "qty": "1", "unit_price": 130, "vat_rate": "5.50", "amount": 130},
        ],
        "payments": [{"method": "CARD", "amount": 630}],
        "total": 630,
    }


def entry(i: int, till: str = "till-1") -> Entry:
    """The ledger entry of request ``i``: validated and fingerprinted like the dispatcher."""
    req = sale(i, till)
    s = validate_sale(req)
    return Entry(
        s.till,
        s.till,
        s.request_id,
        request_fingerprint(req),
        s.record_type,
        s.payload(),
        print_job=True,
    )


def entries(start: int, n: int, tills: int) -> Iterator[Entry]:
    """``n`` entries from request ``start`` on, spread round-robin over ``tills`` chains."""
    for i in range(start, start + n):
        yield entry(i, f"till-{i % tills}")


def signer_for(db: Path) -> SoftwareSigner:
    """The signing key kept next to a bench database (created with it)."""
    key = db.with_name(db.name + ".key.pem")
    return load_signer(key) if key.exists() else generate_key(key)


async def fill(ledger: Ledger, start: int, n: int, *, tills: int, callers: int) -> None:
    """Append ``n`` records with ``callers`` concurrent tasks, entries made on the fly."""
    nxt = start
    end = start + n

    async def caller() -> None:
        nonlocal nxt
        while nxt < end:
            i = nxt
            nxt += 1
            await ledger.submit(entry(i, f"till-{i % tills}"))

    async with asyncio.TaskGroup() as tg:
        for _ in range(callers):
            tg.create_task(caller())


def build_db(db: Path, n: int, *, tills: int = 4, callers: int = 32, quiet: bool = False) -> None:
    """Make (or extend to) an ``n``-record database through the real ledger writer."""
    have = record_count(db) if db.exists() else 0
    if have >= n:
        return
    signer = signer_for(db)

    async def run() -> None:
        ledger = await Ledger.open(db, signer)
        t0 = time.perf_counter()
        done = have
        step = 50_000
        try:
            while done < n:
                k = min(step, n - done)
                await fill(ledger, done, k, tills=tills, callers=callers)
                done += k
                if not quiet:
                    rate = (done - have) / (time.perf_counter() - t0)
                    print(f"  built {done:,}/{n:,} records ({rate:,.0f}/s)", flush=True)
        finally:
            await ledger.close()

    asyncio.run(run())


def record_count(db: Path) -> int:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        try:
            return int(conn.execute("SELECT count(*) FROM records").fetchone()[0])
        except sqlite3.OperationalError:
            return 0


def db_bytes(db: Path) -> int:
    """Bytes on disk of the database and its WAL (after a checkpoint the WAL is empty)."""
    total = 0
    for suffix in ("", "-wal"):
        p = db.with_name(db.name + suffix)
        if p.exists():
            total += p.stat().st_size
    return total


def rss_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in KiB, from /proc/self/status."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out["VmRSS"], out["VmHWM"]


def thread_cpu_s(native_id: int) -> float:
    """CPU time a thread of this process has used so far (from /proc/self/task/*/schedstat)."""
    with open(f"/proc/self/task/{native_id}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def evict_from_page_cache(path: Path) -> None:
    """Ask the kernel to drop this file's cached pages (a cold read without root)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[k]


def machine() -> str:
    """One line about where the numbers come from."""
    model = "?"
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    return (
        f"{os.cpu_count()} CPU ({model}), Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {platform.system()} {platform.release()}, "
        f"load average {load} (other processes share these CPUs), "
        f"argv: {' '.join(sys.argv[1:]) or '(defaults)'}"
    )
