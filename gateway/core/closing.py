"""Closings: what a period of a chain adds up to, and when scheduled periods end.

A closing (``CLOSING::DAILY|MONTHLY|YEARLY``) is a record whose payload sums a **period** of
its chain (docs/record-format.md, "Closings"):

- a period is a run of records ``from_seq..to_seq`` (empty when ``to_seq = from_seq − 1``)
  and the time span ``from_time..to_time`` they fall in; the periods of one closing type
  tile the chain: each starts where the previous closing of that type ended (seq and time);
- a **daily** closing sums the records of its period (:class:`PeriodSums`, fed with
  :func:`contribution` of each record); a **monthly** one sums daily closings, a **yearly**
  one monthly closings (``closings``: the numbers of the closings it sums), so monthly = Σ
  daily and yearly = Σ monthly by construction;
- ``grand_total`` is the chain's perpetual grand total after ``to_seq`` and ``previous`` the
  seq and hash of the previous closing of the same type.

The ledger writer builds closings with these functions and the journal check
(:mod:`gateway.core.journal_rules`) recomputes them with the same ones: one definition of
what a closing must say. :class:`Schedule` says when scheduled periods end (daily at a local
time, months and fiscal years); the time zone is passed in as a ``tzinfo``.

Pure: no clock (times are arguments), no IO (the caller reads records and passes them in).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo
from datetime import time as dtime
from decimal import Decimal
from typing import Any

from gateway.core.chain import contribution as vat_contribution
from gateway.core.documents import effective
from gateway.core.record import format_time

DAILY = "CLOSING::DAILY"
MONTHLY = "CLOSING::MONTHLY"
YEARLY = "CLOSING::YEARLY"
KINDS = (DAILY, MONTHLY, YEARLY)
#: the closing type a monthly / yearly closing sums
LOWER = {MONTHLY: DAILY, YEARLY: MONTHLY}

SALES = ("TRANSACTION::RECEIPT", "TRANSACTION::INVOICE")
CANCELLATION = "TRANSACTION::CANCELLATION"
CORRECTION = "TRANSACTION::CORRECTION"

#: Every key of a closing payload, in the order the journal check compares them.
DAILY_FIELDS = (
    "period",
    "records",
    "counts",
    "vat",
    "payments",
    "period_total",
    "grand_total",
    "previous",
)
SUMMING_FIELDS = (*DAILY_FIELDS, "closings")


def claim_key(chain: str, kind: str, number: int) -> str:
    """The claim a closing takes: unique, and an index of a chain's closings by number."""
    return f"closing:{chain}:{kind}:{number:010d}"


# ---------------------------------------------------------------------- period sums


@dataclass(frozen=True, slots=True)
class Contribution:
    """What one record adds to the period it falls in."""

    type: str
    vat: tuple[dict[str, Any], ...] = ()
    payments: tuple[tuple[str, int], ...] = ()


def contribution(body: Mapping[str, Any], original: Mapping[str, Any] | None) -> Contribution:
    """A record's contribution. ``original`` is the body a correction refers to (required for
    corrections: their payment change is ``corrected.payments − effective(original)``)."""
    rtype = body["type"]
    if not rtype.startswith("TRANSACTION::"):
        return Contribution(rtype)
    payload = body["payload"]
    vat = tuple(vat_contribution(rtype, payload))
    if rtype == CORRECTION:
        if original is None:
            raise ValueError("a correction's contribution needs the record it corrects")
        delta: dict[str, int] = {}
        for p in payload["corrected"]["payments"]:
            delta[p["method"]] = delta.get(p["method"], 0) + p["amount"]
        for p in effective(dict(original))["payments"]:
            delta[p["method"]] = delta.get(p["method"], 0) - p["amount"]
        pays = tuple((m, a) for m, a in sorted(delta.items()) if a != 0)
    else:
        pays = tuple((p["method"], p["amount"]) for p in payload.get("payments", ()))
    return Contribution(rtype, vat, pays)


