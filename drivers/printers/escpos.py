"""The ESC/POS encoder: a signed record in, the exact bytes for a receipt printer out.

Pure: no IO, no clock, no randomness — the same record, profile and layout always give the
same bytes, so tests compare them byte for byte (as python-escpos's tests do). Sending the
bytes, asking for status and waiting for print confirmations is
:mod:`drivers.printers.device`'s job; what a status byte means is :mod:`.status`'s.

Rules this module implements (docs/printers.md):

- Every document starts with ``ESC @`` and, right after it, the profile's one fixed code page
  (``ESC t n``) and the USA international set (``ESC R 0``): ``ESC @`` resets both to whatever
  the printer's memory switches say, so they are re-sent after every ``ESC @``.
- Text is NFC-normalised and encoded in that code page; a character the code page lacks, and
  any control character (a POS must not be able to smuggle commands into a receipt), prints as
  ``?`` — replaced visibly, never dropped.
- The signature QR code is printed natively (``GS ( k`` functions 165/167/169/180/181) when
  the profile supports it, else as a raster image (``GS v 0``). Before either, the symbol plus
  its 4-module quiet zone is checked against the paper's printable width in dots; the module
  size steps down until it fits, and if nothing fits the payload is printed as text under a
  visible notice — a receipt never silently goes without its signature data.
- A copy (``INTENTION::DUPLICATE``) prints its original's content under a large
  ``DUPLICATA / COPY n`` banner (top and bottom), with its own number, time and signature.
- ``CLOSING::*`` records print as a Z-report from their payload, whatever totals it carries.
"""

from __future__ import annotations

import textwrap
import unicodedata
from dataclasses import dataclass
from typing import Any

import segno

from drivers.printers.virtual import TITLES

ESC = b"\x1b"
GS = b"\x1d"
DLE = b"\x10"
LF = b"\n"

INIT = ESC + b"@"
INTERNATIONAL_USA = ESC + b"R\x00"
ALIGN = {"left": ESC + b"a\x00", "center": ESC + b"a\x01", "right": ESC + b"a\x02"}
BOLD_ON, BOLD_OFF = ESC + b"E\x01", ESC + b"E\x00"
CUTS = {"partial": GS + b"VB\x00", "full": GS + b"VA\x00", "none": b""}
#: ``ESC p 0 25 250``: pulse drawer pin 2 for 50 ms, then 500 ms off.
DRAWER_KICK = ESC + b"p\x00\x19\xfa"
#: ``DLE EOT 1..4``: printer, offline-cause, error-cause and paper-sensor status (one byte each).
STATUS_REQUEST = b"".join(DLE + b"\x04" + bytes([n]) for n in (1, 2, 3, 4))
#: ``GS a 15``: Automatic Status Back for drawer, online/offline, error and paper sensor.
ASB_ENABLE = GS + b"a\x0f"

#: Code pages: Python codec → ``ESC t n`` (Epson numbering, followed by most clones).
CODE_PAGES: dict[str, int] = {
    "cp437": 0,
    "cp850": 2,
    "cp1252": 16,
    "cp866": 17,
    "cp852": 18,
    "cp858": 19,
}

#: Paper width (mm) → printable width in dots at 203 dpi, and columns of font A (12 dots).
PAPER: dict[int, tuple[int, int]] = {58: (384, 32), 80: (576, 48)}

QR_QUIET_MODULES = 4
MIN_MODULE_DOTS = 3
MAX_MODULE_DOTS = 16


@dataclass(frozen=True, slots=True)
class Profile:
    """What a family of printers understands."""

    name: str
    code_page: str  # a CODE_PAGES key
    qr_native: bool  # GS ( k QR code
    confirm: bool  # GS ( H fn 48 process-ID response after printing


PROFILES: dict[str, Profile] = {
    # Epson TM-T20/T70/T88 (IV and later) and the clones that follow them fully.
    "epson-tm": Profile("epson-tm", "cp858", qr_native=True, confirm=True),
    # Most ESC/POS printers: native QR, no process-ID responses.
    "generic": Profile("generic", "cp858", qr_native=True, confirm=False),
    # Older or minimal firmware: no GS ( k, so the QR code goes out as a raster image.
    "generic-raster": Profile("generic-raster", "cp858", qr_native=False, confirm=False),
}


