"""gateway.core.chain: seq, prev_hash, counters, perpetual totals, clock and key along a chain.

Chains are written in memory by :class:`journal.Journal` (``chain.draft`` + the TEST signer)
and checked with the verifier, so the writer's and the verifier's reading of the rules are
the same one (``next_state``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.canonical import CanonicalError, canonical_bytes, parse_canonical
from gateway.core.chain import (
    KEY_ROTATED,
    ChainHead,
    ChainRuleError,
    add_totals,
    contribution,
    draft,
    next_state,
    record_time_ms,
    zero_totals,
)
from gateway.core.record import FORMAT, GENESIS_HASH, format_time, parse_time, sha256_hex
from gateway.core.verify import verify_chain

from .journal import T0_MS, Journal, key_ring, play, rotation_payload, signer_for
from .strategies import journal_ops

PROPERTY = settings(max_examples=40, deadline=None)
RECEIPT = "TRANSACTION::RECEIPT"
EVENT = "INTENTION::EVENT"


def vat(rate: str, net: int, tax: int) -> dict[str, Any]:
    return {"rate": rate, "net": net, "vat": tax, "gross": net + tax}


def oracle_totals(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """Perpetual totals summed from scratch over every record's own breakdown."""
    out = zero_totals()
    for body in bodies:
        if not body["type"].startswith("TRANSACTION::"):
            continue
        for v in body["payload"].get("vat", []):
            for k in ("gross", "net", "vat"):
                out[k] += v[k]
                out["by_rate"].setdefault(v["rate"], {"gross": 0, "net": 0, "vat": 0})
                out["by_rate"][v["rate"]][k] += v[k]
            out["gross_abs"] += abs(v["gross"])
    return out


# ---------------------------------------------------------------------- draft


def test_draft_first_record_links_to_genesis_with_seq_1() -> None:
    d = draft(
        ChainHead("till-1"),
        record_type=RECEIPT,
        client="pos-1",
        request_id="r-1",
        payload={"vat": [vat("20.00", 100, 20)]},
        now_ms=T0_MS,
        key_id="k1",
    )
    assert d.body == {
        "format": FORMAT,
        "chain": "till-1",
        "seq": 1,
        "type": RECEIPT,
        "number": 1,
        "time": "2026-11-21T10:00:00.000Z",
        "client": "pos-1",
        "request_id": "r-1",
        "payload": {"vat": [vat("20.00", 100, 20)]},
        "counters": {RECEIPT: 1},
        "totals": {
            "gross": 120,
            "net": 100,
            "vat": 20,
            "gross_abs": 120,
            "by_rate": {"20.00": {"gross": 120, "net": 100, "vat": 20}},
        },
        "offline": False,
        "prev_hash": GENESIS_HASH,
        "key_id": "k1",
    }
    assert d.body_bytes == canonical_bytes(d.body)
    assert d.hash == sha256_hex(d.body_bytes)
    assert d.head == ChainHead("till-1", 1, d.hash, T0_MS, "k1", {RECEIPT: 1}, d.body["totals"])


def test_draft_next_record_links_prev_hash_and_counts_per_type() -> None:
    j = Journal()
    first = j.append(RECEIPT, {"vat": []}, T0_MS)
    second = j.append(EVENT, {"event": "START"}, T0_MS)
    third = j.append(RECEIPT, {"vat": []}, T0_MS)
    assert second.body["prev_hash"] == first.hash
    assert third.body["prev_hash"] == second.hash
    assert [d.body["number"] for d in j.drafts] == [1, 1, 2]
    assert third.body["counters"] == {RECEIPT: 2, EVENT: 1}


def test_draft_offline_flag_recorded_in_body() -> None:
    assert Journal().append(RECEIPT, {}, T0_MS, offline=True).body["offline"] is True


def test_draft_other_key_than_chain_key_raises_wrong_key() -> None:
    j = Journal()
    j.append(EVENT, {"event": "START"}, T0_MS)
    with pytest.raises(ChainRuleError) as info:
        draft(
            j.head,
            record_type=RECEIPT,
            client="pos-1",
            request_id="r",
            payload={},
            now_ms=T0_MS,
            key_id=signer_for("test-key-2").key_id,
        )
    assert info.value.reason == "WRONG_KEY"


