"""Properties of the POS framing (gateway.core.framing): any bytes, split anywhere, give the
same lines or clean framing events; decoding never fails with anything but ProtocolError."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.core.errors import ProtocolError
from gateway.core.framing import Line, LineDecoder, Oversize, decode_request, encode_reply

from .strategies import json_values

FRAMING = settings(deadline=None, max_examples=300)


def feed_split(decoder: LineDecoder, data: bytes, cuts: list[int]) -> list[Any]:
    """Feed ``data`` cut at the given offsets; all events in order."""
    events: list[Any] = []
    start = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        events += decoder.feed(data[start:cut])
        start = cut
    events += decoder.feed(data[start:])
    return events


def model(data: bytes, max_line_bytes: int) -> list[Any]:
    """What the decoder must report for ``data``, whatever the chunking (sizes aside)."""
    *complete, tail = data.split(b"\n")
    out: list[Any] = []
    for segment in complete:
        if len(segment) > max_line_bytes:
            out.append(Oversize)
        else:
            line = segment.rstrip(b"\r")
            if line.strip():
                out.append(Line(line))
    if len(tail) > max_line_bytes:  # reported as soon as the limit is crossed
        out.append(Oversize)
    return out


def shape(events: list[Any]) -> list[Any]:
    return [Oversize if isinstance(e, Oversize) else e for e in events]


requests = st.dictionaries(
    st.sampled_from(["id", "op", "till", "total", "lines", "note", "ref"]),
    json_values,
    min_size=1,
    max_size=6,
)
cuts = st.lists(st.integers(min_value=0, max_value=10**6), max_size=30)


@settings(FRAMING, max_examples=100)
@given(st.lists(requests, min_size=1, max_size=8), cuts, st.booleans())
def test_line_decoder_json_lines_split_anywhere_same_lines_back(
    reqs: list[dict[str, Any]], offsets: list[int], crlf: bool
) -> None:
    lines = [encode_reply(r)[:-1] for r in reqs]
    data = b"".join(ln + (b"\r\n" if crlf else b"\n") for ln in lines)
    # the limit counts every byte before the "\n", a "\r" of a CRLF ending included
    decoder = LineDecoder(max_line_bytes=max(map(len, lines)) + crlf)
    events = feed_split(decoder, data, offsets)
    assert events == [Line(ln) for ln in lines]
    assert [decode_request(e.data) for e in events] == reqs
    assert decoder.buffered == 0


@FRAMING
@given(st.binary(max_size=600), cuts, st.integers(min_value=1, max_value=64))
@example(b"\n\r\n \n", [], 4)
@example(b"abcdefgh\nxy\n", [3, 5], 4)
@example(b"abcd\r\nxy\n", [], 4)
def test_line_decoder_random_bytes_only_line_or_oversize_as_modelled(
    data: bytes, offsets: list[int], max_line_bytes: int
) -> None:
    decoder = LineDecoder(max_line_bytes)
    events = feed_split(decoder, data, offsets)
    for e in events:
        assert isinstance(e, Line | Oversize)
        if isinstance(e, Line):
            assert b"\n" not in e.data and 0 < len(e.data) <= max_line_bytes
    assert shape(events) == model(data, max_line_bytes)
    assert decoder.buffered <= max_line_bytes


@settings(FRAMING, max_examples=100)
@given(
    st.integers(min_value=1, max_value=5000),
    st.integers(min_value=1, max_value=64),
    requests,
    cuts,
)
def test_line_decoder_oversize_line_reported_once_next_line_intact(
    excess: int, max_line_bytes: int, req: dict[str, Any], offsets: list[int]
) -> None:
    good = encode_reply(req)
    decoder = LineDecoder(max(max_line_bytes, len(good)))
    big = b"x" * (decoder.max_line_bytes + excess) + b"\n"
    events = feed_split(decoder, big + good + big + good, offsets)
    assert shape(events) == [Oversize, Line(good[:-1]), Oversize, Line(good[:-1])]
    assert all(e.size > decoder.max_line_bytes for e in events if isinstance(e, Oversize))


def test_line_decoder_oversize_without_newline_never_buffers_past_the_limit() -> None:
    decoder = LineDecoder(100)
    events = []
    for _ in range(1000):
        events += decoder.feed(b"y" * 1000)
        assert decoder.buffered <= 100
    assert shape(events) == [Oversize]
    assert decoder.feed(b'tail\n{"id":"x"}\n') == [Line(b'{"id":"x"}')]


@FRAMING
@given(st.binary(max_size=400))
@example(b'{"id":"n","x":' + b"1" * 5000 + b"}")  # int over Python's 4300-digit limit
@example(b"[" * 100_000)
@example(b'{"a":' * 50_000)
@example(b'{"id":"\\ud800"}')
@example(b'{"a":1,"a":2}')
@example(b"\xef\xbb\xbf{}")  # BOM
@example(b"NaN")
def test_decode_request_arbitrary_bytes_object_or_protocol_error(data: bytes) -> None:
    try:
        value = decode_request(data)
    except ProtocolError:
        return
    assert isinstance(value, dict)


@FRAMING
@given(st.text(max_size=50), st.text(max_size=50))
@example("\ud800", "\udfff")
@example("\u2028", "\x00")
def test_encode_reply_any_text_one_utf8_json_line_that_decodes_back(rid: str, field: str) -> None:
    reply = {"id": rid, "ok": False, "error": {"details": [{"field": field}]}}
    data = encode_reply(reply)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    text = data.decode("utf-8")  # always valid UTF-8, even for lone surrogates
    assert json.loads(text) == reply


@pytest.mark.parametrize(
    "line",
    [b"[]", b"1", b'"s"', b"null", b"true", b"{", b"\xff", b"", b'{"a":1}{"b":2}'],
)
def test_decode_request_not_one_object_protocol_error(line: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_request(line)
