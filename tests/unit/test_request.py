"""gateway.core.request: validate_sale accepts good sales exactly and lists every problem of bad
ones, each with its field path and a stable detail code; it never crashes on input."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.canonical import canonical_bytes
from gateway.core.errors import ValidationError
from gateway.core.money import MAX_AMOUNT_MINOR, VatLine
from gateway.core.request import (
    MAX_LINES,
    MAX_PAYMENTS,
    Line,
    Payment,
    Rules,
    SaleRequest,
    request_fingerprint,
    validate_sale,
)

from .strategies import any_json, sale_requests

PROPERTY = settings(max_examples=150, deadline=None)


def sale(**overrides: Any) -> dict[str, Any]:
    """A valid receipt, prices incl. VAT: 20.00 % 1599 (VAT 266.5 → 267), 5.50 % 391."""
    req: dict[str, Any] = {
        "id": "r-1",
        "op": "sign",
        "till": "till-1",
        "type": "RECEIPT",
        "currency": "EUR",
        "lines": [
            {"text": "Croissant", "qty": "2", "unit_price": 120, "vat_rate": "5.50", "amount": 240},
            {"text": "Pain", "qty": "0.5", "unit_price": 301, "vat_rate": "5.50", "amount": 151},
            {"text": "Vin", "qty": "1", "unit_price": 1599, "vat_rate": "20.00", "amount": 1599},
        ],
        "payments": [{"method": "CASH", "amount": 1000}, {"method": "CARD", "amount": 990}],
        "total": 1990,
    }
    req.update(overrides)
    return req


def with_change(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    req = sale()
    change(req)
    return req


def problems(req: Any, rules: Rules | None = None) -> list[tuple[str, str]]:
    """(field, code) of every detail validate_sale reports for ``req``."""
    with pytest.raises(ValidationError) as info:
        validate_sale(req, rules or Rules())
    err = info.value
    assert err.code == "VALIDATION_ERROR"
    assert err.details, "a validation error names at least one field"
    return [(d.field, d.code) for d in err.details]


def walk(value: Any) -> list[Any]:
    """Every node of a JSON-like structure (dataclass payloads included via to_json)."""
    out = [value]
    if isinstance(value, dict):
        for v in value.values():
            out += walk(v)
    elif isinstance(value, list | tuple):
        for v in value:
            out += walk(v)
    return out


# ---------------------------------------------------------------------- good sales


def test_validate_sale_receipt_incl_vat_breakdown_per_rate_half_up() -> None:
    s = validate_sale(sale())
    assert s.record_type == "TRANSACTION::RECEIPT"
    assert s.prices_include_vat is True
    assert s.total == 1990
    assert s.vat == (VatLine("20.00", 1332, 267, 1599), VatLine("5.50", 371, 20, 391))
    assert s.lines[1] == Line("Pain", "0.5", 301, "5.50", 151)
    assert s.payments == (Payment("CASH", 1000), Payment("CARD", 990))
    assert s.customer is None


def test_validate_sale_prices_excl_vat_total_is_net_plus_vat() -> None:
    req = sale(
        prices_include_vat=False,
        lines=[
            {
                "text": "Traiteur",
                "qty": "1.25",
                "unit_price": 987,
                "vat_rate": "20.00",
                "amount": 1234,
            },
            {
                "text": "Livraison",
                "qty": "1",
                "unit_price": 105,
                "vat_rate": "10.00",
                "amount": 105,
            },
        ],
        payments=[{"method": "TRANSFER", "amount": 1597}],
        total=1597,
    )
    s = validate_sale(req)
    assert s.prices_include_vat is False
    assert s.vat == (VatLine("20.00", 1234, 247, 1481), VatLine("10.00", 105, 11, 116))
    assert s.total == 1481 + 116


def test_validate_sale_vat_rounded_once_per_rate_not_per_line() -> None:
    # Line by line 3 × 20/120 = 0.5 → 1 each (2 in all); on the rate's sum 6 × 20/120 = 1.
    line = {"text": "x", "qty": "1", "unit_price": 3, "vat_rate": "20.00", "amount": 3}
    s = validate_sale(
        sale(lines=[line, dict(line)], payments=[{"method": "CASH", "amount": 6}], total=6)
    )
    assert s.vat == (VatLine("20.00", 5, 1, 6),)


def test_validate_sale_discount_line_negative_price_accepted() -> None:
    lines = [
        {"text": "Café", "qty": "3", "unit_price": 150, "vat_rate": "10.00", "amount": 450},
        {"text": "Remise", "qty": "1", "unit_price": -45, "vat_rate": "10.00", "amount": -45},
    ]
    s = validate_sale(sale(lines=lines, payments=[{"method": "CARD", "amount": 405}], total=405))
    assert s.vat == (VatLine("10.00", 368, 37, 405),)


def test_validate_sale_invoice_with_customer_accepted() -> None:
    customer = {"name": "Boulangerie Ünal SARL", "vat_id": "FR40303265045", "country": "FR"}
    s = validate_sale(sale(type="INVOICE", customer=customer))
    assert s.record_type == "TRANSACTION::INVOICE"
    assert s.customer == customer
    assert s.payload()["customer"] == customer


def test_validate_sale_invoice_without_customer_refused() -> None:
    assert problems(sale(type="INVOICE")) == [("customer", "REQUIRED")]


def test_validate_sale_unicode_text_accepted() -> None:
    text = "Crème brûlée ☕ 🥐 中文 \ue000 e\u0301"
    req = sale()
    req["lines"][0]["text"] = text
    assert validate_sale(req).lines[0].text == text


def test_validate_sale_text_of_max_length_accepted_in_code_points() -> None:
    req = sale()
    req["lines"][0]["text"] = "🥐" * 200  # 200 code points, 400 UTF-16 units
    assert validate_sale(req).lines[0].text == "🥐" * 200


def test_validate_sale_payload_is_the_record_payload() -> None:
    payload = validate_sale(sale()).payload()
    assert payload == {
        "currency": "EUR",
        "lines": sale()["lines"],
        "prices_include_vat": True,
        "vat": [
            {"rate": "20.00", "net": 1332, "vat": 267, "gross": 1599},
            {"rate": "5.50", "net": 371, "vat": 20, "gross": 391},
        ],
        "total": 1990,
        "payments": sale()["payments"],
    }


def test_validate_sale_input_not_mutated() -> None:
    req = sale(type="INVOICE", customer={"name": "A"})
    before = copy.deepcopy(req)
    validate_sale(req)
    assert req == before


def test_validate_sale_rules_restrict_rates_and_currencies() -> None:
    rules = Rules(vat_rates=("19.00", "7.00"), currencies=("EUR",))
    line = {"text": "x", "qty": "1", "unit_price": 107, "vat_rate": "7.00", "amount": 107}
    s = validate_sale(
        sale(lines=[line], payments=[{"method": "CASH", "amount": 107}], total=107), rules
    )
    assert s.vat == (VatLine("7.00", 100, 7, 107),)
    usd = sale(
        currency="USD", lines=[line], payments=[{"method": "CASH", "amount": 107}], total=107
    )
    assert problems(usd, rules) == [("currency", "NOT_ALLOWED")]
    assert ("lines[0].vat_rate", "UNKNOWN_VAT_RATE") in problems(sale(), rules)


def test_request_fingerprint_key_order_irrelevant_content_relevant() -> None:
    req = sale()
    assert request_fingerprint(req) == request_fingerprint(dict(reversed(list(req.items()))))
    assert request_fingerprint(req) != request_fingerprint(sale(id="r-2"))


# ---------------------------------------------------------------------- bad input

BAD_CASES: list[tuple[str, Callable[[dict[str, Any]], None], list[tuple[str, str]]]] = [
    ("unknown top-level field", lambda r: r.update(colour="red"), [("colour", "UNKNOWN_FIELD")]),
    (
        "unknown line field",
        lambda r: r["lines"][1].update(sku=1),
        [("lines[1].sku", "UNKNOWN_FIELD")],
    ),
    (
        "unknown payment field",
        lambda r: r["payments"][0].update(tip=1),
        [("payments[0].tip", "UNKNOWN_FIELD")],
    ),
    ("missing id", lambda r: r.pop("id"), [("id", "REQUIRED")]),
    (
        "missing line amount",
        lambda r: r["lines"][2].pop("amount"),
        [("lines[2].amount", "REQUIRED")],
    ),
    ("id not a string", lambda r: r.update(id=7), [("id", "TYPE")]),
    ("id with a space", lambda r: r.update(id="r 1"), [("id", "FORMAT")]),
    ("id of 65 characters", lambda r: r.update(id="r" * 65), [("id", "FORMAT")]),
    ("id with trailing newline", lambda r: r.update(id="r-1\n"), [("id", "FORMAT")]),
    ("till starting with a dot", lambda r: r.update(till=".t"), [("till", "FORMAT")]),
    ("op not sign", lambda r: r.update(op="cancel"), [("op", "NOT_ALLOWED")]),
    ("type unknown", lambda r: r.update(type="REFUND"), [("type", "NOT_ALLOWED")]),
    ("type an array", lambda r: r.update(type=["RECEIPT"]), [("type", "NOT_ALLOWED")]),
    ("type an object", lambda r: r.update(type={}), [("type", "NOT_ALLOWED")]),
    ("currency lowercase", lambda r: r.update(currency="eur"), [("currency", "FORMAT")]),
    (
        "currency with trailing newline",
        lambda r: r.update(currency="EUR\n"),
        [("currency", "FORMAT")],
    ),
    (
        "prices_include_vat not bool",
        lambda r: r.update(prices_include_vat=1),
        [("prices_include_vat", "TYPE")],
    ),
    ("lines not an array", lambda r: r.update(lines={}), [("lines", "TYPE")]),
    ("lines empty", lambda r: r.update(lines=[]), [("lines", "RANGE")]),
    ("line not an object", lambda r: r["lines"].__setitem__(0, "x"), [("lines[0]", "TYPE")]),
    ("total as string", lambda r: r.update(total="1990"), [("total", "TYPE")]),
    ("total as boolean", lambda r: r.update(total=True), [("total", "TYPE")]),
    ("total negative", lambda r: r.update(total=-1), [("total", "RANGE")]),
    ("total float", lambda r: r.update(total=1990.0), [("total", "FLOAT_NOT_ALLOWED")]),
    (
        "unit price float",
        lambda r: r["lines"][1].update(unit_price=301.0),
        [("lines[1].unit_price", "FLOAT_NOT_ALLOWED")],
    ),
    (
        "line amount float",
        lambda r: r["lines"][1].update(amount=150.5),
        [("lines[1].amount", "FLOAT_NOT_ALLOWED")],
    ),
    (
        "payment amount float",
        lambda r: r["payments"][1].update(amount=990.0),
        [("payments[1].amount", "FLOAT_NOT_ALLOWED")],
    ),
    (
        "unit price too large",
        lambda r: r["lines"][0].update(unit_price=MAX_AMOUNT_MINOR + 1),
        [("lines[0].unit_price", "RANGE")],
    ),
    (
        "payment amount zero",
        lambda r: r["payments"][0].update(amount=0),
        [("payments[0].amount", "RANGE")],
    ),
    (
        "payment method unknown",
        lambda r: r["payments"][0].update(method="BITCOIN"),
        [("payments[0].method", "NOT_ALLOWED")],
    ),
    (
        "payment method an object",
        lambda r: r["payments"][0].update(method={}),
        [("payments[0].method", "NOT_ALLOWED")],
    ),
    ("payments empty", lambda r: r.update(payments=[]), [("payments", "RANGE")]),
    (
        "total does not add up",
        lambda r: r.update(total=1991),
        [("total", "MISMATCH"), ("payments", "MISMATCH")],
    ),
    (
        "payments do not add up",
        lambda r: r["payments"][1].update(amount=989),
        [("payments", "MISMATCH")],
    ),
    (
        "line amount not qty × price",
        lambda r: r["lines"][1].update(amount=150),
        [("lines[1].amount", "MISMATCH")],
    ),
    ("qty zero", lambda r: r["lines"][0].update(qty="0"), [("lines[0].qty", "RANGE")]),
    (
        "qty zero with decimals",
        lambda r: r["lines"][0].update(qty="0.000"),
        [("lines[0].qty", "RANGE")],
    ),
    ("qty negative", lambda r: r["lines"][0].update(qty="-2"), [("lines[0].qty", "RANGE")]),
    ("qty a number", lambda r: r["lines"][0].update(qty=2), [("lines[0].qty", "TYPE")]),
    ("qty a float", lambda r: r["lines"][0].update(qty=2.0), [("lines[0].qty", "TYPE")]),
    (
        "qty with 4 decimals",
        lambda r: r["lines"][0].update(qty="2.0001"),
        [("lines[0].qty", "FORMAT")],
    ),
    (
        "qty with leading zero",
        lambda r: r["lines"][0].update(qty="02"),
        [("lines[0].qty", "FORMAT")],
    ),
    (
        "qty with trailing newline",
        lambda r: r["lines"][0].update(qty="2\n"),
        [("lines[0].qty", "FORMAT")],
    ),
    ("text empty", lambda r: r["lines"][0].update(text=""), [("lines[0].text", "RANGE")]),
    (
        "text of 201 characters",
        lambda r: r["lines"][0].update(text="x" * 201),
        [("lines[0].text", "TOO_LONG")],
    ),
    ("text not a string", lambda r: r["lines"][0].update(text=None), [("lines[0].text", "TYPE")]),
    (
        "unknown VAT rate",
        lambda r: r["lines"][2].update(vat_rate="19.60"),
        [("lines[2].vat_rate", "UNKNOWN_VAT_RATE")],
    ),
    (
        "VAT rate without decimals",
        lambda r: r["lines"][2].update(vat_rate="20"),
        [("lines[2].vat_rate", "UNKNOWN_VAT_RATE")],
    ),
    (
        "VAT rate a number",
        lambda r: r["lines"][2].update(vat_rate=20),
        [("lines[2].vat_rate", "TYPE")],
    ),
    (
        "too many lines",
        lambda r: r.update(lines=r["lines"][:1] * (MAX_LINES + 1)),
        [("lines", "TOO_MANY")],
    ),
    (
        "too many payments",
        lambda r: r.update(payments=[{"method": "CASH", "amount": 1}] * (MAX_PAYMENTS + 1)),
        [("payments", "TOO_MANY")],
    ),
    ("customer not an object", lambda r: r.update(customer="ACME"), [("customer", "TYPE")]),
    (
        "customer without name",
        lambda r: r.update(customer={"vat_id": "FR1"}),
        [("customer.name", "REQUIRED")],
    ),
    (
        "customer unknown field",
        lambda r: r.update(customer={"name": "A", "iban": "x"}),
        [("customer.iban", "UNKNOWN_FIELD")],
    ),
    (
        "customer country lowercase",
        lambda r: r.update(customer={"name": "A", "country": "fr"}),
        [("customer.country", "FORMAT")],
    ),
    (
        "customer name too long",
        lambda r: r.update(customer={"name": "n" * 201}),
        [("customer.name", "TOO_LONG")],
    ),
]


@pytest.mark.parametrize(
    ("change", "expected"),
    [pytest.param(change, expected, id=name) for name, change, expected in BAD_CASES],
)
def test_validate_sale_bad_input_refused_with_field_and_code(
    change: Callable[[dict[str, Any]], None], expected: list[tuple[str, str]]
) -> None:
    assert problems(with_change(change)) == expected


@pytest.mark.parametrize(
    "char",
    [
        "\x00",
        "\x1b",
        "\x7f",
        "\x85",
        "\ud800",
        "\udfff",
        "\ufffe",
        "\uffff",
        "\ufdd0",
        "\ufdef",
        "\U0001fffe",
        "\U0010ffff",
    ],
    ids=lambda c: f"U+{ord(c):04X}",
)
def test_validate_sale_forbidden_character_in_text_refused(char: str) -> None:
    req = sale()
    req["lines"][1]["text"] = f"Pain{char}"
    req["customer"] = {"name": f"{char}ACME"}
    assert problems(req) == [("lines[1].text", "FORMAT"), ("customer.name", "FORMAT")]


@pytest.mark.parametrize("value", [None, [], "sign", 1, 1.5, True])
def test_validate_sale_not_an_object_refused_at_root(value: Any) -> None:
    assert problems(value) == [("$", "TYPE")]


def test_validate_sale_empty_object_lists_every_required_field() -> None:
    assert problems({}) == [
        (f, "REQUIRED")
        for f in ("currency", "id", "lines", "op", "payments", "till", "total", "type")
    ]


def test_validate_sale_many_problems_all_listed() -> None:
    req = sale(id="", till="", currency="euro", colour="red", total=19.9, type="INVOICE")
    req["lines"][0].update(qty="0", unit_price=1.2)
    req["lines"][1].update(amount=150, text="\x00")
    req["lines"][2].update(vat_rate="19.60", extra=True)
    req["payments"][1].update(method="GOLD", amount=-1)
    assert sorted(problems(req)) == sorted(
        [
            ("colour", "UNKNOWN_FIELD"),
            ("id", "FORMAT"),
            ("till", "FORMAT"),
            ("currency", "FORMAT"),
            ("lines[0].qty", "RANGE"),
            ("lines[0].unit_price", "FLOAT_NOT_ALLOWED"),
            ("lines[1].text", "FORMAT"),
            ("lines[1].amount", "MISMATCH"),
            ("lines[2].extra", "UNKNOWN_FIELD"),
            ("lines[2].vat_rate", "UNKNOWN_VAT_RATE"),
            ("payments[1].method", "NOT_ALLOWED"),
            ("payments[1].amount", "RANGE"),
            ("total", "FLOAT_NOT_ALLOWED"),
            ("customer", "REQUIRED"),
        ]
    )


def test_validate_sale_bad_line_and_payments_mismatch_both_listed() -> None:
    req = sale()
    req["lines"][0]["vat_rate"] = "7.00"
    req["payments"][0]["amount"] = 1
    assert problems(req) == [("lines[0].vat_rate", "UNKNOWN_VAT_RATE"), ("payments", "MISMATCH")]


def test_validation_error_to_json_has_code_message_and_details() -> None:
    with pytest.raises(ValidationError) as info:
        validate_sale(sale(total=1.5, colour="red"))
    out = info.value.to_json()
    assert out["code"] == "VALIDATION_ERROR"
    assert out["message"].startswith("invalid sign request: 2 problems")
    assert {d["field"] for d in out["details"]} == {"colour", "total"}
    assert all(set(d) == {"field", "message", "code"} for d in out["details"])


# ---------------------------------------------------------------------- properties


def _has_float(value: Any) -> bool:
    return any(isinstance(v, float) for v in walk(value))


@PROPERTY
@given(sale_requests())
def test_validate_sale_any_valid_request_payload_has_no_float_and_adds_up(
    req: dict[str, Any],
) -> None:
    s = validate_sale(req)
    payload = s.payload()
    assert not _has_float(payload)
    canonical_bytes(payload)  # in the canonical domain
    assert sum(v.gross for v in s.vat) == s.total == sum(p.amount for p in s.payments)
    assert all(v.net + v.vat == v.gross for v in s.vat)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    out = copy.copy(value)
    out[path[0]] = _replace(value[path[0]], path[1:], new)
    return out


def _field_path(path: tuple[Any, ...]) -> str:
    text = ""
    for p in path:
        text += f"[{p}]" if isinstance(p, int) else (f".{p}" if text else p)
    return text


MONEY_FIELDS = {"total", "unit_price", "amount"}


@PROPERTY
@given(sale_requests(), st.data())
def test_validate_sale_money_as_float_refused_float_not_allowed(
    req: dict[str, Any], data: st.DataObject
) -> None:
    money = [p for p in _paths(req) if p and p[-1] in MONEY_FIELDS]
    path = data.draw(st.sampled_from(money))
    bad = _replace(req, path, float(_get(req, path)))
    assert (_field_path(path), "FLOAT_NOT_ALLOWED") in problems(bad)


def _get(value: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        value = value[p]
    return value


@settings(max_examples=300, deadline=None)
@given(sale_requests(max_lines=3), st.data())
def test_validate_sale_any_mutation_refused_cleanly_or_payload_float_free(
    req: dict[str, Any], data: st.DataObject
) -> None:
    path = data.draw(st.sampled_from(_paths(req)))
    mutated = _replace(req, path, data.draw(any_json))
    try:
        s = validate_sale(mutated)
    except ValidationError as err:
        assert err.details
        assert all(isinstance(d.field, str) and d.code for d in err.details)
        return
    assert isinstance(s, SaleRequest)
    assert not _has_float(s.payload())
    canonical_bytes(s.payload())
