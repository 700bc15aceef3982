"""gateway.core.canonical: our fast encoder is RFC 8785, and nothing outside its domain passes.

The property ``canonical_bytes(v) == rfc8785.dumps(v)`` over the whole value domain is the
proof the module docstring points to. ``_jcs_reference`` is a second, independent reading of
RFC 8785 for our domain (keys sorted by UTF-16 code units), so the proof does not rest on the
``rfc8785`` package alone.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.canonical import (
    MAX_SAFE_INT,
    CanonicalError,
    canonical_bytes,
    parse_canonical,
)
from gateway.core.errors import ValidationError

from .strategies import json_values, keys, safe_ints, scalars, texts

PROPERTY = settings(max_examples=300, deadline=None)


def _jcs_reference(value: Any) -> str:
    """RFC 8785 for values without floats: ECMAScript string escaping, UTF-16 key order."""
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda kv: kv[0].encode("utf-16-be"))
        return "{" + ",".join(f"{_jcs_reference(k)}:{_jcs_reference(v)}" for k, v in items) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_jcs_reference(v) for v in value) + "]"
    # For str, int, bool and None, json.dumps without ASCII escaping writes what
    # ECMAScript's JSON.stringify writes (short escapes, \u00xx lowercase for other controls).
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------- equals RFC 8785


@PROPERTY
@given(json_values)
def test_canonical_bytes_any_domain_value_equals_rfc8785(value: Any) -> None:
    assert canonical_bytes(value) == rfc8785.dumps(value)


@PROPERTY
@given(json_values)
def test_canonical_bytes_any_domain_value_equals_independent_reference(value: Any) -> None:
    assert canonical_bytes(value) == _jcs_reference(value).encode("utf-8")


@PROPERTY
@given(st.dictionaries(keys, scalars, min_size=2, max_size=8))
def test_canonical_bytes_object_keys_sorted_by_utf16_code_units(value: dict[str, Any]) -> None:
    parsed = json.loads(canonical_bytes(value))
    order = list(parsed)
    assert order == sorted(value, key=lambda k: k.encode("utf-16-be"))


def test_canonical_bytes_non_bmp_key_sorts_before_private_use_key() -> None:
    # Code point order would put U+1F600 last; UTF-16 (D83D DE00) puts it first.
    assert canonical_bytes({"\ue000": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\ue000":1}'.encode()


def test_canonical_bytes_non_bmp_string_value_keeps_fast_path_result() -> None:
    value = {"b": "\U0001f600", "a": ["\ue000"]}
    assert canonical_bytes(value) == '{"a":["\ue000"],"b":"\U0001f600"}'.encode()


@PROPERTY
@given(st.lists(json_values, max_size=4))
def test_canonical_bytes_tuple_equals_list(items: list[Any]) -> None:
    assert canonical_bytes(tuple(items)) == canonical_bytes(items)


def test_canonical_bytes_safe_integer_bounds_accepted() -> None:
    assert canonical_bytes([MAX_SAFE_INT, -MAX_SAFE_INT]) == b"[9007199254740991,-9007199254740991]"


def test_canonical_bytes_controls_escaped_like_ecmascript() -> None:
    assert canonical_bytes("\x00\x08\x0b\x1f\x7f") == b'"\\u0000\\b\\u000b\\u001f\x7f"'


# ---------------------------------------------------------------------- refusals


def _embed(draw: st.DrawFn, bad: Any) -> Any:
    """Put ``bad`` somewhere inside a random domain value."""
    host = draw(json_values)
    shape = draw(st.integers(0, 3))
    if shape == 0:
        return bad
    if shape == 1:
        return [host, bad]
    if shape == 2:
        return {"x": host, draw(texts): [bad]}
    return {"a": {"b": [host, {"c": bad}]}}


@st.composite
def _with_float(draw: st.DrawFn) -> Any:
    return _embed(draw, draw(st.floats()))


@st.composite
def _with_big_int(draw: st.DrawFn) -> Any:
    big = draw(st.integers(min_value=MAX_SAFE_INT + 1) | st.integers(max_value=-MAX_SAFE_INT - 1))
    return _embed(draw, big)


surrogates = st.integers(0xD800, 0xDFFF).map(chr)


@st.composite
def _with_lone_surrogate(draw: st.DrawFn) -> Any:
    s = draw(texts) + draw(surrogates) + draw(texts)
    return _embed(draw, {s: 1} if draw(st.booleans()) else s)


@settings(max_examples=100, deadline=None)
@given(_with_float())
def test_canonical_bytes_float_anywhere_refused(value: Any) -> None:
    with pytest.raises(CanonicalError, match="float"):
        canonical_bytes(value)


@settings(max_examples=100, deadline=None)
@given(_with_big_int())
def test_canonical_bytes_integer_outside_safe_range_refused(value: Any) -> None:
    with pytest.raises(CanonicalError, match="I-JSON"):
        canonical_bytes(value)


@settings(max_examples=100, deadline=None)
@given(_with_lone_surrogate())
def test_canonical_bytes_lone_surrogate_refused(value: Any) -> None:
    with pytest.raises(CanonicalError, match="surrogate"):
        canonical_bytes(value)


@pytest.mark.parametrize(
    "value",
    [
        {1: "x"},
        {None: 1},
        {("a",): 1},
        b"bytes",
        {1, 2},
        object(),
        {"a": [1, bytearray(b"x")]},
    ],
    ids=["int-key", "null-key", "tuple-key", "bytes", "set", "object", "nested-bytearray"],
)
def test_canonical_bytes_unsupported_types_refused(value: Any) -> None:
    with pytest.raises(CanonicalError):
        canonical_bytes(value)


def test_canonical_error_is_a_validation_error_with_stable_code() -> None:
    with pytest.raises(ValidationError) as info:
        canonical_bytes(1.0)
    assert info.value.code == "VALIDATION_ERROR"


# ---------------------------------------------------------------------- parse_canonical


@PROPERTY
@given(json_values)
def test_parse_canonical_round_trip_stable(value: Any) -> None:
    data = canonical_bytes(value)
    parsed = parse_canonical(data)
    assert parsed == value
    assert canonical_bytes(parsed) == data


@PROPERTY
@given(json_values, st.sampled_from(["ascii", "spaced", "indented", "unsorted"]))
def test_parse_canonical_other_serializations_refused_unless_identical(
    value: Any, style: str
) -> None:
    if style == "ascii":
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    elif style == "spaced":
        text = json.dumps(value, sort_keys=True, ensure_ascii=False)
    elif style == "indented":
        text = json.dumps(value, sort_keys=True, indent=1, ensure_ascii=False)
    else:
        text = json.dumps(_reverse_keys(value), separators=(",", ":"), ensure_ascii=False)
    data = text.encode("utf-8")
    if data == canonical_bytes(value):
        assert parse_canonical(data) == value
    else:
        with pytest.raises(CanonicalError):
            parse_canonical(data)


def _reverse_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reverse_keys(value[k]) for k in reversed(sorted(value))}
    if isinstance(value, list):
        return [_reverse_keys(v) for v in value]
    return value


@pytest.mark.parametrize(
    "data",
    [b"1.0", b"-0.5", b"1e2", b"1E-2", b'{"a":[0.1]}', b"NaN", b"-Infinity", b"[Infinity]"],
)
def test_parse_canonical_float_refused(data: bytes) -> None:
    with pytest.raises(CanonicalError, match="non-integer number"):
        parse_canonical(data)


@settings(max_examples=50, deadline=None)
@given(safe_ints, st.integers(1, 3))
def test_parse_canonical_integer_written_as_float_refused(n: int, decimals: int) -> None:
    with pytest.raises(CanonicalError):
        parse_canonical(f"{n}.{'0' * decimals}".encode())


def test_parse_canonical_huge_integer_literal_refused_cleanly() -> None:
    # Longer than Python's int conversion limit: json.loads raises a bare ValueError.
    with pytest.raises(CanonicalError):
        parse_canonical(b"9" * 5000)


def test_parse_canonical_deep_nesting_refused_cleanly() -> None:
    with pytest.raises(CanonicalError, match="nested too deeply"):
        parse_canonical(b"[" * 100_000 + b"]" * 100_000)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_parse_canonical_arbitrary_bytes_parsed_or_refused(data: bytes) -> None:
    try:
        value = parse_canonical(data)
    except CanonicalError:
        return
    assert canonical_bytes(value) == data
