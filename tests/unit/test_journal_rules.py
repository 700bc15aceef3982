"""gateway.core.journal_rules: closings add up, tile and link; references hold.

Journals are made in memory the way the ledger writer makes them (fiscal_model), signed with
the TEST keys. A state machine mixes sales, cancellations, corrections, requested and
scheduled closings over a clock that sometimes goes back, and checks after every step that
the journal rules pass and that the closings agree with sums computed here independently;
a closing signed with any one field changed is then reported at that closing, naming the
field.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from gateway.core.closing import DAILY, KINDS, MONTHLY, YEARLY
from gateway.core.journal_rules import JournalChecker, JournalState, first_difference, member
from gateway.core.record import format_time, parse_time
from gateway.core.request import validate_sale
from gateway.core.verify import VerifyFailure

from . import fiscal_model as fm
from .journal import T0_MS, Journal
from .strategies import clock_steps_ms, sale_requests

HOUR = 3_600_000


def sell(j: Journal, req: dict[str, Any], now_ms: int) -> dict[str, Any]:
    sale = validate_sale(req)
    return j.append(sale.record_type, sale.payload(), now_ms).body


def a_sale(amount: int, method: str = "CASH", rate: str = "20.00") -> dict[str, Any]:
    return {
        "id": "x",
        "op": "sign",
        "till": "till-1",
        "type": "RECEIPT",
        "currency": "EUR",
        "lines": [
            {"text": "a", "qty": "1", "unit_price": amount, "vat_rate": rate, "amount": amount}
        ],
        "payments": [{"method": method, "amount": amount}],
        "total": amount,
    }


def fails(j: Journal) -> VerifyFailure:
    f = fm.failure(j)
    assert f is not None, "the journal rules should have failed"
    return f


# ---------------------------------------------------------------------- scenarios


def day_of_business() -> Journal:
    """Sales, a cancellation, a correction, a reprint, closings of every kind, a scheduled
    daily closing whose period ends before the last sale."""
    j = Journal()
    t = T0_MS
    s1 = sell(j, a_sale(1200), t)
    sell(j, a_sale(550, "CARD", "5.50"), t + 1000)
    fm.cancel(j, s1["seq"], t + 2000)
    fm.duplicate(j, 2, 1, t + 2500)
    fm.close(j, DAILY, t + 3000)
    s4 = sell(j, a_sale(900, "CARD"), t + HOUR)
    fm.correct(j, s4["seq"], validate_sale(a_sale(700, "CASH")).payload(), t + HOUR + 10)
    sell(j, a_sale(300), t + 3 * HOUR)
    fm.close(j, DAILY, t + 4 * HOUR, boundary_ms=t + 2 * HOUR)  # the 300 sale is after it
    fm.close(j, MONTHLY, t + 4 * HOUR + 1)
    fm.close(j, DAILY, t + 5 * HOUR)
    fm.close(j, MONTHLY, t + 5 * HOUR)
    fm.close(j, YEARLY, t + 5 * HOUR)
    return j


def test_journal_rules_day_of_business_passes_and_counts_closings() -> None:
    j = day_of_business()
    checker = fm.check(j)
    assert checker.closings == 6 and checker.unchecked == []
    daily2 = [b for b in j.bodies if b["type"] == DAILY][1]
    assert daily2["payload"]["period"]["to_time"] == format_time(T0_MS + 2 * HOUR)
    # the first daily closing record itself, the 900 sale and its correction
    assert daily2["payload"]["records"] == 3
    assert daily2["payload"]["payments"] == [
        {"method": "CARD", "amount": 0},
        {"method": "CASH", "amount": 700},
    ]
    yearly = j.bodies[-1]
    monthlies = [b for b in j.bodies if b["type"] == MONTHLY]
    assert yearly["payload"]["period_total"]["gross"] == sum(
        m["payload"]["period_total"]["gross"] for m in monthlies
    )
    assert yearly["payload"]["grand_total"] == j.bodies[-4]["totals"]  # after the last sale


def test_journal_rules_empty_first_closing_of_a_new_chain_passes() -> None:
    j = Journal()
    fm.close(j, DAILY, T0_MS)
    fm.close(j, MONTHLY, T0_MS)
    assert fm.check(j).closings == 2
    assert j.bodies[0]["payload"]["period"]["to_seq"] == 0


def test_journal_rules_cancelling_a_cancelled_sale_is_already_superseded() -> None:
    j = Journal()
    sell(j, a_sale(100), T0_MS)
    fm.cancel(j, 1, T0_MS + 1)
    fm.cancel(j, 1, T0_MS + 2)  # a broken writer: the claim should have refused it
    f = fails(j)
    assert (f.seq, f.reason, f.field) == (3, "ALREADY_SUPERSEDED", "payload.ref")


def test_journal_rules_reference_with_wrong_hash_is_bad_reference() -> None:
    j = Journal()
    sell(j, a_sale(100), T0_MS)
    d = j.drafts[0]
    bad = copy.deepcopy(fm.cancellation_payload(d.body, d.hash, "x"))
    bad["ref"]["hash"] = "ab" * 32
    j.append("TRANSACTION::CANCELLATION", bad, T0_MS + 1)
    f = fails(j)
    assert (f.seq, f.reason) == (2, "BAD_REFERENCE")


def test_journal_rules_cancellation_not_negating_its_sale_is_document_mismatch() -> None:
    j = Journal()
    sell(j, a_sale(100), T0_MS)
    d = j.drafts[0]
    bad = fm.cancellation_payload(d.body, d.hash, "x")
    bad["payments"][0]["amount"] = -90
    j.append("TRANSACTION::CANCELLATION", bad, T0_MS + 1)
    f = fails(j)
    assert (f.reason, f.field) == ("DOCUMENT_MISMATCH", "payload.payments[0].amount")


def test_journal_rules_duplicate_of_missing_record_and_copy_twice_fail() -> None:
    j = Journal()
    sell(j, a_sale(100), T0_MS)
    fm.duplicate(j, 1, 1, T0_MS + 1)
    fm.duplicate(j, 1, 1, T0_MS + 2)
    assert (fails(j).seq, fails(j).field) == (3, "payload.copy")
    k = Journal()
    sell(k, a_sale(100), T0_MS)
    payload = fm.duplicate_payload(k.drafts[0].body, k.drafts[0].hash, 1, "x")
    payload["ref"]["seq"] = 7
    k.append("INTENTION::DUPLICATE", payload, T0_MS + 1)
    assert fails(k).reason == "BAD_REFERENCE"


def test_journal_rules_daily_skipping_records_is_a_period_gap() -> None:
    j = Journal()
    sell(j, a_sale(100), T0_MS)
    fm.close(j, DAILY, T0_MS + 10)
    sell(j, a_sale(200), T0_MS + 20)

    def skip_one(p: dict[str, Any]) -> None:
        p["period"]["from_seq"] += 1

    fm.close(j, DAILY, T0_MS + 30, tamper=skip_one)
    f = fails(j)
    assert (f.seq, f.reason, f.field) == (4, "CLOSING_PERIOD", "payload.period.from_seq")


def test_journal_rules_partial_journal_marks_straddling_closing_unchecked() -> None:
    j = day_of_business()
    checker = fm.check(j, start=2)  # starts inside the first daily period
    assert [seq for seq, _ in checker.unchecked][:1] == [5]


def test_first_difference_names_the_first_differing_leaf() -> None:
    a = {"x": [1, {"y": 2}], "z": True}
    assert first_difference(a, copy.deepcopy(a), "p") is None
    assert first_difference(a, {"x": [1, {"y": 3}], "z": True}, "p") == "p.x[1].y"
    assert first_difference(a, {"x": [1, {"y": 2}], "z": 1}, "p") == "p.z"
    assert first_difference(a, {"x": [1], "z": True}, "p") == "p.x[1]"


# ---------------------------------------------------------------------- the state machine


class FiscalJournal(RuleBasedStateMachine):
    """Sales, cancellations, corrections and closings; the rules hold after every step."""

    @initialize()
    def start(self) -> None:
        self.j = Journal()
        self.now = T0_MS
        self.open_sales: list[int] = []
        self.checker = JournalChecker("till-1", fm.lookup(self.j), state=JournalState())
        self.fed = 0
        self.gross_abs = 0

    def _tick(self, step_ms: int) -> int:
        self.now += step_ms
        return self.now

    @rule(req=sale_requests(max_lines=3), step=clock_steps_ms)
    def sale(self, req: dict[str, Any], step: int) -> None:
        self.open_sales.append(sell(self.j, req, self._tick(step))["seq"])

    @precondition(lambda self: self.open_sales)
    @rule(data=st.data(), step=clock_steps_ms)
    def cancel(self, data: st.DataObject, step: int) -> None:
        seq = self.open_sales.pop(data.draw(st.integers(0, len(self.open_sales) - 1)))
        fm.cancel(self.j, seq, self._tick(step))

    @precondition(lambda self: self.open_sales)
    @rule(data=st.data(), req=sale_requests(max_lines=2), step=clock_steps_ms)
    def correct(self, data: st.DataObject, req: dict[str, Any], step: int) -> None:
        seq = self.open_sales.pop(data.draw(st.integers(0, len(self.open_sales) - 1)))
        body = fm.correct(self.j, seq, validate_sale(req).payload(), self._tick(step))
        self.open_sales.append(body["seq"])  # a correction can be cancelled or corrected

    @rule(kind=st.sampled_from(KINDS), step=clock_steps_ms)
    def close(self, kind: str, step: int) -> None:
        now = self._tick(step)
        for k in KINDS[: KINDS.index(kind) + 1]:  # what the close op makes, lower first
            fm.close(self.j, k, now)

    @rule(data=st.data(), step=st.integers(0, HOUR))
    def scheduled_daily(self, data: st.DataObject, step: int) -> None:
        """A daily closing at a boundary inside the open period: later records stay open."""
        dailies = [b for b in self.j.bodies if b["type"] == DAILY]
        start = parse_time(dailies[-1]["payload"]["period"]["to_time"]) if dailies else None
        times = sorted(
            {
                parse_time(b["time"])
                for b in self.j.bodies
                if start is None or parse_time(b["time"]) > start
            }
        )
        if not times:
            return
        boundary = data.draw(st.sampled_from(times))
        fm.close(self.j, DAILY, self._tick(step), boundary_ms=boundary)

    @invariant()
    def rules_hold_and_closings_add_up(self) -> None:
        for d in self.j.drafts[self.fed :]:
            self.checker.feed(d.body, d.hash, parse_time(d.body["time"]))
            assert d.body["totals"]["gross_abs"] >= self.gross_abs  # never decreases
            self.gross_abs = d.body["totals"]["gross_abs"]
            if d.body["type"] in KINDS:
                self._oracle(d.body)
        self.fed = len(self.j.drafts)

    def _oracle(self, closing: dict[str, Any]) -> None:
        """The closing against sums made here, straight from the records of its period."""
        p = closing["payload"]
        period = p["period"]
        inside = self.j.bodies[period["from_seq"] - 1 : period["to_seq"]]
        lines = [
            v for b in inside if b["type"].startswith("TRANSACTION::") for v in b["payload"]["vat"]
        ]
        assert p["records"] == len(inside)
        assert p["period_total"]["gross"] == sum(v["gross"] for v in lines)
        assert p["period_total"]["gross_abs"] == sum(abs(v["gross"]) for v in lines)
        by_rate: dict[str, int] = {}
        for v in lines:
            by_rate[v["rate"]] = by_rate.get(v["rate"], 0) + v["vat"]
        assert {v["rate"]: v["vat"] for v in p["vat"]} == by_rate
        end = self.j.bodies[period["to_seq"] - 1]["totals"] if period["to_seq"] else None
        assert p["grand_total"]["gross"] == (end["gross"] if end else 0)
        if closing["type"] != DAILY:  # monthly = Σ daily, yearly = Σ monthly
            lower = [b for b in self.j.bodies if b["type"] == p["closings"]["type"]]
            named = lower[p["closings"]["from_number"] - 1 : p["closings"]["to_number"]]
            for key in ("gross", "net", "vat", "gross_abs"):
                assert p["period_total"][key] == sum(
                    c["payload"]["period_total"][key] for c in named
                )


TestFiscalJournal = FiscalJournal.TestCase
TestFiscalJournal.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)


# ---------------------------------------------------------------------- tampered closings

operations = st.lists(
    st.one_of(
        st.tuples(st.just("sale"), st.integers(1, 10**5), st.sampled_from(["CASH", "CARD"])),
        st.tuples(st.just("cancel"), st.integers(0, 20), st.none()),
        st.tuples(st.just("close"), st.sampled_from(KINDS), st.none()),
        st.tuples(st.just("scheduled"), st.integers(0, 20), st.none()),
    ),
    min_size=1,
    max_size=12,
)


def play(ops: list[tuple[Any, Any, Any]], tamper_at: int = -1, tamper: Any = None) -> Journal:
    """The journal of ``ops`` (closings numbered in order; ``tamper`` the ``tamper_at``-th)."""
    j = Journal()
    now = T0_MS
    open_sales: list[int] = []
    made = 0

    def closing(kind: str, boundary: int | None = None) -> None:
        nonlocal made
        fm.close(j, kind, now, boundary_ms=boundary, tamper=tamper if made == tamper_at else None)
        made += 1

    try:
        _play(ops, j, now, open_sales, closing)
    except (KeyError, TypeError, ValueError, IndexError):
        assert 0 <= tamper_at < made  # only a forged closing can make the next ones fail
    return j


def _play(
    ops: list[tuple[Any, Any, Any]],
    j: Journal,
    now: int,
    open_sales: list[int],
    closing: Any,
) -> None:

    for op, a, b in [*ops, ("close", YEARLY, None)]:
        now += 600_000
        if op == "sale":
            open_sales.append(sell(j, a_sale(a, b), now)["seq"])
        elif op == "cancel" and open_sales:
            fm.cancel(j, open_sales.pop(a % len(open_sales)), now)
        elif op == "close":
            for k in KINDS[: KINDS.index(a) + 1]:
                closing(k)
        elif op == "scheduled":
            dailies = [x for x in j.bodies if x["type"] == DAILY]
            start = parse_time(dailies[-1]["payload"]["period"]["to_time"]) if dailies else -1
            times = [parse_time(x["time"]) for x in j.bodies if parse_time(x["time"]) > start]
            if times:
                closing(DAILY, times[a % len(times)])


Parts = tuple[str | int, ...]


def leaves(value: Any, parts: Parts = ()) -> list[Parts]:
    """The path (keys and indexes) of every leaf; an empty container is a leaf too."""
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in leaves(v, (*parts, k))]
    if isinstance(value, list) and value:
        return [p for i, v in enumerate(value) for p in leaves(v, (*parts, i))]
    return [parts]


def path_of(parts: Parts) -> str:
    """The field path the journal rules report for ``parts`` of a payload."""
    out = "payload"
    for part in parts:
        out = f"{out}[{part}]" if isinstance(part, int) else member(out, part)
    return out


def changed(value: Any, parts: Parts, payload: dict[str, Any]) -> Any:
    """A different value for the leaf at ``parts`` that a wrong writer might sign."""
    name = parts[-1]
    if name == "to_time":
        return format_time(parse_time(payload["period"]["from_time"]) - 1)
    if name == "from_time":
        return format_time(parse_time(value) + 1)
    if value is None:
        return {"seq": 1, "hash": "0" * 64}
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, dict | list):
        return {"x": 1} if isinstance(value, dict) else [{"x": 1}]
    if name == "rate":
        return "19.60"
    if name == "method":
        return "VOUCHER"
    if name == "type":
        return "CLOSING::WEEKLY"
    return value[:-1] + ("0" if value[-1] != "0" else "1")


def tampered(parts: Parts) -> Any:
    def tamper(p: dict[str, Any]) -> None:
        cur: Any = p
        for part in parts[:-1]:
            cur = cur[part]
        cur[parts[-1]] = changed(cur[parts[-1]], parts, p)

    return tamper


@settings(max_examples=150, deadline=None)
@given(ops=operations, data=st.data())
def test_journal_rules_closing_signed_with_one_field_changed_is_named(
    ops: list[tuple[Any, Any, Any]], data: st.DataObject
) -> None:
    honest = play(ops)
    assert fm.failure(honest) is None
    closings = [b for b in honest.bodies if b["type"] in KINDS]
    k = data.draw(st.integers(0, len(closings) - 1), label="closing")
    target = closings[k]
    parts = data.draw(st.sampled_from(leaves(target["payload"])), label="field")

    forged = play(ops, tamper_at=k, tamper=tampered(parts))
    f = fm.failure(forged)
    path = path_of(parts)
    assert f is not None, f"{path} changed in closing seq {target['seq']} was not found"
    assert f.seq == target["seq"], (path, f)
    assert f.field is not None
    same = path.startswith(f.field) or f.field.startswith(path)
    both_period = f.field.startswith("payload.period") and path.startswith("payload.period")
    assert same or both_period, (path, f.field, f.message)


def test_journal_rules_tampered_monthly_total_names_the_field() -> None:
    ops: list[tuple[Any, Any, Any]] = [("sale", 500, "CASH"), ("close", MONTHLY, None)]

    def more(p: dict[str, Any]) -> None:
        p["period_total"]["gross"] += 1

    f = fails(play(ops, tamper_at=1, tamper=more))
    assert (f.reason, f.field) == ("CLOSING_MISMATCH", "payload.period_total.gross")
    assert f.seq == 3 and "daily closings 1..1 give 500" in f.message.lower().replace(
        "closing::daily", "daily"
    )


@pytest.mark.parametrize("kind", [DAILY, MONTHLY, YEARLY])
def test_journal_rules_closing_with_wrong_previous_is_a_link_failure(kind: str) -> None:
    ops: list[tuple[Any, Any, Any]] = [("close", YEARLY, None), ("sale", 100, "CASH")]
    n = KINDS.index(kind) + 3  # the second closing of this kind

    def relink(p: dict[str, Any]) -> None:
        p["previous"]["hash"] = "f" * 64

    f = fails(play(ops, tamper_at=n, tamper=relink))
    assert (f.reason, f.field) == ("CLOSING_LINK", "payload.previous")
