"""Money and VAT arithmetic in integer minor units.

Amounts are ``int`` minor units (cents). Quantities and VAT rates are decimal *strings* so
that a record never carries a binary float; arithmetic uses :class:`decimal.Decimal`.

Rounding rule (documented in docs/record-format.md): commercial rounding, half away from
zero (``ROUND_HALF_UP`` on magnitudes), applied
- to each line: ``amount = round(qty × unit_price)``;
- to each VAT rate once, on the sum of that rate's lines (not line by line):
  prices incl. VAT: ``vat = round(gross × rate / (100 + rate))``, ``net = gross − vat``;
  prices excl. VAT: ``vat = round(net × rate / 100)``, ``gross = net + vat``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

QTY_RE = re.compile(r"^-?(0|[1-9][0-9]{0,6})(\.[0-9]{1,3})?$")
RATE_RE = re.compile(r"^(0|[1-9][0-9]?)\.[0-9]{2}$")

#: Largest absolute amount accepted anywhere (10^13 minor units = 100 billion in cents).
MAX_AMOUNT_MINOR = 10**13

#: Default VAT rates (France, as served by fiskaly SIGN FR). Configurable per gateway.
DEFAULT_VAT_RATES: tuple[str, ...] = ("20.00", "10.00", "5.50", "2.10", "0.00")


def round_half_up(value: Decimal) -> int:
    """Round to an integer, halves away from zero."""
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def line_amount(qty: str, unit_price_minor: int) -> int:
    """The amount of a line in minor units: ``round(qty × unit_price)``."""
    return round_half_up(Decimal(qty) * unit_price_minor)


@dataclass(frozen=True, slots=True)
class VatLine:
    """One rate of a VAT breakdown; all amounts in minor units, signed."""

    rate: str
    net: int
    vat: int
    gross: int

    def to_json(self) -> dict[str, int | str]:
        return {"rate": self.rate, "net": self.net, "vat": self.vat, "gross": self.gross}


def vat_breakdown(
    amounts_by_rate: Mapping[str, int], *, prices_include_vat: bool
) -> tuple[VatLine, ...]:
    """VAT per rate from the summed line amounts of each rate, sorted by rate (high first)."""
    out = []
    for rate, amount in amounts_by_rate.items():
        r = Decimal(rate)
        if prices_include_vat:
            vat = round_half_up(Decimal(amount) * r / (100 + r))
            out.append(VatLine(rate, amount - vat, vat, amount))
        else:
            vat = round_half_up(Decimal(amount) * r / 100)
            out.append(VatLine(rate, amount, vat, amount + vat))
    out.sort(key=lambda v: Decimal(v.rate), reverse=True)
    return tuple(out)


def sum_by_rate(pairs: Iterable[tuple[str, int]]) -> dict[str, int]:
    acc: dict[str, int] = {}
    for rate, amount in pairs:
        acc[rate] = acc.get(rate, 0) + amount
    return acc
