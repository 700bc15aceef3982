"""The virtual printer: renders documents as plain text and appends them to a file.

The embedded default when no receipt printer is attached: every document the gateway would
print lands in ``<state_dir>/printer/virtual-printer.txt``, so a developer or technician can
see exactly what a customer would get. The layout follows the receipt: header, lines, VAT
per rate, total, payments, number, time, chain/seq, signature extract and QR payload.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

WIDTH = 42

TITLES = {
    "TRANSACTION::RECEIPT": "TICKET",
    "TRANSACTION::INVOICE": "FACTURE",
    "TRANSACTION::CANCELLATION": "ANNULATION",
    "TRANSACTION::CORRECTION": "CORRECTION",
    "INTENTION::DUPLICATE": "DUPLICATA",
}


def money(amount_minor: int, currency: str) -> str:
    sign = "-" if amount_minor < 0 else ""
    a = abs(amount_minor)
    return f"{sign}{a // 100}.{a % 100:02d} {currency}".strip()


def _lr(left: str, right: str) -> str:
    space = max(1, WIDTH - len(left) - len(right))
    return (left + " " * space + right)[: max(WIDTH, len(left) + 1 + len(right))]


def render_text(
    record: dict[str, Any],
    receipt: dict[str, Any],
    *,
    header: str = "",
    original: dict[str, Any] | None = None,
) -> str:
    """A document as text. A duplicate prints its ``original``'s content under its own
    DUPLICATA title, number, time and signature."""
    p = record["payload"]
    if record["type"] == "INTENTION::DUPLICATE" and original is not None:
        p = {**original["payload"], "ref": p["ref"], "copy": p.get("copy", 1)}
    out = []
    if header:
        out += [header.center(WIDTH)]
    title = TITLES.get(record["type"], record["type"])
    if record["type"] == "INTENTION::DUPLICATE":
        title = f"*** DUPLICATA - COPY {p.get('copy', 1)} ***"
    out += [title.center(WIDTH), "-" * WIDTH]
    content = p.get("corrected", p)
    currency = content.get("currency", p.get("currency", ""))
    for line in content.get("lines", []):
        out.append(_lr(f"{line['qty']} x {line['text']}"[:30], money(line["amount"], "")))
    if "ref" in p:
        ref = p["ref"]
        out.append(f"ref: {ref['chain']} seq {ref['seq']} no {ref['number']}")
    if "vat" in p:
        out.append("-" * WIDTH)
        for v in p["vat"]:
            out.append(_lr(f"VAT {v['rate']}% on {money(v['net'], '')}", money(v["vat"], "")))
    if "total" in p:
        out.append(_lr("TOTAL", money(p["total"], currency)))
    for pay in p.get("payments", []):
        out.append(_lr(f"  {pay['method']}", money(pay["amount"], currency)))
    out += [
        "-" * WIDTH,
        f"No {receipt['number']}",
        f"{record['time']}  {record['chain']} seq {record['seq']}",
        f"sig {receipt['signature_extract']}  key {record['key_id']}",
        f"QR {receipt['qr']}",
        "=" * WIDTH,
        "",
    ]
    return "\n".join(out) + "\n"


class VirtualPrinter:
    """Prints to files under ``path.parent``: every document is appended as text to ``path``
    (one running roll to read), and, when ``escpos`` (profile, layout) is given, each job also
    gets ``jobs/<job id>-<chain>-<seq>.bin`` with the exact ESC/POS bytes a real printer of that
    profile would receive and ``.txt`` with the same document as text beside it."""

    def __init__(self, path: Path, *, escpos: tuple[Any, Any] | None = None) -> None:
        self.path = path
        self.escpos = escpos
        self.jobs_dir = path.parent / "jobs"

    def print_jobs(self, jobs: list[tuple[str, str, bytes | None]]) -> None:
        """Write ``(name, text, escpos_bytes)`` jobs, then fsync: printed means on disk.

        Blocking: call from a thread."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if any(data is not None for _, _, data in jobs):
            self.jobs_dir.mkdir(exist_ok=True, mode=0o700)
        for name, text, data in jobs:
            if data is not None:
                _write_file(self.jobs_dir / f"{name}.bin", data)
                _write_file(self.jobs_dir / f"{name}.txt", text.encode("utf-8"))
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, "".join(text for _, text, _ in jobs).encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)

    def print_texts(self, texts: list[str]) -> None:
        """Append text documents only (no per-job files)."""
        self.print_jobs([("", t, None) for t in texts])


def _write_file(path: Path, data: bytes) -> None:
    # No fsync per job file: the roll file's fsync below marks the batch printed, and two
    # more fsyncs per receipt would compete with the journal's commits for the disk.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
