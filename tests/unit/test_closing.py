"""gateway.core.closing: period sums, the schedule in local time, what is due; and the clock
discipline and event rate limit of the fiscal journal (gateway.core.clock, core.events)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from datetime import time as dtime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.clock import BACKWARD, FORWARD, ClockState, observe
from gateway.core.closing import (
    DAILY,
    MONTHLY,
    YEARLY,
    Contribution,
    Due,
    PeriodSums,
    Schedule,
    contribution,
    due_closings,
    parse_closing_time,
    parse_year_end,
)
from gateway.core.errors import ValidationError
from gateway.core.events import RateLimiter, event_payload
from gateway.core.ops import validate_close

PARIS = ZoneInfo("Europe/Paris")


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


# ---------------------------------------------------------------------- the schedule


def test_schedule_boundary_local_time_follows_daylight_saving() -> None:
    s = Schedule(PARIS, dtime(4, 0))
    assert s.boundary_ms(date(2026, 1, 15)) == ms("2026-01-15T03:00:00+00:00")
    assert s.boundary_ms(date(2026, 7, 15)) == ms("2026-07-15T02:00:00+00:00")


def test_schedule_boundary_in_dst_gap_resolves_and_days_stay_ordered() -> None:
    s = Schedule(PARIS, dtime(2, 30))  # 2026-03-29 02:30 does not exist in Paris
    days = [date(2026, 3, d) for d in (28, 29, 30)]
    bounds = [s.boundary_ms(d) for d in days]
    assert bounds == sorted(bounds)
    assert bounds[1] == ms("2026-03-29T01:30:00+00:00")  # fold=0: the pre-transition offset


def test_schedule_kinds_at_month_and_fiscal_year_start() -> None:
    s = Schedule(UTC, year_end=(6, 30))
    assert s.kinds_at(date(2026, 5, 12)) == (DAILY,)
    assert s.kinds_at(date(2026, 6, 1)) == (DAILY, MONTHLY)
    assert s.kinds_at(date(2026, 7, 1)) == (DAILY, MONTHLY, YEARLY)
    no_months = Schedule(UTC, monthly=False, year_end=(6, 30))
    assert no_months.kinds_at(date(2026, 6, 1)) == (DAILY,)
    assert no_months.kinds_at(date(2026, 7, 1)) == (DAILY, MONTHLY, YEARLY)


def test_schedule_boundaries_between_excludes_start_includes_end() -> None:
    s = Schedule(UTC, dtime(4, 0))
    start = ms("2026-11-20T04:00:00+00:00")
    found = s.boundaries(start, ms("2026-11-22T04:00:00+00:00"), limit=10)
    assert [b for _, b in found] == [
        ms("2026-11-21T04:00:00+00:00"),
        ms("2026-11-22T04:00:00+00:00"),
    ]
    assert s.next_boundary_ms(start) == ms("2026-11-21T04:00:00+00:00")
    assert Schedule(UTC, None).boundaries(0, start, limit=10) == []


def test_due_closings_box_off_over_month_end_gives_each_day_then_month() -> None:
    s = Schedule(UTC, dtime(4, 0))
    start = ms("2026-11-29T10:00:00+00:00")
    due = due_closings(
        s,
        now_ms=ms("2026-12-02T09:00:00+00:00"),
        chain_start_ms=start,
        last_end_ms={DAILY: None, MONTHLY: None, YEARLY: None},
    )
    assert due == [
        Due(DAILY, ms("2026-11-30T04:00:00+00:00")),
        Due(DAILY, ms("2026-12-01T04:00:00+00:00")),
        Due(MONTHLY, ms("2026-12-01T04:00:00+00:00")),
        Due(DAILY, ms("2026-12-02T04:00:00+00:00")),
    ]


def test_due_closings_requested_closing_after_boundary_skips_that_day() -> None:
    s = Schedule(UTC, dtime(4, 0))
    due = due_closings(
        s,
        now_ms=ms("2026-11-21T05:00:00+00:00"),
        chain_start_ms=ms("2026-11-20T10:00:00+00:00"),
        last_end_ms={DAILY: ms("2026-11-21T04:30:00+00:00"), MONTHLY: None, YEARLY: None},
    )
    assert due == []


def test_parse_closing_time_and_year_end_bad_values_raise() -> None:
    assert parse_closing_time("04:00") == dtime(4, 0)
    assert parse_year_end("12-31") == (12, 31)
    for bad in ("4:00", "24:00", "04-00", "ab:cd"):
        with pytest.raises(ValueError):
            parse_closing_time(bad)
    for bad in ("02-29", "13-01", "12/31", "1231"):
        with pytest.raises(ValueError):
            parse_year_end(bad)


# ---------------------------------------------------------------------- period sums


def sale(gross: int, rate: str = "20.00", method: str = "CASH") -> dict[str, object]:
    vat = gross - gross * 100 // 120
    return {
        "type": "TRANSACTION::RECEIPT",
        "payload": {
            "vat": [{"rate": rate, "net": gross - vat, "vat": vat, "gross": gross}],
            "payments": [{"method": method, "amount": gross}],
        },
    }


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 10**6), max_size=10), st.lists(st.integers(1, 10**6), max_size=5))
def test_period_sums_added_then_taken_out_leave_the_rest(first: list[int], rest: list[int]) -> None:
    alone = PeriodSums()
    both = PeriodSums()
    for g in first:
        alone.add(contribution(sale(g), None))
        both.add(contribution(sale(g), None))
    for g in rest:
        both.add(contribution(sale(g, "5.50", "CARD"), None))
    for g in rest:
        both.add(contribution(sale(g, "5.50", "CARD"), None), -1)
    assert both.parts() == alone.parts()


def test_period_sums_rate_seen_is_listed_even_when_it_nets_to_zero() -> None:
    sums = PeriodSums()
    sums.add(
        Contribution(
            "TRANSACTION::RECEIPT",
            ({"rate": "10.00", "net": 91, "vat": 9, "gross": 100},),
            (("CASH", 100),),
        )
    )
    sums.add(
        Contribution(
            "TRANSACTION::CANCELLATION",
            ({"rate": "10.00", "net": -91, "vat": -9, "gross": -100},),
            (("CASH", -100),),
        )
    )
    parts = sums.parts()
    assert parts["vat"] == [{"rate": "10.00", "net": 0, "vat": 0, "gross": 0}]
    assert parts["payments"] == [{"method": "CASH", "amount": 0}]
    assert parts["period_total"] == {"gross": 0, "net": 0, "vat": 0, "gross_abs": 200}
    assert parts["counts"] == {"TRANSACTION::CANCELLATION": 1, "TRANSACTION::RECEIPT": 1}


def test_contribution_correction_without_original_raises() -> None:
    body = {"type": "TRANSACTION::CORRECTION", "payload": {"vat": [], "corrected": {}}}
    with pytest.raises(ValueError):
        contribution(body, None)


# ---------------------------------------------------------------------- the close op


def test_validate_close_period_and_envelope_checked() -> None:
    req = validate_close({"id": "z-1", "op": "close", "till": "till-1", "period": "MONTHLY"})
    assert (req.request_id, req.till, req.kind) == ("z-1", "till-1", MONTHLY)
    with pytest.raises(ValidationError) as info:
        validate_close({"id": "z-1", "op": "close", "till": "till 1", "period": ["DAILY"]})
    assert {d.field for d in info.value.details} == {"till", "period"}


# ---------------------------------------------------------------------- clock discipline


def test_clock_observe_backward_step_is_a_jump_once() -> None:
    s, jump = observe(ClockState(), 10_000, 500, None, forward_threshold_ms=300_000)
    assert jump is None
    s, jump = observe(s, 7_000, 600, None, forward_threshold_ms=300_000)
    assert jump is not None and jump.direction == BACKWARD and jump.jump_ms == -3_100
    s, jump = observe(s, 7_100, 700, None, forward_threshold_ms=300_000)
    assert jump is None


def test_clock_observe_forward_beyond_threshold_is_a_jump_within_is_not() -> None:
    s, _ = observe(ClockState(), 0, 0, None, forward_threshold_ms=60_000)
    s, jump = observe(s, 59_000 + 1_000, 1_000, None, forward_threshold_ms=60_000)
    assert jump is None
    s, jump = observe(s, 7_200_000, 2_000, None, forward_threshold_ms=60_000)
    assert jump is not None and jump.direction == FORWARD
    assert jump.fields()["jump_ms"] == 7_200_000 - 60_000 - 1_000


def test_clock_observe_behind_journal_at_start_is_a_backward_jump() -> None:
    _, jump = observe(ClockState(), 1_000, 5, 9_000, forward_threshold_ms=60_000)
    assert jump is not None and jump.direction == BACKWARD
    assert (jump.from_ms, jump.to_ms) == (9_000, 1_000)


# ---------------------------------------------------------------------- event rate limit


def test_rate_limiter_burst_becomes_first_plus_one_counted_record() -> None:
    rl = RateLimiter(window_ms=1_000)
    fault = event_payload("PRINTER_FAULT", {"problem": "paper out"})
    assert rl.offer(None, fault, 0) is True
    assert [rl.offer(None, fault, t) for t in range(10, 500, 10)] == [False] * 49
    assert rl.offer(None, event_payload("PRINTER_FAULT", {"problem": "cover open"}), 20)
    assert rl.due(900) == []
    (burst,) = rl.due(1_000)
    assert burst.payload["count"] == 49 and burst.payload["first_time"].endswith("00.010Z")
    assert rl.next_due_ms() is None
    assert rl.offer(None, fault, 1_001) is True  # a new window


def test_event_payload_unknown_code_or_reserved_field_raises() -> None:
    with pytest.raises(ValueError):
        event_payload("NO_SUCH_EVENT", {})
    with pytest.raises(ValueError):
        event_payload("START", {"count": 3})
