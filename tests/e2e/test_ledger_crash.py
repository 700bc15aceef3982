"""Crash safety (DESIGN.md §3.1-3.3): kill -9 at any instant loses no acknowledged record.

A worker process (crash_worker.py) signs from 8 concurrent clients on 2 chains and logs each
acknowledgement durably; the test SIGKILLs it after a random delay, many times, reusing
request ids across rounds so that requests in flight at the kill are retried. After every
kill the journal on disk must hold every acknowledged record unchanged, verify end to end,
have no seq gap, and hold no request signed twice.

The random delays come from a fixed seed (printed; override with FISCAL_CRASH_SEED).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from drivers.signers.software import SoftwareSigner
from gateway.audit import verify_db
from gateway.ledger import Ledger

WORKER = Path(__file__).with_name("crash_worker.py")
SEED = int(os.environ.get("FISCAL_CRASH_SEED", "20261121"))
ROUNDS = 12
CLIENTS = 8
BATCH_CLIENT = 7  # this client sends atomic batches of 3
KILL_AFTER_S = (0.2, 1.5)


@dataclass(frozen=True, slots=True)
class Ack:
    chain: str
    seq: int
    hash: str


def read_acks(path: Path) -> list[dict[str, Any]]:
    """Complete ack lines (a line cut by the kill was never fully written: not an ack)."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.split("\n")[:-1]]


def check_journal(db: Path, acked: dict[tuple[str, str], Ack]) -> int:
    """Every invariant the journal must hold after a kill; returns the record count."""
    report = verify_db(db)
    assert report.ok, [c.failure for c in report.chains if c.failure]

    uri = f"file:{db}?mode=ro"  # read-only: leave the crashed WAL for the next start-up
    with closing(sqlite3.connect(uri, uri=True)) as conn:
        per_chain = conn.execute(
            "SELECT chain, count(*), min(seq), max(seq) FROM records GROUP BY chain"
        ).fetchall()
        heads = dict(conn.execute("SELECT chain, seq FROM heads"))
        for chain, count, lo, hi in per_chain:
            assert (lo, hi) == (1, count), f"chain {chain}: seq gap ({count} in {lo}..{hi})"
            assert heads[chain] == hi, f"chain {chain}: head {heads[chain]}, last record {hi}"

        twice = conn.execute(
            "SELECT client, request_id, count(*) FROM records GROUP BY client, request_id "
            "HAVING count(*) > 1"
        ).fetchall()
        assert twice == [], f"requests signed twice: {twice[:5]}"
        n_records = conn.execute("SELECT count(*) FROM records").fetchone()[0]
        n_requests = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
        linked = conn.execute(
            "SELECT count(*) FROM requests q JOIN records r ON r.chain = q.chain "
            "AND r.seq = q.seq AND r.client = q.client AND r.request_id = q.request_id"
        ).fetchone()[0]
        assert n_records == n_requests == linked, (n_records, n_requests, linked)

        for (client, request_id), ack in acked.items():
            row = conn.execute(
                "SELECT r.chain, r.seq, r.hash FROM requests q JOIN records r "
                "ON r.chain = q.chain AND r.seq = q.seq "
                "WHERE q.client = ? AND q.request_id = ?",
                (client, request_id),
            ).fetchone()
            assert row is not None, f"acknowledged {client}/{request_id} is gone"
            assert Ack(*row) == ack, f"acknowledged {client}/{request_id} changed"
    return int(n_records)


def plan_round(rng: random.Random, next_k: dict[str, int]) -> list[dict[str, Any]]:
    """Where each client starts: after its last ack, or a few ids back (retries)."""
    plan = []
    for i in range(CLIENTS):
        client = f"pos-{i}"
        batch = 3 if i == BATCH_CLIENT else 1
        start = next_k[client]
        if rng.random() < 0.6:
            start = max(0, start - rng.randint(0, 3))
        start -= start % batch
        plan.append({"client": client, "chain": f"till-{i % 2}", "start": start, "batch": batch})
    return plan


@pytest.mark.slow
def test_ledger_sigkill_at_random_moments_loses_no_acknowledged_record(
    tmp_path: Path, db_path: Path, key_path: Path, signer: SoftwareSigner
) -> None:
    rng = random.Random(SEED)
    print(f"crash test seed {SEED} (set FISCAL_CRASH_SEED to replay another)")
    acked: dict[tuple[str, str], Ack] = {}
    next_k = {f"pos-{i}": 0 for i in range(CLIENTS)}
    replays = 0
    for rnd in range(ROUNDS):
        plan = plan_round(rng, next_k)
        delay_s = rng.uniform(*KILL_AFTER_S)
        ack_path = tmp_path / f"acks-{rnd}.jsonl"
        out_path, err_path = tmp_path / f"worker-{rnd}.out", tmp_path / f"worker-{rnd}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, WORKER, db_path, key_path, ack_path, json.dumps(plan)],
                stdout=out,
                stderr=err,
            )
            try:
                time.sleep(delay_s)
                alive = proc.poll() is None
            finally:
                proc.kill()  # SIGKILL: no cleanup, no close, no checkpoint
                proc.wait(timeout=30)
        assert alive, f"round {rnd}: worker exited early:\n{err_path.read_text()}"
        assert proc.returncode == -signal.SIGKILL

        round_acks = read_acks(ack_path)
        for a in round_acks:
            key = (a["client"], a["request_id"])
            ack = Ack(a["chain"], a["seq"], a["hash"])
            if key in acked:
                assert acked[key] == ack, f"round {rnd}: {key} answered differently on retry"
            acked.setdefault(key, ack)
            replays += a["replayed"]
            k = int(a["request_id"].rsplit("-", 1)[1])
            next_k[a["client"]] = max(next_k[a["client"]], k + 1)

        records = check_journal(db_path, acked)
        print(
            f"round {rnd}: killed after {delay_s:.2f} s, {len(round_acks)} acks "
            f"({sum(a['replayed'] for a in round_acks)} replayed), {records} records"
        )

    assert len(acked) >= 200, f"too little signed to prove anything ({len(acked)} acks)"
    assert replays > 0, "no retried request was ever replayed"

    async def reopen() -> str | None:
        led = await Ledger.open(db_path, signer)
        try:
            return led.halted
        finally:
            await led.close()

    assert asyncio.run(reopen()) is None
    check_journal(db_path, acked)
