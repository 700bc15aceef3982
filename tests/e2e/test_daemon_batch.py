"""The ``batch`` op against the running daemon, one test per option (seed 003: BigLedger
batch semantics): continueOnError, stop on error, validateOnly, rollbackOnError, async."""

from __future__ import annotations

import asyncio
import time
from typing import Any

Op = dict[str, Any]


def batch(rid: str, operations: list[Op], **options: bool) -> dict[str, Any]:
    return {
        "id": rid,
        "op": "batch",
        "till": "till-1",
        "operations": operations,
        "options": options,
    }


def sign_op(ref: str, data: dict[str, Any]) -> Op:
    return {"operation": "sign", "referenceId": ref, "data": data}


def ref_op(operation: str, ref: str, seq: int) -> Op:
    return {
        "operation": operation,
        "referenceId": ref,
        "data": {"ref": {"chain": "till-1", "seq": seq}},
    }


def bad_amount(data: dict[str, Any]) -> dict[str, Any]:
    """A sale whose first line's amount is not qty × unit_price."""
    lines = [dict(data["lines"][0], amount=data["lines"][0]["amount"] + 1), *data["lines"][1:]]
    return {**data, "lines": lines}


async def run(daemon: Any, request: dict[str, Any]) -> dict[str, Any]:
    reply = await daemon.request(request)
    assert reply["ok"] is True, reply
    result: dict[str, Any] = reply["batch"]
    assert result["batchId"] == request["id"]
    assert len(result["results"]) == len(request["operations"])
    for item, op in zip(result["results"], request["operations"], strict=True):
        assert (item["referenceId"], item["operation"]) == (op["referenceId"], op["operation"])
    return result


def fields_of(item: dict[str, Any]) -> list[str]:
    return [d["field"] for d in item["error"]["details"]]


async def test_batch_continue_on_error_mixed_ops_signs_valid_and_reports_invalid(
    daemon: Any, make_sale_data: Any, journal_check: Any
) -> None:
    data = make_sale_data(630)
    b = daemon.held_events()  # the chain opens with them: the first sale is seq b + 1
    result = await run(
        daemon,
        batch(
            "b1",
            [
                sign_op("r0", data),
                sign_op("r1", bad_amount(data)),
                sign_op("r2", {**data, "total": 1.5}),
                ref_op("cancel", "r3", 42),  # valid request, missing record: NOT_FOUND
                ref_op("cancel", "r4", b + 1),
                sign_op("r5", make_sale_data(900)),
            ],
            continueOnError=True,
        ),
    )
    r = result["results"]
    assert [i["success"] for i in r] == [True, False, False, False, True, True]
    assert r[1]["error"]["code"] == "VALIDATION_ERROR"
    assert fields_of(r[1]) == ["operations[1].data.lines[0].amount"]
    assert r[1]["error"]["details"][0]["code"] == "MISMATCH"
    assert "operations[2].data.total" in fields_of(r[2])
    assert {d["code"] for d in r[2]["error"]["details"]} >= {"FLOAT_NOT_ALLOWED"}
    assert r[3]["error"]["code"] == "NOT_FOUND"
    assert [i["record"]["seq"] for i in (r[0], r[4], r[5])] == [b + 1, b + 2, b + 3]
    assert r[4]["record"]["payload"]["ref"]["hash"] == r[0]["record"]["hash"]
    assert r[0]["record"]["request_id"] == "b1#r0"
    assert (result["status"], result["success"]) == ("completed_with_errors", False)
    counts = [
        result[k]
        for k in (
            "totalRecords",
            "processedRecords",
            "successfulRecords",
            "failedRecords",
            "skippedRecords",
        )
    ]
    assert counts == [6, 6, 3, 3, 0]

    # the same batch again signs nothing: every stored record comes back, replayed
    again = await run(
        daemon,
        batch(
            "b1",
            [
                sign_op("r0", data),
                ref_op("cancel", "r4", b + 1),
                sign_op("r5", make_sale_data(900)),
            ],
            continueOnError=True,
        ),
    )
    assert [i["replayed"] for i in again["results"]] == [True, True, True]
    assert [i["record"]["hash"] for i in again["results"]] == [
        i["record"]["hash"] for i in (r[0], r[4], r[5])
    ]
    assert await daemon.head() == (b + 3, r[5]["record"]["hash"])
    assert await daemon.stop() == 0
    journal_check(daemon.db_path, [i["record"] for i in (r[0], r[4], r[5])])