class PeriodSums:
    """Running sums of a period: records, counts per type, VAT per rate, payments per method.

    A rate (method) is listed when at least one VAT line (payment) of the period has it, even
    if its sums cancel out. ``add(c, -1)`` takes a contribution back out (the journal check
    uses it for records that follow a period's end but precede its closing).
    """

    __slots__ = ("counts", "gross_abs", "payments", "records", "vat")

    def __init__(self) -> None:
        self.records = 0
        self.counts: dict[str, int] = {}
        self.vat: dict[str, list[int]] = {}  # rate -> [net, vat, gross, lines]
        self.payments: dict[str, list[int]] = {}  # method -> [amount, items]
        self.gross_abs = 0

    def add(self, c: Contribution, sign: int = 1) -> None:
        self.records += sign
        n = self.counts.get(c.type, 0) + sign
        if n:
            self.counts[c.type] = n
        else:
            del self.counts[c.type]
        for v in c.vat:
            e = self.vat.get(v["rate"])
            if e is None:
                e = self.vat[v["rate"]] = [0, 0, 0, 0]
            e[0] += sign * v["net"]
            e[1] += sign * v["vat"]
            e[2] += sign * v["gross"]
            e[3] += sign
            if e[3] == 0:
                del self.vat[v["rate"]]
            self.gross_abs += sign * abs(v["gross"])
        for method, amount in c.payments:
            p = self.payments.get(method)
            if p is None:
                p = self.payments[method] = [0, 0]
            p[0] += sign * amount
            p[1] += sign
            if p[1] == 0:
                del self.payments[method]

    def add_closing(self, payload: Mapping[str, Any]) -> None:
        """Add the sums a closing states (a monthly closing sums daily ones, and so on)."""
        self.records += payload["records"]
        for rtype, n in payload["counts"].items():
            self.counts[rtype] = self.counts.get(rtype, 0) + n
        for v in payload["vat"]:
            e = self.vat.setdefault(v["rate"], [0, 0, 0, 0])
            e[0] += v["net"]
            e[1] += v["vat"]
            e[2] += v["gross"]
            e[3] += 1
        for p in payload["payments"]:
            e = self.payments.setdefault(p["method"], [0, 0])
            e[0] += p["amount"]
            e[1] += 1
        self.gross_abs += payload["period_total"]["gross_abs"]

    def copy(self) -> PeriodSums:
        out = PeriodSums()
        out.records = self.records
        out.counts = dict(self.counts)
        out.vat = {k: list(v) for k, v in self.vat.items()}
        out.payments = {k: list(v) for k, v in self.payments.items()}
        out.gross_abs = self.gross_abs
        return out

    def parts(self) -> dict[str, Any]:
        """The payload fields these sums give (``records`` … ``period_total``)."""
        rates = sorted(self.vat, key=Decimal, reverse=True)
        net = sum(e[0] for e in self.vat.values())
        vat = sum(e[1] for e in self.vat.values())
        gross = sum(e[2] for e in self.vat.values())
        return {
            "records": self.records,
            "counts": dict(sorted(self.counts.items())),
            "vat": [
                {"rate": r, "net": self.vat[r][0], "vat": self.vat[r][1], "gross": self.vat[r][2]}
                for r in rates
            ],
            "payments": [
                {"method": m, "amount": self.payments[m][0]} for m in sorted(self.payments)
            ],
            "period_total": {"gross": gross, "net": net, "vat": vat, "gross_abs": self.gross_abs},
        }


