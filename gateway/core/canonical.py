"""Canonical bytes of JSON values: RFC 8785 (JSON Canonicalization Scheme).

The only source of bytes that are hashed and signed. Our values are restricted to what a
record may hold — ``dict`` with ``str`` keys, ``list``, ``str``, ``int`` (|n| < 2**53),
``bool`` and ``None``; **no floats** (money is integer minor units, rates are strings).

For that restricted domain RFC 8785 coincides with the standard library's
``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` except in one
place: JCS sorts object keys by UTF-16 code units, Python by code points, which differ only
when a key holds a character above U+FFFF. ``_check`` walks the value once, refuses what is
outside the domain, and reports whether such a key exists; only then do we fall back to the
reference ``rfc8785`` encoder. ``tests/unit/test_canonical.py`` proves the fast path equal to
``rfc8785.dumps`` by property test.
"""

from __future__ import annotations

import json
from typing import Any

import rfc8785

from gateway.core.errors import ValidationError

MAX_SAFE_INT = 2**53 - 1

# check_circular=False: _check has already walked the value (a cycle ends there as a
# RecursionError), so the encoder's own cycle bookkeeping is pure cost.
_encoder = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
)


class CanonicalError(ValidationError):
    """A value cannot be canonicalized (float, huge integer, lone surrogate, bad key)."""


def _check_str(s: str) -> bool:
    """Return True if ``s`` holds a non-BMP character; refuse lone surrogates."""
    if s.isascii():
        return False
    try:
        s.encode("utf-8")  # the codec refuses exactly the lone surrogates, in C
    except UnicodeEncodeError:
        for ch in s:
            o = ord(ch)
            if 0xD800 <= o <= 0xDFFF:
                raise CanonicalError(f"string holds a lone surrogate U+{o:04X}") from None
        raise  # unreachable: a UTF-8 encoding error is always a surrogate
    return max(s) > "\uffff"


def _check(value: Any) -> bool:
    """Validate the domain; return True when a key needs UTF-16 ordering."""
    t = type(value)
    if t is dict:
        return _check_dict(value)
    if t is list or t is tuple:
        return _check_list(value)
    return _check_scalar(value, t)


# The containers' loops test the common scalar types inline: this walk runs for every record
# the ledger signs and every record a verifier parses, and a call per leaf is most of its cost.


def _check_dict(value: dict[Any, Any]) -> bool:
    wide = False
    for k, v in value.items():
        if type(k) is not str:
            raise CanonicalError(f"object key {k!r} is not a string")
        if not k.isascii():
            wide |= _check_str(k)
        t = type(v)
        if t is str:
            if not v.isascii():
                _check_str(v)
        elif t is int:
            if not -MAX_SAFE_INT <= v <= MAX_SAFE_INT:
                raise CanonicalError(f"integer {v} is outside the I-JSON range ±(2**53-1)")
        elif t is dict:
            wide |= _check_dict(v)
        elif t is list or t is tuple:
            wide |= _check_list(v)
        else:
            _check_scalar(v, t)
    return wide


def _check_list(value: list[Any] | tuple[Any, ...]) -> bool:
    wide = False
    for v in value:
        t = type(v)
        if t is dict:
            wide |= _check_dict(v)
        elif t is str:
            if not v.isascii():
                _check_str(v)
        elif t is list or t is tuple:
            wide |= _check_list(v)
        else:
            _check_scalar(v, t)
    return wide


def _check_scalar(value: Any, t: type) -> bool:
    if t is str:
        _check_str(value)
        return False
    if t is int:
        if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            raise CanonicalError(f"integer {value} is outside the I-JSON range ±(2**53-1)")
        return False
    if value is None or t is bool:
        return False
    if t is float:
        raise CanonicalError("floats are not allowed in canonical values (use integers)")
    raise CanonicalError(f"type {t.__name__} cannot be canonicalized")


def canonical_bytes(value: Any) -> bytes:
    """RFC 8785 bytes of ``value`` (see module docstring for the accepted domain)."""
    if _check(value):
        return rfc8785.dumps(value)
    return _encoder.encode(value).encode("utf-8")


def parse_canonical(unverified_bytes: bytes) -> Any:
    """Parse bytes that claim to be canonical JSON; refuse floats and non-canonical forms."""
    try:
        value = json.loads(
            unverified_bytes.decode("utf-8"),
            parse_float=_refuse_float,
            parse_constant=_refuse_float,
        )
    except ValueError as exc:
        # UnicodeDecodeError and JSONDecodeError, and also the ValueError of an integer
        # literal longer than Python's int conversion limit (4300 digits).
        raise CanonicalError(f"not valid UTF-8 JSON: {exc}") from exc
    except RecursionError:
        raise CanonicalError("JSON nested too deeply") from None
    try:
        if not _needs_check(unverified_bytes):
            # json.loads already refused floats and gives only str keys; without a \u escape
            # (the only way to a lone surrogate), a 4-byte UTF-8 sequence (the only way to a
            # key that sorts differently in UTF-16) or 16 digits in a row (the only way to an
            # integer beyond 2**53) there is nothing _check could refuse: encode directly.
            canonical = _encoder.encode(value).encode("utf-8")
        else:
            canonical = canonical_bytes(value)
    except RecursionError:
        raise CanonicalError("JSON nested too deeply") from None
    if canonical != unverified_bytes:
        raise CanonicalError("bytes are not in canonical (RFC 8785) form")
    return value


# Digits become "0" and the lead bytes of 4-byte UTF-8 sequences 0xFF, so that three C
# substring searches replace a walk of the parsed value (a regex is several times slower).
_SCAN = bytes.maketrans(b"123456789" + bytes(range(0xF0, 0x100)), b"0" * 9 + b"\xff" * 16)


def _needs_check(data: bytes) -> bool:
    """False when bytes that parsed as JSON cannot hold what :func:`_check` refuses."""
    scanned = data.translate(_SCAN)
    return b"0" * 16 in scanned or b"\\u" in scanned or b"\xff" in scanned


def _refuse_float(text: str) -> Any:
    raise CanonicalError(f"non-integer number {text!r} is not allowed")
