"""kill -9 while an all-or-nothing batch is being signed (DESIGN.md §3.1, §3.2).

Each round sends a 400-operation ``rollbackOnError`` batch while another client signs
single sales, kills the daemon with SIGKILL at a random moment, restarts it and checks:
the batch is entirely in the chain or not at all, every acknowledged single sale survived,
and re-sending the batch with the same id completes it exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from typing import Any

import pytest

N_OPS = 400
ROUNDS = 8


def atomic_batch(rid: str, make_sale_data: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "op": "batch",
        "till": "till-1",
        "operations": [
            {"operation": "sign", "referenceId": f"r{i}", "data": make_sale_data(200 + i)}
            for i in range(N_OPS)
        ],
        "options": {"rollbackOnError": True},
    }


async def sign_singles(daemon: Any, make_pos_sale: Any, prefix: str, acked: dict[str, str]):
    """Sign sales one by one until the connection dies; record what was acknowledged."""
    i = 0
    with contextlib.suppress(ConnectionError, EOFError, OSError, TimeoutError):
        async with await daemon.connect() as client:
            while True:
                reply = await client.request(make_pos_sale(f"{prefix}-{i}"), timeout_s=10)
                if reply.get("ok"):
                    acked[reply["record"]["request_id"]] = reply["record"]["hash"]
                i += 1


def batch_count(daemon: Any, rid: str) -> int:
    ((n,),) = daemon.query("SELECT count(*) FROM records WHERE request_id LIKE ?", (f"{rid}#%",))
    return int(n)


@pytest.mark.slow
async def test_rollback_batch_kill9_at_random_moments_all_or_nothing(
    daemon: Any, make_pos_sale: Any, make_sale_data: Any
) -> None:
    seed = int(os.environ.get("FG_CRASH_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    print(f"crash test seed {seed} (FG_CRASH_SEED to replay)")

    # round 0, no kill: how long such a batch takes on this machine
    t0 = time.monotonic()
    result = (await daemon.request(atomic_batch("b0", make_sale_data)))["batch"]
    batch_s = time.monotonic() - t0
    assert (result["status"], result["successfulRecords"]) == ("completed", N_OPS)

    acked: dict[str, str] = {}
    outcomes = []
    for rnd in range(1, ROUNDS + 1):
        rid = f"b{rnd}"
        singles = asyncio.create_task(sign_singles(daemon, make_pos_sale, f"s{rnd}", acked))
        while sum(k.startswith(f"s{rnd}-") for k in acked) < 5:  # singles are flowing
            assert not singles.done(), "the single sales stopped early"
            await asyncio.sleep(0.005)
        client = await daemon.connect()
        await client.send(atomic_batch(rid, make_sale_data))
        # anywhere from before the batch is read to after it is committed
        await asyncio.sleep(rng.uniform(0.0, 1.5 * batch_s))
        await daemon.kill()
        await client.close()
        await singles
        await daemon.start()

        n = batch_count(daemon, rid)
        outcomes.append(n)
        assert n in (0, N_OPS), f"round {rnd}: {n} of {N_OPS} batch operations survived"
        # every acknowledged single sale survived, unchanged
        for request_id, hash_hex in acked.items():
            assert daemon.query("SELECT hash FROM records WHERE request_id = ?", (request_id,)) == [
                (hash_hex,)
            ], f"acknowledged {request_id} lost after kill -9 (seed {seed})"
        # re-sending the batch finishes it, exactly once
        result = (await daemon.request(atomic_batch(rid, make_sale_data)))["batch"]
        assert result["status"] == "completed"
        assert {i["replayed"] for i in result["results"]} == {n == N_OPS}
        assert batch_count(daemon, rid) == N_OPS

    print(f"batch {batch_s:.3f} s; ops found after each kill: {outcomes}; {len(acked)} acked")
    assert await daemon.stop() == 0
    from gateway.audit import verify_db

    report = verify_db(daemon.db_path)
    assert report.ok, [c.failure.to_json() for c in report.chains if c.failure]
    assert (
        report.records
        == N_OPS * (ROUNDS + 1)
        + daemon.query("SELECT count(*) FROM records WHERE request_id NOT LIKE 'b%'")[0][0]
    )