def grand_total_after(before: Mapping[str, Any], sums: PeriodSums) -> dict[str, Any]:
    """The perpetual grand total after a period, from the one before it and its sums."""
    by_rate = {k: dict(v) for k, v in before["by_rate"].items()}
    for rate, (net, vat, gross, _lines) in sums.vat.items():
        r = by_rate.setdefault(rate, {"gross": 0, "net": 0, "vat": 0})
        r["gross"] += gross
        r["net"] += net
        r["vat"] += vat
    total = sums.parts()["period_total"]
    return {
        "gross": before["gross"] + total["gross"],
        "net": before["net"] + total["net"],
        "vat": before["vat"] + total["vat"],
        "gross_abs": before["gross_abs"] + total["gross_abs"],
        "by_rate": by_rate,
    }


# ---------------------------------------------------------------------- the payload


@dataclass(frozen=True, slots=True)
class Period:
    from_seq: int
    to_seq: int
    from_ms: int
    to_ms: int

    def to_json(self) -> dict[str, Any]:
        return {
            "from_seq": self.from_seq,
            "to_seq": self.to_seq,
            "from_time": format_time(self.from_ms),
            "to_time": format_time(self.to_ms),
        }


def previous_ref(seq: int, hash_hex: str) -> dict[str, Any]:
    return {"seq": seq, "hash": hash_hex}


