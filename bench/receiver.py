"""A minimal, fast stand-in for Mozrest's webhook, for benchmarks only.

The emulator (`mozrest-relay emulator`) validates every request and answers ~2,000 requests a
second: it would be what a benchmark measures. This receiver is a raw asyncio protocol (uvloop
when installed) that answers `200 {"status":"ok"}` to `POST /rms` and keeps, per request, the
body and its arrival time (`time.monotonic_ns()`, stamped when the whole request has been read;
CLOCK_MONOTONIC is system-wide on Linux, so a producer's stamp right after COMMIT compares).
Bodies are parsed only when asked for, so a request costs a few microseconds.

Control (plain HTTP on the same port, no auth, loopback only):
    GET  /_stats                  {"received", "first_ns", "last_ns"}
    POST /_reset                  forget everything
    POST /_dump?path=FILE         write {"received", "bookings": {bookingId: [count, first_ns,
                                  last_ns, last_body]}} to FILE (a JSON file); answers {"ok"};
                                  with &arrivals=1, also "arrivals_ns": every request's arrival

Usage:
    python -m bench.receiver [--port 8099]          serve until SIGTERM/SIGINT
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


class Store:
    """Arrivals in order: (arrival_ns, body)."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[int, bytes]] = []

    def reset(self) -> None:
        self.arrivals = []

    def stats(self) -> dict[str, Any]:
        a = self.arrivals
        return {
            "received": len(a),
            "first_ns": a[0][0] if a else None,
            "last_ns": a[-1][0] if a else None,
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
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            out: dict[str, Any] = {"received": len(self.arrivals), "bookings": bookings}
            if arrivals:
                out["arrivals_ns"] = [ns for ns, _ in self.arrivals]
            json.dump(out, f)
        os.replace(tmp, path)


class HttpProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive with Content-Length bodies; enough for httpx and aiohttp clients."""

    __slots__ = ("buffer", "store", "transport")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

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
                out.append(OK)
            else:
                out.append(self.control(head))
        self.buffer = buffer
        if out and self.transport is not None:
            self.transport.write(b"".join(out) if len(out) > 1 else out[0])

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
            self.store.dump(path, arrivals=query.get("arrivals", [""])[0] == "1")
            return _response(200, b'{"ok":true}')
        return _response(404, b'{"detail":"not found"}', "Not Found")


def _install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def serve(host: str, port: int, lifetime: float) -> None:
    loop = asyncio.get_running_loop()
    store = Store()
    server = await loop.create_server(lambda: HttpProtocol(store), host, port, backlog=1024)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"receiver listening on http://{host}:{port}", flush=True)
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


def selftest(port: int, seconds: float, connections: int) -> dict[str, float]:
    """Start a receiver process, drive it from this one, stop it; the standalone rate."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.receiver", "--port", str(port)],
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
    args = parser.parse_args()
    if args.host not in {"127.0.0.1", "localhost", "::1"}:
        parser.error("the receiver serves loopback only")
    if args.selftest:
        result = selftest(args.port, min(args.seconds, 60.0), args.connections)
        print(json.dumps(result))
        return 0
    loop_name = _install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.lifetime))
    del loop_name
    return 0


if __name__ == "__main__":
    sys.exit(main())
