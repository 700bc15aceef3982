"""The ESC/POS encoder and the status decoder: exact bytes, known answers, round trips.

Golden files (tests/vectors/escpos/*.hex) hold the exact bytes of a few canonical documents,
one command per line with the text it prints; ``UPDATE_GOLDEN=1`` rewrites them after an
intended layout change (review the diff). The hand-written known answers below are taken
from the ESC/POS command reference, independently of the encoder.
"""

from __future__ import annotations

import base64
import itertools
import os
import string
from pathlib import Path
from typing import Any

import pytest
import segno
from escpos_peer import decode, tokens
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.printers.escpos import (
    PROFILES,
    STATUS_REQUEST,
    Layout,
    confirmation_request,
    encode_document,
    encode_text,
    plan_qr,
    process_id_of,
    prologue,
    qr_native,
    qr_version,
)
from drivers.printers.status import (
    AutoStatus,
    Noise,
    PrinterStatus,
    ProcessId,
    ResponseParser,
    StatusByte,
    decode_asb,
    decode_dle_eot,
)
from gateway.core.record import Record
from gateway.dispatch import receipt_data

GOLDEN = Path(__file__).resolve().parent.parent / "vectors" / "escpos"
EPSON = PROFILES["epson-tm"]
SIG = base64.b64encode(bytes(range(71))).decode()
KEY_ID = "0123456789abcdef"

SHOP = Layout(
    paper_width_mm=80,
    merchant="Café de la Gare",
    address=("1 place de la Gare", "75010 Paris"),
    vat_id="FR40123456789",
    header=("Ouvert 7j/7 - prix en €",),
    footer=("Merci de votre visite",),
    drawer_kick=True,
)


def body(seq: int, rtype: str, payload: dict[str, Any], *, number: int = 1) -> dict[str, Any]:
    return {
        "format": 1,
        "chain": "till-1",
        "seq": seq,
        "type": rtype,
        "number": number,
        "time": f"2026-11-21T09:{seq:02d}:00.123Z",
        "client": "till-1",
        "request_id": f"r{seq}",
        "payload": payload,
        "counters": {rtype: number},
        "totals": {"gross": 2130, "net": 1852, "vat": 278, "gross_abs": 2130, "by_rate": {}},
        "offline": False,
        "prev_hash": "0" * 64,
        "key_id": KEY_ID,
    }


def line(text: str, qty: str, unit: int, rate: str) -> dict[str, Any]:
    return {
        "text": text,
        "qty": qty,
        "unit_price": unit,
        "vat_rate": rate,
        "amount": int(qty) * unit,
    }


SALE = body(
    1,
    "TRANSACTION::RECEIPT",
    {
        "currency": "EUR",
        "lines": [
            line("Café crème", "2", 250, "10.00"),
            line("Croissant pur beurre, la pièce (fournée du matin)", "1", 130, "5.50"),
            line("Bière pression 25 cl €", "3", 500, "20.00"),
        ],
        "prices_include_vat": True,
        "vat": [
            {"rate": "20.00", "net": 1250, "vat": 250, "gross": 1500},
            {"rate": "10.00", "net": 455, "vat": 45, "gross": 500},
            {"rate": "5.50", "net": 123, "vat": 7, "gross": 130},
        ],
        "total": 2130,
        "payments": [{"method": "CASH", "amount": 1000}, {"method": "CARD", "amount": 1130}],
    },
)

REF = {"chain": "till-1", "seq": 1, "type": "TRANSACTION::RECEIPT", "number": 1, "hash": "ab" * 32}

CANCEL = body(
    2,
    "TRANSACTION::CANCELLATION",
    {
        "ref": REF,
        "reason": "erreur de caisse",
        "currency": "EUR",
        "vat": [
            {"rate": "20.00", "net": -1250, "vat": -250, "gross": -1500},
            {"rate": "10.00", "net": -455, "vat": -45, "gross": -500},
            {"rate": "5.50", "net": -123, "vat": -7, "gross": -130},
        ],
        "total": -2130,
        "payments": [{"method": "CASH", "amount": -1000}, {"method": "CARD", "amount": -1130}],
    },
)

