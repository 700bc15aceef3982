"""sign, cancel, correction, reprint and status against the running daemon, over the Unix
socket and over HTTP; every record a reply carried is checked against the journal."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

RECEIPT = "TRANSACTION::RECEIPT"
CANCELLATION = "TRANSACTION::CANCELLATION"
CORRECTION = "TRANSACTION::CORRECTION"
DUPLICATE = "INTENTION::DUPLICATE"


class Transport:
    """Sends one request and returns (HTTP-like status or None, reply)."""

    def __init__(self, kind: str, daemon: Any) -> None:
        self.kind = kind
        self.daemon = daemon
        self.client: Any = None

    async def __call__(self, request: dict[str, Any]) -> tuple[int | None, dict[str, Any]]:
        if self.kind == "http":
            return await self.daemon.http_post(request)
        if self.client is None:
            self.client = await self.daemon.connect()
        return None, await self.client.request(request)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()


@pytest.fixture(params=["socket", "http"])
async def send(request: pytest.FixtureRequest, daemon: Any) -> Any:
    t = Transport(request.param, daemon)
    try:
        yield t
    finally:
        await t.close()


def referring(rid: str, op: str, seq: int) -> dict[str, Any]:
    return {"id": rid, "op": op, "till": "till-1", "ref": {"chain": "till-1", "seq": seq}}


async def test_record_ops_full_lifecycle_replies_match_verified_journal(
    daemon: Any, send: Transport, make_pos_sale: Any, make_sale_data: Any, journal_check: Any
) -> None:
    records: list[dict[str, Any]] = []
    # the chain opens with the gateway-wide events held since start (START, KEY_GENERATED)
    base = daemon.held_events()
    events = {"INTENTION::EVENT": base}

    async def ok(request: dict[str, Any]) -> dict[str, Any]:
        status, reply = await send(request)
        assert reply["ok"] is True, reply
        assert reply["id"] == request["id"]
        assert status in (None, 200)
        if "record" in reply:
            records.append(reply["record"])
            assert reply["replayed"] is False
        return reply

    async def refused(request: dict[str, Any], code: str, http: int) -> dict[str, Any]:
        status, reply = await send(request)
        assert reply["ok"] is False, reply
        assert reply["error"]["code"] == code, reply
        assert status in (None, http)
        return reply

    # sign: the first sale, after the held events; totals are this sale
    s1 = (await ok(make_pos_sale("s1", 630)))["record"]
    assert (s1["chain"], s1["seq"], s1["type"], s1["number"]) == ("till-1", base + 1, RECEIPT, 1)
    assert base == 2 and s1["prev_hash"] != "0" * 64
    assert s1["totals"]["gross"] == 630
    assert s1["counters"] == {RECEIPT: 1, **events}
    reply = await ok(make_pos_sale("s1b", 1000))
    assert reply["receipt"]["number"] == "till-1-R-00000002"

    # cancel: negates s1; totals drop by 630; twice is a conflict
    c1 = (await ok(referring("c1", "cancel", base + 1)))["record"]
    assert c1["type"] == CANCELLATION and c1["seq"] == base + 3
    assert c1["payload"]["total"] == -630
    assert c1["payload"]["ref"]["hash"] == s1["hash"]
    assert c1["totals"]["gross"] == 1000
    await refused(referring("c2", "cancel", base + 1), "CONFLICT", 409)
    await refused(referring("c3", "cancel", 99), "NOT_FOUND", 404)

    # correction of seq 2 (1000 → 1500): payload carries the difference; totals follow
    k1 = (
        await ok(
            {
                **referring("k1", "correction", base + 2),
                "reason": "wrong price",
                **{k: v for k, v in make_sale_data(1500).items() if k != "type"},
            }
        )
    )["record"]
    assert k1["type"] == CORRECTION and k1["seq"] == base + 4
    assert k1["payload"]["total"] == 500
    assert k1["payload"]["corrected"]["total"] == 1500
    assert k1["totals"]["gross"] == 1500
    # the corrected sale cannot be cancelled any more; the correction itself can
    await refused(referring("c4", "cancel", base + 2), "CONFLICT", 409)

    # reprint: copies 1 and 2, totals untouched
    d1 = (await ok(referring("d1", "reprint", base + 4)))["record"]
    d2 = (await ok(referring("d2", "reprint", base + 4)))["record"]
    assert (d1["type"], d1["payload"]["copy"], d2["payload"]["copy"]) == (DUPLICATE, 1, 2)
    assert d1["payload"]["ref"]["hash"] == k1["hash"]
    assert d2["totals"] == k1["totals"]

    # status: the head is the last record, the counters count each type
    status = (await ok({"id": "st", "op": "status"}))["status"]
    (chain,) = status["chains"]
    assert (chain["chain"], chain["seq"], chain["hash"]) == ("till-1", base + 6, d2["hash"])
    assert chain["counters"] == {
        RECEIPT: 2,
        CANCELLATION: 1,
        CORRECTION: 1,
        DUPLICATE: 2,
        **events,
    }
    assert chain["counters"] == d2["counters"]
    assert chain["totals"] == d2["totals"]
    assert status["signing"]["ok"] is True
    assert status["writer"]["records"] == base + 6
    code, get_status = await daemon.http_get("/v1/status")
    assert code == 200 and get_status["chains"] == status["chains"]

    # the chain links reply to reply
    for prev, rec in itertools.pairwise(records):
        assert (rec["seq"], rec["prev_hash"]) == (prev["seq"] + 1, prev["hash"])

    assert await daemon.stop() == 0
    journal_check(daemon.db_path, records)
    rows = daemon.query("SELECT count(*) FROM records WHERE type != 'INTENTION::EVENT'")
    assert rows == [(6,)]  # and the STOP event of the clean stop