async def test_batch_stop_on_error_first_failure_skips_later_ops(
    daemon: Any, make_sale_data: Any
) -> None:
    data = make_sale_data(630)
    b = daemon.held_events()
    # an invalid operation: the ones before it are signed, the rest skipped
    result = await run(
        daemon,
        batch(
            "b1",
            [
                sign_op("r0", data),
                sign_op("r1", bad_amount(data)),
                sign_op("r2", data),
                sign_op("r3", data),
            ],
            continueOnError=False,
        ),
    )
    r = result["results"]
    assert r[0]["success"] and r[0]["record"]["seq"] == b + 1
    assert fields_of(r[1]) == ["operations[1].data.lines[0].amount"]
    assert [i.get("skipped") for i in r[2:]] == [True, True]
    assert [i["error"]["code"] for i in r[2:]] == ["SKIPPED", "SKIPPED"]
    assert (result["successfulRecords"], result["failedRecords"], result["skippedRecords"]) == (
        1,
        1,
        2,
    )

    # a failure found only by the ledger (missing record) stops the batch the same way
    result = await run(
        daemon,
        batch("b2", [sign_op("r0", data), ref_op("cancel", "r1", 77), sign_op("r2", data)]),
    )
    r = result["results"]
    assert r[0]["record"]["seq"] == b + 2
    assert r[1]["error"]["code"] == "NOT_FOUND"
    assert r[2]["skipped"] is True
    assert result["status"] == "completed_with_errors"
    assert (await daemon.head())[0] == b + 2
    assert daemon.query("SELECT count(*) FROM records WHERE request_id IN ('b1#r2', 'b2#r2')") == [
        (0,)
    ]


async def test_batch_validate_only_signs_nothing_and_reports_missing_refs(
    daemon: Any, make_pos_sale: Any, make_sale_data: Any
) -> None:
    b = daemon.held_events()
    s1, s2 = b + 1, b + 2
    assert (await daemon.request(make_pos_sale("s1")))["ok"]
    assert (await daemon.request(make_pos_sale("s2")))["ok"]
    assert (
        await daemon.request(
            {"id": "c2", "op": "cancel", "till": "till-1", "ref": {"chain": "till-1", "seq": s2}}
        )
    )["ok"]
    before = daemon.query("SELECT count(*) FROM records")
    head = await daemon.head()
    data = make_sale_data(630)
    result = await run(
        daemon,
        batch(
            "v1",
            [
                sign_op("r0", data),
                ref_op("cancel", "r1", 99),  # does not exist
                ref_op("cancel", "r2", s1),  # exists, still cancellable
                ref_op("cancel", "r3", s2),  # already cancelled
                ref_op("reprint", "r4", s2),  # a cancelled sale can still be reprinted
                sign_op("r5", bad_amount(data)),
            ],
            validateOnly=True,
        ),
    )
    r = result["results"]
    assert result["status"] == "validated"
    assert [i["success"] for i in r] == [True, False, True, False, True, False]
    assert r[1]["error"]["code"] == "NOT_FOUND"
    assert r[3]["error"]["code"] == "CONFLICT"
    assert fields_of(r[5]) == ["operations[5].data.lines[0].amount"]
    assert all("record" not in i for i in r)
    assert daemon.query("SELECT count(*) FROM records") == before
    assert await daemon.head() == head
    # validateOnly ignores async: the answer is the validation, at once
    result = await run(
        daemon, batch("v2", [sign_op("r0", data)], validateOnly=True, **{"async": True})
    )
    assert result["status"] == "validated"
    assert daemon.query("SELECT count(*) FROM records") == before


async def test_batch_rollback_on_error_any_failure_leaves_no_trace_and_no_seq_gap(
    daemon: Any, make_pos_sale: Any, make_sale_data: Any, journal_check: Any
) -> None:
    b = daemon.held_events()
    s1 = await daemon.request(make_pos_sale("s1"))
    data = make_sale_data(630)
    # invalid request in the batch: refused before the ledger sees anything
    result = await run(
        daemon,
        batch(
            "rb1",
            [sign_op("r0", data), sign_op("r1", data), sign_op("r2", bad_amount(data))],
            rollbackOnError=True,
        ),
    )
    assert (result["status"], result["successfulRecords"]) == ("rolled_back", 0)
    assert fields_of(result["results"][2]) == ["operations[2].data.lines[0].amount"]
    assert all(not i["success"] for i in result["results"])
    # failure found inside the ledger transaction (cancelling s1 twice): all undone
    result = await run(
        daemon,
        batch(
            "rb2",
            [
                sign_op("r0", data),
                ref_op("cancel", "r1", b + 1),
                sign_op("r2", data),
                ref_op("cancel", "r3", b + 1),
                sign_op("r4", data),
            ],
            rollbackOnError=True,
        ),
    )
    assert (result["status"], result["successfulRecords"]) == ("rolled_back", 0)
    assert {i["error"]["code"] for i in result["results"]} == {"CONFLICT"}
    assert daemon.query("SELECT count(*) FROM records WHERE request_id LIKE 'rb%'") == [(0,)]
    assert daemon.query("SELECT count(*) FROM claims") == [(0,)]
    assert await daemon.head() == (b + 1, s1["record"]["hash"])

    # no seq was consumed: the next sale follows s1 and links to it
    s2 = (await daemon.request(make_pos_sale("s2")))["record"]
    assert (s2["seq"], s2["prev_hash"]) == (b + 2, s1["record"]["hash"])
    # an all-valid atomic batch signs everything, contiguously
    result = await run(
        daemon,
        batch(
            "rb3",
            [sign_op("r0", data), ref_op("cancel", "r1", b + 1), sign_op("r2", data)],
            rollbackOnError=True,
        ),
    )
    assert result["status"] == "completed"
    recs = [i["record"] for i in result["results"]]
    assert [r["seq"] for r in recs] == [b + 3, b + 4, b + 5]
    assert await daemon.stop() == 0
    journal_check(daemon.db_path, [s1["record"], s2, *recs])


