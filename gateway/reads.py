"""Reads for the event loop: one read-only connection used from a worker thread.

SQLite calls block, so the loop never makes them itself: ``await reads.run(fn)`` runs
``fn(reader)`` in a thread, serialized by a lock (one connection, one user at a time).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gateway.store import Reader

T = TypeVar("T")


class ReadPool:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._reader: Reader | None = None
        self._lock = threading.Lock()

    async def run(self, fn: Callable[[Reader], T]) -> T:
        return await asyncio.to_thread(self._call, fn)

    def _call(self, fn: Callable[[Reader], T]) -> T:
        with self._lock:
            if self._reader is None:
                self._reader = Reader(self.path)
            return fn(self._reader)

    def close(self) -> None:
        with self._lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