def test_draft_key_rotation_switches_head_key() -> None:
    old, new = signer_for("test-key-1"), signer_for("test-key-2")
    j = Journal(old)
    j.append(EVENT, {"event": "START"}, T0_MS)
    d = j.rotate(new, T0_MS + 1)
    assert d.body["key_id"] == old.key_id  # the rotation itself is signed by the old key
    assert d.head.key_id == new.key_id
    assert j.append(RECEIPT, {}, T0_MS + 2).body["key_id"] == new.key_id


def test_draft_payload_float_refused() -> None:
    with pytest.raises(CanonicalError, match="float"):
        Journal().append(RECEIPT, {"total": 1.5}, T0_MS)


# ---------------------------------------------------------------------- clock discipline


def test_draft_clock_behind_head_gives_head_time_plus_1ms() -> None:
    j = Journal()
    j.append(EVENT, {"event": "START"}, T0_MS)
    d = j.append(EVENT, {"event": "CLOCK_JUMP"}, T0_MS - 600_000)
    assert d.body["time"] == format_time(T0_MS + 1)
    assert d.head.time_ms == T0_MS + 1
    assert j.append(RECEIPT, {}, T0_MS - 1).body["time"] == format_time(T0_MS + 2)


def test_draft_clock_equal_to_head_keeps_time() -> None:
    j = Journal()
    j.append(EVENT, {}, T0_MS)
    assert j.append(EVENT, {}, T0_MS).body["time"] == format_time(T0_MS)


def test_draft_clock_ahead_takes_clock_time() -> None:
    j = Journal()
    j.append(EVENT, {}, T0_MS)
    assert j.append(EVENT, {}, T0_MS + 86_400_000).head.time_ms == T0_MS + 86_400_000


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**41), st.integers(0, 2**41))
def test_record_time_ms_never_before_head(head_ms: int, now_ms: int) -> None:
    t = record_time_ms(ChainHead("c", time_ms=head_ms), now_ms)
    assert t >= head_ms
    assert t == (now_ms if now_ms >= head_ms else head_ms + 1)


# ---------------------------------------------------------------------- counters and totals


def test_next_state_empty_head_starts_counting_at_1() -> None:
    seq, number, counters, totals = next_state(ChainHead("c"), EVENT, {"event": "START"})
    assert (seq, number, counters, totals) == (1, 1, {EVENT: 1}, zero_totals())


def test_contribution_only_transactions_count() -> None:
    payload = {"vat": [vat("20.00", 100, 20)]}
    assert contribution("TRANSACTION::CANCELLATION", payload) == payload["vat"]
    for t in ("INTENTION::DUPLICATE", "INTENTION::EVENT", "CLOSING::DAILY", "EXPORT::RECORDS"):
        assert contribution(t, payload) == []


def test_contribution_transaction_without_vat_adds_nothing() -> None:
    assert contribution(RECEIPT, {}) == []


@pytest.mark.parametrize(
    "payload",
    [
        {"vat": {"rate": "20.00"}},
        {"vat": ["20.00"]},
        {"vat": [{"rate": 20, "net": 1, "vat": 0, "gross": 1}]},
        {"vat": [{"rate": "20.00", "net": 1.0, "vat": 0, "gross": 1}]},
        {"vat": [{"rate": "20.00", "net": True, "vat": 0, "gross": 1}]},
        {"vat": [{"rate": "20.00", "net": 1, "vat": 0}]},
    ],
    ids=["not-a-list", "item-not-object", "rate-int", "net-float", "net-bool", "no-gross"],
)
def test_contribution_malformed_vat_raises_bad_field(payload: dict[str, Any]) -> None:
    with pytest.raises(ChainRuleError) as info:
        contribution(RECEIPT, payload)
    assert info.value.reason == "BAD_FIELD"


def test_add_totals_does_not_mutate_previous_totals() -> None:
    before = add_totals(zero_totals(), [vat("20.00", 100, 20)])
    snapshot = canonical_bytes(before)
    after = add_totals(before, [vat("20.00", -100, -20), vat("5.50", 10, 1)])
    assert canonical_bytes(before) == snapshot
    assert after["by_rate"]["20.00"] == {"gross": 0, "net": 0, "vat": 0}
    assert after["gross_abs"] == 120 + 120 + 11