DUPLICATE = body(3, "INTENTION::DUPLICATE", {"ref": REF, "copy": 2, "reason": "client"})

CLOSING = body(
    4,
    "CLOSING::DAILY",
    {
        "period": {
            "from_seq": 1,
            "to_seq": 3,
            "from_time": "2026-11-21T03:00:00.000Z",
            "to_time": "2026-11-22T03:00:00.000Z",
        },
        "records": 3,
        "counts": {"TRANSACTION::RECEIPT": 2, "TRANSACTION::CANCELLATION": 1},
        "vat": [{"rate": "20.00", "net": 1250, "vat": 250, "gross": 1500}],
        "payments": [{"method": "CASH", "amount": 1500}],
        "period_total": {"gross": 1500, "net": 1250, "vat": 250, "gross_abs": 2100},
        "grand_total": {"gross": 1500, "net": 1250, "vat": 250, "gross_abs": 2100, "by_rate": {}},
        "previous": None,
    },
)


def encode(
    b: dict[str, Any],
    layout: Layout = SHOP,
    *,
    profile: str = "epson-tm",
    original: dict[str, Any] | None = None,
) -> tuple[bytes, dict[str, Any]]:
    rec = Record.from_body(b, "cd" * 32, SIG)
    receipt = receipt_data(rec)
    data = encode_document(
        rec.to_json(), receipt, profile=PROFILES[profile], layout=layout, original=original
    )
    return data, receipt


def dump(data: bytes) -> str:
    out = []
    for t in tokens(data):
        if t[0] >= 0x20 and t != b"\n":
            out.append(f"{t.hex(' ')}  | {t.decode('cp858')}")
        else:
            out.append(t.hex(" "))
    return "\n".join(out) + "\n"


