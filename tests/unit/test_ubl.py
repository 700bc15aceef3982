"""The UBL 2.1 / Peppol BIS 3.0 rendering of an invoice record (gateway.core.ubl)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from decimal import Decimal
from typing import Any

import pytest

from gateway.core.request import validate_sale
from gateway.core.ubl import (
    CUSTOMIZATION_ID,
    NS,
    PROFILE_ID,
    NotAnInvoice,
    Party,
    line_nets,
    missing_elements,
    render_invoice,
)

SELLER = Party("Vendeur & Fils", "0009:12345678900011", "FR", "FR12345678901", "1 rue")


def payload(incl: bool = True, **customer: str) -> dict[str, Any]:
    cust = {"name": "Client <SA>", "country": "BE", "endpoint_id": "0208:0123456789"}
    cust.update(customer)
    req = {
        "id": "r1",
        "op": "sign",
        "till": "till-1",
        "type": "INVOICE",
        "currency": "EUR",
        "prices_include_vat": incl,
        "lines": [
            {"text": "A & B", "qty": "3", "unit_price": 333, "vat_rate": "20.00", "amount": 999},
            {"text": "C", "qty": "1", "unit_price": 130, "vat_rate": "5.50", "amount": 130},
            {"text": "D", "qty": "2", "unit_price": 251, "vat_rate": "20.00", "amount": 502},
        ],
        "customer": cust,
    }
    sale = validate_sale(_with_total(req, incl))
    return sale.payload()


def _with_total(req: dict[str, Any], incl: bool) -> dict[str, Any]:
    from gateway.core.money import sum_by_rate, vat_breakdown

    vat = vat_breakdown(
        sum_by_rate((ln["vat_rate"], ln["amount"]) for ln in req["lines"]), prices_include_vat=incl
    )
    total = sum(v.gross for v in vat)
    return {**req, "total": total, "payments": [{"method": "TRANSFER", "amount": total}]}


def render(p: dict[str, Any]) -> bytes:
    return render_invoice(
        chain="till-1",
        number=7,
        time="2026-03-08T10:11:12.123Z",
        request_id="r1",
        payload=p,
        seller=SELLER,
    )


@pytest.mark.parametrize("incl", [True, False])
def test_render_invoice_every_mandatory_element_totals_match(incl: bool) -> None:
    p = payload(incl)
    xml = render(p)
    assert missing_elements(xml) == []
    root = ET.fromstring(xml)
    assert root.findtext("cbc:CustomizationID", namespaces=NS) == CUSTOMIZATION_ID
    assert root.findtext("cbc:ProfileID", namespaces=NS) == PROFILE_ID
    assert root.findtext("cbc:ID", namespaces=NS) == "till-1-7"
    assert root.findtext("cbc:IssueDate", namespaces=NS) == "2026-03-08"
    total = Decimal(root.findtext("cac:LegalMonetaryTotal/cbc:PayableAmount", namespaces=NS) or "")
    assert total == Decimal(p["total"]) / 100
    lines = root.findall("cac:InvoiceLine", NS)
    line_sum = sum(
        Decimal(ln.findtext("cbc:LineExtensionAmount", namespaces=NS) or "") for ln in lines
    )
    assert line_sum * 100 == sum(v["net"] for v in p["vat"])
    ep = root.find("cac:AccountingCustomerParty/cac:Party/cbc:EndpointID", NS)
    assert ep is not None and ep.get("schemeID") == "0208" and ep.text == "0123456789"


def test_render_invoice_special_characters_escaped_by_library() -> None:
    xml = render(payload())
    assert b"Client &lt;SA&gt;" in xml and b"A &amp; B" in xml
    assert ET.fromstring(xml) is not None


def test_render_invoice_no_endpoint_refused() -> None:
    p = payload()
    del p["customer"]["endpoint_id"]
    with pytest.raises(NotAnInvoice, match="endpoint_id"):
        render(p)


def test_render_invoice_endpoint_without_scheme_refused() -> None:
    with pytest.raises(NotAnInvoice, match="scheme"):
        render(payload(endpoint_id="0123456789"))


def test_line_nets_incl_vat_add_up_to_rate_net() -> None:
    p = payload(True)
    nets = line_nets(p["lines"], p["vat"], True)
    for v in p["vat"]:
        assert (
            sum(n for n, ln in zip(nets, p["lines"], strict=True) if ln["vat_rate"] == v["rate"])
            == v["net"]
        )


def test_missing_elements_incomplete_document_listed() -> None:
    root = ET.fromstring(render(payload()))
    for el in root.findall("cbc:InvoiceTypeCode", NS):
        root.remove(el)
    assert missing_elements(ET.tostring(root)) == ["cbc:InvoiceTypeCode"]
