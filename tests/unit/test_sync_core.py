"""The pure parts of the sync engine: offline budget, uplink states, backoff, replay headers,
answer classification and run stats (gateway/core/offline_budget, uplink, replay,
sync_policy). No event loop, files or sockets."""

from __future__ import annotations

import base64
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.events import budget_event, uplink_event
from gateway.core.offline_budget import PROTOCOL_MAX_PENDING, BudgetLimits, assess, worst
from gateway.core.replay import (
    IDEMPOTENCY_KEY_RE,
    REPLAY_REMAINING_RE,
    call_key,
    remaining_after,
    replay_headers,
)
from gateway.core.sync_policy import (
    AUTH,
    BUSY,
    OK,
    PERMANENT,
    TRANSIENT,
    RunStats,
    classify_status,
    failure_rate,
    format_since,
    retry_after_s,
    stats_json,
)
from gateway.core.uplink import (
    OFFLINE,
    ONLINE,
    REPLAYING,
    STOPPED,
    Uplink,
    on_drained,
    on_failure,
    on_rejected,
    on_resume,
    on_success,
    probe_delay_s,
)

HASH = "ab" * 32

# ---------------------------------------------------------------------- offline budget

LIMITS = BudgetLimits(max_records=100, warn_records=80, max_age_s=3600, warn_age_s=600)


def test_budget_nothing_pending_is_full() -> None:
    b = assess(LIMITS, 0, 99999.0)
    assert (b.level, b.remaining_records, b.remaining_s, b.oldest_age_s) == ("ok", 100, 3600, None)
    assert b.refusal is None


@pytest.mark.parametrize(
    ("pending", "age_s", "level"),
    [
        (79, 599.0, "ok"),
        (80, 0.0, "warning"),
        (1, 600.0, "warning"),
        (100, 0.0, "hard"),
        (1, 3600.0, "hard"),
    ],
)
def test_budget_levels_by_records_or_age_warn_policy_never_refuses(
    pending: int, age_s: float, level: str
) -> None:
    b = assess(LIMITS, pending, age_s)
    assert b.level == level
    assert b.refusal is None  # policy warn
    assert b.remaining_records == max(0, 100 - pending)


def test_budget_block_policy_refuses_at_hard_level_with_reason() -> None:
    limits = BudgetLimits(
        max_records=5, warn_records=3, max_age_s=60, warn_age_s=30, policy="block"
    )
    assert assess(limits, 4, 10.0).refusal is None
    by_count = assess(limits, 5, 10.0).refusal
    assert by_count is not None and "max_pending_records = 5" in by_count
    by_age = assess(limits, 1, 60.0).refusal
    assert by_age is not None and "max_offline_age_s = 60" in by_age


def test_budget_protocol_ceiling_refuses_even_with_warn_policy() -> None:
    limits = BudgetLimits(max_records=PROTOCOL_MAX_PENDING, warn_records=10)
    assert assess(limits, PROTOCOL_MAX_PENDING - 1, 0.0).refusal is None
    reason = assess(limits, PROTOCOL_MAX_PENDING, 0.0).refusal
    assert reason is not None and "4 digits" in reason


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_records": 10000},
        {"max_records": 0},
        {"warn_records": 101, "max_records": 100},
        {"warn_age_s": 10, "max_age_s": 5},
        {"policy": "ignore"},
    ],
)
def test_budget_limits_invalid_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        BudgetLimits(**kwargs)  # type: ignore[arg-type]


def test_budget_worst_level_orders_ok_warning_hard() -> None:
    assert worst([]) == "ok"
    assert worst(["ok", "hard", "warning"]) == "hard"
    assert worst(["warning", "ok"]) == "warning"


def test_budget_to_json_has_every_field() -> None:
    j = assess(LIMITS, 2, 12.3456).to_json()
    assert j == {
        "level": "ok",
        "policy": "warn",
        "pending_records": 2,
        "remaining_records": 98,
        "oldest_unsent_age_s": 12.346,
        "remaining_s": 3587.654,
        "blocked": False,
    }


# ---------------------------------------------------------------------- uplink states