def test_chain_cancellation_reverses_totals_but_grows_gross_abs() -> None:
    j = Journal()
    sale = j.append(RECEIPT, {"vat": [vat("20.00", 1000, 200)]}, T0_MS)
    cancel = {"cancels": {"seq": 1, "hash": sale.hash}, "vat": [vat("20.00", -1000, -200)]}
    d = j.append("TRANSACTION::CANCELLATION", cancel, T0_MS)
    assert d.body["totals"] == {
        "gross": 0,
        "net": 0,
        "vat": 0,
        "gross_abs": 2400,
        "by_rate": {"20.00": {"gross": 0, "net": 0, "vat": 0}},
    }
    assert d.body["counters"] == {RECEIPT: 1, "TRANSACTION::CANCELLATION": 1}


def test_chain_head_from_body_restores_the_writers_head() -> None:
    j = Journal()
    j.append(EVENT, {"event": "START"}, T0_MS)
    j.append(RECEIPT, {"vat": [vat("10.00", 50, 5)]}, T0_MS + 5)
    j.rotate(signer_for("test-key-2"), T0_MS + 6)
    for d in j.drafts:
        assert ChainHead.from_body(parse_canonical(d.body_bytes), d.hash) == d.head


# ---------------------------------------------------------------------- properties


@PROPERTY
@given(journal_ops())
def test_chain_any_valid_sales_verify(ops: list[tuple[Any, ...]]) -> None:
    j = play(ops)
    head = verify_chain(
        "till-1",
        j.records,
        key_ring().check_sig,
        expected_seq=len(ops),
        expected_hash=j.head.hash,
    )
    assert head == j.head


@PROPERTY
@given(journal_ops())
def test_chain_any_sales_counters_never_decrease_and_number_is_counter(
    ops: list[tuple[Any, ...]],
) -> None:
    bodies = play(ops).bodies
    previous: dict[str, int] = {}
    for seq, body in enumerate(bodies, start=1):
        counters = body["counters"]
        assert body["seq"] == seq
        assert body["number"] == counters[body["type"]]
        assert sum(counters.values()) == seq
        for t, n in previous.items():
            assert counters[t] >= n
        assert counters[body["type"]] == previous.get(body["type"], 0) + 1
        previous = counters


@PROPERTY
@given(journal_ops())
def test_chain_any_sales_totals_equal_sum_of_breakdowns(ops: list[tuple[Any, ...]]) -> None:
    bodies = play(ops).bodies
    for n in range(1, len(bodies) + 1):
        assert bodies[n - 1]["totals"] == oracle_totals(bodies[:n])


@PROPERTY
@given(journal_ops())
def test_chain_any_clock_times_never_decrease(ops: list[tuple[Any, ...]]) -> None:
    bodies = play(ops).bodies
    times = [parse_time(b["time"]) for b in bodies]
    assert times == sorted(times)
    now_ms = T0_MS
    prev = 0
    for (_kind, _data, step_ms), t in zip(ops, times, strict=True):
        now_ms += step_ms
        assert t == (now_ms if now_ms >= prev else prev + 1)
        prev = t


@PROPERTY
@given(journal_ops(max_size=5))
def test_chain_any_records_hash_is_sha256_of_canonical_body(ops: list[tuple[Any, ...]]) -> None:
    j = play(ops)
    for d, rec in zip(j.drafts, j.records, strict=True):
        assert rec.body == canonical_bytes(d.body) == d.body_bytes
        assert rec.hash == sha256_hex(rec.body)
        assert parse_canonical(rec.body) == d.body


@PROPERTY
@given(journal_ops(max_size=4), journal_ops(max_size=4))
def test_chain_rotation_anywhere_later_records_verify(
    before: list[tuple[Any, ...]], after: list[tuple[Any, ...]]
) -> None:
    j = play(before)
    j.rotate(signer_for("test-key-2"), T0_MS)
    play(after, j)
    head = verify_chain("till-1", j.records, key_ring().check_sig)
    assert head.key_id == signer_for("test-key-2").key_id
    rotation = j.bodies[len(before)]
    assert rotation["payload"] == rotation_payload(
        signer_for("test-key-1"), signer_for("test-key-2")
    )
    assert rotation["payload"]["event"] == KEY_ROTATED


def test_chain_head_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ChainHead("c").seq = 2