@dataclass(frozen=True, slots=True)
class Layout:
    """What goes on every document besides the record: the shop and the paper."""

    paper_width_mm: int = 80
    merchant: str = ""
    address: tuple[str, ...] = ()
    vat_id: str = ""
    header: tuple[str, ...] = ()
    footer: tuple[str, ...] = ()
    qr_module_dots: int = 6
    feed_lines: int = 3
    cut: str = "partial"
    drawer_kick: bool = False
    status_back: bool = False

    @property
    def printable_dots(self) -> int:
        return PAPER[self.paper_width_mm][0]

    @property
    def columns(self) -> int:
        return PAPER[self.paper_width_mm][1]


# ---------------------------------------------------------------------- text


#: The control characters (Unicode category Cc): printed as "?" like unmappable ones.
_CONTROLS = {c: "?" for c in (*range(0x20), *range(0x7F, 0xA0))}


def encode_text(text: str, code_page: str) -> bytes:
    """``text`` in ``code_page``; unmappable and control characters become ``?``."""
    # The charmap codecs' "replace" handler writes one b"?" per character they lack.
    return unicodedata.normalize("NFC", text).translate(_CONTROLS).encode(code_page, "replace")


def money(amount_minor: int) -> str:
    sign = "-" if amount_minor < 0 else ""
    a = abs(amount_minor)
    return f"{sign}{a // 100}.{a % 100:02d}"


def _lr(left: str, right: str, width: int) -> list[str]:
    """``left`` and ``right`` on one line of ``width``; long ``left`` wraps above."""
    if len(left) + 1 + len(right) <= width:
        return [left + " " * (width - len(left) - len(right)) + right]
    lines = textwrap.wrap(left, width, break_long_words=True) or [""]
    last = lines[-1]
    if len(last) + 1 + len(right) <= width:
        return [*lines[:-1], last + " " * (width - len(last) - len(right)) + right]
    return [*lines, right.rjust(width)]


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_long_words=True) or [""]


# ---------------------------------------------------------------------- QR code


@dataclass(frozen=True, slots=True)
class QrPlan:
    """How the QR code will be printed: ``native``, ``raster`` or ``text`` (does not fit)."""

    kind: str
    version: int
    module_dots: int
    width_dots: int  # symbol plus quiet zone


def plan_qr(data: str, *, printable_dots: int, module_dots: int, native: bool) -> QrPlan:
    """Pick the largest module size from ``module_dots`` down whose symbol fits the paper.

    The version is the smallest that holds ``data`` in byte mode at level M — what a printer
    encoding it natively needs at most — so the check is conservative for native codes too.
    """
    version = qr_version(len(data.encode("utf-8")))
    if version is None:
        return QrPlan("text", 0, 0, 0)
    modules = 17 + 4 * version + 2 * QR_QUIET_MODULES
    for dots in range(min(module_dots, MAX_MODULE_DOTS), MIN_MODULE_DOTS - 1, -1):
        if modules * dots <= printable_dots:
            return QrPlan("native" if native else "raster", version, dots, modules * dots)
    return QrPlan("text", version, 0, 0)


#: Data codewords of QR versions 1-40 at error correction level M (ISO/IEC 18004, table 7).
_QR_M_DATA_CODEWORDS = (
    16, 28, 44, 64, 86, 108, 124, 154, 182, 216,
    254, 290, 334, 365, 415, 453, 507, 563, 627, 669,
    714, 782, 860, 914, 1000, 1062, 1128, 1193, 1267, 1373,
    1455, 1541, 1631, 1725, 1812, 1914, 1992, 2102, 2216, 2334,
)  # fmt: skip


def qr_version(data_bytes: int) -> int | None:
    """The smallest QR version holding ``data_bytes`` in byte mode at level M (None: none).

    Computed from the capacity table rather than by encoding the symbol: making the whole
    matrix in Python costs milliseconds, and only the raster fallback needs it.
    """
    for version, codewords in enumerate(_QR_M_DATA_CODEWORDS, 1):
        header_bits = 4 + (8 if version < 10 else 16)  # mode indicator + character count
        if header_bits + 8 * data_bytes <= 8 * codewords:
            return version
    return None