def golden(name: str, data: bytes) -> None:
    path = GOLDEN / f"{name}.hex"
    if os.environ.get("UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dump(data), "utf-8")
    expected = b"".join(
        bytes.fromhex(ln.split("  |", 1)[0]) for ln in path.read_text("utf-8").splitlines()
    )
    if data != expected:
        assert dump(data) == dump(expected)  # a readable diff
    assert data == expected


# ---------------------------------------------------------------------- exact bytes


def test_encoder_receipt_80mm_matches_golden_bytes() -> None:
    data, receipt = encode(SALE)
    golden("receipt-80mm", data)
    doc = decode(data)
    assert doc.qr == [receipt["qr"]] and doc.qr_module_dots == [6]
    assert doc.drawer_kicks == 1 and doc.cuts == 1


def test_encoder_receipt_58mm_qr_too_wide_falls_back_to_smaller_modules() -> None:
    layout = Layout(paper_width_mm=58, merchant="Café de la Gare")
    data, receipt = encode(SALE, layout)
    golden("receipt-58mm", data)
    plan = plan_qr(receipt["qr"], printable_dots=384, module_dots=6, native=True)
    # version 10: (57 + 8 quiet) modules x 6 dots = 390 > 384 printable dots on 58 mm
    assert (plan.kind, plan.version, plan.module_dots, plan.width_dots) == ("native", 10, 5, 325)
    doc = decode(data)
    assert doc.qr == [receipt["qr"]] and doc.qr_module_dots == [5]
    assert max(len(t) for t in doc.texts) <= 32


def test_encoder_cancellation_matches_golden_bytes() -> None:
    data, _ = encode(CANCEL)
    golden("cancellation-80mm", data)
    doc = decode(data)
    assert "ANNULATION" in doc.texts
    assert any(t.startswith("TOTAL") and t.endswith("-21.30 EUR") for t in doc.texts)


def test_encoder_duplicate_prints_original_content_under_banner() -> None:
    data, receipt = encode(DUPLICATE, original=SALE)
    golden("duplicate-80mm", data)
    doc = decode(data)
    banners = [ln for ln in doc.lines if ln.text == "DUPLICATA"]
    assert len(banners) == 2 and all(b.width == 2 and b.height == 2 and b.bold for b in banners)
    assert doc.texts.count("COPY 2") == 2
    assert any("Café crème" in t for t in doc.texts)  # the original's lines
    assert "No till-1-D-00000001" in doc.texts  # its own number
    assert doc.qr == [receipt["qr"]] and receipt["qr"].split("|")[3] == "D"
    assert doc.drawer_kicks == 0  # a copy never opens the drawer


def test_encoder_closing_prints_z_report() -> None:
    data, _ = encode(CLOSING)
    golden("z-report-80mm", data)
    doc = decode(data)
    assert "Z-REPORT" in doc.texts
    assert "DAILY" in doc.texts
    assert any(t.startswith("to:") and t.endswith("2026-11-22T03:00:00.000Z") for t in doc.texts)
    assert any(t.startswith("TOTAL") and t.endswith("15.00") for t in doc.texts)
    assert any(t.startswith("TRANSACTION::CANCELLATION") and t.endswith("1") for t in doc.texts)
    assert "Grand totals (perpetual)" in doc.texts


# ---------------------------------------------------------------------- known answers


def test_prologue_selects_code_page_after_every_init() -> None:
    # ESC @, ESC t 19 (CP858), ESC R 0 (USA)
    assert prologue(EPSON, SHOP) == bytes.fromhex("1b40 1b7413 1b5200")
    assert prologue(EPSON, Layout(status_back=True)).endswith(bytes.fromhex("1d610f"))
    data, _ = encode(SALE)
    assert data.startswith(bytes.fromhex("1b40 1b7413 1b5200"))
    assert data.count(b"\x1b@") == 1


def test_encoder_qr_native_commands_are_epson_functions_165_to_181() -> None:
    payload = b"FG1|x"
    assert qr_native(payload, 5) == bytes.fromhex(
        "1d286b 0400 31 41 32 00"  # fn 165: model 2
        "1d286b 0300 31 43 05"  # fn 167: 5 dots per module
        "1d286b 0300 31 45 31"  # fn 169: error correction M
        "1d286b 0800 31 50 30"  # fn 180: store 5 bytes (pL = 5 + 3)
    ) + payload + bytes.fromhex("1d286b 0300 31 51 30")  # fn 181: print


def test_encoder_document_ends_with_feed_cut_and_drawer_kick() -> None:
    data, _ = encode(SALE)
    assert data.endswith(bytes.fromhex("1b6403 1d564200 1b7000 19fa"))


def test_confirmation_request_is_gs_h_fn48_with_process_id() -> None:
    assert confirmation_request("0042") == bytes.fromhex("1d2848 0600 30 30 30303432")
    assert process_id_of(120042) == "0042"
    with pytest.raises(ValueError):
        confirmation_request("12345")


def test_status_request_is_dle_eot_1_to_4() -> None:
    assert bytes.fromhex("100401 100402 100403 100404") == STATUS_REQUEST


def test_encode_text_unmappable_characters_replaced_visibly() -> None:
    # Ł, ź, 東, 京 are not in CP858; ESC must not reach the printer as a command
    assert encode_text("Łódź 東京 \x1b@ €", "cp858") == b"?\xa2d? ?? ?@ \xd5"
    # decomposed é (e + combining acute) is normalised first, then mapped
    assert encode_text("e\u0301", "cp858") == b"\x82"
    assert encode_text("€", "cp437") == b"?"


def test_encoder_unmappable_item_text_prints_question_marks() -> None:
    sale = body(
        1,
        "TRANSACTION::RECEIPT",
        {
            "currency": "EUR",
            "lines": [line("Łódź 東京\x1b@", "1", 100, "20.00")],
            "vat": [{"rate": "20.00", "net": 83, "vat": 17, "gross": 100}],
            "total": 100,
            "payments": [{"method": "CASH", "amount": 100}],
        },
    )
    data, _ = encode(sale)
    assert b"1 x ?\xa2d? ???@" in data
    assert b"\x1b@" not in data[2:]  # the only ESC @ is the document's own
    assert "1 x ?ód? ???@".ljust(44) + "1.00" in decode(data).texts


# ---------------------------------------------------------------------- QR fit


def test_plan_qr_80mm_default_module_fits() -> None:
    _, receipt = encode(SALE)
    plan = plan_qr(receipt["qr"], printable_dots=576, module_dots=6, native=True)
    assert (plan.kind, plan.module_dots, plan.width_dots) == ("native", 6, 390)
    big = plan_qr(receipt["qr"], printable_dots=576, module_dots=16, native=True)
    assert big.module_dots == 8  # 65 x 8 = 520 <= 576 < 65 x 9


@pytest.mark.parametrize("version", [1, 2, 9, 10, 11, 26, 39])
def test_qr_version_capacity_table_agrees_with_segno(version: int) -> None:
    most = max(n for n in range(3000) if qr_version(n) == version)
    assert segno.make_qr("a" * most, error="m", mode="byte", boost_error=False).version == version
    bigger = segno.make_qr("a" * (most + 1), error="m", mode="byte", boost_error=False)
    assert bigger.version == version + 1 == qr_version(most + 1)


def test_plan_qr_nothing_fits_falls_back_to_text() -> None:
    assert plan_qr("x" * 1500, printable_dots=384, module_dots=6, native=True).kind == "text"
    assert plan_qr("x" * 5000, printable_dots=576, module_dots=6, native=True).kind == "text"


def test_encoder_qr_too_large_prints_payload_as_text() -> None:
    sale = body(1, "TRANSACTION::RECEIPT", dict(SALE["payload"]))
    rec = Record.from_body(sale, "cd" * 32, SIG)
    receipt = {**receipt_data(rec), "qr": "Q" * 1500}
    data = encode_document(rec.to_json(), receipt, profile=EPSON, layout=Layout(paper_width_mm=58))
    doc = decode(data)
    assert doc.qr == [] and doc.rasters == []
    assert "QR CODE DOES NOT FIT - SIGNATURE DATA:" in " ".join(doc.texts)
    assert "".join(t for t in doc.texts if set(t) == {"Q"}) == "Q" * 1500


def test_encoder_raster_profile_prints_qr_matrix_as_gs_v_0() -> None:
    data, receipt = encode(SALE, Layout(paper_width_mm=58), profile="generic-raster")
    assert b"\x1d(k" not in data
    doc = decode(data)
    (raster,) = doc.rasters
    matrix = segno.make_qr(receipt["qr"], error="m", mode="byte", boost_error=False).matrix
    dots = 5  # as in the native case: 6 does not fit 58 mm
    side = (len(matrix) + 8) * dots
    assert (raster.width_bytes, raster.height) == ((side + 7) // 8, side)
    for y, row in enumerate(matrix):
        for x, dark in enumerate(row):
            assert raster.pixel((x + 4) * dots + 2, (y + 4) * dots + 2) == bool(dark)
    assert not raster.pixel(0, 0) and not raster.pixel(side - 1, side - 1)  # quiet zone


# ---------------------------------------------------------------------- round trip

_ALPHABET = string.ascii_letters + string.digits + "éèàçüöÉ€£"
_TEXT = st.text(alphabet=_ALPHABET, min_size=1, max_size=12)


@st.composite
def receipts(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(1, 6))
    lines = []
    for _ in range(n):
        words = draw(st.lists(_TEXT, min_size=1, max_size=6))
        qty, unit = draw(st.integers(1, 9)), draw(st.integers(1, 99999))
        lines.append(line(" ".join(words), str(qty), unit, "20.00"))
    total = sum(ln["amount"] for ln in lines)
    vat = round(total * 20 / 120)
    return body(
        draw(st.integers(1, 99)),
        "TRANSACTION::RECEIPT",
        {
            "currency": "EUR",
            "lines": lines,
            "vat": [{"rate": "20.00", "net": total - vat, "vat": vat, "gross": total}],
            "total": total,
            "payments": [{"method": "CASH", "amount": total}],
        },
        number=draw(st.integers(1, 10**7)),
    )


@settings(max_examples=60, deadline=None)
@given(receipts(), st.sampled_from([58, 80]))
def test_encoder_any_receipt_decodes_back_to_its_content(sale: dict[str, Any], width: int) -> None:
    data, receipt = encode(sale, Layout(paper_width_mm=width))
    doc = decode(data)
    cols = 32 if width == 58 else 48
    assert all(len(ln.text) * ln.width <= cols for ln in doc.lines)
    printed = " ".join(doc.texts).split()
    at = 0
    for ln in sale["payload"]["lines"]:  # every word of every line, in order
        for word in f"{ln['qty']} x {ln['text']}".split():
            at = printed.index(word, at) + 1
    total = sale["payload"]["total"]
    assert f"{total // 100}.{total % 100:02d}" in printed
    assert f"No {receipt['number']}" in doc.texts
    assert doc.qr == [receipt["qr"]]
    assert doc.code_pages == [19] and doc.inits == 1 and doc.cuts == 1


# ---------------------------------------------------------------------- status


def test_decode_dle_eot_online_printer_is_ready() -> None:
    st_ = decode_dle_eot(0x12, 0x12, 0x12, 0x12)
    assert st_ == PrinterStatus() and st_.ready and st_.problem is None


def test_decode_dle_eot_paper_out_is_not_ready() -> None:
    # n=1 offline (bit 3), n=2 stopped at paper end (bit 5), n=4 near end + roll end sensors
    st_ = decode_dle_eot(0x1A, 0x32, 0x12, 0x7E)
    assert st_.paper_out and st_.paper_near_end and not st_.online
    assert st_.problem == "paper out" and not st_.ready


def test_decode_dle_eot_cover_open_and_errors() -> None:
    assert decode_dle_eot(0x1A, 0x16, 0x12, 0x12).problem == "cover open"
    assert decode_dle_eot(0x12, 0x12, 0x32, 0x12).problem == "unrecoverable error"
    assert decode_dle_eot(0x12, 0x12, 0x1A, 0x12).problem == "recoverable error"
    assert decode_dle_eot(0x12, 0x12, 0x52, 0x12).problem == "auto-recoverable error"
    near_end = decode_dle_eot(0x12, 0x12, 0x12, 0x1E)
    assert near_end.paper_near_end and near_end.ready  # a warning, not a stop


def test_decode_dle_eot_not_a_status_byte_raises() -> None:
    with pytest.raises(ValueError):
        decode_dle_eot(0x12, 0x12, 0x37, 0x12)


def test_decode_asb_paper_out_and_cover_open() -> None:
    st_ = decode_asb(bytes([0x38, 0x00, 0x0F, 0x00]))
    assert st_.cover_open and st_.paper_out and st_.paper_near_end and not st_.online
    with pytest.raises(ValueError):
        decode_asb(bytes([0x12, 0, 0, 0]))


STREAM = (
    bytes([0x12, 0x1A])  # two DLE EOT answers
    + bytes([0x10, 0x00, 0x0C, 0x00])  # ASB: paper out
    + b"\x11"  # an XON that got through
    + b"\x37\x22"
    + b"0042"
    + b"\x00"  # process-ID response
    + b"\x37\x71\x40\x00"  # another header-to-NUL block
    + b"\xff"
)
MESSAGES = [
    StatusByte(0x12),
    StatusByte(0x1A),
    AutoStatus(PrinterStatus(paper_out=True)),
    ProcessId("0042"),
]


@given(st.lists(st.integers(0, len(STREAM)), max_size=8))
def test_response_parser_any_chunking_gives_same_messages(cuts: list[int]) -> None:
    parser = ResponseParser()
    messages = []
    bounds = [0, *sorted(cuts), len(STREAM)]
    for a, b in itertools.pairwise(bounds):
        messages += parser.feed(STREAM[a:b])
    assert messages[:4] == MESSAGES
    assert messages[-1] == Noise(0xFF) and len(messages) == 6
