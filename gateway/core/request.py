"""Validation of untrusted requests into frozen, typed values.

Each ``validate_*`` function takes the decoded JSON of one request (``unverified``) and
either returns a frozen request value or raises :class:`ValidationError` whose ``details``
list *every* problem found, each with its field path (``lines[2].amount``) and a stable code.
Nothing here touches the ledger: a request that fails validation changes nothing.

Detail codes: ``REQUIRED``, ``UNKNOWN_FIELD``, ``TYPE``, ``FLOAT_NOT_ALLOWED``, ``FORMAT``,
``RANGE``, ``TOO_LONG``, ``TOO_MANY``, ``MISMATCH``, ``UNKNOWN_VAT_RATE``, ``NOT_ALLOWED``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway.core.canonical import CanonicalError, canonical_bytes
from gateway.core.errors import Detail, ValidationError
from gateway.core.money import (
    DEFAULT_VAT_RATES,
    MAX_AMOUNT_MINOR,
    QTY_RE,
    VatLine,
    line_amount,
    sum_by_rate,
    vat_breakdown,
)

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")
TILL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")
CURRENCY_RE = re.compile(r"^[A-Z]{3}$")
COUNTRY_RE = re.compile(r"^[A-Z]{2}$")

MAX_TEXT_CHARS = 200
MAX_LINES = 1000
MAX_PAYMENTS = 20

PAYMENT_METHODS = frozenset(
    {"CASH", "CARD", "CHEQUE", "VOUCHER", "TRANSFER", "MOBILE", "CREDIT", "OTHER"}
)
SALE_TYPES = {"RECEIPT": "TRANSACTION::RECEIPT", "INVOICE": "TRANSACTION::INVOICE"}

_CUSTOMER_FIELDS = {
    "name": 200,
    "vat_id": 32,
    "address": 400,
    "country": 2,
    "endpoint_id": 128,
    "email": 254,
}


@dataclass(frozen=True, slots=True)
class Rules:
    """What a gateway accepts (from configuration)."""

    vat_rates: tuple[str, ...] = DEFAULT_VAT_RATES
    currencies: tuple[str, ...] = ()  # empty: any ISO 4217-shaped code


@dataclass(frozen=True, slots=True)
class Line:
    text: str
    qty: str
    unit_price: int
    vat_rate: str
    amount: int

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "qty": self.qty,
            "unit_price": self.unit_price,
            "vat_rate": self.vat_rate,
            "amount": self.amount,
        }


@dataclass(frozen=True, slots=True)
class Payment:
    method: str
    amount: int

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "amount": self.amount}


@dataclass(frozen=True, slots=True)
class SaleRequest:
    """A validated ``sign`` request (a receipt or an invoice)."""

    request_id: str
    till: str
    record_type: str
    currency: str
    lines: tuple[Line, ...]
    payments: tuple[Payment, ...]
    total: int
    vat: tuple[VatLine, ...]
    prices_include_vat: bool
    customer: Mapping[str, str] | None = field(default=None)

    def payload(self) -> dict[str, Any]:
        """The record payload of this sale."""
        out: dict[str, Any] = {
            "currency": self.currency,
            "lines": [ln.to_json() for ln in self.lines],
            "prices_include_vat": self.prices_include_vat,
            "vat": [v.to_json() for v in self.vat],
            "total": self.total,
            "payments": [p.to_json() for p in self.payments],
        }
        if self.customer is not None:
            out["customer"] = dict(self.customer)
        return out


def request_fingerprint(validated_request: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical bytes of a request, for idempotency comparison."""
    return hashlib.sha256(canonical_bytes(dict(validated_request))).hexdigest()


class Checker:
    """Collects :class:`Detail` items while walking a request."""

    def __init__(self) -> None:
        self.details: list[Detail] = []

    def add(self, path: str, message: str, code: str) -> None:
        self.details.append(Detail(path, message, code))

    def raise_if_any(self, what: str) -> None:
        if self.details:
            n = len(self.details)
            raise ValidationError(
                f"{what}: {n} problem{'s' if n > 1 else ''}; first: "
                f"{self.details[0].field}: {self.details[0].message}",
                self.details,
            )

    def obj(
        self, value: Any, path: str, required: set[str], optional: set[str]
    ) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.add(path or "$", f"must be an object, not {_json_type(value)}", "TYPE")
            return None
        for key in sorted(required - value.keys()):
            self.add(_join(path, key), "is required", "REQUIRED")
        for key in sorted(value.keys() - required - optional):
            self.add(_join(path, str(key)), "is not a known field", "UNKNOWN_FIELD")
        return value

    def string(
        self,
        value: Any,
        path: str,
        *,
        max_chars: int = MAX_TEXT_CHARS,
        pattern: re.Pattern[str] | None = None,
        what: str = "",
    ) -> str | None:
        if not isinstance(value, str):
            self.add(path, f"must be a string, not {_json_type(value)}", "TYPE")
            return None
        # fullmatch: a pattern's "$" alone also matches before a trailing newline
        if pattern is not None and not pattern.fullmatch(value):
            self.add(path, f"must match {what or pattern.pattern}", "FORMAT")
            return None
        if not value:
            self.add(path, "must not be empty", "RANGE")
            return None
        if len(value) > max_chars:
            self.add(path, f"is {len(value)} characters; at most {max_chars}", "TOO_LONG")
            return None
        bad = _bad_char(value)
        if bad is not None:
            self.add(path, f"holds a forbidden character U+{ord(bad):04X}", "FORMAT")
            return None
        return value

    def integer(self, value: Any, path: str, *, lo: int, hi: int) -> int | None:
        if isinstance(value, float):
            self.add(
                path, "money and counts are integers (minor units), not floats", "FLOAT_NOT_ALLOWED"
            )
            return None
        if type(value) is not int:
            self.add(path, f"must be an integer, not {_json_type(value)}", "TYPE")
            return None
        if not lo <= value <= hi:
            self.add(path, f"must be between {lo} and {hi}", "RANGE")
            return None
        return value

    def array(self, value: Any, path: str, *, lo: int, hi: int) -> list[Any] | None:
        if not isinstance(value, list):
            self.add(path, f"must be an array, not {_json_type(value)}", "TYPE")
            return None
        if len(value) < lo:
            self.add(path, f"must hold at least {lo} item{'s' if lo > 1 else ''}", "RANGE")
            return None
        if len(value) > hi:
            self.add(path, f"holds {len(value)} items; at most {hi}", "TOO_MANY")
            return None
        return value


