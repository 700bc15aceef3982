"""MQTT load for bench_mqtt.py: many tills in one process, on a minimal MQTT client.

A benchmark of the gateway must not be limited by its load generator. aiomqtt/paho tills cost
a few hundred microseconds of Python per request and reply, about as much as the gateway
itself, so ``bench_mqtt.py`` runs its tills in separate processes (``--procs``), each with this
client: hand-built MQTT 5 / 3.1.1 packets over asyncio streams, nothing else. A till is one
TCP connection (clean session, its own client id) that subscribes to
``<prefix>/<gateway>/tills/<till>/res/#`` and publishes each request at QoS 1 to
``.../req`` — v5 with a response topic ``.../res/<client id>`` and the request id as
correlation data, 3.1.1 without properties (the reply is matched by its ``id``). Replies
(QoS 1) are acknowledged at once. Each till has one request in flight at a time, like a POS.

Run by bench_mqtt.py, not by hand:

    python bench/mqtt_load.py --port P --first 1 --tills 8 --requests 500 [--protocol 5]

It prints ``ready`` once every till is connected and subscribed, waits for a line on stdin,
runs, and prints one JSON line: records, failures, start/end (``time.monotonic``: one clock
for every process on the machine), the latencies when asked, and its own CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import sale

CONNECT, CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK = 1, 2, 3, 4, 8, 9
TIMEOUT_S = 30.0


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


class LeanTill:
    """One till on one connection: ``request()`` publishes and waits for the reply."""

    def __init__(self, port: int, till: str, *, v5: bool, base: str) -> None:
        self.port = port
        self.till = till
        self.v5 = v5
        self.client_id = f"bench-{till}"
        self.topic = f"{base}/tills/{till}/req".encode()
        self.response_topic = f"{base}/tills/{till}/res/{self.client_id}"
        self.waiters: dict[bytes, asyncio.Future[dict[str, object]]] = {}
        self.next_mid = 0

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(6, 1, 1)  # TCP_NODELAY
        level = 5 if self.v5 else 4
        var = _str("MQTT") + bytes([level, 0x02]) + struct.pack("!H", 60)
        if self.v5:
            var += b"\x00"  # no properties
        self.writer.write(_packet(CONNECT << 4, var + _str(self.client_id)))
        ptype, _ = await asyncio.wait_for(self._read_packet(), TIMEOUT_S)
        assert ptype >> 4 == CONNACK, ptype
        sub = struct.pack("!H", 1) + (b"\x00" if self.v5 else b"")
        sub += _str(f"{self.response_topic.rsplit('/', 1)[0]}/#") + b"\x01"
        self.writer.write(_packet(SUBSCRIBE << 4 | 2, sub))
        ptype, _ = await asyncio.wait_for(self._read_packet(), TIMEOUT_S)
        assert ptype >> 4 == SUBACK, ptype
        self.reader_task = asyncio.create_task(self._read_loop())

    async def close(self) -> None:
        self.reader_task.cancel()
        self.writer.write(b"\xe0\x00")  # DISCONNECT
        self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT_S)
        except (OSError, TimeoutError):
            pass

    async def _read_packet(self) -> tuple[int, bytes]:
        head = await self.reader.readexactly(1)
        n = shift = 0
        while True:
            b = (await self.reader.readexactly(1))[0]
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        return head[0], await self.reader.readexactly(n) if n else b""

    async def _read_loop(self) -> None:
        while True:
            first, body = await self._read_packet()
            if first >> 4 != PUBLISH:
                continue  # PUBACKs of our requests
            qos = (first >> 1) & 3
            (tlen,) = struct.unpack_from("!H", body)
            pos = 2 + tlen
            if qos:
                mid = body[pos : pos + 2]
                pos += 2
                self.writer.write(b"\x40\x02" + mid)
            key = None
            if self.v5:
                plen = shift = 0
                while True:
                    b = body[pos]
                    pos += 1
                    plen |= (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        break
                props, pos = body[pos : pos + plen], pos + plen
                i = 0
                while i < len(props):
                    ident = props[i]
                    if ident == 0x09:  # correlation data
                        (ln,) = struct.unpack_from("!H", props, i + 1)
                        key = props[i + 3 : i + 3 + ln]
                        break
                    if ident in (0x03, 0x08):  # content type, response topic: strings
                        (ln,) = struct.unpack_from("!H", props, i + 1)
                        i += 3 + ln
                    elif ident == 0x01:  # payload format indicator
                        i += 2
                    elif ident == 0x26:  # user property: two strings
                        (ln,) = struct.unpack_from("!H", props, i + 1)
                        (ln2,) = struct.unpack_from("!H", props, i + 3 + ln)
                        i += 5 + ln + ln2
                    else:
                        break
            reply = json.loads(body[pos:])
            if key is None:
                key = str(reply.get("id")).encode()
            fut = self.waiters.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def request(self, request: dict[str, object]) -> dict[str, object]:
        key = str(request["id"]).encode()
        fut = asyncio.get_running_loop().create_future()
        self.waiters[key] = fut
        self.next_mid = self.next_mid % 65535 + 1
        body = struct.pack("!H", len(self.topic)) + self.topic + struct.pack("!H", self.next_mid)
        if self.v5:
            rt = self.response_topic.encode()
            props = b"\x08" + struct.pack("!H", len(rt)) + rt
            props += b"\x09" + struct.pack("!H", len(key)) + key
            body += _varint(len(props)) + props
        body += json.dumps(request).encode()
        self.writer.write(_packet(PUBLISH << 4 | 2, body))
        return await asyncio.wait_for(fut, TIMEOUT_S)


async def run(args: argparse.Namespace) -> None:
    v5 = args.protocol == "5"
    base = f"{args.prefix}/{args.gateway}"
    tills = [
        LeanTill(args.port, f"{args.till_prefix}{args.first + k}", v5=v5, base=base)
        for k in range(args.tills)
    ]
    for t in tills:
        await t.connect()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    latencies: list[float] = []
    failures = 0

    async def drive(t: LeanTill, k: int) -> None:
        nonlocal failures
        for i in range(args.requests):
            req = sale(args.id_base + 1_000_000 * (args.first + k) + i, t.till)
            t0 = time.perf_counter()
            reply = await t.request(req)
            if args.latencies:
                latencies.append(time.perf_counter() - t0)
            if not reply.get("ok"):
                failures += 1
                if failures <= 3:
                    print(json.dumps({"failed": reply})[:500], file=sys.stderr)

    cpu0 = time.process_time()
    start = time.monotonic()
    await asyncio.gather(*(drive(t, k) for k, t in enumerate(tills)))
    end = time.monotonic()
    cpu = time.process_time() - cpu0
    for t in tills:
        await t.close()
    result = {
        "records": args.tills * args.requests,
        "failures": failures,
        "start": start,
        "end": end,
        "cpu_s": cpu,
        "latencies": latencies if args.latencies else None,
    }
    print(json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--first", type=int, default=1, help="number of the first till")
    p.add_argument("--tills", type=int, default=1)
    p.add_argument("--requests", type=int, default=1000, help="per till")
    p.add_argument("--protocol", choices=("5", "3.1.1"), default="5")
    p.add_argument("--prefix", default="fiscal")
    p.add_argument("--gateway", default="gw-1")
    p.add_argument("--till-prefix", default="till-")
    p.add_argument("--id-base", type=int, default=0, help="added to every request number")
    p.add_argument("--latencies", action="store_true", help="report every round trip")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
