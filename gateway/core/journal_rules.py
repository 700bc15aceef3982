"""Journal rules: what a whole journal must satisfy beyond the per-record chain rules.

:class:`JournalChecker` is fed, in chain order, the bodies :class:`~gateway.core.verify.
ChainVerifier` accepted (so each is already canonical, hashed, signed and chained), and
checks what only the journal as a whole can show (docs/record-format.md, "What verify
checks"):

- **closings**: a daily closing's sums equal the sums of the records of its period; a monthly
  (yearly) closing's equal the sums of the daily (monthly) closings it names; the periods of
  each closing type tile the chain without gap or overlap, in seq and in time; every record of
  a period is at or before its ``to_time`` and every later record before the closing is after
  it; ``grand_total`` is the perpetual grand total at the period's end and ``previous`` the
  previous closing of the same type;
- **references**: a cancellation or correction refers to an existing sale (or correction) by
  its chain, seq, type, number and hash, that nothing else cancelled or corrected, and its
  content is exactly what :mod:`gateway.core.documents` derives from it; a duplicate refers
  to an existing record and its copy number is used once; an ``EXPORT::RECORDS`` record
  refers to an existing closing.

Records referred to are read through ``lookup(chain, seq)`` → canonical body bytes (or
None), a callable passed in (the database, or an export's own files): this module does no
IO. Whatever it returns is trusted only when its SHA-256 equals the hash the referring,
signed record states. A partial export may start inside a period: what cannot be checked for
lack of the earlier records is listed in :attr:`JournalChecker.unchecked`, never passed.

Failures are :class:`~gateway.core.verify.VerifyFailure` with the record's seq, the field
(``payload.vat[0].gross``) and a stable reason: ``CLOSING_MISMATCH`` (a sum or total differs
from what the journal gives), ``CLOSING_PERIOD`` (tiling or times), ``CLOSING_LINK``
(``previous``), ``BAD_REFERENCE``, ``ALREADY_SUPERSEDED``, ``DOCUMENT_MISMATCH``,
``BAD_FIELD``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.core.canonical import CanonicalError, parse_canonical
from gateway.core.chain import zero_totals
from gateway.core.closing import (
    CANCELLATION,
    CORRECTION,
    DAILY,
    DAILY_FIELDS,
    KINDS,
    LOWER,
    SUMMING_FIELDS,
    Contribution,
    PeriodSums,
    contribution,
    grand_total_after,
    summed_closing,
)
from gateway.core.documents import SALE_LIKE, cancellation_payload, correction_payload
from gateway.core.errors import GatewayError
from gateway.core.record import parse_time
from gateway.core.verify import VerifyFailure

DUPLICATE = "INTENTION::DUPLICATE"
EXPORT = "EXPORT::RECORDS"

#: Lookup of a referenced record: canonical body bytes, or None if there is no such record.
Lookup = Callable[[str, int], bytes | None]

#: Records kept to take back out of a period's sums those that follow its end but precede
#: its closing. The gateway makes a closing right after its period ends (start-up catch-up
#: runs before the POS is served), so a handful is the norm.
TAIL_LIMIT = 100_000


@dataclass(slots=True)
class _Mark:
    """A closing already seen: what the next closings need of it."""

    kind: str
    seq: int
    hash: str
    number: int
    to_seq: int
    to_ms: int
    payload: dict[str, Any]
    checked: bool


@dataclass(slots=True)
class JournalState:
    """What the checkers of one verification share across chains (references may cross)."""

    superseded: dict[tuple[str, int], tuple[str, int]] = field(default_factory=dict)
    copies: set[tuple[str, int, int]] = field(default_factory=set)


class JournalChecker:
    """Checks one chain's journal rules, record by record (see the module docstring).

    ``start_seq``/``start_totals``: the chain state before the first record fed (a partial
    export); 0 and zero totals for a walk from seq 1.
    """

    def __init__(
        self,
        chain: str,
        lookup: Lookup,
        *,
        state: JournalState | None = None,
        start_seq: int = 0,
        start_totals: Mapping[str, Any] | None = None,
        tail_limit: int = TAIL_LIMIT,
    ) -> None:
        self.chain = chain
        self.lookup = lookup
        self.state = state if state is not None else JournalState()
        self.start_seq = start_seq
        #: (seq, reason) of closings that could not be fully checked (partial exports)
        self.unchecked: list[tuple[int, str]] = []
        self.closings = 0
        self._first_ms: int | None = None
        self._base_seq = start_seq  # the sums cover base_seq+1 .. the last record fed
        self._base_total: dict[str, Any] = (
            dict(start_totals) if start_totals is not None else zero_totals()
        )
        self._base_known = True
        self._sums = PeriodSums()
        self._tail: deque[tuple[int, int, Contribution]] = deque(maxlen=tail_limit)
        self._last: dict[str, _Mark | None] = {k: None for k in KINDS}
        self._lower: dict[str, dict[int, _Mark]] = {k: {} for k in LOWER.values()}
        self._seq = start_seq
        self._time_ms = 0

    # ------------------------------------------------------------------ feeding

    def feed(self, body: Mapping[str, Any], hash_hex: str, time_ms: int) -> None:
        """Check the next record (already chain-verified); raise VerifyFailure."""
        seq = body["seq"]
        rtype = body["type"]
        self._seq = seq
        if seq == 1:
            self._first_ms = time_ms
        original = None
        if rtype in (CANCELLATION, CORRECTION, DUPLICATE):
            original = self._check_reference(body)
        elif rtype in KINDS:
            self._check_closing(body, hash_hex, time_ms)
        elif rtype == EXPORT:
            self._check_export(body)
        try:
            c = contribution(body, original)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise self._fail("BAD_FIELD", f"payload cannot be summed: {exc!r}", "payload") from None
        self._sums.add(c)
        self._tail.append((seq, time_ms, c))
        self._time_ms = time_ms

    def _fail(self, reason: str, message: str, at: str) -> VerifyFailure:
        return VerifyFailure(self.chain, self._seq, reason, message, field=at)

    # ------------------------------------------------------------------ references

    def _fetch(self, ref: Mapping[str, Any], what: str) -> dict[str, Any] | None:
        """The body ``ref`` names (``chain``, ``seq``, ``hash``), authenticated by its hash;
        None if the lookup has no such record."""
        chain, seq, hash_hex = ref["chain"], ref["seq"], ref["hash"]
        data = self.lookup(chain, seq)
        if data is None:
            return None
        if hashlib.sha256(data).hexdigest() != hash_hex:
            raise self._fail(
                "BAD_REFERENCE", f"{what} {chain} seq {seq} has another hash", f"{what_path(what)}"
            )
        try:
            body: dict[str, Any] = parse_canonical(data)
        except CanonicalError as exc:
            raise self._fail(
                "BAD_REFERENCE", f"{what} {chain} seq {seq}: {exc.message}", what_path(what)
            ) from None
        return body

    def _check_reference(self, body: Mapping[str, Any]) -> dict[str, Any]:
        p = body["payload"]
        ref = p.get("ref")
        if not (
            isinstance(ref, dict)
            and isinstance(ref.get("chain"), str)
            and _is_int(ref.get("seq"))
            and isinstance(ref.get("type"), str)
            and _is_int(ref.get("number"))
            and isinstance(ref.get("hash"), str)
        ):
            raise self._fail(
                "BAD_FIELD", "payload.ref needs chain, seq, type, number and hash", "payload.ref"
            )
        if ref["chain"] == self.chain and ref["seq"] >= body["seq"]:
            raise self._fail("BAD_REFERENCE", "refers to a later record", "payload.ref.seq")
        original = self._fetch(ref, "ref")
        if original is None:
            raise self._fail(
                "BAD_REFERENCE",
                f"refers to {ref['chain']} seq {ref['seq']}, which does not exist",
                "payload.ref",
            )
        for key in ("chain", "seq", "type", "number"):
            if original[key] != ref[key]:
                raise self._fail(
                    "BAD_REFERENCE",
                    f"ref.{key} is {ref[key]!r}, the record has {original[key]!r}",
                    f"payload.ref.{key}",
                )
        target = (ref["chain"], ref["seq"])
        rtype = body["type"]
        if rtype == DUPLICATE:
            copy = p.get("copy")
            if not _is_int(copy) or copy < 1:
                raise self._fail("BAD_FIELD", "copy must be 1, 2, …", "payload.copy")
            made = (*target, copy)
            if made in self.state.copies:
                raise self._fail(
                    "DOCUMENT_MISMATCH",
                    f"copy {copy} of {target[0]} seq {target[1]} was already made",
                    "payload.copy",
                )
            self.state.copies.add(made)
            return original
        if original["type"] not in SALE_LIKE:
            raise self._fail(
                "BAD_REFERENCE",
                f"a {original['type']} record cannot be cancelled or corrected",
                "payload.ref.type",
            )
        done = self.state.superseded.get(target)
        if done is not None:
            raise self._fail(
                "ALREADY_SUPERSEDED",
                f"{target[0]} seq {target[1]} was already cancelled or corrected by "
                f"{done[0]} seq {done[1]}",
                "payload.ref",
            )
        self.state.superseded[target] = (self.chain, body["seq"])
        try:
            if rtype == CANCELLATION:
                expected = cancellation_payload(original, ref["hash"], p.get("reason", ""))
            else:
                expected = correction_payload(
                    original, ref["hash"], p.get("reason", ""), p.get("corrected")
                )
        except (GatewayError, KeyError, TypeError, AttributeError) as exc:
            raise self._fail(
                "DOCUMENT_MISMATCH", f"does not follow from the original: {exc}", "payload"
            ) from None
        diff = first_difference(expected, p, "payload")
        if diff is not None:
            raise self._fail(
                "DOCUMENT_MISMATCH",
                f"{diff} is not what the {rtype.split('::')[1].lower()} of "
                f"{target[0]} seq {target[1]} gives",
                diff,
            )
        return original

    def _check_export(self, body: Mapping[str, Any]) -> None:
        closing = body["payload"].get("closing")
        if not (
            isinstance(closing, dict)
            and closing.get("type") in KINDS
            and _is_int(closing.get("seq"))
            and _is_int(closing.get("number"))
            and isinstance(closing.get("hash"), str)
        ):
            raise self._fail(
                "BAD_FIELD", "payload.closing needs type, seq, number and hash", "payload.closing"
            )
        target = self._fetch({**closing, "chain": self.chain}, "closing")
        if target is None:
            raise self._fail(
                "BAD_REFERENCE",
                f"the archived closing seq {closing['seq']} does not exist",
                "payload.closing",
            )
        if target["type"] != closing["type"] or target["number"] != closing["number"]:
            raise self._fail(
                "BAD_REFERENCE", "type/number differ from the archived closing", "payload.closing"
            )
        period = body["payload"].get("period")
        if period is not None and first_difference(target["payload"]["period"], period, "p"):
            raise self._fail(
                "BAD_REFERENCE", "period differs from the archived closing's", "payload.period"
            )

    # ------------------------------------------------------------------ closings

    def _check_closing(self, body: Mapping[str, Any], hash_hex: str, time_ms: int) -> None:
        kind = body["type"]
        seq = body["seq"]
        p = body["payload"]
        fields = SUMMING_FIELDS if kind in LOWER else DAILY_FIELDS
        if not isinstance(p, dict) or set(p) != set(fields):
            extra = sorted(set(p) - set(fields)) if isinstance(p, dict) else []
            missing = sorted(set(fields) - set(p)) if isinstance(p, dict) else list(fields)
            name = f"payload.{(missing or extra)[0]}"
            raise self._fail(
                "BAD_FIELD", f"a {kind} payload has exactly the fields {', '.join(fields)}", name
            )
        f_seq, t_seq, f_ms, t_ms = self._period(p["period"])
        prev = self._previous(kind, p["previous"])
        if prev is None and p["previous"] is None:
            if self.start_seq == 0:
                first_ms = self._first_ms if self._first_ms is not None else time_ms
                if f_seq != 1:
                    raise self._fail(
                        "CLOSING_PERIOD",
                        f"the first {kind} starts at seq 1, not {f_seq}",
                        "payload.period.from_seq",
                    )
                if f_ms != first_ms:
                    raise self._fail(
                        "CLOSING_PERIOD",
                        "the first closing's period starts at the chain's first record",
                        "payload.period.from_time",
                    )
            elif t_seq > self.start_seq:
                self.unchecked.append((seq, "period starts before the export"))
        elif prev is not None:
            if f_seq != prev.to_seq + 1:
                raise self._fail(
                    "CLOSING_PERIOD",
                    f"starts at seq {f_seq} but the previous {kind} (seq {prev.seq}) ended at "
                    f"seq {prev.to_seq}",
                    "payload.period.from_seq",
                )
            if f_ms != prev.to_ms:
                raise self._fail(
                    "CLOSING_PERIOD",
                    f"starts at {p['period']['from_time']} but the previous {kind} (seq "
                    f"{prev.seq}) ended at {prev.payload['period']['to_time']}",
                    "payload.period.from_time",
                )
        if not f_seq - 1 <= t_seq < seq:
            raise self._fail(
                "CLOSING_PERIOD",
                f"to_seq {t_seq} is outside {f_seq - 1}..{seq - 1}",
                "payload.period.to_seq",
            )
        if not f_ms <= t_ms <= time_ms:
            raise self._fail(
                "CLOSING_PERIOD",
                "to_time must lie between from_time and the closing's own time",
                "payload.period.to_time",
            )
        checked = (
            self._check_daily(p, f_seq, t_seq, t_ms, seq)
            if kind == DAILY
            else self._check_summing(kind, p, prev)
        )
        mark = _Mark(kind, seq, hash_hex, body["number"], t_seq, t_ms, dict(p), checked)
        self._last[kind] = mark
        if kind in self._lower:
            self._lower[kind][mark.number] = mark
        self.closings += 1

    def _period(self, period: Any) -> tuple[int, int, int, int]:
        keys = ("from_seq", "to_seq", "from_time", "to_time")
        if not isinstance(period, dict) or set(period) != set(keys):
            raise self._fail("BAD_FIELD", f"period has exactly {', '.join(keys)}", "payload.period")
        for k in ("from_seq", "to_seq"):
            if not _is_int(period[k]):
                raise self._fail("BAD_FIELD", "must be an integer", f"payload.period.{k}")
        times = []
        for k in ("from_time", "to_time"):
            try:
                times.append(parse_time(period[k]))
            except (ValueError, TypeError):
                raise self._fail(
                    "BAD_FIELD", "must be an RFC 3339 UTC millisecond time", f"payload.period.{k}"
                ) from None
        return period["from_seq"], period["to_seq"], times[0], times[1]

    def _previous(self, kind: str, ref: Any) -> _Mark | None:
        """The previous closing of ``kind``, checked against the payload's ``previous``."""
        last = self._last[kind]
        if ref is None:
            if last is not None:
                raise self._fail(
                    "CLOSING_LINK",
                    f"previous is null, but {kind} seq {last.seq} came before",
                    "payload.previous",
                )
            return None
        if not (
            isinstance(ref, dict)
            and set(ref) == {"seq", "hash"}
            and _is_int(ref["seq"])
            and isinstance(ref["hash"], str)
        ):
            raise self._fail("BAD_FIELD", "previous is {seq, hash} or null", "payload.previous")
        if last is not None:
            if (ref["seq"], ref["hash"]) != (last.seq, last.hash):
                raise self._fail(
                    "CLOSING_LINK",
                    f"previous names seq {ref['seq']}, but the previous {kind} is seq {last.seq}",
                    "payload.previous",
                )
            return last
        if self.start_seq == 0 or ref["seq"] > self.start_seq:
            raise self._fail(
                "CLOSING_LINK",
                f"previous names seq {ref['seq']}, which is not a {kind}",
                "payload.previous",
            )
        body = self._fetch({**ref, "chain": self.chain}, "previous")
        if body is None or body["type"] != kind:
            self.unchecked.append((self._seq, "the previous closing is not in the export"))
            return None
        pp = body["payload"]
        _, t_seq, _, t_ms = self._period(pp.get("period"))
        return _Mark(kind, body["seq"], ref["hash"], body["number"], t_seq, t_ms, pp, False)

    def _check_daily(self, p: dict[str, Any], f_seq: int, t_seq: int, t_ms: int, seq: int) -> bool:
        """A daily closing against the records of its period; rebases the running sums."""
        if t_seq <= self.start_seq and self.start_seq > 0:
            return self._before_export(p, t_seq)
        tail = self._tail
        after = _newest_after(tail, t_seq)
        if t_seq + 1 < seq and (not after or after[-1][0] != t_seq + 1):
            raise self._fail(
                "CLOSING_PERIOD",
                f"the period ends {seq - 1 - t_seq} records before its closing; at most "
                f"{tail.maxlen} are kept to check that",
                "payload.period.to_seq",
            )
        if after and after[-1][1] <= t_ms:
            raise self._fail(
                "CLOSING_PERIOD",
                f"record seq {after[-1][0]} is at or before to_time but after to_seq",
                "payload.period.to_seq",
            )
        last_in = _entry(tail, t_seq) if t_seq > self._base_seq else None
        if last_in is not None and last_in[1] > t_ms:
            raise self._fail(
                "CLOSING_PERIOD",
                f"record seq {t_seq} of the period is after to_time",
                "payload.period.to_time",
            )
        period_sums = self._sums.copy()
        for e in after:
            period_sums.add(e[2], -1)
        checked = f_seq - 1 == self._base_seq and self._base_known
        if checked:
            expected = {**period_sums.parts(), "grand_total": None}
            expected["grand_total"] = grand_total_after(self._base_total, period_sums)
            for name in ("records", "counts", "vat", "payments", "period_total", "grand_total"):
                diff = _difference(expected[name], p[name], f"payload.{name}")
                if diff is not None:
                    raise self._fail(
                        "CLOSING_MISMATCH",
                        f"{diff[0]} is {diff[2]!r}, the records of the period give {diff[1]!r}",
                        diff[0],
                    )
        elif self.start_seq == 0:
            raise self._fail(
                "CLOSING_PERIOD",
                f"the period starts at seq {f_seq}, the open period at {self._base_seq + 1}",
                "payload.period.from_seq",
            )
        else:
            self.unchecked.append((seq, "period starts before the export"))
        # the records after the period start the next one
        rest = PeriodSums()
        for e in reversed(after):
            rest.add(e[2])
        self._sums = rest
        self._base_seq = t_seq
        self._base_total = p["grand_total"]
        self._base_known = checked
        while tail and tail[0][0] <= t_seq:
            tail.popleft()
        return checked

    def _before_export(self, p: dict[str, Any], t_seq: int) -> bool:
        """A daily closing (in a partial export) of a period that ends before the export
        starts: only its end state can be compared, with the export's start state."""
        if t_seq == self.start_seq:
            diff = first_difference(self._base_total, p["grand_total"], "payload.grand_total")
            if diff is not None:
                raise self._fail(
                    "CLOSING_MISMATCH",
                    f"{diff} is not the chain's grand total at seq {t_seq}",
                    diff,
                )
        return False

    def _check_summing(self, kind: str, p: dict[str, Any], prev: _Mark | None) -> bool:
        """A monthly (yearly) closing against the daily (monthly) closings it names."""
        lower = LOWER[kind]
        cl = p["closings"]
        if not (
            isinstance(cl, dict)
            and set(cl) == {"type", "from_number", "to_number"}
            and cl["type"] == lower
            and _is_int(cl["from_number"])
            and _is_int(cl["to_number"])
        ):
            raise self._fail(
                "BAD_FIELD",
                f"closings is {{type: {lower}, from_number, to_number}}",
                "payload.closings",
            )
        a, b = cl["from_number"], cl["to_number"]
        if prev is not None and "closings" in prev.payload:
            want = prev.payload["closings"]["to_number"] + 1
        elif p["previous"] is None and self.start_seq == 0:
            want = 1
        else:
            want = a  # the previous closing is outside a partial export
        if a != want:
            raise self._fail(
                "CLOSING_PERIOD",
                f"from_number is {a}; the previous {kind} summed up to {lower} {want - 1}",
                "payload.closings.from_number",
            )
        if p["period"]["to_seq"] <= self.start_seq and self.start_seq > 0:
            return False  # a period before a partial export: its closings are not in it
        marks = self._lower[lower]
        if b < a or any(n not in marks for n in range(a, b + 1)):
            if self.start_seq == 0 or b < a:
                raise self._fail(
                    "CLOSING_MISMATCH",
                    f"names {lower} closings {a}..{b}, which the journal does not hold",
                    "payload.closings.to_number",
                )
            self.unchecked.append((self._seq, f"{lower} closings {a}..{b} are not all exported"))
            return False
        named = [marks[n] for n in range(a, b + 1)]
        expected = summed_closing(
            kind, [m.payload for m in named], first_number=a, previous=p["previous"]
        )
        if named[-1].number != max(marks):
            raise self._fail(
                "CLOSING_MISMATCH",
                f"sums {lower} closings up to {b}, but {lower} {max(marks)} came before it",
                "payload.closings.to_number",
            )
        for name in SUMMING_FIELDS:
            diff = _difference(expected[name], p[name], f"payload.{name}")
            if diff is not None:
                raise self._fail(
                    "CLOSING_MISMATCH",
                    f"{diff[0]} is {diff[2]!r}, the {lower} closings {a}..{b} give {diff[1]!r}",
                    diff[0],
                )
        for n in range(a, b + 1):
            del marks[n]
        return all(m.checked for m in named)


