"""A Mozrest stand-in that answers whatever it is told to: a raw asyncio TCP server on loopback.

Not aiohttp.web: a web framework refuses to send most of what a hostile receiver can (NUL in a
body, a reset after the status line, a header no parser accepts). `HostileMozrest` serves
`POST /rms` in a thread of its own, so a synchronous test drives it and a module reuses it: its
next answers follow the script given to `play`; once the script is used up (or after
`turn_healthy`) it answers 200 with a small JSON body. It logs every request it received: arrival
time, booking id, the JSON body, and the answer it gave.

Every answer is sent on its own connection and ends it (`Connection: close`), so no answer's
framing can leak into the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

#: What a request gets once the script is used up.
HEALTHY_BODY = b'{"status":"ok"}'
#: A 1 MiB body: NUL bytes, invalid UTF-8 and text, repeated.
MEBIBYTE_BODY = (b'\x00\xff\xfe{"status":"ok"}\xc3(' * 65536)[: 1 << 20]

_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_LONG_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
#: Zone spellings an HTTP-date may carry, with their offset from UTC in minutes. RFC 9110 says
#: GMT; servers in the wild write the rest, and SPEC 9.2 says every spelling is honoured.
ZONES: dict[str, int] = {
    "GMT": 0,
    "UTC": 0,
    "UT": 0,
    "Z": 0,
    "gmt": 0,
    "+0000": 0,
    "-0000": 0,
    "+0100": 60,
    "-0800": -480,
    "+0530": 330,
    "EST": -300,
    "PDT": -420,
}

DateForm = Literal["imf", "rfc850", "asctime"]


@dataclass(frozen=True, slots=True)
class HttpDate:
    """An HTTP-date `offset_seconds` from the moment the answer is sent, in one of the three
    RFC 9110 forms and a zone spelling (asctime has no zone: it is always GMT)."""

    offset_seconds: float
    form: DateForm = "imf"
    zone: str = "GMT"

    def render(self, now: datetime) -> bytes:
        minutes = 0 if self.form == "asctime" else ZONES[self.zone]
        moment = now + timedelta(seconds=self.offset_seconds, minutes=minutes)
        clock = f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
        month = _MONTHS[moment.month - 1]
        if self.form == "imf":
            day = _WEEKDAYS[moment.weekday()]
            text = f"{day}, {moment.day:02d} {month} {moment.year} {clock} {self.zone}"
        elif self.form == "rfc850":
            day = _LONG_WEEKDAYS[moment.weekday()]
            text = f"{day}, {moment.day:02d}-{month}-{moment.year % 100:02d} {clock} {self.zone}"
        else:
            day = _WEEKDAYS[moment.weekday()]
            text = f"{day} {month} {moment.day:>2} {clock} {moment.year}"
        return text.encode()

    def __repr__(self) -> str:  # what a failing example prints
        return f"HttpDate({self.offset_seconds:+g}s, {self.form}, {self.zone})"


#: A header value: bytes as written, or an HTTP-date rendered when the answer is sent.
HeaderValue = bytes | HttpDate

#: How the answer goes out:
#: `answer`     the status line, headers and body, framed as `framing` says;
#: `reset`      the status line, then a TCP reset;
#: `truncated`  status line and headers promising more body than is sent, then a close;
#: `stall`      nothing at all until `stall_seconds` have passed (past the relay's timeout),
#:              then a close;
#: `close`      a close without any (final) answer.
Kind = Literal["answer", "reset", "truncated", "stall", "close"]
Framing = Literal["length", "chunked", "until-close"]


@dataclass(frozen=True, slots=True)
class Answer:
    """One scripted answer. `interim` 1xx status lines (never 101) go out before it."""

    status: int = 200
    headers: tuple[tuple[bytes, HeaderValue], ...] = ()
    body: bytes = HEALTHY_BODY
    kind: Kind = "answer"
    framing: Framing = "length"
    interim: tuple[int, ...] = ()
    reason: bytes = b"Whatever"
    stall_seconds: float = 1.5

    @property
    def accepted(self) -> bool:
        """Whether the stand-in took the state (as Mozrest would before answering 2xx): a 2xx
        decided for the request, whether or not the answer then reaches the relay."""
        return self.kind in ("answer", "reset", "truncated") and 200 <= self.status < 300

    def head(self, now: datetime) -> bytes:
        lines = [b"HTTP/1.1 %d %s" % (self.status, self.reason)]
        for name, value in self.headers:
            lines.append(
                name + b": " + (value.render(now) if isinstance(value, HttpDate) else value)
            )
        lines.append(b"Connection: close")
        if self._bodiless:
            pass  # 204 and 304 never carry a body, nor a framing header that promises one
        elif self.framing == "length" or self.kind == "truncated":
            lines.append(
                b"Content-Length: %d" % (len(self.body) + (1000 if self.kind == "truncated" else 0))
            )
        elif self.framing == "chunked":
            lines.append(b"Transfer-Encoding: chunked")
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def framed_body(self) -> bytes:
        if self._bodiless:
            return b""
        if self.framing == "chunked" and self.kind != "truncated":
            chunks = [self.body[i : i + 65536] for i in range(0, len(self.body), 65536)]
            return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks if c) + b"0\r\n\r\n"
        return self.body

    @property
    def _bodiless(self) -> bool:
        return self.status in (204, 304)

    def __repr__(self) -> str:
        parts = [f"{self.kind} {self.status}"]
        if self.interim:
            parts.append(f"after {'/'.join(map(str, self.interim))}")
        if self.headers:
            parts.append(f"headers={[(name, _short(value)) for name, value in self.headers]!r}")
        if self.kind in ("answer", "truncated") and self.body != HEALTHY_BODY:
            parts.append(f"body={_short(self.body)!r} ({len(self.body)} bytes, {self.framing})")
        return f"Answer({', '.join(parts)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        """How hypothesis prints a failing example: the short form, not a mebibyte of body."""
        printer.text(repr(self))


def _short(value: HeaderValue) -> HeaderValue:
    if isinstance(value, HttpDate) or len(value) <= 40:
        return value
    return value[:40] + b"...(%d bytes)" % len(value)


HEALTHY = Answer()


@dataclass(slots=True)
class Received:
    """One request as the stand-in saw it, and what it answered."""

    arrival: float  # time.time()
    booking_id: str | None
    body: Any  # the JSON body, or the raw bytes when it was not JSON
    answer: Answer
    scripted: bool

    @property
    def accepted(self) -> bool:
        return self.answer.accepted


@dataclass
class HostileMozrest:
    """The stand-in. `start()` it, `play(answers)`, read `received`, `stop()` it."""

    host: str = "127.0.0.1"
    port: int = 0
    received: list[Received] = field(default_factory=list)
    _script: deque[Answer] = field(default_factory=deque)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/rms"

    # -- driving it (from the test's thread) ---------------------------------------------

    def play(self, answers: Iterable[Answer]) -> None:
        """The next requests get these answers, in order of arrival; then healthy ones."""
        with self._lock:
            self._script = deque(answers)

    def turn_healthy(self) -> None:
        """Forget what is left of the script: every request from now on is accepted."""
        with self._lock:
            self._script.clear()

    def script_left(self) -> int:
        with self._lock:
            return len(self._script)

    def requests(self, booking_ids: Iterable[str] | None = None) -> list[Received]:
        """What arrived (for these bookings), oldest first."""
        wanted = None if booking_ids is None else set(booking_ids)
        with self._lock:
            return [r for r in self.received if wanted is None or r.booking_id in wanted]

    def last_accepted(self, booking_id: str) -> Any:
        """The body of the last request for the booking that the stand-in accepted, or None."""
        accepted = [r for r in self.requests([booking_id]) if r.accepted]
        return accepted[-1].body if accepted else None

    # -- serving (in its own thread and event loop) ---------------------------------------

    def start(self) -> HostileMozrest:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._server = loop.run_until_complete(
                asyncio.start_server(self._serve, self.host, self.port)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="hostile-mozrest", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the hostile Mozrest stand-in did not start")
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None or self._thread is None:
            return

        async def close() -> None:
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            body = await _read_request(reader)
            if body is None:
                return
            with self._lock:
                scripted = bool(self._script)
                answer = self._script.popleft() if scripted else HEALTHY
                self.received.append(_received(body, answer, scripted))
            await _send(answer, writer)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass  # the relay hung up first (it reads 4 KiB of a body at most): fine
        finally:
            if not writer.transport.is_closing():
                writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _received(body: bytes, answer: Answer, scripted: bool) -> Received:
    try:
        document: Any = json.loads(body)
    except ValueError:
        document = body
    booking_id = document.get("bookingId") if isinstance(document, dict) else None
    return Received(time.time(), booking_id, document, answer, scripted)


async def _read_request(reader: asyncio.StreamReader) -> bytes | None:
    """The body of one HTTP/1.1 request (Content-Length or chunked), or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        chunks: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return b"".join(chunks)
            chunks.append(chunk[:-2])
    return await reader.readexactly(int(headers.get(b"content-length", b"0")))


async def _send(answer: Answer, writer: asyncio.StreamWriter) -> None:
    interim = b"".join(
        b"HTTP/1.1 %d Interim\r\nX-Interim: yes\r\n\r\n" % code for code in answer.interim
    )
    if answer.kind == "stall":
        await asyncio.sleep(answer.stall_seconds)
        return
    if answer.kind == "close":
        writer.write(interim)
        await writer.drain()
        return
    head = answer.head(datetime.now(UTC))
    if answer.kind == "reset":
        writer.write(interim + head.split(b"\r\n", 1)[0] + b"\r\n")
        await writer.drain()
        _reset(writer)
        return
    writer.write(interim + head)
    body = answer.framed_body()
    for start in range(0, len(body), 65536):
        writer.write(body[start : start + 65536])
        await writer.drain()
    await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0) rather than a clean FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
