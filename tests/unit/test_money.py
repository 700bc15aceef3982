"""gateway.core.money: integer minor units, half-up (away from zero) rounding, VAT per rate.

``Fraction`` gives an exact, independent oracle for every rounding the module does.
"""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.money import (
    DEFAULT_VAT_RATES,
    QTY_RE,
    RATE_RE,
    VatLine,
    line_amount,
    round_half_up,
    sum_by_rate,
    vat_breakdown,
)

PROPERTY = settings(max_examples=200, deadline=None)
amounts = st.integers(-(10**13), 10**13)
rates = st.sampled_from(DEFAULT_VAT_RATES)


def _half_up(x: Fraction) -> int:
    """Exact commercial rounding: halves away from zero."""
    n = int(abs(x) + Fraction(1, 2))  # int() truncates a non-negative value: floor
    return n if x >= 0 else -n


# ---------------------------------------------------------------------- round_half_up


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.5", 1),
        ("-0.5", -1),
        ("1.5", 2),
        ("2.5", 3),
        ("-2.5", -3),
        ("0.49", 0),
        ("-0.49", 0),
        ("0.51", 1),
        ("-0.51", -1),
        ("1.4999999", 1),
        ("-1.4999999", -1),
        ("266.5", 267),
        ("-266.5", -267),
        ("0", 0),
        ("-0", 0),
    ],
)
def test_round_half_up_examples_round_halves_away_from_zero(value: str, expected: int) -> None:
    assert round_half_up(Decimal(value)) == expected


@PROPERTY
@given(st.integers(-(10**15), 10**15), st.integers(1, 1000))
def test_round_half_up_any_quotient_equals_exact_oracle(num: int, den: int) -> None:
    assert round_half_up(Decimal(num) / Decimal(den)) == _half_up(Fraction(num, den))


@PROPERTY
@given(st.integers(-(10**15), 10**15))
def test_round_half_up_sign_symmetric(num: int) -> None:
    x = Decimal(num) / 1000
    assert round_half_up(-x) == -round_half_up(x)


# ---------------------------------------------------------------------- line_amount


@pytest.mark.parametrize(
    ("qty", "price", "expected"),
    [
        ("1", 1599, 1599),
        ("2", 120, 240),
        ("0.5", 301, 151),  # 150.5 rounds up
        ("0.5", -301, -151),  # and a discount rounds away from zero too
        ("0.333", 100, 33),
        ("1.005", 200, 201),
        ("0.001", 499, 0),
        ("0.001", 500, 1),
        ("9999999.999", 1, 10_000_000),
        ("1", 0, 0),
    ],
)
def test_line_amount_examples_rounded_half_up(qty: str, price: int, expected: int) -> None:
    assert line_amount(qty, price) == expected


@PROPERTY
@given(st.integers(1, 9_999_999_999), st.integers(-(10**9), 10**9))
def test_line_amount_any_qty_equals_exact_oracle(qty_milli: int, price: int) -> None:
    qty = f"{qty_milli // 1000}.{qty_milli % 1000:03d}"
    assert line_amount(qty, price) == _half_up(Fraction(qty_milli, 1000) * price)


# ---------------------------------------------------------------------- vat_breakdown


def test_vat_breakdown_prices_incl_vat_rounds_each_rate_half_up() -> None:
    # 20.00 %: 1599 × 20/120 = 266.5 → 267; 5.50 %: 391 × 5.5/105.5 = 20.38 → 20
    out = vat_breakdown({"5.50": 391, "20.00": 1599}, prices_include_vat=True)
    assert out == (VatLine("20.00", 1332, 267, 1599), VatLine("5.50", 371, 20, 391))


def test_vat_breakdown_prices_excl_vat_adds_vat_on_top() -> None:
    # 20.00 %: 1234 × 0.2 = 246.8 → 247; 10.00 %: 105 × 0.1 = 10.5 → 11
    out = vat_breakdown({"10.00": 105, "20.00": 1234}, prices_include_vat=False)
    assert out == (VatLine("20.00", 1234, 247, 1481), VatLine("10.00", 105, 11, 116))


def test_vat_breakdown_negative_amount_rounds_half_away_from_zero() -> None:
    assert vat_breakdown({"20.00": -1599}, prices_include_vat=True) == (
        VatLine("20.00", -1332, -267, -1599),
    )
    assert vat_breakdown({"10.00": -105}, prices_include_vat=False) == (
        VatLine("10.00", -105, -11, -116),
    )