async def test_batch_async_300_ops_job_reports_progress_then_results(
    daemon: Any, make_sale_data: Any, journal_check: Any
) -> None:
    n = 300
    b = daemon.held_events()
    ops = [sign_op(f"r{i}", make_sale_data(200 + i)) for i in range(n)]
    request = batch("a1", ops, continueOnError=True, **{"async": True})
    async with await daemon.connect() as client:
        t0 = time.monotonic()
        reply = await client.request(request)
        answered_s = time.monotonic() - t0
        assert reply["ok"] is True, reply
        job = reply["job"]
        job_id = job["jobId"]
        assert job_id.startswith("job_")
        assert job["status"] in ("queued", "processing")
        assert job["progress"]["total"] == n
        assert reply["job"]["progressOp"] == {"op": "job", "jobId": job_id}
        assert answered_s < 5.0
        seen: list[tuple[str, int]] = [(job["status"], job["progress"]["processed"])]
        deadline = time.monotonic() + 60
        while True:
            reply = await client.request({"id": "q", "op": "job", "jobId": job_id})
            assert reply["ok"], reply
            job = reply["job"]
            seen.append((job["status"], job["progress"]["processed"]))
            if job["status"] in ("completed", "failed"):
                break
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.002)
        # the same batch id again is the same job, not a second run
        again = await client.request(request)
        assert again["job"]["jobId"] == job_id
        missing = await client.request({"id": "q2", "op": "job", "jobId": "job_" + "0" * 32})
        assert missing["error"]["code"] == "NOT_FOUND"

    processed = [p for _, p in seen]
    assert processed == sorted(processed), seen
    assert seen[0][0] in ("queued", "processing") and seen[-1] == ("completed", n)
    # chunks of 50 commit one after another: some poll lands between two of them
    assert any(s == "processing" and 0 < p < n for s, p in seen), seen
    assert job["progress"] == {
        "total": n,
        "processed": n,
        "successful": n,
        "failed": 0,
        "percentComplete": 100.0,
    }
    assert job["startedAt"] and job["completedAt"]
    result = job["batch"]
    assert (result["status"], result["successfulRecords"]) == ("completed", n)
    recs = [i["record"] for i in result["results"]]
    assert [r["seq"] for r in recs] == list(range(b + 1, b + n + 1))
    assert [r["request_id"] for r in recs] == [f"a1#r{i}" for i in range(n)]
    assert await daemon.stop() == 0
    journal_check(daemon.db_path, recs)


async def test_batch_invalid_envelope_refused_whole_and_signs_nothing(
    daemon: Any, make_sale_data: Any
) -> None:
    data = make_sale_data(630)
    cases = [
        (batch("e1", [sign_op("r0", data)], rollbackOnError=True, continueOnError=True), "options"),
        (batch("e2", [sign_op("r0", data), sign_op("r0", data)]), "operations[1].referenceId"),
        (batch("e3", [sign_op("r0", {**data, "till": "till-2"})]), "operations[0].data.till"),
        (batch("e4", [{"operation": "refund", "data": {}}]), "operations[0].operation"),
        (batch("e5", [sign_op(f"r{i}", data) for i in range(501)]), "operations"),
        (batch("e6", []), "operations"),
        (batch("e7", [sign_op("r0", data)], fast=True), "options.fast"),
    ]
    for request, field in cases:
        reply = await daemon.request(request)
        assert reply["ok"] is False and reply["error"]["code"] == "VALIDATION_ERROR", reply
        assert field in [d["field"] for d in reply["error"]["details"]], reply
    assert daemon.query("SELECT count(*) FROM records") == [(0,)]
