"""``POST /v1/pos/requests``: the HTTP status mirrors the reply's error code
(docs/protocol.md, "Error codes"), and a refused request changes nothing."""

from __future__ import annotations

from typing import Any

MAX_BODY_BYTES = 64 * 1024
CONFIG = f"""
[tills]
allowed = ["till-1"]

[http]
max_body_bytes = {MAX_BODY_BYTES}
"""


async def test_http_pos_requests_error_codes_map_to_http_statuses(
    start_daemon: Any, make_pos_sale: Any
) -> None:
    daemon = await start_daemon(CONFIG)
    h1 = daemon.held_events() + 1  # the chain opens with the held START, KEY_GENERATED
    status, reply = await daemon.http_post(make_pos_sale("h1"))
    assert (status, reply["ok"], reply["record"]["seq"]) == (200, True, h1)

    cancel = {"id": "hc1", "op": "cancel", "till": "till-1", "ref": {"chain": "till-1", "seq": h1}}
    cases: list[tuple[str, dict[str, Any] | bytes, int, str]] = [
        ("invalid sale", {**make_pos_sale("h2"), "total": 1}, 400, "VALIDATION_ERROR"),
        ("float money", {**make_pos_sale("h3"), "total": 6.3}, 400, "VALIDATION_ERROR"),
        ("unknown op", {"id": "h4", "op": "refund"}, 400, "VALIDATION_ERROR"),
        ("not JSON", b'{"id": "h5", "op": ', 400, "PROTOCOL_ERROR"),
        ("not an object", b"[1, 2]", 400, "PROTOCOL_ERROR"),
        ("invalid UTF-8", b'{"id": "\xff"}', 400, "PROTOCOL_ERROR"),
        ("huge integer", b'{"id": "h6", "n": ' + b"9" * 5000 + b"}", 400, "PROTOCOL_ERROR"),
        ("unknown till", make_pos_sale("h7", till="till-9"), 403, "UNKNOWN_TILL"),
        ("missing record", {**cancel, "ref": {"chain": "till-1", "seq": 99}}, 404, "NOT_FOUND"),
        ("missing job", {"id": "h8", "op": "job", "jobId": "job_" + "0" * 32}, 404, "NOT_FOUND"),
        ("same id, other body", make_pos_sale("h1", 700), 409, "IDEMPOTENCY_MISMATCH"),
        (
            "body over the limit",
            b'{"id": "h9", "pad": "' + b"x" * MAX_BODY_BYTES + b'"}',
            413,
            "LINE_TOO_LONG",
        ),
    ]
    for name, body, want_status, want_code in cases:
        status, reply = await daemon.http_post(body)
        assert (status, reply["ok"], reply["error"]["code"]) == (want_status, False, want_code), (
            name,
            reply,
        )

    status, reply = await daemon.http_post(cancel)
    assert (status, reply["record"]["seq"]) == (200, h1 + 1)
    status, reply = await daemon.http_post({**cancel, "id": "hc2"})
    assert (status, reply["error"]["code"]) == (409, "CONFLICT")
    # a batch is 200 even when operations fail: the outcomes are per operation
    status, reply = await daemon.http_post(
        {
            "id": "hb",
            "op": "batch",
            "till": "till-1",
            "options": {"continueOnError": True},
            "operations": [
                {"operation": "cancel", "data": {"ref": {"chain": "till-1", "seq": h1}}}
            ],
        }
    )
    assert (status, reply["batch"]["results"][0]["error"]["code"]) == (200, "CONFLICT")
    status, reply = await daemon.http_post({"id": "st", "op": "status", "till": "till-1"})
    assert status == 200 and reply["status"]["chains"][0]["seq"] == h1 + 1
    assert daemon.query(
        "SELECT request_id FROM records WHERE type != 'INTENTION::EVENT' ORDER BY seq"
    ) == [("h1",), ("hc1",)]
    # the same body over the socket gets the same verdicts
    assert (await daemon.request(make_pos_sale("s7", till="till-9")))["error"]["code"] == (
        "UNKNOWN_TILL"
    )
    status, health = await daemon.http_get("/v1/health")
    assert (status, health) == (200, {"ok": True})