def test_vat_breakdown_sorted_by_rate_high_first_numerically() -> None:
    out = vat_breakdown(
        {r: 100 for r in ("0.00", "2.10", "10.00", "5.50", "20.00")}, prices_include_vat=True
    )
    assert [v.rate for v in out] == ["20.00", "10.00", "5.50", "2.10", "0.00"]


def test_vat_breakdown_zero_rate_has_no_vat() -> None:
    assert vat_breakdown({"0.00": 777}, prices_include_vat=True) == (VatLine("0.00", 777, 0, 777),)
    assert vat_breakdown({"0.00": 777}, prices_include_vat=False) == (VatLine("0.00", 777, 0, 777),)


def test_vat_breakdown_empty_is_empty() -> None:
    assert vat_breakdown({}, prices_include_vat=True) == ()


@PROPERTY
@given(st.dictionaries(rates, amounts, max_size=5), st.booleans())
def test_vat_breakdown_any_amounts_lines_add_up_and_match_oracle(
    amounts_by_rate: dict[str, int], incl: bool
) -> None:
    out = vat_breakdown(amounts_by_rate, prices_include_vat=incl)
    assert {v.rate for v in out} == set(amounts_by_rate)
    for v in out:
        amount = amounts_by_rate[v.rate]
        r = Fraction(v.rate)
        assert v.net + v.vat == v.gross
        assert all(type(x) is int for x in (v.net, v.vat, v.gross))
        if incl:
            assert v.gross == amount
            assert v.vat == _half_up(amount * r / (100 + r))
        else:
            assert v.net == amount
            assert v.vat == _half_up(amount * r / 100)
        assert abs(v.vat) <= abs(v.gross)
        assert v.vat == 0 or (v.vat > 0) == (amount > 0)
    key_sum = "gross" if incl else "net"
    assert sum(getattr(v, key_sum) for v in out) == sum(amounts_by_rate.values())


@PROPERTY
@given(st.dictionaries(rates, amounts, max_size=5), st.booleans())
def test_vat_breakdown_negated_amounts_give_negated_breakdown(
    amounts_by_rate: dict[str, int], incl: bool
) -> None:
    out = vat_breakdown(amounts_by_rate, prices_include_vat=incl)
    neg = vat_breakdown({r: -a for r, a in amounts_by_rate.items()}, prices_include_vat=incl)
    assert neg == tuple(VatLine(v.rate, -v.net, -v.vat, -v.gross) for v in out)


def test_vat_line_to_json_is_integers_and_rate_string() -> None:
    assert VatLine("5.50", 371, 20, 391).to_json() == {
        "rate": "5.50",
        "net": 371,
        "vat": 20,
        "gross": 391,
    }


# ---------------------------------------------------------------------- sums and formats


def test_sum_by_rate_sums_each_rate() -> None:
    pairs = [("20.00", 100), ("5.50", 7), ("20.00", -30), ("0.00", 0)]
    assert sum_by_rate(pairs) == {"20.00": 70, "5.50": 7, "0.00": 0}


@PROPERTY
@given(st.lists(st.tuples(rates, amounts), max_size=12))
def test_sum_by_rate_total_preserved(pairs: list[tuple[str, int]]) -> None:
    sums = sum_by_rate(pairs)
    assert sum(sums.values()) == sum(a for _, a in pairs)
    assert set(sums) == {r for r, _ in pairs}


@pytest.mark.parametrize("text", ["0", "1", "0.5", "0.250", "1234567", "9999999.999"])
def test_qty_re_decimal_text_matches(text: str) -> None:
    assert QTY_RE.fullmatch(text)


@pytest.mark.parametrize("text", ["", ".5", "1.", "01", "1.2345", "12345678", "1e3", "1,5", "+1"])
def test_qty_re_other_text_refused(text: str) -> None:
    assert not QTY_RE.fullmatch(text)


@pytest.mark.parametrize("rate", DEFAULT_VAT_RATES)
def test_rate_re_default_rates_match(rate: str) -> None:
    assert RATE_RE.fullmatch(rate)


@pytest.mark.parametrize("rate", ["20", "20.0", "020.00", "100.00", "5.5", "-5.50"])
def test_rate_re_other_text_refused(rate: str) -> None:
    assert not RATE_RE.fullmatch(rate)
