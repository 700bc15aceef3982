"""Crash-test worker: signs from concurrent clients until it is killed (SIGKILL).

Run by tests/e2e/test_ledger_crash.py as a real subprocess::

    python crash_worker.py DB KEY ACKS PLAN_JSON

PLAN_JSON lists the clients: ``[{"client": "pos-0", "chain": "till-0", "start": 7,
"batch": 1}, ...]``. Client *c* sends request ids ``c-<k>`` for k = start, start+1, ...
(``batch`` > 1: that many ids per atomic ``submit_many``). A request's body is a pure
function of its id, so a retry of an id after a crash is the same request.

Only after ``await`` returned a signed record does the worker append one JSON line per
record — ``client, request_id, chain, seq, hash, replayed`` — to ACKS, then flush and
fsync: a line in ACKS is exactly an acknowledgement the POS would have received.
Exit codes: killed by the test (normal); 3 when the ledger is halted at start-up.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import zlib
from pathlib import Path
from typing import IO, Any

from drivers.signers.software import load_signer
from gateway.core.errors import GatewayError
from gateway.core.request import request_fingerprint, validate_sale
from gateway.ledger import Entry, Ledger, Signed


def sale(client: str, chain: str, k: int) -> dict[str, Any]:
    request_id = f"{client}-{k}"
    amount = 200 + zlib.crc32(request_id.encode()) % 10_000
    return {
        "id": request_id,
        "op": "sign",
        "till": chain,
        "type": "RECEIPT",
        "currency": "EUR",
        "lines": [
            {
                "text": f"item {k}",
                "qty": "1",
                "unit_price": amount - 100,
                "vat_rate": "20.00",
                "amount": amount - 100,
            },
            {"text": "bag", "qty": "1", "unit_price": 100, "vat_rate": "5.50", "amount": 100},
        ],
        "payments": [{"method": "CASH", "amount": amount}],
        "total": amount,
    }


def entry(client: str, chain: str, k: int) -> Entry:
    request = sale(client, chain, k)
    s = validate_sale(request)
    return Entry(
        chain, client, s.request_id, request_fingerprint(request), s.record_type, s.payload()
    )


def acknowledge(acks: IO[str], client: str, results: list[Signed]) -> None:
    lines = "".join(
        json.dumps(
            {
                "client": client,
                "request_id": r.record.request_id,
                "chain": r.record.chain,
                "seq": r.record.seq,
                "hash": r.record.hash,
                "replayed": r.replayed,
            }
        )
        + "\n"
        for r in results
    )
    acks.write(lines)
    acks.flush()
    os.fsync(acks.fileno())


async def run_client(ledger: Ledger, acks: IO[str], plan: dict[str, Any]) -> None:
    client, chain, k, batch = plan["client"], plan["chain"], plan["start"], plan["batch"]
    while True:
        if batch == 1:
            results = [await ledger.submit(entry(client, chain, k))]
        else:
            outcomes = await ledger.submit_many(
                [entry(client, chain, k + j) for j in range(batch)], atomic=True
            )
            results = []
            for o in outcomes:
                if isinstance(o, GatewayError):
                    raise o
                results.append(o)
        acknowledge(acks, client, results)
        k += batch


async def main(db: Path, key: Path, acks: IO[str], plan: list[dict[str, Any]]) -> int:
    ledger = await Ledger.open(db, load_signer(key))
    if ledger.halted is not None:
        print(f"HALTED: {ledger.halted}", file=sys.stderr, flush=True)
        await ledger.close()
        return 3
    print("ready", flush=True)
    async with asyncio.TaskGroup() as tg:
        for p in plan:
            tg.create_task(run_client(ledger, acks, p))
    return 0  # unreachable: the clients run until the process is killed


if __name__ == "__main__":
    db, key, ack_path, plan_json = sys.argv[1:5]
    with open(ack_path, "a", encoding="utf-8") as ack_file:
        sys.exit(asyncio.run(main(Path(db), Path(key), ack_file, json.loads(plan_json))))