def _qr(data: str) -> segno.QRCode:
    return segno.make_qr(data, error="m", mode="byte", boost_error=False)


def _gs_k(fn: int, payload: bytes) -> bytes:
    """``GS ( k pL pH cn fn ...`` for the QR code (cn = 49)."""
    n = len(payload) + 2
    return GS + b"(k" + bytes([n & 0xFF, n >> 8, 49, fn]) + payload


def qr_native(data: bytes, module_dots: int) -> bytes:
    return b"".join(
        [
            _gs_k(65, b"\x32\x00"),  # fn 165: model 2
            _gs_k(67, bytes([module_dots])),  # fn 167: module size in dots
            _gs_k(69, b"\x31"),  # fn 169: error correction level M
            _gs_k(80, b"\x30" + data),  # fn 180: store the data
            _gs_k(81, b"\x30"),  # fn 181: print it
        ]
    )


def qr_raster(data: str, module_dots: int) -> bytes:
    """``GS v 0``: the QR code (with its quiet zone) as a 1-bit raster image."""
    matrix = _qr(data).matrix
    q = QR_QUIET_MODULES
    size = len(matrix) + 2 * q
    width = height = size * module_dots
    row_bytes = (width + 7) // 8
    body = bytearray()
    for y in range(height):
        my = y // module_dots - q
        row = bytearray(row_bytes)
        if 0 <= my < len(matrix):
            for mx, dark in enumerate(matrix[my]):
                if dark:
                    for x in range((mx + q) * module_dots, (mx + q + 1) * module_dots):
                        row[x >> 3] |= 0x80 >> (x & 7)
        body += row
    head = GS + b"v0\x00" + bytes([row_bytes & 0xFF, row_bytes >> 8, height & 0xFF, height >> 8])
    return head + bytes(body)


# ---------------------------------------------------------------------- commands


def select_code_page(code_page: str) -> bytes:
    return ESC + b"t" + bytes([CODE_PAGES[code_page]])


def prologue(profile: Profile, layout: Layout) -> bytes:
    """``ESC @``, then everything ``ESC @`` resets that the gateway relies on."""
    out = INIT + select_code_page(profile.code_page) + INTERNATIONAL_USA
    return out + ASB_ENABLE if layout.status_back else out


def confirmation_request(process_id: str) -> bytes:
    """``GS ( H fn 48``: the printer answers ``37 22 d1..d4 00`` once everything before it
    has been printed (send it after the cut)."""
    pid = process_id.encode("ascii")
    if len(pid) != 4 or not all(32 <= b <= 126 for b in pid):
        raise ValueError("a process id is 4 printable ASCII characters")
    return GS + b"(H\x06\x00\x30\x30" + pid


def process_id_of(job_id: int) -> str:
    return f"{job_id % 10000:04d}"


# ---------------------------------------------------------------------- documents


