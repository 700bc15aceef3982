"""JSON Lines framing for the POS protocol: bytes in, lines or framing events out.

Like h11, this is a state machine without IO: the socket adapter feeds whatever bytes
arrived (split anywhere) and gets back complete events. It enforces the line limit without
ever buffering more than ``max_line_bytes``: an oversize line is reported once as
:class:`Oversize` and its remaining bytes are discarded up to the next newline, so the
connection stays usable. :func:`decode_request` turns one line into a JSON object or a
:class:`ProtocolError` (invalid UTF-8, invalid JSON, not an object, duplicate keys, floats
are left to validation so the field path can be named).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from gateway.core.errors import ProtocolError


@dataclass(frozen=True, slots=True)
class Line:
    data: bytes


@dataclass(frozen=True, slots=True)
class Oversize:
    """A line longer than the limit was dropped (``size`` bytes seen before the limit hit)."""

    size: int


Event = Line | Oversize


class LineDecoder:
    """Splits a byte stream into lines of at most ``max_line_bytes`` (newline excluded)."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._discarding = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        start = 0
        n = len(data)
        while start < n:
            nl = data.find(b"\n", start)
            end = n if nl < 0 else nl
            chunk = data[start:end]
            if self._discarding:
                if nl >= 0:
                    self._discarding = False
            elif len(self._buf) + len(chunk) > self.max_line_bytes:
                events.append(Oversize(len(self._buf) + len(chunk)))
                self._buf.clear()
                self._discarding = nl < 0
            elif nl >= 0:
                self._buf += chunk
                line = bytes(self._buf).rstrip(b"\r")
                self._buf.clear()
                if line.strip():
                    events.append(Line(line))
            else:
                self._buf += chunk
            if nl < 0:
                break
            start = nl + 1
        return events


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ProtocolError(f"duplicate key {k[:64]!r} in JSON object")
        out[k] = v
    return out


def decode_request(line: bytes) -> dict[str, Any]:
    """One JSON Lines request → a JSON object, or ProtocolError."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"request is not valid UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"request is not valid JSON: {exc.msg} at column {exc.colno}") from None
    except ValueError:
        # json.loads raises a plain ValueError for an integer literal longer than Python's
        # int conversion limit (4300 digits)
        raise ProtocolError("request JSON holds a number too long to convert") from None
    except RecursionError:
        raise ProtocolError("request JSON is nested too deeply") from None
    if not isinstance(value, dict):
        raise ProtocolError("a request must be a JSON object")
    return value


def encode_reply(reply: dict[str, Any]) -> bytes:
    """One reply line (compact JSON, UTF-8, newline-terminated)."""
    text = json.dumps(reply, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        # a lone surrogate echoed from a request (its id, a field name) has no UTF-8 form;
        # ASCII escapes keep the reply valid JSON that the client can match by id
        return json.dumps(reply, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"
