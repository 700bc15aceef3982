"""The pure parts of the MQTT transport: topic scheme, reconnect backoff, alerts from status."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.core.alerts import alerts
from gateway.core.backoff import backoff_s
from gateway.core.mqtt_topics import Topics

T = Topics("fiscal", "gw-1")
tills = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,31}", fullmatch=True)


# ---------------------------------------------------------------------- topics


def test_topics_names_follow_the_documented_scheme() -> None:
    assert T.request_filter == "fiscal/gw-1/tills/+/req"
    assert T.request("till-1") == "fiscal/gw-1/tills/till-1/req"
    assert T.reply("till-1") == "fiscal/gw-1/tills/till-1/res"
    assert T.status == "fiscal/gw-1/status"
    assert T.events == "fiscal/gw-1/events"
    assert Topics("store/7", "gw").request("t") == "store/7/gw/tills/t/req"


@given(tills)
def test_topics_till_of_request_topic_round_trips(till: str) -> None:
    assert T.till_of(T.request(till)) == till


def test_topics_till_of_other_topics_is_none() -> None:
    for topic in (
        "fiscal/gw-1/tills/till-1/res",
        "fiscal/gw-2/tills/till-1/req",
        "fiscal/gw-1/tills//req",
        "fiscal/gw-1/tills/a/b/req",
        "fiscal/gw-1/status",
        "other/gw-1/tills/till-1/req",
    ):
        assert T.till_of(topic) is None, topic


def test_topics_response_topic_only_under_the_tills_own_reply_topic() -> None:
    own = "fiscal/gw-1/tills/till-1/res"
    assert T.response_topic_allowed("till-1", own)
    assert T.response_topic_allowed("till-1", own + "/client-7")
    for bad in (
        "fiscal/gw-1/tills/till-2/res",
        "fiscal/gw-1/tills/till-1/resX",
        "fiscal/gw-1/status",
        "fiscal/gw-1/events",
        "elsewhere/anything",
        own + "/+",
        own + "/#",
        own + "/\x00",
        own + "/" + "x" * 70000,
    ):
        assert not T.response_topic_allowed("till-1", bad), bad[:80]


# ---------------------------------------------------------------------- backoff


@given(
    st.integers(min_value=-3, max_value=10_000),
    st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_backoff_stays_between_half_the_ceiling_and_the_cap(attempt: int, rand: float) -> None:
    delay = backoff_s(attempt, min_s=0.5, max_s=30.0, rand=rand)
    ceiling = min(30.0, 0.5 * 2.0 ** max(attempt, 0)) if attempt < 64 else 30.0
    assert ceiling / 2 <= delay <= ceiling <= 30.0


def test_backoff_doubles_until_capped() -> None:
    top = [backoff_s(a, min_s=0.5, max_s=30.0, rand=0.999999) for a in range(10)]
    assert [round(x, 3) for x in top[:6]] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
    assert all(29.9 < x <= 30.0 for x in top[6:])
    assert backoff_s(0, min_s=0.5, max_s=30.0, rand=0.0) == 0.25


# ---------------------------------------------------------------------- alerts


def status(
    ok: bool = True, printer_error: str | None = None, limits: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "signing": {"ok": ok, "halted_reason": None if ok else "chain till-1 broken at seq 7"},
        "printer": {"last_error": printer_error},
        "offline": {"processors": [{"name": n, "limit": lim} for n, lim in (limits or {}).items()]},
    }


def names(found: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(a["alert"], a["severity"]) for a in found]


def test_alerts_none_while_everything_is_fine() -> None:
    assert alerts(None, status()) == []
    assert alerts(status(), status()) == []


def test_alerts_integrity_alarm_once_when_signing_halts_then_resumed() -> None:
    halted = status(ok=False)
    assert names(alerts(status(), halted)) == [("integrity_alarm", "critical")]
    assert "broken at seq 7" in alerts(status(), halted)[0]["message"]
    assert alerts(halted, halted) == []
    assert names(alerts(halted, status())) == [("signing_resumed", "info")]


def test_alerts_bad_state_seen_first_is_raised() -> None:
    found = alerts(None, status(ok=False, printer_error="paper out", limits={"fr/x": "hard"}))
    assert names(found) == [
        ("integrity_alarm", "critical"),
        ("printer_fault", "warning"),
        ("offline_limit", "critical"),
    ]


def test_alerts_printer_fault_on_each_new_error_and_recovery() -> None:
    assert names(alerts(status(), status(printer_error="cover open"))) == [
        ("printer_fault", "warning")
    ]
    assert alerts(status(printer_error="cover open"), status(printer_error="cover open")) == []
    assert names(alerts(status(printer_error="a"), status(printer_error="b"))) == [
        ("printer_fault", "warning")
    ]
    assert names(alerts(status(printer_error="a"), status())) == [("printer_ok", "info")]


def test_alerts_offline_limit_levels_per_processor() -> None:
    before = status(limits={"france/fiskaly": "ok", "peppol/goroute": "warning"})
    after = status(limits={"france/fiskaly": "warning", "peppol/goroute": "ok"})
    found = alerts(before, after)
    assert [(a["processor"], a["limit"], a["severity"]) for a in found] == [
        ("france/fiskaly", "warning", "warning"),
        ("peppol/goroute", "ok", "info"),
    ]


def test_alerts_tolerate_missing_sections() -> None:
    assert alerts({}, {}) == []
    assert alerts(None, {"signing": "?", "offline": {"processors": [1, {"x": 1}]}}) == []
