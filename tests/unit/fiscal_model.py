"""The fiscal journal in memory: documents and closings made the way the ledger writer makes
them (gateway.closings), on a :class:`journal.Journal`, with no IO.

``close`` mirrors ``gateway.closings.prepare_closing`` for the in-memory journal: the period
ends now (requested) or at a boundary (scheduled: records at or before it are in), a daily
closing sums its records, a monthly / yearly one the closings below it. ``tamper`` edits the
payload before it is signed — a closing signed with a wrong field, as a broken or dishonest
writer would make it. :func:`check` runs the journal rules over the whole journal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.core.chain import record_time_ms, zero_totals
from gateway.core.closing import (
    CORRECTION,
    DAILY,
    LOWER,
    Period,
    PeriodSums,
    closing_payload,
    contribution,
    previous_ref,
    summed_closing,
)
from gateway.core.documents import cancellation_payload, correction_payload, duplicate_payload
from gateway.core.journal_rules import JournalChecker, JournalState
from gateway.core.record import parse_time
from gateway.core.verify import VerifyFailure

from .journal import Journal

Tamper = Callable[[dict[str, Any]], None]


def by_seq(j: Journal, seq: int) -> dict[str, Any]:
    body: dict[str, Any] = j.drafts[seq - 1].body
    return body


def lookup(j: Journal) -> Callable[[str, int], bytes | None]:
    def find(chain: str, seq: int) -> bytes | None:
        if chain != j.head.chain or not 1 <= seq <= len(j.drafts):
            return None
        return j.drafts[seq - 1].body_bytes

    return find


def cancel(j: Journal, seq: int, now_ms: int) -> dict[str, Any]:
    d = j.drafts[seq - 1]
    return j.append(
        "TRANSACTION::CANCELLATION", cancellation_payload(d.body, d.hash, "error"), now_ms
    ).body


def correct(j: Journal, seq: int, corrected: dict[str, Any], now_ms: int) -> dict[str, Any]:
    d = j.drafts[seq - 1]
    payload = correction_payload(d.body, d.hash, "fix", corrected)
    return j.append(CORRECTION, payload, now_ms).body


def duplicate(j: Journal, seq: int, copy: int, now_ms: int) -> dict[str, Any]:
    d = j.drafts[seq - 1]
    payload = duplicate_payload(d.body, d.hash, copy, "reprint")
    return j.append("INTENTION::DUPLICATE", payload, now_ms).body


def _closings(j: Journal, kind: str) -> list[dict[str, Any]]:
    return [d.body for d in j.drafts if d.body["type"] == kind]


def close(
    j: Journal,
    kind: str,
    now_ms: int,
    *,
    boundary_ms: int | None = None,
    tamper: Tamper | None = None,
) -> dict[str, Any]:
    """Append the next ``kind`` closing (what the ledger writer would sign)."""
    done = _closings(j, kind)
    prev = done[-1] if done else None
    previous = previous_ref(prev["seq"], j.drafts[prev["seq"] - 1].hash) if prev else None
    if kind == DAILY:
        own_ms = record_time_ms(j.head, now_ms)
        if prev is not None:
            from_seq = prev["payload"]["period"]["to_seq"] + 1
            from_ms = parse_time(prev["payload"]["period"]["to_time"])
        else:
            from_seq = 1
            from_ms = parse_time(j.drafts[0].body["time"]) if j.drafts else own_ms
        if boundary_ms is None:
            to_seq, to_ms = j.head.seq, own_ms
        else:
            inside = [
                b["seq"] for b in j.bodies[from_seq - 1 :] if parse_time(b["time"]) <= boundary_ms
            ]
            to_seq, to_ms = (inside[-1] if inside else from_seq - 1), boundary_ms
        sums = PeriodSums()
        for b in j.bodies[from_seq - 1 : to_seq]:
            original = None
            if b["type"] == CORRECTION:
                original = by_seq(j, b["payload"]["ref"]["seq"])
            sums.add(contribution(b, original))
        grand = by_seq(j, to_seq)["totals"] if to_seq else zero_totals()
        payload = closing_payload(
            DAILY,
            period=Period(from_seq, to_seq, from_ms, to_ms),
            sums=sums,
            grand_total=grand,
            previous=previous,
        )
    else:
        lower = _closings(j, LOWER[kind])
        first = prev["payload"]["closings"]["to_number"] + 1 if prev else 1
        payload = summed_closing(
            kind, [b["payload"] for b in lower[first - 1 :]], first_number=first, previous=previous
        )
    if tamper is not None:
        tamper(payload)
    return j.append(kind, payload, now_ms).body


def check(j: Journal, *, start: int = 0) -> JournalChecker:
    """Run the journal rules over records ``start+1..`` (raise VerifyFailure)."""
    start_totals = by_seq(j, start)["totals"] if start else None
    checker = JournalChecker(
        j.head.chain, lookup(j), state=JournalState(), start_seq=start, start_totals=start_totals
    )
    for d in j.drafts[start:]:
        checker.feed(d.body, d.hash, parse_time(d.body["time"]))
    return checker


def failure(j: Journal) -> VerifyFailure | None:
    try:
        check(j)
    except VerifyFailure as exc:
        return exc
    return None
