"""Hypothesis strategies for the unit tests: JSON values of the canonical domain, valid sale
requests, and sequences of journal operations (sales, events, duplicates, cancellations with a
wall clock that may go back)."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import strategies as st

from gateway.core.canonical import MAX_SAFE_INT
from gateway.core.money import DEFAULT_VAT_RATES, line_amount, sum_by_rate, vat_breakdown

# ---------------------------------------------------------------------- JSON values

#: Characters biased towards where JCS and naive encoders differ: controls and escapes,
#: U+E000..U+FFFF (sorts after surrogates in UTF-16) and non-BMP (sorts before them).
chars = st.one_of(
    st.characters(codec="utf-8"),
    st.characters(min_codepoint=0xE000, max_codepoint=0xFFFF),
    st.characters(min_codepoint=0x10000),
    st.sampled_from('"\\/\b\f\n\r\t\x00\x1f\x7f\u2028\u2029'),
)
texts = st.text(chars, max_size=6)
keys = st.one_of(texts, st.sampled_from(["a", "b", "\ue000", "\uffff", "\U0001f600", ""]))
safe_ints = st.one_of(
    st.integers(-MAX_SAFE_INT, MAX_SAFE_INT),
    st.sampled_from([0, -1, MAX_SAFE_INT, -MAX_SAFE_INT]),
)
scalars = st.one_of(st.none(), st.booleans(), safe_ints, texts)
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=5),
    max_leaves=20,
)
#: Anything JSON can carry, floats included (for fuzzing validators).
any_json = st.recursive(
    st.one_of(scalars, st.floats(allow_nan=False, allow_infinity=False)),
    lambda kids: (
        st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3)
    ),
    max_leaves=8,
)

# ---------------------------------------------------------------------- sale requests

#: Texts the validator accepts: no controls, surrogates or (unassigned, so Cn) noncharacters.
line_texts = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Cn")), min_size=1, max_size=12
)


def qty_text(qty_milli: int, pad: int) -> str:
    """Decimal text of ``qty_milli`` thousandths, with up to ``pad`` trailing zeros kept."""
    whole, frac = divmod(qty_milli, 1000)
    digits = f"{frac:03d}"
    keep = max(len(digits.rstrip("0")), min(pad, 3))
    return f"{whole}.{digits[:keep]}" if keep else str(whole)


@st.composite
def sale_lines(draw: st.DrawFn, first: bool) -> dict[str, Any]:
    """One line; the first line of a sale is a purchase, later ones may be discounts."""
    if first:
        qty = qty_text(draw(st.integers(1000, 20_000)), draw(st.integers(0, 3)))
        price = draw(st.integers(1000, 500_000))
    elif draw(st.integers(0, 4)) == 0:
        qty, price = "1", -draw(st.integers(1, 150))
    else:
        qty = qty_text(draw(st.integers(1, 50_000)), draw(st.integers(0, 3)))
        price = draw(st.integers(0, 200_000))
    return {
        "text": draw(line_texts),
        "qty": qty,
        "unit_price": price,
        "vat_rate": draw(st.sampled_from(DEFAULT_VAT_RATES)),
        "amount": line_amount(qty, price),
    }


@st.composite
def sale_requests(draw: st.DrawFn, max_lines: int = 6, till: str = "till-1") -> dict[str, Any]:
    """A valid ``sign`` request (receipt or invoice), totals and payments adding up."""
    n = draw(st.integers(1, max_lines))
    lines = [draw(sale_lines(first=i == 0)) for i in range(n)]
    incl = draw(st.booleans())
    vat = vat_breakdown(
        sum_by_rate((ln["vat_rate"], ln["amount"]) for ln in lines), prices_include_vat=incl
    )
    total = sum(v.gross for v in vat)
    assert total >= 1, "a first line of at least 10.00 outweighs the discounts"
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), max_size=2))) if total > 1 else []
    bounds = [0, *cuts, total]
    methods = st.sampled_from(["CASH", "CARD", "VOUCHER", "MOBILE"])
    payments = [
        {"method": draw(methods), "amount": hi - lo} for lo, hi in itertools.pairwise(bounds)
    ]
    req: dict[str, Any] = {
        "id": draw(st.from_regex(r"[A-Za-z0-9._:@-]{1,20}", fullmatch=True)),
        "op": "sign",
        "till": till,
        "type": draw(st.sampled_from(["RECEIPT", "INVOICE"])),
        "currency": "EUR",
        "lines": lines,
        "payments": payments,
        "total": total,
    }
    if draw(st.booleans()) or not incl:
        req["prices_include_vat"] = incl
    if req["type"] == "INVOICE":
        req["customer"] = {"name": draw(line_texts), "country": "FR"}
    return req


# ---------------------------------------------------------------------- journal operations

#: Wall-clock steps between records: mostly forward, sometimes backwards (clock behind).
clock_steps_ms = st.one_of(st.integers(0, 3_600_000), st.integers(-600_000, -1))


@st.composite
def journal_ops(draw: st.DrawFn, min_size: int = 1, max_size: int = 8) -> list[tuple[Any, ...]]:
    """Operations ``(kind, data, step_ms)``: sale/event/duplicate/cancel (by sale index)."""
    n = draw(st.integers(min_size, max_size))
    ops: list[tuple[Any, ...]] = []
    sales = 0
    for _ in range(n):
        kinds = ["sale", "sale", "event"] + (["duplicate", "cancel"] if sales else [])
        kind = draw(st.sampled_from(kinds))
        step = draw(clock_steps_ms)
        if kind == "sale":
            ops.append(("sale", draw(sale_requests(max_lines=4)), step))
            sales += 1
        elif kind == "event":
            ops.append(("event", draw(st.sampled_from(["PRINTER_FAULT", "OFFLINE"])), step))
        else:
            ops.append((kind, draw(st.integers(0, sales - 1)), step))
    return ops
