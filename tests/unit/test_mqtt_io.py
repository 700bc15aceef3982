"""gateway.mqtt_io.BufferedSocket over a scripted fake socket: paho's small reads served from
one big read, EOF and "nothing there" passed through, corked sends leaving in one call, and
what a full socket did not take handed back in order. (The whole transport runs on it in
tests/integration/test_mqtt_transport.py, over TCP, TLS and a Unix socket.)"""

from __future__ import annotations

import pytest

from gateway.mqtt_io import READ_CHUNK_BYTES, BufferedSocket


class FakeSocket:
    def __init__(self, chunks: list[bytes], accept: list[int] | None = None) -> None:
        self.chunks = chunks
        self.accept = accept or []  # bytes each send() takes; 0 = EAGAIN; none left = all
        self.asked: list[int] = []
        self.sent: list[bytes] = []
        self.closed = False

    def recv(self, n: int) -> bytes:
        self.asked.append(n)
        if not self.chunks:
            raise BlockingIOError
        return self.chunks.pop(0)

    def send(self, data: bytes) -> int:
        take = self.accept.pop(0) if self.accept else len(data)
        if take == 0:
            raise BlockingIOError
        self.sent.append(bytes(data[:take]))
        return take

    def close(self) -> None:
        self.closed = True

    def fileno(self) -> int:
        return 7


def test_buffered_socket_small_reads_served_from_one_big_read() -> None:
    fake = FakeSocket([b"\x32\x05hello\x40\x02\x00\x01"])
    sock = BufferedSocket(fake)
    assert sock.recv(1) == b"\x32" and fake.asked == [READ_CHUNK_BYTES]
    assert sock.pending() == 10
    assert sock.recv(1) == b"\x05"
    assert sock.recv(5) == b"hello"
    assert sock.recv(100) == b"\x40\x02\x00\x01"  # no more than is buffered
    assert sock.pending() == 0 and len(fake.asked) == 1
    with pytest.raises(BlockingIOError):  # nothing there: as a non-blocking socket says
        sock.recv(1)
    assert sock.fileno() == 7  # everything else is the wrapped socket's


def test_buffered_socket_eof_and_exact_reads_pass_through() -> None:
    fake = FakeSocket([b"ab", b""])
    sock = BufferedSocket(fake)
    assert sock.recv(2) == b"ab" and sock.pending() == 0
    assert sock.recv(1) == b""  # the peer closed


def test_buffered_socket_corked_sends_leave_in_one_call() -> None:
    fake = FakeSocket([])
    sock = BufferedSocket(fake)
    assert sock.send(b"direct") == 6 and fake.sent == [b"direct"]
    sock.corked = True
    assert sock.send(b"reply-1") == 7 and sock.send(b"ack-1") == 5 and fake.sent == [b"direct"]
    assert sock.uncork() == b""
    assert fake.sent == [b"direct", b"reply-1ack-1"] and not sock.corked


@pytest.mark.parametrize("accept", [[4], [0]])
def test_buffered_socket_uncork_returns_what_a_full_socket_did_not_take(accept: list[int]) -> None:
    fake = FakeSocket([], accept=list(accept))
    sock = BufferedSocket(fake)
    sock.corked = True
    sock.send(b"0123456789")
    rest = sock.uncork()
    assert b"".join(fake.sent) + rest == b"0123456789"
    assert rest == b"0123456789"[accept[0] :]
    assert sock.uncork() == b""  # handed back: not sent twice


def test_buffered_socket_close_sends_what_is_corked_first() -> None:
    fake = FakeSocket([])
    sock = BufferedSocket(fake)
    sock.corked = True
    sock.send(b"\xe0\x00")  # paho "wrote" DISCONNECT and closes at once
    sock.close()
    assert fake.sent == [b"\xe0\x00"] and fake.closed


def test_buffered_socket_close_never_waits_for_a_full_socket() -> None:
    fake = FakeSocket([], accept=[3, 0])  # takes 3 bytes, then the broker stops reading
    sock = BufferedSocket(fake)
    sock.corked = True
    sock.send(b"reply+ack")
    sock.close()
    assert fake.sent == [b"rep"] and fake.closed
