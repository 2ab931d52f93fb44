"""A minimal, fast stand-in for Mozrest's webhook, for benchmarks only.

The emulator (`mozrest-relay emulator`) validates every request and answers ~2,000 requests a
second: it would be what a benchmark measures. This receiver is a raw asyncio protocol (uvloop
when installed) that answers `200 {"status":"ok"}` to `POST /rms` and keeps, per request, the
body and its arrival time (`time.monotonic_ns()`, stamped when the whole request has been read;
CLOCK_MONOTONIC is system-wide on Linux, so a producer's stamp right after COMMIT compares).
Bodies are parsed only when asked for, so a request costs a few microseconds.

With `--delay-ms D` every `POST /rms` is answered D ms after it was read, as a slow Mozrest
would: the answer is scheduled on the event loop (`call_later`), so any number of requests wait
at once and the receiver stays free meanwhile. In that mode it also keeps, per bookingId, how
many of its requests are unanswered, and counts an *overlap* each time a request arrives while
another for the same booking is still unanswered (the relay sends one request per booking at a
time: the count must stay 0). Without the option the answer is written at once, as before, and
nothing is parsed.

Control (plain HTTP on the same port, no auth, loopback only; on a connection of its own: a
control request is answered at once, ahead of any delayed answer):
    GET  /_stats                  {"received", "first_ns", "last_ns", "delay_ms", "in_flight",
                                   "max_in_flight", "overlaps"}
    POST /_reset                  forget everything
    POST /_dump?path=FILE         write {"received", "bookings": {bookingId: [count, first_ns,
                                  last_ns, last_body]}, "overlaps", "overlap_bookings",
                                  "max_in_flight"} to FILE (a JSON file); answers {"ok"};
                                  with `&arrivals=1` also "arrivals_ns" (every arrival, in order)

Usage:
    python -m bench.receiver [--port 8099]          serve until SIGTERM/SIGINT
    python -m bench.receiver --delay-ms 200         answer every POST 200 ms after it arrived
    python -m bench.receiver --selftest [--seconds 5] [--connections 64]
        measure the receiver's standalone rate: it starts a receiver process and drives it with
        a raw-socket keep-alive client (one request in flight per connection, like the relay)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

OK_BODY = b'{"status":"ok"}'
OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(OK_BODY)).encode()
    + b"\r\n\r\n"
    + OK_BODY
)
#: Requests kept at most (bounded memory): far above any scenario's size.
MAX_KEPT = 3_000_000


def _response(status: int, body: bytes, reason: str = "OK") -> bytes:
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _booking_of(body: bytes) -> str:
    try:
        return str(json.loads(body)["bookingId"])
    except (ValueError, KeyError, TypeError):
        return "?"


class Store:
    """Arrivals in order: (arrival_ns, body); with a delay, the requests not yet answered."""

    def __init__(self, delay_ms: float = 0.0) -> None:
        self.delay_ms = delay_ms
        self.arrivals: list[tuple[int, bytes]] = []
        self.reset()

    def reset(self) -> None:
        self.arrivals = []
        #: Unanswered requests per booking (delay mode only); a booking leaves at 0.
        self.open: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.overlaps = 0
        self.overlap_bookings: dict[str, int] = {}

    def opened(self, booking_id: str) -> None:
        """A request of `booking_id` was read and its answer is waiting."""
        waiting = self.open.get(booking_id, 0)
        if waiting:
            self.overlaps += 1
            self.overlap_bookings[booking_id] = self.overlap_bookings.get(booking_id, 0) + 1
        self.open[booking_id] = waiting + 1
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight

    def answered(self, booking_id: str) -> None:
        waiting = self.open.get(booking_id, 0) - 1
        if waiting > 0:
            self.open[booking_id] = waiting
        else:
            self.open.pop(booking_id, None)
        # A reset while answers wait has already forgotten them.
        self.in_flight = max(self.in_flight - 1, 0)

    def stats(self) -> dict[str, Any]:
        a = self.arrivals
        return {
            "received": len(a),
            "first_ns": a[0][0] if a else None,
            "last_ns": a[-1][0] if a else None,
            "delay_ms": self.delay_ms,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "overlaps": self.overlaps,
        }

    def dump(self, path: str, *, arrivals: bool = False) -> None:
        bookings: dict[str, list[Any]] = {}
        for ns, body in self.arrivals:
            try:
                booking_id = str(json.loads(body)["bookingId"])
            except (ValueError, KeyError, TypeError):
                booking_id = "?"
            entry = bookings.get(booking_id)
            if entry is None:
                bookings[booking_id] = [1, ns, ns, body.decode("utf-8", "replace")]
            else:
                entry[0] += 1
                entry[2] = ns
                entry[3] = body.decode("utf-8", "replace")
        out: dict[str, Any] = {
            "received": len(self.arrivals),
            "bookings": bookings,
            "overlaps": self.overlaps,
            "overlap_bookings": dict(list(self.overlap_bookings.items())[:20]),
            "max_in_flight": self.max_in_flight,
        }
        if arrivals:
            out["arrivals_ns"] = [ns for ns, _ in self.arrivals]
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(out, f)
        os.replace(tmp, path)


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive with Content-Length bodies; enough for httpx and aiohttp clients."""

    __slots__ = ("buffer", "delay", "loop", "store", "transport")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        #: Seconds before a POST is answered; 0: at once (the fast path, nothing parsed).
        self.delay = store.delay_ms / 1000.0
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        out = []
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = buffer[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"\r\ncontent-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at + 2)
                length = int(lower[at + 17 : stop if stop >= 0 else len(lower)])
            total = end + 4 + length
            if len(buffer) < total:
                break
            body = buffer[end + 4 : total]
            buffer = buffer[total:]
            if head.startswith(b"POST /rms"):
                arrivals = self.store.arrivals
                if len(arrivals) < MAX_KEPT:
                    arrivals.append((time.monotonic_ns(), body))
                if self.delay:
                    self.answer_later(body)
                else:
                    out.append(OK)
            else:
                out.append(self.control(head))
        self.buffer = buffer
        if out and self.transport is not None:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def answer_later(self, body: bytes) -> None:
        """Answer this request `delay` seconds from now without holding the loop: the answers
        of every connection wait side by side (one timer each). A connection's answers leave in
        the order its requests came, since they all wait the same delay."""
        booking_id = _booking_of(body)
        self.store.opened(booking_id)
        self.loop.call_later(self.delay, self.answer, booking_id)

    def answer(self, booking_id: str) -> None:
        self.store.answered(booking_id)
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(OK)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def control(self, head: bytes) -> bytes:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "/")
        url = urlsplit(target)
        if method == "GET" and url.path == "/_stats":
            return _response(200, json.dumps(self.store.stats()).encode())
        if method == "POST" and url.path == "/_reset":
            self.store.reset()
            return _response(200, b'{"ok":true}')
        if method == "POST" and url.path == "/_dump":
            query = parse_qs(url.query)
            path = query.get("path", [""])[0]
            if not path:
                return _response(400, b'{"detail":"path is required"}', "Bad Request")
            self.store.dump(path, arrivals=query.get("arrivals", ["0"])[0] == "1")
            return _response(200, b'{"ok":true}')
        return _response(404, b'{"detail":"not found"}', "Not Found")


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def serve(host: str, port: int, lifetime: float, delay_ms: float = 0.0) -> None:
    loop = asyncio.get_running_loop()
    store = Store(delay_ms)
    server = await loop.create_server(lambda: HttpProtocol(store), host, port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    delay = f", answering after {delay_ms:g} ms" if delay_ms else ""
    print(f"receiver listening on http://{host}:{port}{delay}", flush=True)
    async with server:
        # Bounded: an orphaned receiver (its harness killed) ends by itself.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=lifetime)


# -- standalone rate -------------------------------------------------------------------------


def _sample_request(port: int) -> bytes:
    body = json.dumps(
        {
            "bookingId": "60e890aca5f07b6ee5b950b1",
            "venueId": "60e890aca5f07b6ee5b950b1",
            "partySize": 4,
            "status": "seated",
            "tables": ["28c3ce8b-8c10-4a64-8099-f0dffcc549a8"],
            "date": 1639578600,
            "prepayment": 50.0,
            "contact": {
                "firstname": "John",
                "lastname": "Doe",
                "email": "john.doe@mail.com",
                "telephone": "34646223399",
                "locale": "en",
            },
            "notes": "I am allergic to peanuts",
        },
        separators=(",", ":"),
    ).encode()
    return (
        f"POST /rms HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer bench\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def drive(port: int, *, seconds: float, connections: int) -> dict[str, float]:
    """Keep `connections` keep-alive connections busy, one request in flight on each."""
    request = _sample_request(port)
    deadline = time.monotonic() + seconds
    done = 0

    async def one() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < deadline:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                at = head.lower().find(b"content-length:")
                length = int(head[at + 15 : head.find(b"\r\n", at)]) if at >= 0 else 0
                await reader.readexactly(length)
                done += 1
        finally:
            writer.close()

    start = time.monotonic()
    await asyncio.gather(*(one() for _ in range(connections)))
    elapsed = time.monotonic() - start
    return {"requests": done, "seconds": elapsed, "rate": done / elapsed}


def selftest(
    port: int, seconds: float, connections: int, delay_ms: float = 0.0
) -> dict[str, float]:
    """Start a receiver process, drive it from this one, stop it; the standalone rate."""
    argv = [sys.executable, "-m", "bench.receiver", "--port", str(port)]
    if delay_ms:
        argv += ["--delay-ms", str(delay_ms)]
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # "receiver listening"
        _install_uvloop()
        return asyncio.run(drive(port, seconds=seconds, connections=connections))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--selftest", action="store_true", help="measure the standalone rate")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--lifetime", type=float, default=7200.0, help="exit after this long")
    parser.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="answer each POST this long after it arrived (a slow Mozrest); 0: at once",
    )
    args = parser.parse_args()
    if args.host not in {"127.0.0.1", "localhost", "::1"}:
        parser.error("the receiver serves loopback only")
    if args.selftest:
        result = selftest(args.port, min(args.seconds, 60.0), args.connections, args.delay_ms)
        print(json.dumps(result))
        return 0
    loop_name = _install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.lifetime, args.delay_ms))
    del loop_name
    return 0


if __name__ == "__main__":
    sys.exit(main())