def _is_int(v: Any) -> bool:
    return type(v) is int


def what_path(what: str) -> str:
    return {"ref": "payload.ref", "previous": "payload.previous"}.get(what, f"payload.{what}")


def _newest_after(tail: deque[tuple[int, int, Contribution]], seq: int) -> list[Any]:
    """Entries of ``tail`` with a seq above ``seq``, newest first."""
    out = []
    for e in reversed(tail):
        if e[0] <= seq:
            break
        out.append(e)
    return out


def _entry(tail: deque[tuple[int, int, Contribution]], seq: int) -> tuple[int, int, Any] | None:
    if not tail or seq < tail[0][0] or seq > tail[-1][0]:
        return None
    e = tail[seq - tail[0][0]]
    return e if e[0] == seq else None


_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def member(path: str, key: str) -> str:
    """``path.key``, or ``path["key"]`` when the key is not a plain name (``"20.00"``)."""
    return f"{path}.{key}" if _NAME_RE.fullmatch(key) else f"{path}[{json.dumps(key)}]"


def first_difference(expected: Any, actual: Any, path: str) -> str | None:
    """The path of the first place ``actual`` differs from ``expected`` as JSON (types
    included: ``1`` is not ``true``), or None if they are equal."""
    found = _difference(expected, actual, path)
    return found[0] if found is not None else None


def _difference(expected: Any, actual: Any, path: str) -> tuple[str, Any, Any] | None:
    if type(expected) is not type(actual):
        return path, expected, actual
    if isinstance(expected, dict):
        for key in expected:
            if key not in actual:
                return member(path, key), expected[key], None
            d = _difference(expected[key], actual[key], member(path, key))
            if d is not None:
                return d
        for key in actual:
            if key not in expected:
                return member(path, key), None, actual[key]
        return None
    if isinstance(expected, list):
        for i, (e, a) in enumerate(zip(expected, actual, strict=False)):
            d = _difference(e, a, f"{path}[{i}]")
            if d is not None:
                return d
        if len(expected) != len(actual):
            i = min(len(expected), len(actual))
            return (
                f"{path}[{i}]",
                expected[i] if i < len(expected) else None,
                actual[i] if i < len(actual) else None,
            )
        return None
    return None if expected == actual else (path, expected, actual)
