"""Whole-database verification rate (``gateway.audit.verify_db`` / ``fiscal-gateway verify``).

Builds a database of ``--n`` records through the real ledger writer the first time (kept at
``--db`` for the next run; its key is kept next to it), then verifies it ``--repeat`` times
in-process and once through the command line. Verification is the full check: canonical
form, SHA-256, links, counters, totals, and every ECDSA signature. Prints numbers; asserts
nothing.

    python bench/bench_verify.py                          # 100,000 records
    python bench/bench_verify.py --n 20000 --repeat 1     # quick look
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

from workload import build_db, db_bytes, machine, record_count

from gateway.audit import verify_db


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="records in the database")
    ap.add_argument(
        "--db",
        type=Path,
        default=None,
        help="database to verify (built with --n records if missing; default "
        "/tmp/fgw-bench/verify-<n>.db, kept for the next run)",
    )
    ap.add_argument("--tills", type=int, default=4, help="chains when building")
    ap.add_argument("--repeat", type=int, default=3, help="in-process runs")
    ap.add_argument("--no-cli", action="store_true", help="skip the command-line run")
    args = ap.parse_args()

    db = args.db or Path(f"/tmp/fgw-bench/verify-{args.n}.db")
    db.parent.mkdir(parents=True, exist_ok=True)
    print(f"machine      {machine()}")
    if not db.exists() or record_count(db) < args.n:
        print(f"building     {db} with {args.n:,} records through the ledger writer")
        build_db(db, args.n, tills=args.tills)
    n = record_count(db)
    print(f"database     {db}: {n:,} records, {db_bytes(db) / 2**20:,.1f} MiB")

    rates = []
    for i in range(args.repeat):
        t0 = time.perf_counter()
        report = verify_db(db)
        wall = time.perf_counter() - t0
        if not report.ok:
            failures = [c.failure for c in report.chains if c.failure is not None]
            raise SystemExit(f"verification FAILED: {failures[0]}")
        rates.append(report.records / wall)
        print(
            f"verify_db    run {i + 1}: {report.records:,} records in {wall:.2f} s = "
            f"{report.records / wall:,.0f} records/s (report says {report.records_per_s:,.0f}/s)"
        )
    if rates:
        rates.sort()
        print(f"verify_db    median {rates[len(rates) // 2]:,.0f} records/s over {len(rates)} runs")

    exe = shutil.which("fiscal-gateway")
    if exe and not args.no_cli:
        t0 = time.perf_counter()
        out = subprocess.run([exe, "verify", "--db", str(db)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        print(
            f"CLI          fiscal-gateway verify --db: exit {out.returncode}, {wall:.2f} s wall "
            f"incl. interpreter start = {n / wall:,.0f} records/s"
        )


if __name__ == "__main__":
    main()