def validate_envelope(unverified: Any, checker: Checker) -> tuple[str | None, str | None]:
    """Check ``id`` and ``till`` of any request; return them (None when invalid)."""
    if not isinstance(unverified, dict):
        return None, None
    rid = (
        checker.string(
            unverified.get("id"),
            "id",
            max_chars=64,
            pattern=REQUEST_ID_RE,
            what="1-64 characters of A-Z a-z 0-9 . _ : @ -",
        )
        if "id" in unverified
        else None
    )
    till = (
        checker.string(
            unverified.get("till"),
            "till",
            max_chars=32,
            pattern=TILL_RE,
            what="1-32 characters of A-Z a-z 0-9 . _ - (starting alphanumeric)",
        )
        if "till" in unverified
        else None
    )
    return rid, till


def validate_sale(unverified: Any, rules: Rules = Rules()) -> SaleRequest:
    """Validate a ``sign`` request; raise ValidationError listing every problem."""
    c = Checker()
    req = c.obj(
        unverified,
        "",
        {"id", "op", "till", "type", "currency", "lines", "payments", "total"},
        {"customer", "prices_include_vat"},
    )
    if req is None:
        c.raise_if_any("invalid sign request")
        raise AssertionError("unreachable")
    rid, till = validate_envelope(req, c)
    if "op" in req and req["op"] != "sign":
        c.add("op", "must be 'sign'", "NOT_ALLOWED")
    rtype = None
    if "type" in req:
        # isinstance first: an unhashable value (list, object) must not reach the lookup
        if isinstance(req["type"], str) and req["type"] in SALE_TYPES:
            rtype = SALE_TYPES[req["type"]]
        else:
            c.add("type", "must be 'RECEIPT' or 'INVOICE'", "NOT_ALLOWED")
    currency = None
    if "currency" in req:
        currency = c.string(
            req["currency"],
            "currency",
            max_chars=3,
            pattern=CURRENCY_RE,
            what="an ISO 4217 code (3 capital letters)",
        )
        if currency is not None and rules.currencies and currency not in rules.currencies:
            c.add("currency", f"must be one of {', '.join(rules.currencies)}", "NOT_ALLOWED")
            currency = None
    incl = True
    if "prices_include_vat" in req:
        if type(req["prices_include_vat"]) is not bool:
            c.add("prices_include_vat", "must be true or false", "TYPE")
        else:
            incl = req["prices_include_vat"]

    lines = _lines(c, req.get("lines"), rules) if "lines" in req else None
    payments = _payments(c, req.get("payments")) if "payments" in req else None
    total = c.integer(req["total"], "total", lo=0, hi=MAX_AMOUNT_MINOR) if "total" in req else None
    customer = _customer(c, req.get("customer")) if "customer" in req else None
    if rtype == "TRANSACTION::INVOICE" and customer is None and "customer" not in req:
        c.add("customer", "an invoice needs a customer", "REQUIRED")

    vat: tuple[VatLine, ...] = ()
    if lines is not None:
        vat = vat_breakdown(
            sum_by_rate((ln.vat_rate, ln.amount) for ln in lines), prices_include_vat=incl
        )
        gross = sum(v.gross for v in vat)
        if total is not None and gross != total:
            c.add("total", f"is {total} but the lines add up to {gross} (VAT included)", "MISMATCH")
    # Checked even when the lines are invalid, so that every problem is listed at once.
    if payments is not None and total is not None:
        paid = sum(p.amount for p in payments)
        if paid != total:
            c.add("payments", f"add up to {paid} but the total is {total}", "MISMATCH")
    c.raise_if_any("invalid sign request")
    assert rid is not None and till is not None and rtype is not None
    assert currency is not None and lines is not None and payments is not None
    assert total is not None
    return SaleRequest(rid, till, rtype, currency, lines, payments, total, vat, incl, customer)


