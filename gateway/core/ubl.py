"""A signed invoice record as a UBL 2.1 invoice with the Peppol BIS Billing 3.0 mandatory
elements (docs/sync.md, "peppol/goroute").

Built with :mod:`xml.etree.ElementTree` (never by string concatenation), so every text and
attribute is escaped by the library. Elements, in the order UBL's schema wants them:
``CustomizationID``, ``ProfileID``, ``ID`` (``<chain>-<number>``), ``IssueDate`` (the
record's date, UTC), ``InvoiceTypeCode`` 380, ``DocumentCurrencyCode``, ``BuyerReference``
(the till's request id: PEPPOL-EN16931-R003 wants a buyer or order reference), the seller
and buyer parties (``EndpointID`` with its ``schemeID``, postal address with country, VAT
number, legal name), one ``TaxTotal`` with one ``TaxSubtotal`` per rate, the
``LegalMonetaryTotal`` and one ``InvoiceLine`` per record line.

Amounts: the record keeps minor units (2 decimals assumed: the currencies we serve). The
record's VAT breakdown is the source of every total, so the invoice's totals are the signed
record's: ``TaxableAmount``/``TaxAmount`` per rate = the record's ``net``/``vat``;
``LineExtensionAmount`` = ``TaxExclusiveAmount`` = Σ net; ``TaxInclusiveAmount`` =
``PayableAmount`` = Σ gross = the record's ``total``. When prices include VAT, a line's net
amount is its share of its rate's net (largest remainder to the rate's last line), so the
lines add up to the rate's net exactly (BR-CO-10).

Pure: what this module does not do is send, validate against the full Peppol schematron, or
decide which records are invoices worth sending (drivers/cloud/goroute.py).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

UBL_NS = "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"
CAC_NS = "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
CBC_NS = "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2"
CUSTOMIZATION_ID = "urn:cen.eu:en16931:2017#compliant#urn:fdc:peppol.eu:2017:poacc:billing:3.0"
PROFILE_ID = "urn:fdc:peppol.eu:2017:poacc:billing:01:1.0"
INVOICE_TYPE_CODE = "380"
UNIT_CODE = "C62"  # "one" (UN/ECE rec 20)

ET.register_namespace("", UBL_NS)
ET.register_namespace("cac", CAC_NS)
ET.register_namespace("cbc", CBC_NS)

#: Every element a produced invoice must carry (paths relative to the root), for the tests
#: and for a last check before a document leaves.
MANDATORY_PATHS = (
    "cbc:CustomizationID",
    "cbc:ProfileID",
    "cbc:ID",
    "cbc:IssueDate",
    "cbc:InvoiceTypeCode",
    "cbc:DocumentCurrencyCode",
    "cbc:BuyerReference",
    "cac:AccountingSupplierParty/cac:Party/cbc:EndpointID",
    "cac:AccountingSupplierParty/cac:Party/cac:PostalAddress/cac:Country/cbc:IdentificationCode",
    "cac:AccountingSupplierParty/cac:Party/cac:PartyLegalEntity/cbc:RegistrationName",
    "cac:AccountingCustomerParty/cac:Party/cbc:EndpointID",
    "cac:AccountingCustomerParty/cac:Party/cac:PostalAddress/cac:Country/cbc:IdentificationCode",
    "cac:AccountingCustomerParty/cac:Party/cac:PartyLegalEntity/cbc:RegistrationName",
    "cac:TaxTotal/cbc:TaxAmount",
    "cac:TaxTotal/cac:TaxSubtotal",
    "cac:LegalMonetaryTotal/cbc:LineExtensionAmount",
    "cac:LegalMonetaryTotal/cbc:TaxExclusiveAmount",
    "cac:LegalMonetaryTotal/cbc:TaxInclusiveAmount",
    "cac:LegalMonetaryTotal/cbc:PayableAmount",
    "cac:InvoiceLine",
)
NS = {"cac": CAC_NS, "cbc": CBC_NS, "": UBL_NS}


class NotAnInvoice(ValueError):
    """The record cannot be a Peppol invoice (no buyer endpoint, wrong type, ...)."""


@dataclass(frozen=True, slots=True)
class Party:
    """A seller or buyer: ``endpoint_id`` as ``scheme:value`` (e.g. ``0208:0123456789``)."""

    name: str
    endpoint_id: str
    country: str
    vat_id: str = ""
    address: str = ""

    def scheme_and_value(self) -> tuple[str, str]:
        scheme, sep, value = self.endpoint_id.partition(":")
        if not sep or not scheme or not value:
            raise NotAnInvoice(
                f"endpoint id {self.endpoint_id!r} is not <scheme>:<value> (e.g. 0208:0123456789)"
            )
        return scheme, value


def amount_text(minor: int) -> str:
    """Minor units as a 2-decimal string (``-1234`` → ``-12.34``)."""
    return str((Decimal(minor) / 100).quantize(Decimal("0.01")))


def tax_category(rate: str) -> str:
    """UNCL5305: S (standard) for a positive rate, Z (zero rated) for 0."""
    return "S" if Decimal(rate) > 0 else "Z"


def buyer_of(payload: Mapping[str, Any]) -> Party:
    c = payload.get("customer")
    if not isinstance(c, Mapping):
        raise NotAnInvoice("the invoice has no customer")
    if not c.get("endpoint_id"):
        raise NotAnInvoice("customer.endpoint_id is missing (Peppol needs the buyer's endpoint)")
    if not c.get("country"):
        raise NotAnInvoice("customer.country is missing (BT-55)")
    return Party(
        name=str(c["name"]),
        endpoint_id=str(c["endpoint_id"]),
        country=str(c["country"]),
        vat_id=str(c.get("vat_id", "")),
        address=str(c.get("address", "")),
    )


def line_nets(
    lines: list[Mapping[str, Any]], vat: list[Mapping[str, Any]], incl: bool
) -> list[int]:
    """Each line's net amount; per rate they add up to the breakdown's ``net``."""
    if not incl:
        return [int(ln["amount"]) for ln in lines]
    net_by_rate = {str(v["rate"]): int(v["net"]) for v in vat}
    gross_by_rate = {str(v["rate"]): int(v["gross"]) for v in vat}
    last = {str(ln["vat_rate"]): i for i, ln in enumerate(lines)}
    out = [0] * len(lines)
    given: dict[str, int] = {}
    for i, ln in enumerate(lines):
        rate = str(ln["vat_rate"])
        if i == last[rate]:
            out[i] = net_by_rate[rate] - given.get(rate, 0)
        else:
            gross = gross_by_rate[rate]
            share = int(ln["amount"]) * net_by_rate[rate] // gross if gross else 0
            out[i] = share
        given[rate] = given.get(rate, 0) + out[i]
    return out


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str) -> ET.Element:
    prefix, _, local = tag.partition(":")
    ns = CBC_NS if prefix == "cbc" else CAC_NS
    el = ET.SubElement(parent, f"{{{ns}}}{local}", attrs)
    if text is not None:
        el.text = text
    return el


def _party(parent: ET.Element, role: str, p: Party) -> None:
    party = _sub(_sub(parent, role), "cac:Party")
    scheme, value = p.scheme_and_value()
    _sub(party, "cbc:EndpointID", value, schemeID=scheme)
    addr = _sub(party, "cac:PostalAddress")
    if p.address:
        _sub(addr, "cbc:StreetName", p.address)
    _sub(_sub(addr, "cac:Country"), "cbc:IdentificationCode", p.country)
    if p.vat_id:
        pts = _sub(party, "cac:PartyTaxScheme")
        _sub(pts, "cbc:CompanyID", p.vat_id)
        _sub(_sub(pts, "cac:TaxScheme"), "cbc:ID", "VAT")
    _sub(_sub(party, "cac:PartyLegalEntity"), "cbc:RegistrationName", p.name)


def invoice_id(chain: str, number: int) -> str:
    return f"{chain}-{number}"


def render_invoice(
    *,
    chain: str,
    number: int,
    time: str,
    request_id: str,
    payload: Mapping[str, Any],
    seller: Party,
) -> bytes:
    """The UBL invoice of one signed ``TRANSACTION::INVOICE`` record (UTF-8 bytes)."""
    buyer = buyer_of(payload)
    cur = str(payload["currency"])
    lines = list(payload["lines"])
    vat = list(payload["vat"])
    if not lines:
        raise NotAnInvoice("the invoice has no lines")
    root = ET.Element(f"{{{UBL_NS}}}Invoice")
    _sub(root, "cbc:CustomizationID", CUSTOMIZATION_ID)
    _sub(root, "cbc:ProfileID", PROFILE_ID)
    _sub(root, "cbc:ID", invoice_id(chain, number))
    _sub(root, "cbc:IssueDate", time[:10])
    _sub(root, "cbc:InvoiceTypeCode", INVOICE_TYPE_CODE)
    _sub(root, "cbc:DocumentCurrencyCode", cur)
    _sub(root, "cbc:BuyerReference", request_id)
    _party(root, "cac:AccountingSupplierParty", seller)
    _party(root, "cac:AccountingCustomerParty", buyer)
    tax_total = _sub(root, "cac:TaxTotal")
    _sub(tax_total, "cbc:TaxAmount", amount_text(sum(int(v["vat"]) for v in vat)), currencyID=cur)
    for v in vat:
        st = _sub(tax_total, "cac:TaxSubtotal")
        _sub(st, "cbc:TaxableAmount", amount_text(int(v["net"])), currencyID=cur)
        _sub(st, "cbc:TaxAmount", amount_text(int(v["vat"])), currencyID=cur)
        cat = _sub(st, "cac:TaxCategory")
        _sub(cat, "cbc:ID", tax_category(str(v["rate"])))
        _sub(cat, "cbc:Percent", str(v["rate"]))
        _sub(_sub(cat, "cac:TaxScheme"), "cbc:ID", "VAT")
    net = sum(int(v["net"]) for v in vat)
    gross = sum(int(v["gross"]) for v in vat)
    lmt = _sub(root, "cac:LegalMonetaryTotal")
    _sub(lmt, "cbc:LineExtensionAmount", amount_text(net), currencyID=cur)
    _sub(lmt, "cbc:TaxExclusiveAmount", amount_text(net), currencyID=cur)
    _sub(lmt, "cbc:TaxInclusiveAmount", amount_text(gross), currencyID=cur)
    _sub(lmt, "cbc:PayableAmount", amount_text(int(payload["total"])), currencyID=cur)
    nets = line_nets(lines, vat, bool(payload.get("prices_include_vat", True)))
    for i, (ln, line_net) in enumerate(zip(lines, nets, strict=True), start=1):
        il = _sub(root, "cac:InvoiceLine")
        _sub(il, "cbc:ID", str(i))
        _sub(il, "cbc:InvoicedQuantity", str(ln["qty"]), unitCode=UNIT_CODE)
        _sub(il, "cbc:LineExtensionAmount", amount_text(line_net), currencyID=cur)
        item = _sub(il, "cac:Item")
        _sub(item, "cbc:Name", str(ln["text"]))
        ctc = _sub(item, "cac:ClassifiedTaxCategory")
        _sub(ctc, "cbc:ID", tax_category(str(ln["vat_rate"])))
        _sub(ctc, "cbc:Percent", str(ln["vat_rate"]))
        _sub(_sub(ctc, "cac:TaxScheme"), "cbc:ID", "VAT")
        qty = Decimal(str(ln["qty"]))
        price = (Decimal(line_net) / 100 / qty) if qty else Decimal(0)
        price_el = _sub(il, "cac:Price")
        _sub(
            price_el, "cbc:PriceAmount", str(abs(price).quantize(Decimal("0.0001"))), currencyID=cur
        )
    out: bytes = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return out


def missing_elements(xml_bytes: bytes) -> list[str]:
    """The :data:`MANDATORY_PATHS` absent from a document (empty: all there)."""
    root = ET.fromstring(xml_bytes)  # noqa: S314 (our own output, parsed in tests/checks)
    return [p for p in MANDATORY_PATHS if root.find(p, NS) is None]