def fail(u: Uplink, now: int = 1000, rand: float = 0.0) -> Uplink:
    return on_failure(u, now, "CLOUD_UNAVAILABLE: boom", min_s=1.0, max_s=8.0, rand=rand)


def test_uplink_online_failure_goes_offline_with_probe_time() -> None:
    u = fail(Uplink(ONLINE, 0))
    assert (u.state, u.since_ms, u.failures, u.next_probe_ms) == (OFFLINE, 1000, 1, 1500)
    assert u.offline and not u.may_send(1499) and u.may_send(1500)


def test_uplink_offline_success_with_backlog_replays_then_drains_online() -> None:
    u = on_success(fail(Uplink()), 2000, offline_waiting=True)
    assert (u.state, u.failures, u.since_ms) == (REPLAYING, 0, 2000)
    assert u.offline  # records signed while replaying are flagged offline too
    u = on_drained(u, 3000)
    assert (u.state, u.since_ms, u.offline) == (ONLINE, 3000, False)


def test_uplink_offline_success_without_backlog_goes_online() -> None:
    assert on_success(fail(Uplink()), 2000, offline_waiting=False).state == ONLINE


def test_uplink_replaying_failure_goes_back_offline() -> None:
    u = on_success(fail(Uplink()), 2000, offline_waiting=True)
    assert fail(u, 2500).state == OFFLINE


def test_uplink_rejection_stops_until_resumed() -> None:
    u = on_rejected(Uplink(REPLAYING, 5), 100, "CLOUD_REJECTED: 422")
    assert u.state == STOPPED and not u.may_send(10**12)
    assert fail(u).state == STOPPED  # failures do not restart it
    assert on_success(u, 200, offline_waiting=False).state == STOPPED
    r = on_resume(u, 300)
    assert (r.state, r.next_probe_ms) == (OFFLINE, 300) and r.may_send(300)


def test_uplink_failures_grow_probe_delay() -> None:
    u = Uplink()
    delays = []
    for _ in range(6):
        u = fail(u, 0, rand=1.0)
        delays.append(u.next_probe_ms)
    assert delays == [1000, 2000, 4000, 8000, 8000, 8000]


def test_uplink_event_for_each_transition() -> None:
    assert uplink_event(ONLINE, OFFLINE) == "UPLINK_OFFLINE"
    assert uplink_event(REPLAYING, OFFLINE) == "UPLINK_OFFLINE"
    assert uplink_event(OFFLINE, OFFLINE) is None
    assert uplink_event(OFFLINE, REPLAYING) is None
    assert uplink_event(REPLAYING, ONLINE) == "UPLINK_ONLINE"
    assert uplink_event(OFFLINE, ONLINE) == "UPLINK_ONLINE"
    assert uplink_event(ONLINE, ONLINE) is None
    assert uplink_event(ONLINE, STOPPED) is None
    assert uplink_event(STOPPED, OFFLINE) == "UPLINK_OFFLINE"


def test_budget_event_only_when_a_worse_level_is_reached() -> None:
    assert budget_event("ok", "warning") == "OFFLINE_WARNING"
    assert budget_event("ok", "hard") == "OFFLINE_LIMIT"
    assert budget_event("warning", "hard") == "OFFLINE_LIMIT"
    assert budget_event("warning", "warning") is None
    assert budget_event("hard", "warning") is None
    assert budget_event("hard", "ok") is None


@given(
    failures=st.integers(1, 10_000),
    rand=st.floats(0, 1),
    min_s=st.floats(0.001, 10),
    extra=st.floats(0, 1000),
)
def test_probe_delay_capped_exponential_with_jitter_in_bounds(
    failures: int, rand: float, min_s: float, extra: float
) -> None:
    max_s = min_s + extra
    d = probe_delay_s(failures, min_s=min_s, max_s=max_s, rand=rand)
    ceiling = min(max_s, min_s * 2.0 ** min(failures - 1, 32))
    assert ceiling / 2 - 1e-9 <= d <= ceiling + 1e-9
    assert d <= max_s + 1e-9


# ---------------------------------------------------------------------- replay headers


