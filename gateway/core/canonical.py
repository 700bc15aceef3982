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

_encoder = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


class CanonicalError(ValidationError):
    """A value cannot be canonicalized (float, huge integer, lone surrogate, bad key)."""


def _check_str(s: str) -> bool:
    """Return True if ``s`` holds a non-BMP character; refuse lone surrogates."""
    if s.isascii():
        return False
    wide = False
    for ch in s:
        o = ord(ch)
        if 0xD800 <= o <= 0xDFFF:
            raise CanonicalError(f"string holds a lone surrogate U+{o:04X}")
        if o > 0xFFFF:
            wide = True
    return wide


def _check(value: Any) -> bool:
    """Validate the domain; return True when a key needs UTF-16 ordering."""
    t = type(value)
    if t is str:
        _check_str(value)
        return False
    if t is int:
        if not -MAX_SAFE_INT <= value <= MAX_SAFE_INT:
            raise CanonicalError(f"integer {value} is outside the I-JSON range ±(2**53-1)")
        return False
    if value is None or t is bool:
        return False
    if t is dict:
        wide = False
        for k, v in value.items():
            if type(k) is not str:
                raise CanonicalError(f"object key {k!r} is not a string")
            wide |= _check_str(k)
            wide |= _check(v)
        return wide
    if t is list or t is tuple:
        wide = False
        for v in value:
            wide |= _check(v)
        return wide
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
        canonical = canonical_bytes(value)
    except RecursionError:
        raise CanonicalError("JSON nested too deeply") from None
    if canonical != unverified_bytes:
        raise CanonicalError("bytes are not in canonical (RFC 8785) form")
    return value


def _refuse_float(text: str) -> Any:
    raise CanonicalError(f"non-integer number {text!r} is not allowed")
