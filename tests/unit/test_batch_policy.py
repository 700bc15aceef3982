"""Rate limit arithmetic, batch cutting and item classification (gateway.core.batch_policy)."""

from __future__ import annotations

from gateway.core.batch_policy import (
    ACCEPTED,
    DUPLICATE,
    FAILED,
    PENDING,
    REVIEW,
    Limits,
    classify_goroute,
    classify_sifen,
    cut_batches,
    doc_refusal,
    hold_ms,
    rate_keep,
    rate_wait_ms,
    resolve_duplicate,
)
from gateway.core.sync_policy import retry_after_s

W = 60_000


def test_rate_wait_under_limit_zero() -> None:
    assert rate_wait_ms([0, 1000], 2000, limit=10, window_ms=W) == 0


def test_rate_wait_full_bucket_waits_for_oldest_token() -> None:
    sent = [1000 * i for i in range(10)]
    assert rate_wait_ms(sent, 9000, limit=10, window_ms=W) == 51_000
    assert rate_wait_ms(sent, 59_999, limit=10, window_ms=W) == 1
    assert rate_wait_ms(sent, 60_000, limit=10, window_ms=W) == 0


def test_rate_greedy_sender_any_window_never_over_limit() -> None:
    kept: list[int] = []
    every: list[int] = []
    now = 0
    for _ in range(35):
        now += rate_wait_ms(kept, now, limit=10, window_ms=W)
        kept = [*rate_keep(kept, now, limit=10, window_ms=W), now]
        every.append(now)
        now += 137
    for t in every:
        assert sum(1 for u in every if t - W < u <= t) <= 10
    assert every[10] - every[0] >= W


def test_rate_keep_drops_old_and_extra() -> None:
    assert rate_keep([1, 2, 3, 70_000], 70_001, limit=2, window_ms=W) == [70_000]
    assert rate_keep(list(range(5)), 10, limit=2, window_ms=W) == [3, 4]


def test_doc_refusal_over_doc_limit_names_limit() -> None:
    lim = Limits(max_docs=100, max_batch_bytes=50_000, max_doc_bytes=15_000)
    assert doc_refusal(15_000, lim) is None
    assert "15000-byte limit" in (doc_refusal(15_001, lim) or "")


def test_cut_batches_count_and_bytes_respected() -> None:
    lim = Limits(max_docs=3, max_batch_bytes=2_000, max_doc_bytes=1_000, overhead_bytes=100)
    assert cut_batches([10] * 7, lim) == [[0, 1, 2], [3, 4, 5], [6]]
    assert cut_batches([900, 900, 900], lim) == [[0, 1], [2]]
    assert cut_batches([], lim) == []


def test_cut_batches_1050_docs_11_batches() -> None:
    batches = cut_batches([5000] * 1050, Limits())
    assert len(batches) == 11 and max(len(b) for b in batches) == 100


def test_classify_goroute_codes_split_retriable_review() -> None:
    assert classify_goroute("accepted", None) == ACCEPTED
    assert classify_goroute("rejected", "VALIDATION_ERROR") == REVIEW
    assert classify_goroute("rejected", "SERVICE_UNAVAILABLE") == FAILED
    assert classify_goroute("rejected", "SOMETHING_NEW") == REVIEW
    assert classify_goroute("failed", "X") == FAILED
    assert classify_goroute("pending", None) == PENDING


def test_classify_sifen_estados() -> None:
    assert classify_sifen("Aprobado") == ACCEPTED
    assert classify_sifen("Rechazado") == REVIEW
    assert classify_sifen("Procesando") == PENDING
    assert classify_sifen("En Cola") == PENDING


def test_classify_duplicates_goroute_code_and_sifen_1001() -> None:
    assert classify_goroute("rejected", "DUPLICATE_DOCUMENT") == DUPLICATE
    assert classify_sifen("Rechazado", 1001) == DUPLICATE
    assert classify_sifen("Rechazado", "1001") == DUPLICATE
    assert classify_sifen("Rechazado", 3001) == REVIEW
    assert classify_sifen("Aprobado", None) == ACCEPTED


def test_resolve_duplicate_accepted_only_if_sent_before() -> None:
    assert resolve_duplicate(True) == ACCEPTED
    assert resolve_duplicate(False) == REVIEW


def test_hold_retry_after_seconds_and_date_bounded_by_maximum() -> None:
    now_ms = 1_763_778_000_000  # 2025-11-22T02:20:00Z
    assert hold_ms(retry_after_s("40", now_ms), default_s=60, max_s=300) == 40_000
    date = "Sat, 22 Nov 2025 02:20:40 GMT"
    assert hold_ms(retry_after_s(date, now_ms + 500), default_s=60, max_s=300) == 39_500
    assert hold_ms(retry_after_s("86400", now_ms), default_s=60, max_s=300) == 300_000
    # missing or unreadable: the default; a date in the past: no hold
    assert hold_ms(retry_after_s(None, now_ms), default_s=60, max_s=300) == 60_000
    assert hold_ms(retry_after_s("soon", now_ms), default_s=60, max_s=300) == 60_000
    past = "Sat, 22 Nov 2025 02:19:00 GMT"
    assert hold_ms(retry_after_s(past, now_ms), default_s=60, max_s=300) == 0