class _Doc:
    def __init__(self, profile: Profile, layout: Layout) -> None:
        self.profile = profile
        self.layout = layout
        self.cols = layout.columns
        self.out = bytearray(prologue(profile, layout))
        # the printer's current styles (as ESC @ leaves them): only changes are sent
        self._align, self._bold, self._size = "left", False, 0

    def _style(self, align: str = "left", bold: bool = False, size: int = 0) -> None:
        """``size``: the ``GS !`` byte (0 normal, 0x01 double height, 0x11 double both)."""
        if align != self._align:
            self.out += ALIGN[align]
            self._align = align
        if bold != self._bold:
            self.out += BOLD_ON if bold else BOLD_OFF
            self._bold = bold
        if size != self._size:
            self.out += GS + b"!" + bytes([size])
            self._size = size

    def _line(self, text: str) -> None:
        self.out += encode_text(text, self.profile.code_page) + LF

    def text(
        self, text: str = "", *, align: str = "left", bold: bool = False, double: bool = False
    ) -> None:
        """One line (wrapped to the columns of its size)."""
        self._style(align, bold, 0x11 if double else 0)
        for part in _wrap(text, self.cols // 2 if double else self.cols) if text else [""]:
            self._line(part)

    def lr(self, left: str, right: str, *, bold: bool = False, tall: bool = False) -> None:
        self._style("left", bold, 0x01 if tall else 0)
        for line in _lr(left, right, self.cols):
            self._line(line)

    def rule(self, ch: str = "-") -> None:
        self.text(ch * self.cols)

    def merchant(self) -> None:
        lay = self.layout
        if lay.merchant:
            self.text(lay.merchant, align="center", bold=True)
        for line in lay.address:
            self.text(line, align="center")
        if lay.vat_id:
            self.text(f"VAT {lay.vat_id}", align="center")
        for line in lay.header:
            self.text(line, align="center")

    def copy_banner(self, copy: int) -> None:
        self.text("DUPLICATA", align="center", bold=True, double=True)
        self.text(f"COPY {copy}", align="center", bold=True)

    def sale(self, p: dict[str, Any]) -> None:
        """Lines, VAT per rate, total, payments (a sale, cancellation or correction)."""
        content = p.get("corrected", p)
        currency = p.get("currency", content.get("currency", ""))
        customer = content.get("customer")
        if customer:
            self.text(f"Customer: {customer.get('name', '')}")
            if customer.get("vat_id"):
                self.text(f"VAT {customer['vat_id']}")
        if "ref" in p:
            ref = p["ref"]
            short = TITLES.get(ref.get("type", ""), ref.get("type", ""))
            self.text(f"Ref: {short} {ref['chain']} seq {ref['seq']} no {ref['number']}")
        if p.get("reason"):
            self.text(f"Reason: {p['reason']}")
        if content.get("lines"):
            self.rule()
            for line in content["lines"]:
                self.lr(f"{line['qty']} x {line['text']}", money(line["amount"]))
        if "corrected" in p:
            self.rule()
            self._vat(content["vat"])
            self.lr("CORRECTED TOTAL", f"{money(content['total'])} {currency}", bold=True)
            self.text("Difference:")
        if p.get("vat"):
            self.rule()
            self._vat(p["vat"])
        if "total" in p:
            self.rule()
            self.lr("TOTAL", f"{money(p['total'])} {currency}", bold=True, tall=True)
        for pay in p.get("payments", []):
            self.lr(f"  {pay['method']}", money(pay["amount"]))

    def _vat(self, vat: list[dict[str, Any]]) -> None:
        w = self.cols // 4
        first = self.cols - 3 * w
        self.text("VAT %".ljust(first) + "net".rjust(w) + "VAT".rjust(w) + "gross".rjust(w))
        for v in vat:
            self.text(
                f"{v['rate']}%".ljust(first)
                + money(v["net"]).rjust(w)
                + money(v["vat"]).rjust(w)
                + money(v["gross"]).rjust(w)
            )

    def z_report(self, record: dict[str, Any]) -> None:
        """A closing as a Z-report (docs/record-format.md, "Closings"): its period, the
        records of each type, VAT per rate, the period's total and payments, then the chain's
        perpetual grand totals. Other scalar payload fields are listed as they are."""
        period = record["type"].split("::", 1)[1]
        self.text("Z-REPORT", align="center", bold=True, double=True)
        self.text(period, align="center", bold=True)
        p = record["payload"]
        self.rule()
        span = p.get("period")
        if isinstance(span, dict):
            self.lr("from:", str(span.get("from_time", "")))
            self.lr("to:", str(span.get("to_time", "")))
            self.lr("seq:", f"{span.get('from_seq')}..{span.get('to_seq')}")
        for key in sorted(p):
            value = p[key]
            if key in ("vat", "payments", "total", "counters"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | str):
                continue
            shown = money(value) if isinstance(value, int) and _is_money(key) else str(value)
            self.lr(f"{key}:", shown)
        for name, count in sorted(p.get("counters", p.get("counts", {})).items()):
            self.lr(f"{name}", str(count))
        currency = p.get("currency", "")
        if p.get("vat"):
            self.rule()
            self._vat(p["vat"])
        total = p.get("total", (p.get("period_total") or {}).get("gross"))
        if isinstance(total, int):
            self.lr("TOTAL", f"{money(total)} {currency}".strip(), bold=True, tall=True)
        for pay in p.get("payments", []):
            self.lr(f"  {pay['method']}", money(pay["amount"]))
        totals = record.get("totals") or {}
        if totals:
            self.rule()
            self.text("Grand totals (perpetual)", bold=True)
            for key in ("gross", "net", "vat", "gross_abs"):
                if key in totals:
                    self.lr(key, money(totals[key]))
            for rate, t in sorted(totals.get("by_rate", {}).items()):
                self.lr(f"{rate}%", f"{money(t['net'])} + {money(t['vat'])} = {money(t['gross'])}")

    def identity(self, record: dict[str, Any], receipt: dict[str, Any]) -> None:
        self.rule()
        self.text(f"No {receipt['number']}", bold=True)
        self.text(record["time"])
        self.text(f"{record['chain']} seq {record['seq']}  key {record['key_id']}")
        self.text(f"sig {receipt['signature_extract']}")

    def qr(self, data: str) -> None:
        lay = self.layout
        plan = plan_qr(
            data,
            printable_dots=lay.printable_dots,
            module_dots=lay.qr_module_dots,
            native=self.profile.qr_native,
        )
        if plan.kind == "text":
            self.text("QR CODE DOES NOT FIT - SIGNATURE DATA:", bold=True)
            self.text(data)
            return
        self._style("center")
        if plan.kind == "native":
            self.out += qr_native(data.encode("ascii", "replace"), plan.module_dots)
        else:
            self.out += qr_raster(data, plan.module_dots)
        self.out += LF

    def finish(self, kick: bool) -> bytes:
        lay = self.layout
        if lay.feed_lines:
            self.out += ESC + b"d" + bytes([lay.feed_lines])
        self.out += CUTS[lay.cut]
        if kick:
            self.out += DRAWER_KICK
        return bytes(self.out)


def _is_money(key: str) -> bool:
    return key in ("gross", "net", "vat", "total", "amount") or key.endswith("_minor")


def encode_document(
    record: dict[str, Any],
    receipt: dict[str, Any],
    *,
    profile: Profile,
    layout: Layout,
    original: dict[str, Any] | None = None,
) -> bytes:
    """The bytes of one document, from ``ESC @`` to the cut (and drawer kick).

    ``record`` is the signed record (``Record.to_json()``), ``receipt`` what
    :func:`gateway.dispatch.receipt_data` made of it (number, QR payload, signature extract);
    for a duplicate, ``original`` is the record it copies.
    """
    doc = _Doc(profile, layout)
    rtype = record["type"]
    p = record["payload"]
    copy: int | None = None
    shown, content = record, p
    if rtype == "INTENTION::DUPLICATE":
        copy = int(p.get("copy", 1))
        doc.copy_banner(copy)
        if original is not None:
            shown = original
            content = {**original["payload"], "ref": p["ref"], "reason": p.get("reason", "")}
    content_type = shown["type"]
    doc.merchant()
    if content_type.startswith("CLOSING::"):
        doc.z_report(shown)
    else:
        doc.text(TITLES.get(content_type, content_type), align="center", bold=True)
        doc.sale(content)
    doc.identity(record, receipt)
    doc.qr(receipt["qr"])
    for line in layout.footer:
        doc.text(line, align="center")
    if copy is not None:
        doc.copy_banner(copy)
    kick = layout.drawer_kick and copy is None and rtype.startswith("TRANSACTION::")
    return doc.finish(kick)


def encode_test_page(profile: Profile, layout: Layout) -> bytes:
    """A page to check wiring, code page and QR code (``fiscal-gateway print-test``)."""
    doc = _Doc(profile, layout)
    doc.merchant()
    doc.text("TEST PAGE", align="center", bold=True, double=True)
    doc.text(f"profile {profile.name}, code page {profile.code_page}")
    doc.text(f"paper {layout.paper_width_mm} mm, {layout.columns} columns")
    doc.rule()
    doc.text("€ £ é è à ç ñ ü ß Ø")
    doc.lr("left", "right")
    doc.qr("FG1|TEST")
    return doc.finish(kick=False)