def test_replay_headers_remaining_and_base64_hash() -> None:
    h = replay_headers(0, HASH)
    assert h["X-Replay-Remaining"] == "0"
    assert base64.b64decode(h["X-Replay-Hash"]) == bytes.fromhex(HASH)
    assert len(h["X-Replay-Hash"]) == 44 <= 64
    assert REPLAY_REMAINING_RE.match(replay_headers(9999, HASH)["X-Replay-Remaining"])


@pytest.mark.parametrize("remaining", [-1, 10000])
def test_replay_headers_beyond_four_digits_raise(remaining: int) -> None:
    with pytest.raises(ValueError, match="0-9999"):
        replay_headers(remaining, HASH)


def test_replay_remaining_after_counts_page_and_beyond() -> None:
    page = [3, 5, 8]
    assert remaining_after(page, 3, 10) == 12
    assert remaining_after(page, 8, 10) == 10
    assert remaining_after(page, 4, 0) == 2


def test_call_key_first_is_stored_later_are_v3_fixed_and_distinct() -> None:
    stored = str(uuid.uuid4())
    assert call_key(stored, 0, "INTENTION::TRANSACTION") == stored
    second = call_key(stored, 1, "TRANSACTION::RECEIPT")
    assert second == call_key(stored, 1, "TRANSACTION::RECEIPT")  # same on every retry
    assert second != stored and uuid.UUID(second).version == 3
    assert IDEMPOTENCY_KEY_RE.match(second) and IDEMPOTENCY_KEY_RE.match(stored)
    assert call_key(stored, 1, "TRANSACTION::INVOICE") != second


# ---------------------------------------------------------------------- answers and stats


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (200, OK),
        (201, OK),
        (401, AUTH),
        (409, BUSY),
        (429, BUSY),
        (408, TRANSIENT),
        (500, TRANSIENT),
        (503, TRANSIENT),
        (400, PERMANENT),
        (404, PERMANENT),
        (422, PERMANENT),
    ],
)
def test_classify_status_every_class(status: int, kind: str) -> None:
    assert classify_status(status) == kind


def test_retry_after_seconds_and_http_date() -> None:
    now_ms = 1_700_000_000_000
    assert retry_after_s("3", now_ms) == 3.0
    assert retry_after_s("Tue, 14 Nov 2023 22:13:30 GMT", now_ms) == pytest.approx(10.0)
    assert retry_after_s(None, now_ms) is None
    assert retry_after_s("soon", now_ms) is None


def test_failure_rate_counts_rejected_and_failed_items() -> None:
    # the seed's batch-stats example: 142 accepted, 3 rejected -> 0.021
    assert round(failure_rate(142, 3, 0), 3) == 0.021
    assert round(failure_rate(10, 2, 1), 3) == 0.231
    assert failure_rate(0, 0, 0) == 0.0


def test_run_stats_result_json_fields_exactly_as_seed() -> None:
    s = RunStats(
        "spain/lroe",
        batches_created=1,
        accepted=10,
        rejected=2,
        failed=1,
        errors_count=1,
        duration_ms=2345,
    )
    assert s.check_alert(0.05) is True
    assert not s.succeeded
    assert s.result_json() == {
        "processor": "spain/lroe",
        "batches_created": 1,
        "batches_retried": 0,
        "accepted": 10,
        "rejected": 2,
        "failed": 1,
        "failure_rate": 0.231,
        "alert_triggered": True,
        "errors_count": 1,
        "duration_ms": 2345,
    }


def test_run_stats_success_and_no_alert_without_items() -> None:
    s = RunStats("france/fiskaly", accepted=5)
    assert s.succeeded and not s.check_alert(0.0)
    assert not RunStats("x/y", run_error="CLOUD_UNAVAILABLE").succeeded


def test_stats_json_fields_exactly_as_seed() -> None:
    j = stats_json(
        "spain/lroe",
        batches_created=5,
        batches_retried=1,
        accepted=142,
        rejected=3,
        failed=0,
        since_ms=1_773_066_600_000,
    )
    assert j == {
        "processor": "spain/lroe",
        "batches_created": 5,
        "batches_retried": 1,
        "accepted": 142,
        "rejected": 3,
        "failed": 0,
        "failure_rate": 0.021,
        "since": "2026-03-09T14:30:00Z",
    }
    assert format_since(0) == "1970-01-01T00:00:00Z"
