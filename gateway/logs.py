"""Logging for journald: one structured line per event on stderr (or a file).

``json`` format: ``{"ts", "level", "logger", "msg", ...}`` plus the request context passed
as ``extra`` (``request_id``, ``till``, ``chain``, ``seq``, ``code``). Never log secrets or
full customer data: callers pass ids and codes, not request bodies.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

CONTEXT_FIELDS = ("request_id", "till", "chain", "seq", "code", "processor")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ctx = " ".join(
            f"{n}={record.__dict__[n]}"
            for n in CONTEXT_FIELDS
            if record.__dict__.get(n) is not None
        )
        base = f"{record.levelname.lower()} {record.name}: {record.getMessage()}"
        if ctx:
            base += f" [{ctx}]"
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


def setup_logging(level: str, fmt: str, file: Path | None) -> logging.Handler:
    """(Re)configure the root logger; returns the handler (SIGHUP reopens a file).

    The new handler is opened before the old ones are closed, so a file that cannot be opened
    raises ``OSError`` and leaves the current logging as it was.
    """
    root = logging.getLogger()
    handler: logging.Handler
    if file is not None:
        handler = logging.FileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return handler