def closing_payload(
    kind: str,
    *,
    period: Period,
    sums: PeriodSums,
    grand_total: Mapping[str, Any],
    previous: dict[str, Any] | None,
    closings: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The payload of a closing of type ``kind``. ``closings``: the first and last number of
    the lower closings a monthly / yearly closing sums."""
    payload: dict[str, Any] = {"period": period.to_json(), **sums.parts()}
    payload["grand_total"] = copy.deepcopy(dict(grand_total))  # never alias an input
    payload["previous"] = copy.deepcopy(previous)
    if kind in LOWER:
        if closings is None:
            raise ValueError(f"a {kind} closing names the closings it sums")
        payload["closings"] = {
            "type": LOWER[kind],
            "from_number": closings[0],
            "to_number": closings[1],
        }
    return payload


def summed_closing(
    kind: str,
    lower: Sequence[Mapping[str, Any]],
    *,
    first_number: int,
    previous: dict[str, Any] | None,
) -> dict[str, Any]:
    """A monthly (yearly) closing over the payloads of its daily (monthly) closings ``lower``,
    numbered ``first_number`` onwards, in order."""
    if not lower:
        raise ValueError(f"a {kind} closing sums at least one {LOWER[kind]} closing")
    sums = PeriodSums()
    for p in lower:
        sums.add_closing(p)
    first, last = lower[0]["period"], lower[-1]["period"]
    payload: dict[str, Any] = {
        "period": {
            "from_seq": first["from_seq"],
            "to_seq": last["to_seq"],
            "from_time": first["from_time"],
            "to_time": last["to_time"],
        },
        **sums.parts(),
    }
    payload["grand_total"] = copy.deepcopy(lower[-1]["grand_total"])
    payload["previous"] = copy.deepcopy(previous)
    payload["closings"] = {
        "type": LOWER[kind],
        "from_number": first_number,
        "to_number": first_number + len(lower) - 1,
    }
    return payload


# ---------------------------------------------------------------------- the schedule


@dataclass(frozen=True, slots=True)
class Schedule:
    """When scheduled periods end, in local time of ``tz``.

    Every day at ``closing_time`` a daily period ends (``None``: no scheduled closings). A
    month ends at the daily boundary of its first day, a fiscal year at the daily boundary of
    the day after ``year_end`` (month, day); at such a boundary the monthly (yearly) closing
    follows the daily one. A local time that does not exist (DST gap) or exists twice
    (DST overlap) resolves as ``zoneinfo`` does with ``fold=0``.
    """

    tz: tzinfo
    closing_time: dtime | None = dtime(4, 0)
    monthly: bool = True
    yearly: bool = True
    year_end: tuple[int, int] = (12, 31)

    def boundary_ms(self, day: date) -> int:
        assert self.closing_time is not None
        local = datetime.combine(day, self.closing_time, tzinfo=self.tz)
        return int(local.astimezone(UTC).timestamp() * 1000)

    def is_year_start(self, day: date) -> bool:
        before = day - timedelta(days=1)
        return (before.month, before.day) == self.year_end

    def kinds_at(self, day: date) -> tuple[str, ...]:
        """The closing types that end a period at ``day``'s boundary, lower first."""
        year = self.yearly and self.is_year_start(day)
        # a yearly closing sums monthly ones: its boundary always ends a month too
        month = year or (self.monthly and day.day == 1)
        return (DAILY,) + ((MONTHLY,) if month else ()) + ((YEARLY,) if year else ())

    def boundaries(self, after_ms: int, until_ms: int, *, limit: int) -> list[tuple[date, int]]:
        """Daily boundaries B with ``after_ms < B <= until_ms``, oldest first, at most
        ``limit`` of them."""
        if self.closing_time is None or until_ms <= after_ms:
            return []
        day = datetime.fromtimestamp(after_ms / 1000, UTC).astimezone(self.tz).date()
        day -= timedelta(days=1)
        out: list[tuple[date, int]] = []
        while len(out) < limit:
            b = self.boundary_ms(day)
            if b > until_ms:
                break
            if b > after_ms:
                out.append((day, b))
            day += timedelta(days=1)
        return out

    def next_boundary_ms(self, now_ms: int) -> int | None:
        found = self.boundaries(now_ms, now_ms + 3 * 86_400_000, limit=1)
        return found[0][1] if found else None


@dataclass(frozen=True, slots=True)
class Due:
    """A scheduled closing that is due: its type and the boundary its period ends at."""

    kind: str
    boundary_ms: int


def due_closings(
    schedule: Schedule,
    *,
    now_ms: int,
    chain_start_ms: int,
    last_end_ms: Mapping[str, int | None],
    limit: int = 1000,
) -> list[Due]:
    """The scheduled closings of one chain that are due at ``now_ms``, in the order they must
    be made (by boundary; daily, then monthly, then yearly at the same boundary).

    ``last_end_ms[kind]``: ``to_time`` of the chain's last closing of that type (None: none
    yet, the chain's first record at ``chain_start_ms`` starts the first period). A boundary
    is due for a type when it lies after that type's last period end and is not in the
    future; monthly and yearly boundaries are the daily ones :meth:`Schedule.kinds_at` names.
    """
    starts = {k: v if v is not None else chain_start_ms for k, v in last_end_ms.items()}
    earliest = min(starts.get(k, chain_start_ms) for k in KINDS)
    out: list[Due] = []
    for day, b in schedule.boundaries(earliest, now_ms, limit=limit):
        for kind in schedule.kinds_at(day):
            if b > starts.get(kind, chain_start_ms):
                out.append(Due(kind, b))
    return out


def parse_closing_time(text: str) -> dtime:
    """``HH:MM`` (24 h) → time; ValueError otherwise."""
    hh, sep, mm = text.partition(":")
    if not sep or len(hh) != 2 or len(mm) != 2 or not (hh + mm).isdigit():
        raise ValueError("must be HH:MM, e.g. 04:00")
    return dtime(int(hh), int(mm))


def parse_year_end(text: str) -> tuple[int, int]:
    """``MM-DD`` that exists in every year (so not 02-29) → (month, day)."""
    mm, sep, dd = text.partition("-")
    if not sep or len(mm) != 2 or len(dd) != 2 or not (mm + dd).isdigit():
        raise ValueError("must be MM-DD, e.g. 12-31")
    date(2001, int(mm), int(dd))  # a year without 29 February: ValueError if no such day
    return int(mm), int(dd)


def lower_numbers(previous: Mapping[str, Any] | None) -> int:
    """The first lower-closing number a monthly / yearly closing sums (after ``previous``)."""
    if previous is None:
        return 1
    return int(previous["payload"]["closings"]["to_number"]) + 1
