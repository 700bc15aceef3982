"""Exactly once (DESIGN.md §3.3) across a connection dropped before the reply was read."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest


async def wait_for_head(daemon: Any, seq: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (await daemon.head())[0] < seq:
        assert time.monotonic() < deadline, f"seq {seq} never committed"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("drop", ["close", "abort"])
async def test_sign_connection_dropped_before_reply_retry_replays_same_record(
    daemon: Any, make_pos_sale: Any, journal_check: Any, drop: str
) -> None:
    request = make_pos_sale("t-1", 630)
    first = daemon.held_events() + 1  # the chain opens with the held gateway-wide events
    client = await daemon.connect()
    await client.send_raw(json.dumps(request).encode() + b"\n")
    if drop == "abort":
        client.abort()
    await client.close()

    # the request was read before the drop: it is signed anyway
    await wait_for_head(daemon, first)
    async with await daemon.connect() as client:
        reply = await client.request(request)
        assert reply["ok"] is True and reply["replayed"] is True, reply
        record = reply["record"]
        assert (record["seq"], record["request_id"]) == (first, "t-1")
        # the same id from the same till over HTTP: the same stored record
        status, over_http = await daemon.http_post(request)
        assert status == 200 and over_http["replayed"] is True
        assert over_http["record"] == record
        # the same id with another body is refused and changes nothing
        other = await client.request({**make_pos_sale("t-1", 640)})
        assert other["ok"] is False
        assert other["error"]["code"] == "IDEMPOTENCY_MISMATCH"
        status, other_http = await daemon.http_post(make_pos_sale("t-1", 640))
        assert (status, other_http["error"]["code"]) == (409, "IDEMPOTENCY_MISMATCH")
        # a new id is a new record, right after
        fresh = await client.request(make_pos_sale("t-2", 640))
        assert (fresh["record"]["seq"], fresh["replayed"]) == (first + 1, False)

    # ... and after a restart the same id still replays
    await daemon.restart()
    reply = await daemon.request(request)
    assert reply["replayed"] is True and reply["record"] == record
    assert await daemon.stop() == 0
    assert daemon.query("SELECT count(*) FROM records WHERE request_id = 't-1'") == [(1,)]
    # the restart added technical events (STOP, START), no sale
    assert daemon.query("SELECT count(*) FROM records WHERE type != 'INTENTION::EVENT'") == [(2,)]
    journal_check(daemon.db_path, [record, fresh["record"]])


async def test_sign_same_id_sent_twice_concurrently_signs_once(
    daemon: Any, make_pos_sale: Any
) -> None:
    request = make_pos_sale("dup-1", 630)
    clients = [await daemon.connect() for _ in range(5)]
    try:
        replies = await asyncio.gather(*(c.request(request) for c in clients))
    finally:
        for c in clients:
            await c.close()
    assert {r["record"]["hash"] for r in replies} == {replies[0]["record"]["hash"]}
    assert sorted(r["replayed"] for r in replies) == [False, True, True, True, True]
    assert daemon.query("SELECT count(*) FROM records WHERE type != 'INTENTION::EVENT'") == [(1,)]
