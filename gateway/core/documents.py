"""Documents that refer to other records: cancellations, corrections and duplicates.

Pure functions from the *original* record (already stored and trusted) and a validated
request to the new record's payload.

- The *effective content* of a sale-like record is what it currently contributes:
  a receipt or invoice its own ``vat``/``total``/``payments``; a correction its
  ``corrected`` content.
- A **cancellation** negates the effective content of its target (totals go back).
- A **correction** replaces the effective content of its target: its ``vat`` is the
  per-rate difference ``corrected − effective(original)``, so perpetual totals equal the
  corrected sale.
- A **duplicate** (reprint) copies nothing into the totals; it names the original and
  carries its copy number.

A target can be cancelled or corrected once: the writer enforces it with a *claim* key
(:func:`claim_key`), unique in the journal.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from gateway.core.errors import Conflict, NotFound

SALE_LIKE = ("TRANSACTION::RECEIPT", "TRANSACTION::INVOICE", "TRANSACTION::CORRECTION")


def claim_key(chain: str, seq: int) -> str:
    """The journal-wide unique key that a cancellation or correction of a record takes."""
    return f"supersede:{chain}:{seq}"


def reference(original: dict[str, Any], hash_hex: str) -> dict[str, Any]:
    return {
        "chain": original["chain"],
        "seq": original["seq"],
        "type": original["type"],
        "number": original["number"],
        "hash": hash_hex,
    }


def effective(original: dict[str, Any]) -> dict[str, Any]:
    """The content a sale-like record contributes now (see module docstring)."""
    p = original["payload"]
    if original["type"] == "TRANSACTION::CORRECTION":
        p = p["corrected"]
    return {
        "currency": p["currency"],
        "vat": p["vat"],
        "total": p["total"],
        "payments": p["payments"],
    }


def _negate_vat(vat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"rate": v["rate"], "net": -v["net"], "vat": -v["vat"], "gross": -v["gross"]} for v in vat
    ]


def _check_target(original: dict[str, Any] | None, what: str) -> dict[str, Any]:
    if original is None:
        raise NotFound(f"the record to {what} does not exist")
    if original["type"] not in SALE_LIKE:
        raise Conflict(
            f"a {original['type']} record cannot be {what}ed; only sales and corrections can"
        )
    return original


def cancellation_payload(
    original: dict[str, Any] | None, hash_hex: str, reason: str
) -> dict[str, Any]:
    orig = _check_target(original, "cancel")
    eff = effective(orig)
    return {
        "ref": reference(orig, hash_hex),
        "reason": reason,
        "currency": eff["currency"],
        "vat": _negate_vat(eff["vat"]),
        "total": -eff["total"],
        "payments": [{"method": p["method"], "amount": -p["amount"]} for p in eff["payments"]],
    }


def correction_payload(
    original: dict[str, Any] | None, hash_hex: str, reason: str, corrected: dict[str, Any]
) -> dict[str, Any]:
    orig = _check_target(original, "correct")
    eff = effective(orig)
    if corrected["currency"] != eff["currency"]:
        raise Conflict(f"a correction keeps the currency {eff['currency']}")
    delta: dict[str, dict[str, int]] = {}
    for sign, vat in ((-1, eff["vat"]), (1, corrected["vat"])):
        for v in vat:
            d = delta.setdefault(v["rate"], {"net": 0, "vat": 0, "gross": 0})
            for k in ("net", "vat", "gross"):
                d[k] += sign * v[k]
    vat_delta = [
        {"rate": rate, **d}
        for rate, d in sorted(delta.items(), key=lambda kv: Decimal(kv[0]), reverse=True)
        if any(d.values())
    ]
    return {
        "ref": reference(orig, hash_hex),
        "reason": reason,
        "currency": eff["currency"],
        "corrected": corrected,
        "vat": vat_delta,
        "total": corrected["total"] - eff["total"],
    }


def duplicate_payload(
    original: dict[str, Any] | None, hash_hex: str, copy: int, reason: str
) -> dict[str, Any]:
    if original is None:
        raise NotFound("the record to reprint does not exist")
    return {"ref": reference(original, hash_hex), "copy": copy, "reason": reason}
