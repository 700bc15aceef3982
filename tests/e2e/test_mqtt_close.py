"""The ``close`` op over MQTT (issue 4: "socket, HTTP, MQTT"): a till on a real Mosquitto asks
the daemon (a real subprocess) for a monthly closing; the reply is the signed closing, the
same stored record a repeat over the socket gets, and the journal verifies."""

from __future__ import annotations

from typing import Any

import pytest
from mqtt_support import Broker, Till, sale, subscribe_once

from gateway.audit import verify_db

pytestmark = pytest.mark.timeout(180)

STATUS = "fiscal/gw-1/status"


async def test_mqtt_close_op_monthly_replies_signed_closing_same_as_socket_replay(
    broker: Broker, start_daemon: Any
) -> None:
    d = await start_daemon(broker.gateway_config())
    await subscribe_once(broker.port, STATUS, predicate=lambda s: s.get("online") is True)
    close = {"id": "z-mqtt", "op": "close", "till": "till-1", "period": "MONTHLY"}
    async with Till(broker.port) as till:
        signed = await till.request(sale("s1"))
        assert signed["ok"], signed
        reply = await till.request(close)
        bad = await till.request({**close, "id": "z-bad", "period": "WEEKLY"})
    assert reply["ok"], reply
    assert [c["type"] for c in reply["closings"]] == ["CLOSING::DAILY", "CLOSING::MONTHLY"]
    monthly = reply["record"]
    assert monthly["type"] == "CLOSING::MONTHLY"
    assert monthly["payload"]["period_total"]["gross"] == signed["record"]["payload"]["total"]
    assert bad["error"]["code"] == "VALIDATION_ERROR"
    assert bad["error"]["details"][0]["field"] == "period"
    # the same request id from the same till over the socket: the stored closing, not a new one
    again = await d.request(close)
    assert again["replayed"] is True and again["record"] == monthly
    assert await d.stop() == 0
    report = verify_db(d.db_path)
    assert report.ok, [c.failure.to_json() for c in report.chains if c.failure]
    assert sum(c.closings for c in report.chains) == 2
