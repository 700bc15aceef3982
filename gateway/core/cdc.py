"""SIFEN's 44-digit CDC (Código de Control) of a document, derived from configuration and the
signed record, and its modulo-11 check digit (docs/sync.md, "paraguay/sifen").

Structure (SIFEN Manual Técnico, "Código de Control del DE"), 44 digits in this order:

=====  =========  ===========================================================================
width  field      our source
=====  =========  ===========================================================================
2      iTiDE      document type: ``01`` factura electrónica (config ``document_type``)
8      dRucEm     the issuer's RUC, zero-padded left (config ``ruc``, the part before ``-``)
1      dDVEmi     the RUC's check digit (config, the part after ``-``; verified mod 11)
3      dEst       establishment (config ``establishment``)
3      dPunExp    expedition point: per till from config ``expedition_points``, else default
7      dNumDoc    document number: the record's ``number`` (refused above 9,999,999)
1      iTipCont   taxpayer type: 1 natural person, 2 legal entity (config)
8      dFeEmiDE   issue date ``YYYYMMDD`` (the record's time, UTC)
1      iTipEmi    emission type: 1 normal, 2 contingency (the record's ``offline`` flag)
9      dCodSeg    security code: the first 9 digits of int(SHA-256(record hash)) mod 10^9,
                  zero-padded (SIFEN wants it random-looking; ours is fixed by the record so
                  a retry after a crash names the same document)
1      dDVId      check digit of the 43 digits before it (:func:`check_digit`)
=====  =========  ===========================================================================

:func:`check_digit` is SET's modulo 11 (the one of the RUC too): weights 2, 3, … 11 from the
rightmost digit, cycling back to 2; ``r = Σ % 11``; the digit is ``11 − r`` when ``r > 1``,
else ``0``.

Pure: no IO, no clock.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

CDC_RE = re.compile(r"^[0-9]{44}$")
RUC_RE = re.compile(r"^([0-9]{1,8})-([0-9])$")
MAX_NUMBER = 9_999_999


class CdcError(ValueError):
    """The record or the configuration cannot give a valid CDC."""


def check_digit(digits: str, base_max: int = 11) -> int:
    """SET's modulo-11 check digit of a string of digits."""
    if not digits.isdigit():
        raise CdcError(f"{digits!r} is not all digits")
    k = 2
    total = 0
    for ch in reversed(digits):
        total += int(ch) * k
        k = k + 1 if k < base_max else 2
    r = total % 11
    return 11 - r if r > 1 else 0


@dataclass(frozen=True, slots=True)
class Issuer:
    """The parts of a CDC fixed by configuration."""

    ruc: str  # "80012345-7"
    establishment: str = "001"
    expedition_point: str = "001"
    expedition_points: tuple[tuple[str, str], ...] = ()  # (till, point)
    taxpayer_type: int = 2
    document_type: str = "01"

    def validate(self) -> None:
        m = RUC_RE.match(self.ruc)
        if m is None:
            raise CdcError(f"ruc {self.ruc!r} is not <1-8 digits>-<check digit>")
        if check_digit(m.group(1)) != int(m.group(2)):
            raise CdcError(f"ruc {self.ruc!r}: the check digit should be {check_digit(m.group(1))}")
        for name, value, width in (
            ("establishment", self.establishment, 3),
            ("expedition_point", self.expedition_point, 3),
            ("document_type", self.document_type, 2),
        ):
            if not (value.isdigit() and len(value) == width):
                raise CdcError(f"{name} {value!r} is not {width} digits")
        for till, point in self.expedition_points:
            if not (point.isdigit() and len(point) == 3):
                raise CdcError(f"expedition_points.{till} {point!r} is not 3 digits")
        if self.taxpayer_type not in (1, 2):
            raise CdcError(f"taxpayer_type {self.taxpayer_type} is not 1 or 2")

    def point_of(self, till: str) -> str:
        return dict(self.expedition_points).get(till, self.expedition_point)


def security_code(record_hash: str) -> str:
    return f"{int(hashlib.sha256(record_hash.encode()).hexdigest(), 16) % 10**9:09d}"


def derive_cdc(
    issuer: Issuer, *, chain: str, number: int, time: str, offline: bool, record_hash: str
) -> str:
    """The 44-digit CDC of a record (``time`` is the record's ISO UTC time)."""
    m = RUC_RE.match(issuer.ruc)
    if m is None:
        raise CdcError(f"ruc {issuer.ruc!r} is not <1-8 digits>-<check digit>")
    if not 1 <= number <= MAX_NUMBER:
        raise CdcError(f"document number {number} does not fit SIFEN's 7 digits")
    date = time[:10].replace("-", "")
    if not (date.isdigit() and len(date) == 8):
        raise CdcError(f"time {time!r} has no YYYY-MM-DD date")
    body = (
        f"{issuer.document_type}{int(m.group(1)):08d}{m.group(2)}{issuer.establishment}"
        f"{issuer.point_of(chain)}{number:07d}{issuer.taxpayer_type}{date}"
        f"{2 if offline else 1}{security_code(record_hash)}"
    )
    if len(body) != 43:
        raise CdcError(f"cdc body {body!r} is not 43 digits")
    return body + str(check_digit(body))


def valid_cdc(cdc: str) -> bool:
    return bool(CDC_RE.match(cdc)) and check_digit(cdc[:43]) == int(cdc[43])
