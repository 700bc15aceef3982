"""Many requests on one connection without waiting: every reply arrives once, by id."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest


async def test_socket_50_pipelined_requests_each_answered_once_by_id(
    daemon: Any, make_pos_sale: Any, journal_check: Any
) -> None:
    base = daemon.held_events()  # the chain opens with them
    requests: list[dict[str, Any]] = []
    for i in range(50):
        if i % 10 == 9:
            requests.append({"id": f"st{i}", "op": "status"})
        elif i % 10 == 4:
            requests.append({**make_pos_sale(f"bad{i}"), "total": -1})
        else:
            requests.append(make_pos_sale(f"p{i}", 200 + i))
    payload = b"".join(json.dumps(r).encode() + b"\n" for r in requests)
    async with await daemon.connect() as client:
        await client.send_raw(payload)  # all 50 in one write, nothing read yet
        replies = [await client.recv() for _ in requests]
        with pytest.raises(TimeoutError):  # and nothing more
            await client.recv(timeout_s=0.3)

    counts = Counter(r["id"] for r in replies)
    assert counts == Counter(r["id"] for r in requests)
    by_id = {r["id"]: r for r in replies}
    signs = [r for r in requests if r["id"].startswith("p")]
    records = [by_id[r["id"]]["record"] for r in signs]
    for req, rec in zip(signs, records, strict=True):
        assert rec["request_id"] == req["id"] and rec["payload"]["total"] == req["total"]
    assert sorted(rec["seq"] for rec in records) == list(range(base + 1, base + len(signs) + 1))
    for r in requests:
        reply = by_id[r["id"]]
        if r["id"].startswith("bad"):
            assert reply["error"]["code"] == "VALIDATION_ERROR"
        else:
            assert reply["ok"] is True, reply
    assert await daemon.stop() == 0
    journal_check(daemon.db_path, records)


async def test_socket_pipelining_beyond_inflight_limit_backpressure_answers_all(
    daemon: Any, make_pos_sale: Any
) -> None:
    n = 400  # over pos.max_inflight_per_connection (64): reading pauses, nothing is lost
    base = daemon.held_events()
    ids = [f"q{i}" for i in range(n)]
    async with await daemon.connect() as client:
        await client.send_raw(b"".join(json.dumps(make_pos_sale(i)).encode() + b"\n" for i in ids))
        replies = [await client.recv() for _ in ids]
    assert sorted(r["id"] for r in replies) == sorted(ids)
    assert all(r["ok"] for r in replies)
    assert sorted(r["record"]["seq"] for r in replies) == list(range(base + 1, base + n + 1))
