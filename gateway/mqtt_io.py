"""How the MQTT client's socket meets the event loop: buffered reads, writes flushed on the loop.

aiomqtt drives paho-mqtt's socket from asyncio: paho reads each packet with several ``recv``
calls (one byte of packet type, the remaining length byte by byte, then the body) and asks
for a write callback through ``call_soon_threadsafe`` (a wake-up byte through the loop's self
pipe, then ``add_writer``/``remove_writer``) for every burst of packets it queues. At hundreds of
requests a second those system calls and loop turns were a large part of the gateway's CPU per
request (docs/performance.md, "MQTT"). :func:`install` changes two things on one paho client,
before it connects:

- its socket is wrapped in :class:`BufferedSocket`: one ``recv`` of up to 64 KiB feeds paho's
  small reads from memory. ``pending()`` reports the buffered bytes, so aiomqtt's read callback
  (which loops while the socket has pending bytes, as it does for TLS) drains the buffer before
  it returns to the loop, and nothing is left waiting for a readiness event that will not come;
- a write request made on the loop's thread (replies, acknowledgements) schedules one
  ``loop_write`` with ``call_soon``, corked: every packet queued in that loop turn (the replies
  and acknowledgements of a whole ledger group) leaves in one ``send``. Only when the socket is
  full does the rest wait for ``add_writer`` and paho's own partial-write handling. Requests
  from other threads (paho's connect runs in an executor) keep aiomqtt's thread-safe path.

This module does not change what is sent or when it is acknowledged; gateway.mqtt decides that.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from typing import Any

import aiomqtt

#: Bytes asked of the kernel per read: many request packets at once under load.
READ_CHUNK_BYTES = 65536


class BufferedSocket:
    """A socket whose ``recv`` is served from one buffer refilled by large reads, and whose
    ``send`` can be corked: while ``corked``, sends are collected and :meth:`uncork` sends
    them in one call.

    Everything else goes to the wrapped socket (plain or TLS)."""

    __slots__ = ("_buf", "_out", "_pos", "_sock", "corked")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._buf = b""
        self._pos = 0
        self._out = bytearray()
        self.corked = False

    def send(self, data: bytes | bytearray) -> int:
        if self.corked:
            self._out += data
            return len(data)
        return int(self._sock.send(data))

    def uncork(self) -> bytes:
        """Send what was collected while corked; return what the socket did not take now.

        An OSError (connection reset, broken pipe) is raised: the connection is gone."""
        self.corked = False
        if not self._out:
            return b""
        out, self._out = self._out, bytearray()
        try:
            sent = self._sock.send(out)
        except (BlockingIOError, ssl.SSLWantWriteError):
            sent = 0
        return bytes(out[sent:])

    def close(self) -> None:
        # paho closes the socket right after "writing" DISCONNECT: get it (and anything
        # before it) out first, or the broker would see a lost connection (Last Will). Only
        # what the socket takes now: this runs on the event loop, which must never block on a
        # broker that stopped reading (it then sees a lost connection, which is what it is).
        with contextlib.suppress(OSError):
            while self._out:
                sent = self._sock.send(self._out)
                if sent <= 0:
                    break
                del self._out[:sent]
        self._out.clear()
        self._sock.close()

    def recv(self, bufsize: int) -> bytes:
        if self._pos >= len(self._buf):
            # Raises BlockingIOError / SSLWantReadError when nothing is there, as paho expects;
            # b"" is the peer closing, passed on as such.
            data = self._sock.recv(max(bufsize, READ_CHUNK_BYTES))
            if len(data) <= bufsize:
                return bytes(data)
            self._buf, self._pos = data, 0
        end = self._pos + bufsize
        chunk = self._buf[self._pos : end]
        self._pos = min(end, len(self._buf))
        return chunk

    def pending(self) -> int:
        buffered = len(self._buf) - self._pos
        if isinstance(self._sock, ssl.SSLSocket):
            buffered += self._sock.pending()
        return buffered

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def install(
    client: aiomqtt.Client,
    loop: asyncio.AbstractEventLoop,
    socket_options: tuple[tuple[int, int, int], ...] = (),
) -> None:
    """Give ``client``'s paho client a buffered socket and loop-side write scheduling;
    ``socket_options`` (``setsockopt`` arguments) are applied to the socket when it opens."""
    paho = client._client
    aiomqtt_open = paho.on_socket_open
    aiomqtt_register_write = paho.on_socket_register_write
    loop_thread = threading.get_ident()
    scheduled = False

    def on_socket_open(mqttc: Any, userdata: Any, sock: Any) -> None:
        # aiomqtt sets its socket_options after connect() only on a socket.socket, which the
        # wrapper is not: set them here, on the real socket (TCP_NODELAY matters: ~40 ms).
        if isinstance(sock, socket.socket):
            for option in socket_options:
                sock.setsockopt(*option)
        buffered = BufferedSocket(sock)
        mqttc._sock = buffered  # paho reads and writes through self._sock from now on
        if aiomqtt_open is not None:
            aiomqtt_open(mqttc, userdata, buffered)

    def flush() -> None:
        nonlocal scheduled
        scheduled = False
        sock = paho._sock
        buffered = sock if isinstance(sock, BufferedSocket) else None
        try:
            if buffered is not None:
                buffered.corked = True  # every packet of this turn in one send()
            try:
                paho.loop_write()
            finally:
                rest = buffered.uncork() if buffered is not None else b""
            if rest:  # the socket is full: paho sends the rest once it is writable
                paho._out_packet.appendleft(
                    {
                        "command": 0,  # not PUBLISH/DISCONNECT: written, nothing else
                        "mid": 0,
                        "qos": 0,
                        "pos": 0,
                        "to_process": len(rest),
                        "packet": rest,
                        "info": None,
                    }
                )
        except Exception as exc:  # as aiomqtt's own write callback: the connection is broken
            disconnected = client._disconnected
            if not disconnected.done():
                disconnected.set_exception(exc)
            return
        if paho.want_write() and paho._sock is not None:
            # Wait for writability with aiomqtt's callback (uncorked writes, paho's own
            # EAGAIN handling), which unregisters once everything is out.
            assert aiomqtt_register_write is not None
            paho._registered_write = True
            aiomqtt_register_write(paho, None, paho._sock)

    def on_socket_register_write(mqttc: Any, userdata: Any, sock: Any) -> None:
        nonlocal scheduled
        if threading.get_ident() != loop_thread:
            assert aiomqtt_register_write is not None
            aiomqtt_register_write(mqttc, userdata, sock)
            return
        # paho calls this once and then not again until it unregisters (after a write that
        # emptied its queue), so everything queued until the flush goes out in it.
        if not scheduled:
            scheduled = True
            loop.call_soon(flush)

    paho.on_socket_open = on_socket_open
    paho.on_socket_register_write = on_socket_register_write
