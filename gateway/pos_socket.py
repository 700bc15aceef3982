"""POS local API transport: JSON Lines over a Unix socket (and optionally loopback TCP).

One request per line, one reply per line; requests on one connection are handled
concurrently (up to ``max_inflight`` each) and replies are written as they complete, each
carrying its request ``id`` — so replies may come back in another order than sent.

Defences, so one client cannot hurt the others: a line limit enforced while reading
(gateway.core.framing), a per-connection in-flight bound (reading stops while it is full:
backpressure instead of unbounded memory), a write timeout (a client that does not read its
replies is disconnected), and a connection limit. Bad bytes get a ``PROTOCOL_ERROR`` or
``LINE_TOO_LONG`` reply and the connection stays usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

from gateway.core.errors import LineTooLong, ProtocolError, StorageError
from gateway.core.framing import LineDecoder, Oversize, decode_request, encode_reply
from gateway.dispatch import Dispatcher, error_reply

log = logging.getLogger("gateway.pos")

READ_CHUNK = 64 * 1024


class PosServer:
    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        max_line_bytes: int,
        max_inflight: int,
        max_connections: int,
        write_timeout_s: float,
    ) -> None:
        self.dispatcher = dispatcher
        self.max_line_bytes = max_line_bytes
        self.max_inflight = max_inflight
        self.max_connections = max_connections
        self.write_timeout_s = write_timeout_s
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.StreamWriter] = set()
        self._requests: set[asyncio.Task[None]] = set()
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._stopping = False
        self.socket_path: Path | None = None

    @property
    def connections(self) -> int:
        return len(self._connections)

    @property
    def inflight(self) -> int:
        return len(self._requests)

    async def start_unix(self, path: Path, mode: int) -> None:
        _remove_stale_socket(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        server = await asyncio.start_unix_server(self._serve, path=str(path), limit=READ_CHUNK)
        os.chmod(path, mode)
        self.socket_path = path
        self._servers.append(server)
        log.info("POS socket listening on %s (mode %04o)", path, mode)

    async def start_tcp(self, host: str, port: int) -> None:
        server = await asyncio.start_server(self._serve, host=host, port=port, limit=READ_CHUNK)
        self._servers.append(server)
        log.info("POS TCP listening on %s:%d", host, port)

    async def stop(self, grace_s: float) -> None:
        """Stop accepting and reading; let in-flight requests finish and reply; close."""
        self._stopping = True
        for s in self._servers:
            s.close()
        if self._requests:
            _, pending = await asyncio.wait(set(self._requests), timeout=grace_s)
            if pending:
                log.warning("%d request(s) still in flight at the stop timeout", len(pending))
        for w in list(self._connections):
            w.close()
        for t in list(self._conn_tasks):
            t.cancel()
        if self._conn_tasks:
            await asyncio.wait(set(self._conn_tasks), timeout=1.0)
        for s in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 1.0)
        if self.socket_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.socket_path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
        if self._stopping or len(self._connections) >= self.max_connections:
            writer.write(
                encode_reply(
                    error_reply(
                        None,
                        ProtocolError(
                            "too many connections" if not self._stopping else "gateway is stopping"
                        ),
                    )
                )
            )
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.drain(), 1.0)
            writer.close()
            if task is not None:
                self._conn_tasks.discard(task)
            return
        self._connections.add(writer)
        conn = _Connection(self, writer)
        try:
            await conn.read_loop(reader)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(writer)
            if conn.inflight:
                # replies can no longer be delivered; the records are committed anyway and a
                # retry with the same id returns them.
                await asyncio.wait(set(conn.inflight), timeout=None)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            if task is not None:
                self._conn_tasks.discard(task)


class _Connection:
    def __init__(self, server: PosServer, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.writer = writer
        self.slots = asyncio.Semaphore(server.max_inflight)
        self.write_lock = asyncio.Lock()
        self.inflight: set[asyncio.Task[None]] = set()
        self.broken = False

    async def read_loop(self, reader: asyncio.StreamReader) -> None:
        decoder = LineDecoder(self.server.max_line_bytes)
        while not self.server._stopping and not self.broken:
            data = await reader.read(READ_CHUNK)
            if not data:
                return
            for ev in decoder.feed(data):
                if isinstance(ev, Oversize):
                    await self.send(
                        error_reply(
                            None,
                            LineTooLong(
                                f"request line exceeds {self.server.max_line_bytes} bytes; dropped"
                            ),
                        )
                    )
                    continue
                await self.slots.acquire()
                if self.server._stopping:
                    self.slots.release()
                    return
                t = asyncio.create_task(self.handle(ev.data))
                self.inflight.add(t)
                self.server._requests.add(t)
                t.add_done_callback(self._done)

    def _done(self, t: asyncio.Task[None]) -> None:
        self.inflight.discard(t)
        self.server._requests.discard(t)
        self.slots.release()

    async def handle(self, line: bytes) -> None:
        try:
            request = decode_request(line)
        except ProtocolError as exc:
            reply = error_reply(None, exc)
        else:
            reply = await self.server.dispatcher.handle(request)
        await self.send(reply)

    async def send(self, reply: dict[str, Any]) -> None:
        if self.broken:
            return
        data = encode_reply(reply)
        async with self.write_lock:
            if self.broken:  # disconnected while this reply waited for the lock
                return
            try:
                self.writer.write(data)
                await asyncio.wait_for(self.writer.drain(), self.server.write_timeout_s)
            except (TimeoutError, ConnectionError, RuntimeError):
                self.broken = True
                log.warning(
                    "POS client not reading its replies or gone; disconnected",
                    extra={"request_id": reply.get("id")},
                )
                self.writer.transport.abort()


def _remove_stale_socket(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StorageError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: a leftover from an unclean stop
    else:
        raise StorageError(f"another process is serving {path}")
    finally:
        probe.close()