def _lines(c: Checker, value: Any, rules: Rules) -> tuple[Line, ...] | None:
    items = c.array(value, "lines", lo=1, hi=MAX_LINES)
    if items is None:
        return None
    n_before = len(c.details)
    out = []
    for i, item in enumerate(items):
        p = f"lines[{i}]"
        obj = c.obj(item, p, {"text", "qty", "unit_price", "vat_rate", "amount"}, set())
        if obj is None:
            continue
        text = c.string(obj.get("text"), f"{p}.text") if "text" in obj else None
        qty = None
        if "qty" in obj:
            if isinstance(obj["qty"], int | float) and not isinstance(obj["qty"], bool):
                c.add(f"{p}.qty", 'must be a decimal string such as "1" or "0.250"', "TYPE")
            else:
                qty = c.string(
                    obj["qty"],
                    f"{p}.qty",
                    max_chars=12,
                    pattern=QTY_RE,
                    what="a decimal string with up to 3 decimals",
                )
            if qty is not None and (qty.startswith("-") or set(qty) <= {"0", "."}):
                c.add(f"{p}.qty", "must be greater than zero", "RANGE")
                qty = None
        price = (
            c.integer(
                obj["unit_price"], f"{p}.unit_price", lo=-MAX_AMOUNT_MINOR, hi=MAX_AMOUNT_MINOR
            )
            if "unit_price" in obj
            else None
        )
        rate = None
        if "vat_rate" in obj:
            raw_rate = obj["vat_rate"]
            if not isinstance(raw_rate, str):
                c.add(f"{p}.vat_rate", 'must be a decimal string such as "20.00"', "TYPE")
            elif raw_rate not in rules.vat_rates:
                c.add(
                    f"{p}.vat_rate",
                    f"unknown VAT rate {raw_rate[:16]!r}; allowed: {', '.join(rules.vat_rates)}",
                    "UNKNOWN_VAT_RATE",
                )
            else:
                rate = raw_rate
        amount = (
            c.integer(obj["amount"], f"{p}.amount", lo=-MAX_AMOUNT_MINOR, hi=MAX_AMOUNT_MINOR)
            if "amount" in obj
            else None
        )
        if qty is not None and price is not None and amount is not None:
            expected = line_amount(qty, price)
            if expected != amount:
                c.add(f"{p}.amount", f"is {amount} but qty × unit_price = {expected}", "MISMATCH")
                continue
        if None not in (text, qty, price, rate, amount):
            out.append(Line(text, qty, price, rate, amount))  # type: ignore[arg-type]
    if len(c.details) != n_before:
        return None
    return tuple(out)


def _payments(c: Checker, value: Any) -> tuple[Payment, ...] | None:
    items = c.array(value, "payments", lo=1, hi=MAX_PAYMENTS)
    if items is None:
        return None
    n_before = len(c.details)
    out = []
    for i, item in enumerate(items):
        p = f"payments[{i}]"
        obj = c.obj(item, p, {"method", "amount"}, set())
        if obj is None:
            continue
        method = None
        if "method" in obj:
            if isinstance(obj["method"], str) and obj["method"] in PAYMENT_METHODS:
                method = obj["method"]
            else:
                c.add(
                    f"{p}.method",
                    f"must be one of {', '.join(sorted(PAYMENT_METHODS))}",
                    "NOT_ALLOWED",
                )
        amount = (
            c.integer(obj["amount"], f"{p}.amount", lo=1, hi=MAX_AMOUNT_MINOR)
            if "amount" in obj
            else None
        )
        if method is not None and amount is not None:
            out.append(Payment(method, amount))
    if len(c.details) != n_before:
        return None
    return tuple(out)


def _customer(c: Checker, value: Any) -> dict[str, str] | None:
    obj = c.obj(value, "customer", {"name"}, set(_CUSTOMER_FIELDS) - {"name"})
    if obj is None:
        return None
    n_before = len(c.details)
    out: dict[str, str] = {}
    for key, max_chars in _CUSTOMER_FIELDS.items():
        if key in obj:
            pattern = COUNTRY_RE if key == "country" else None
            s = c.string(
                obj[key],
                f"customer.{key}",
                max_chars=max_chars,
                pattern=pattern,
                what="an ISO 3166 alpha-2 code",
            )
            if s is not None:
                out[key] = s
    return out if len(c.details) == n_before else None


def _bad_char(s: str) -> str | None:
    """First control, surrogate or non-character code point in ``s``, if any."""
    if s.isascii() and s.isprintable():
        return None
    for ch in s:
        cat = unicodedata.category(ch)
        o = ord(ch)
        if cat in ("Cc", "Cs") or (0xFDD0 <= o <= 0xFDEF) or (o & 0xFFFE) == 0xFFFE:
            return ch
    return None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


__all__ = [
    "CanonicalError",
    "Checker",
    "Line",
    "Payment",
    "Rules",
    "SaleRequest",
    "Sequence",
    "request_fingerprint",
    "validate_envelope",
    "validate_sale",
]
