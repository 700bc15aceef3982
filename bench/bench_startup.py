"""Start-up to ready: ``Ledger.open`` on a large journal (default 1,000,000 records).

Builds the database once through the real ledger writer and keeps it at ``--db`` (with its
key next to it) for later runs; then times ``Ledger.open`` (lock, connect, integrity check,
migrations, key registration, per-chain tail check of the last ``tail_verify`` records) and
``close`` several times, warm (file in the page cache) and cold (its pages dropped with
posix_fadvise, no root needed). It also times ``PRAGMA quick_check`` and the tail check on
their own, and reports what the ledger did with the integrity check at each open. Prints
numbers; asserts nothing.

    python bench/bench_startup.py                       # builds 1M records the first time
    python bench/bench_startup.py --n 200000 --runs 3   # smaller and quicker
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from workload import (
    build_db,
    db_bytes,
    evict_from_page_cache,
    machine,
    record_count,
    signer_for,
)

from gateway.ledger import Ledger
from gateway.store import connect, quick_check


def time_quick_check(db: Path) -> float:
    conn = connect(db, write=False)
    try:
        t0 = time.perf_counter()
        quick_check(conn)
        return time.perf_counter() - t0
    finally:
        conn.close()


async def time_open(db: Path, *, wait_check: bool = False, **kwargs: object) -> tuple[float, str]:
    """Seconds for Ledger.open, and what its integrity check did (waited for if asked)."""
    t0 = time.perf_counter()
    ledger = await Ledger.open(db, signer_for(db), **kwargs)  # type: ignore[arg-type]
    t_open = time.perf_counter() - t0
    if wait_check:
        for _ in range(2400):  # poll, up to 2 minutes
            if not ledger.integrity_check.startswith("running"):
                break
            await asyncio.sleep(0.05)
    check = ledger.integrity_check
    if ledger.halted is not None:
        check += f" / HALTED: {ledger.halted}"
    await ledger.close()
    return t_open, check


def forget_clean_close(db: Path) -> None:
    """Make the next open take the unclean-shutdown path (as after a crash)."""
    db.with_name(db.name + ".clean").unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="records in the database")
    ap.add_argument(
        "--db",
        type=Path,
        default=None,
        help="database (built with --n records if missing; default "
        "/tmp/fgw-bench/startup-<n>.db, kept for the next run)",
    )
    ap.add_argument("--tills", type=int, default=4, help="chains when building")
    ap.add_argument("--runs", type=int, default=5, help="timed opens per mode")
    args = ap.parse_args()

    db = args.db or Path(f"/tmp/fgw-bench/startup-{args.n}.db")
    db.parent.mkdir(parents=True, exist_ok=True)
    print(f"machine      {machine()}")
    if not db.exists() or record_count(db) < args.n:
        print(f"building     {db} with {args.n:,} records through the ledger writer (once)")
        t0 = time.perf_counter()
        build_db(db, args.n, tills=args.tills)
        print(f"built        in {time.perf_counter() - t0:,.0f} s")
    n = record_count(db)
    print(f"database     {db}: {n:,} records, {db_bytes(db) / 2**20:,.0f} MiB")

    modes = [
        ("warm", "after a clean close, file in the page cache"),
        ("cold", "after a clean close, file dropped from the page cache"),
        ("unclean", "after an unclean shutdown (no clean-close record), warm"),
        ("unclean-cold", "after an unclean shutdown and a reboot (cold page cache)"),
    ]
    for mode, what in modes:
        opens = []
        for i in range(args.runs):
            # the first warm run warms the cache (the previous run may have evicted it)
            if mode.endswith("cold"):
                evict_from_page_cache(db)
            if mode.startswith("unclean"):
                forget_clean_close(db)
            t_open, check = asyncio.run(time_open(db, wait_check=True))
            opens.append(t_open)
            print(f"open {mode:12s} run {i + 1}: Ledger.open {t_open * 1e3:,.0f} ms; {check}")
        opens.sort()
        print(
            f"open {mode:12s} median {opens[len(opens) // 2] * 1e3:,.0f} ms over {len(opens)} "
            f"runs ({what})"
        )

    for mode in ("warm", "cold"):
        if mode == "cold":
            evict_from_page_cache(db)
        else:
            time_quick_check(db)  # bring the file into the page cache
        t = time_quick_check(db)
        print(f"quick_check  {mode}: PRAGMA quick_check alone {t * 1e3:,.0f} ms")

    t_open, _ = asyncio.run(time_open(db, run_quick_check=False))
    print(
        f"tail check   Ledger.open without the integrity check {t_open * 1e3:,.0f} ms "
        f"(connect, migrations, key, last 1,000 records of every chain verified)"
    )


if __name__ == "__main__":
    main()
