"""A local Mozrest stand-in: the reservation webhook and POS tables endpoint, with injected faults.

`mozrest-relay emulator` serves it on loopback (`serve`); tests build it in process (`create_app`).
It validates what arrives as Mozrest documents the webhook payload (the README's outbox contract),
by `app.contract.parse_state(strict=True)`.

Mozrest's endpoints
    POST /rms                          the reservation webhook; `Authorization: Bearer <token>`.
                                       200 `{"status": "ok", "bookingId"}`, 401 bad credentials,
                                       400 `{"detail", "field"?}` for a body that breaks the
                                       contract, isn't JSON, isn't `application/json` or is over
                                       64 KiB, 422 `Unknown SKU(s): …` when a venue's menu says so.
    GET  /venues/{venueId}/pos-tables  `{"venueId", "tables": [{"id", "name", "area"}], "count"}`;
                                       Bearer auth with the Partner API key. A venue without
                                       configured tables answers `DEFAULT_TABLES`.

Without a configured token (or api key) every request passes, with or without a Bearer token; with
one, a missing or different token is 401.

Accepted states are upserted per `bookingId`. Like Mozrest, the emulator's POS order keeps the
items of the last state that carried them: a state without `items` (or with an empty array) leaves
them untouched, and the booking's `order_items_kept` says so. When a venue has a menu, unknown
SKUs are appended to the monitoring trace and the state is still accepted, as Mozrest documents;
a menu with `reject_unknown` answers 422 instead and stores nothing.

Control and inspection API (no auth)
    GET    /                                   this map, as JSON
    GET    /_emulator/bookings                 `{"items": {bookingId: booking}}`, where a booking
                                               is `{"state", "accepted_count", "order_items",
                                               "order_items_kept"}`; `state` is the last accepted
                                               body as received
    GET    /_emulator/bookings/{bookingId}     one booking plus its `bookingId`; 404 if none
    GET    /_emulator/requests                 `{"items": [...]}`: every request /rms received,
           ?booking_id=&since_seq=             oldest first, the last `REQUEST_LOG_LIMIT` kept; each
                                               `{"seq", "bookingId", "status_code", "received_at",
                                               "arrival_ns", "finished_ns", "body", "fault"}`
                                               (`status_code` null for a dropped connection)
    GET    /_emulator/trace                    `{"items": [...]}`: monitoring events, e.g.
                                               `{"type": "unknown_sku", "bookingId", "venueId",
                                               "skus", "rejected", "at"}`
    GET    /_emulator/faults                   the fault settings and `fail_next_remaining`
    PUT    /_emulator/faults                   replace them (body: `FaultSettings`; omitted fields
                                               take their defaults; 422 on bad values)
    DELETE /_emulator/faults                   no faults
    PUT    /_emulator/venues/{venueId}/menu    `{"skus": [...], "reject_unknown": false}`
    PUT    /_emulator/venues/{venueId}/tables  `{"tables": [{"id", "name", "area"}]}`
    PUT    /_emulator/token                    change the keys it expects at once, as Mozrest
                                               rotating them: `{"token": "...", "api_key": ...}`
                                               (the webhook token, the Partner API key; an omitted
                                               one stays, null accepts any); answers which are set
    POST   /_emulator/reset                    forget everything: bookings, request log, trace,
                                               faults, menus, tables and stats (`seq` keeps
                                               counting, so `since_seq` polling stays correct;
                                               the keys stay as they are)
    GET    /_emulator/stats                    `{"received", "accepted", "dropped", "by_status"}`
                                               for /rms

Faults (`FaultSettings`) apply to the endpoints named by `target`: "rms" (the default),
"pos-tables" or "all". Per request, in this order: wait `latency_ms` plus up to
`latency_jitter_ms`; drop the connection with probability `drop_rate`; answer
`fail_next_status` while the counted burst `fail_next` lasts; answer `status` when set; answer
`failure_status` with probability `failure_rate`. Injected failure answers carry `Retry-After`
when `retry_after_seconds` is set (as an HTTP date with `retry_after_http_date`). Random draws come
from `random.Random(seed)`, so a seeded run is reproducible. Faults come before the Bearer check.

A drop starts a response (status 503, `Content-Length: 1`) and then raises `ConnectionDropped`
before any body: per ASGI the server must then close the connection, so a client reading the
answer gets a transport error (aiohttp: `ServerDisconnectedError`; httpx: `RemoteProtocolError`)
instead of an HTTP answer; one that stops at the status line sees a retryable 503. In process
(httpx's `ASGITransport`) the exception reaches the caller. Dropped requests are not stored, and
`serve` keeps uvicorn from logging these deliberate errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Annotated, Any, Final, Literal, NoReturn

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from app.contract import DEFAULT_MAX_PAYLOAD_BYTES, ContractError, parse_state

#: How many /rms requests and trace events are kept: enough for a long benchmark, bounded memory.
REQUEST_LOG_LIMIT: Final = 100_000
TRACE_LIMIT: Final = 100_000
#: What an unconfigured venue's POS tables are, so `make run` shows something.
DEFAULT_TABLES: Final[tuple[dict[str, str | None], ...]] = (
    {"id": "T1", "name": "Table 1", "area": "Main room"},
    {"id": "T2", "name": "Table 2", "area": "Main room"},
    {"id": "T3", "name": "Table 3", "area": "Terrace"},
    {"id": "T4", "name": "Table 4", "area": None},
)

FaultTarget = Literal["rms", "pos-tables", "all"]
_NOT_JSON: Final = object()


class ConnectionDropped(Exception):
    """Raised after a response has started so that the server closes the connection (a drop)."""


class FaultSettings(BaseModel):
    """Faults to inject; every field is optional and a PUT replaces the whole set."""

    model_config = ConfigDict(extra="forbid")

    target: FaultTarget = "rms"
    failure_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    failure_status: int = Field(default=500, ge=300, le=599)
    status: int | None = Field(default=None, ge=300, le=599)
    latency_ms: float = Field(default=0.0, ge=0.0, le=60_000)
    latency_jitter_ms: float = Field(default=0.0, ge=0.0, le=60_000)
    retry_after_seconds: int | None = Field(default=None, ge=0)
    retry_after_http_date: bool = False
    drop_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    fail_next: int = Field(default=0, ge=0)
    fail_next_status: int = Field(default=503, ge=300, le=599)
    seed: int | None = None


class MenuSettings(BaseModel):
    """A venue's menu: the SKUs its POS knows, and whether unknown ones are refused with 422."""

    model_config = ConfigDict(extra="forbid")

    skus: list[str]
    reject_unknown: bool = False


class TokenSettings(BaseModel):
    """New keys for the emulator to expect; an omitted one is left as it is, null accepts any."""

    model_config = ConfigDict(extra="forbid")

    token: str | None = Field(default=None, min_length=1)
    api_key: str | None = Field(default=None, min_length=1)


class PosTable(BaseModel):
    """One table as Mozrest's POS tables endpoint describes it."""

    model_config = ConfigDict(extra="forbid")

    id: str
    name: str
    area: str | None = None


class TablesSettings(BaseModel):
    """A venue's POS tables."""

    model_config = ConfigDict(extra="forbid")

    tables: list[PosTable]


@dataclass(slots=True)
class _Fault:
    """A fault drawn for one request: `status` None means drop the connection."""

    name: str
    status: int | None


@dataclass(slots=True)
class _Faults:
    """Active fault settings with their random source and what is left of the counted burst."""

    settings: FaultSettings
    rng: random.Random
    fail_next_remaining: int

    @classmethod
    def from_settings(cls, settings: FaultSettings) -> _Faults:
        return cls(settings, random.Random(settings.seed), settings.fail_next)

    def draw(self, endpoint: FaultTarget) -> tuple[float, _Fault | None]:
        """The delay in seconds and the fault, if any, for one request to `endpoint`."""
        settings = self.settings
        if settings.target not in (endpoint, "all"):
            return 0.0, None
        delay_ms = settings.latency_ms
        if settings.latency_jitter_ms:
            delay_ms += self.rng.uniform(0.0, settings.latency_jitter_ms)
        delay_seconds = delay_ms / 1000
        if settings.drop_rate and self.rng.random() < settings.drop_rate:
            return delay_seconds, _Fault("drop", None)
        if self.fail_next_remaining > 0:
            self.fail_next_remaining -= 1
            return delay_seconds, _Fault("fail_next", settings.fail_next_status)
        if settings.status is not None:
            return delay_seconds, _Fault("status", settings.status)
        if settings.failure_rate and self.rng.random() < settings.failure_rate:
            return delay_seconds, _Fault("failure_rate", settings.failure_status)
        return delay_seconds, None

    def as_json(self) -> dict[str, Any]:
        return {**self.settings.model_dump(), "fail_next_remaining": self.fail_next_remaining}


@dataclass(slots=True)
class _Booking:
    """What the emulated POS holds for one booking."""

    state: dict[str, Any]
    accepted_count: int = 0
    order_items: list[dict[str, Any]] = field(default_factory=list)
    #: True when the last accepted state carried no items and the order kept earlier ones.
    order_items_kept: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "accepted_count": self.accepted_count,
            "order_items": self.order_items,
            "order_items_kept": self.order_items_kept,
        }


@dataclass(slots=True)
class _Menu:
    skus: frozenset[str]
    reject_unknown: bool


class Emulator:
    """Everything one emulator app holds; it lives on `app.state.emulator`."""

    def __init__(self, *, token: str | None, api_key: str | None) -> None:
        self.token = token
        self.api_key = api_key
        self.next_seq = 1
        self.reset()

    def reset(self) -> None:
        """Forget what was received and configured; `next_seq` keeps counting."""
        self.bookings: dict[str, _Booking] = {}
        self.requests: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_LIMIT)
        self.trace: deque[dict[str, Any]] = deque(maxlen=TRACE_LIMIT)
        self.faults: _Faults | None = None
        self.menus: dict[str, _Menu] = {}
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.received = 0
        self.accepted = 0
        self.dropped = 0
        self.by_status: dict[int, int] = {}

    def draw_fault(self, endpoint: FaultTarget) -> tuple[float, _Fault | None]:
        return (0.0, None) if self.faults is None else self.faults.draw(endpoint)

    def fault_response(self, fault: _Fault) -> Response:
        if fault.status is None:
            return _DroppedConnection()
        headers = {}
        assert self.faults is not None  # a fault was drawn from them
        settings = self.faults.settings
        if settings.retry_after_seconds is not None:
            if settings.retry_after_http_date:
                when = datetime.now(UTC) + timedelta(seconds=settings.retry_after_seconds)
                headers["Retry-After"] = format_datetime(when, usegmt=True)
            else:
                headers["Retry-After"] = str(settings.retry_after_seconds)
        detail = f"Injected fault ({fault.name}): {fault.status}"
        return JSONResponse({"detail": detail}, status_code=fault.status, headers=headers)

    def accept(self, request: Request, raw: bytes, body: Any) -> Response:
        """Check one webhook request that drew no fault and store its state if it is valid."""
        rejection = _bearer_rejection(request.headers.get("authorization"), self.token)
        if rejection is not None:
            return _unauthorized(rejection)
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            return JSONResponse({"detail": "Content-Type must be application/json"}, 400)
        try:
            if len(raw) > DEFAULT_MAX_PAYLOAD_BYTES:
                raise ContractError(
                    "payload", f"is larger than the {DEFAULT_MAX_PAYLOAD_BYTES}-byte limit"
                )
            if body is _NOT_JSON:
                raise ContractError("payload", "is not valid JSON")
            state = parse_state(body, strict=True)
        except ContractError as err:
            return JSONResponse({"detail": str(err), "field": err.field}, 400)
        booking_id: str = state["bookingId"]
        items: list[dict[str, Any]] | None = state.get("items")
        menu = self.menus.get(state["venueId"])
        if items and menu is not None:
            unknown = list(dict.fromkeys(i["sku"] for i in items if i["sku"] not in menu.skus))
            if unknown:
                self.trace.append(
                    {
                        "type": "unknown_sku",
                        "bookingId": booking_id,
                        "venueId": state["venueId"],
                        "skus": unknown,
                        "rejected": menu.reject_unknown,
                        "at": datetime.now(UTC).isoformat(),
                    }
                )
                if menu.reject_unknown:
                    return JSONResponse({"detail": f"Unknown SKU(s): {', '.join(unknown)}"}, 422)
        booking = self.bookings.get(booking_id)
        if booking is None:
            booking = self.bookings[booking_id] = _Booking(state=body)
        else:
            booking.state = body
        booking.accepted_count += 1
        if items:
            booking.order_items, booking.order_items_kept = items, False
        else:
            booking.order_items_kept = bool(booking.order_items)
        self.accepted += 1
        return JSONResponse({"status": "ok", "bookingId": booking_id})

    def log_request(
        self,
        *,
        body: Any,
        status_code: int | None,
        received_at: datetime,
        arrival_ns: int,
        fault: _Fault | None,
    ) -> None:
        booking_id = body.get("bookingId") if isinstance(body, dict) else None
        self.requests.append(
            {
                "seq": self.next_seq,
                "bookingId": booking_id if isinstance(booking_id, str) else None,
                "status_code": status_code,
                "received_at": received_at.isoformat(),
                "arrival_ns": arrival_ns,
                "finished_ns": time.monotonic_ns(),
                "body": body,
                "fault": None if fault is None else fault.name,
            }
        )
        self.next_seq += 1
        self.received += 1
        if status_code is None:
            self.dropped += 1
        else:
            self.by_status[status_code] = self.by_status.get(status_code, 0) + 1


class _DroppedConnection(Response):
    """Starts an answer it never finishes, so that the server closes the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": 503, "headers": [(b"content-length", b"1")]}
        )
        raise ConnectionDropped


def _bearer_rejection(authorization: str | None, expected: str | None) -> str | None:
    """Why a request's Bearer credentials are refused, or None when they are accepted. With no
    token expected, every request is accepted, with or without credentials: so a relay run
    without MOZREST_WEBHOOK_TOKEN (allowed on loopback) works against an emulator started
    without `--token`."""
    if expected is None:
        return None
    scheme, _, credentials = (authorization or "").partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return "Missing bearer token"
    if not secrets.compare_digest(credentials.encode(), expected.encode()):
        return "Invalid bearer token"
    return None


def _unauthorized(detail: str) -> Response:
    return JSONResponse({"detail": detail}, 401, headers={"WWW-Authenticate": "Bearer"})


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _decode_json(raw: bytes) -> Any:
    """The parsed body, or `_NOT_JSON`; bodies over the size limit are not parsed."""
    if len(raw) > DEFAULT_MAX_PAYLOAD_BYTES:
        return _NOT_JSON
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _emulator(request: Request) -> Emulator:
    emulator: Emulator = request.app.state.emulator
    return emulator


EmulatorDep = Annotated[Emulator, Depends(_emulator)]

mozrest = APIRouter()
control = APIRouter(prefix="/_emulator")


@mozrest.post("/rms")
async def receive_reservation(request: Request) -> Response:
    """Mozrest's reservation webhook."""
    arrival_ns = time.monotonic_ns()
    received_at = datetime.now(UTC)
    emulator = _emulator(request)
    raw = await request.body()
    body = _decode_json(raw)
    delay_seconds, fault = emulator.draw_fault("rms")
    if delay_seconds:
        await asyncio.sleep(delay_seconds)
    if fault is None:
        response = emulator.accept(request, raw, body)
    else:
        response = emulator.fault_response(fault)
    emulator.log_request(
        body=None if body is _NOT_JSON else body,
        status_code=None if isinstance(response, _DroppedConnection) else response.status_code,
        received_at=received_at,
        arrival_ns=arrival_ns,
        fault=fault,
    )
    return response


@mozrest.get("/venues/{venue_id}/pos-tables")
async def list_pos_tables(venue_id: str, request: Request) -> Response:
    """Mozrest's Partner API: the tables configured in a venue's POS."""
    emulator = _emulator(request)
    delay_seconds, fault = emulator.draw_fault("pos-tables")
    if delay_seconds:
        await asyncio.sleep(delay_seconds)
    if fault is not None:
        return emulator.fault_response(fault)
    rejection = _bearer_rejection(request.headers.get("authorization"), emulator.api_key)
    if rejection is not None:
        return _unauthorized(rejection)
    tables = emulator.tables.get(venue_id, DEFAULT_TABLES)
    return JSONResponse({"venueId": venue_id, "tables": list(tables), "count": len(tables)})


@control.get("/bookings")
async def list_bookings(emulator: EmulatorDep) -> Response:
    """Every booking's last accepted state and POS order."""
    items = {booking_id: b.as_json() for booking_id, b in emulator.bookings.items()}
    return JSONResponse({"items": items})


@control.get("/bookings/{booking_id}")
async def get_booking(booking_id: str, emulator: EmulatorDep) -> Response:
    """One booking's last accepted state and POS order."""
    booking = emulator.bookings.get(booking_id)
    if booking is None:
        raise HTTPException(404, f"No state was accepted for booking {booking_id!r}")
    return JSONResponse({"bookingId": booking_id, **booking.as_json()})


@control.get("/requests")
async def list_requests(
    emulator: EmulatorDep,
    booking_id: str | None = None,
    since_seq: Annotated[int | None, Query(ge=0)] = None,
) -> Response:
    """The /rms request log, oldest first, optionally one booking's or after a `seq`."""
    items = [
        entry
        for entry in emulator.requests
        if (booking_id is None or entry["bookingId"] == booking_id)
        and (since_seq is None or entry["seq"] > since_seq)
    ]
    return JSONResponse({"items": items})


@control.get("/trace")
async def list_trace(emulator: EmulatorDep) -> Response:
    """The monitoring trace (unknown SKUs), oldest first."""
    return JSONResponse({"items": list(emulator.trace)})


@control.get("/faults")
async def get_faults(emulator: EmulatorDep) -> dict[str, Any]:
    """The active fault settings."""
    return (emulator.faults or _Faults.from_settings(FaultSettings())).as_json()


@control.put("/faults")
async def put_faults(settings: FaultSettings, emulator: EmulatorDep) -> dict[str, Any]:
    """Replace the fault settings (omitted fields take their defaults)."""
    emulator.faults = _Faults.from_settings(settings)
    return emulator.faults.as_json()


@control.delete("/faults")
async def clear_faults(emulator: EmulatorDep) -> dict[str, Any]:
    """Inject no faults."""
    emulator.faults = None
    return _Faults.from_settings(FaultSettings()).as_json()


@control.put("/venues/{venue_id}/menu")
async def put_menu(venue_id: str, menu: MenuSettings, emulator: EmulatorDep) -> dict[str, Any]:
    """Configure the SKUs a venue's POS knows."""
    emulator.menus[venue_id] = _Menu(frozenset(menu.skus), menu.reject_unknown)
    return {"venueId": venue_id, **menu.model_dump()}


@control.put("/venues/{venue_id}/tables")
async def put_tables(
    venue_id: str, settings: TablesSettings, emulator: EmulatorDep
) -> dict[str, Any]:
    """Configure the tables a venue's POS reports."""
    tables = [table.model_dump() for table in settings.tables]
    emulator.tables[venue_id] = tables
    return {"venueId": venue_id, "tables": tables, "count": len(tables)}


@control.put("/token")
async def put_token(settings: TokenSettings, emulator: EmulatorDep) -> dict[str, bool]:
    """Expect other keys from the next request on (a rotation at Mozrest's side)."""
    if "token" in settings.model_fields_set:
        emulator.token = settings.token
    if "api_key" in settings.model_fields_set:
        emulator.api_key = settings.api_key
    return {
        "token_required": emulator.token is not None,
        "api_key_required": emulator.api_key is not None,
    }


@control.post("/reset")
async def reset(emulator: EmulatorDep) -> dict[str, str]:
    """Forget everything received and configured."""
    emulator.reset()
    return {"status": "ok"}


@control.get("/stats")
async def get_stats(emulator: EmulatorDep) -> dict[str, Any]:
    """Counts of /rms requests: received, accepted, dropped and answered per status code."""
    return {
        "received": emulator.received,
        "accepted": emulator.accepted,
        "dropped": emulator.dropped,
        "by_status": {str(code): n for code, n in sorted(emulator.by_status.items())},
    }


@mozrest.get("/")
async def index() -> dict[str, Any]:
    """A map of the emulator for a person finding their way."""
    return {
        "service": "mozrest emulator",
        "mozrest": ["POST /rms", "GET /venues/{venueId}/pos-tables"],
        "control": [
            "GET /_emulator/bookings",
            "GET /_emulator/bookings/{bookingId}",
            "GET /_emulator/requests?booking_id=&since_seq=",
            "GET /_emulator/trace",
            "GET|PUT|DELETE /_emulator/faults",
            "PUT /_emulator/venues/{venueId}/menu",
            "PUT /_emulator/venues/{venueId}/tables",
            "PUT /_emulator/token",
            "POST /_emulator/reset",
            "GET /_emulator/stats",
        ],
        "docs": "/docs",
    }


def create_app(*, token: str | None = None, api_key: str | None = None) -> FastAPI:
    """Build an emulator; `token` and `api_key` are the Bearer tokens it expects, if any."""
    app = FastAPI(title="Mozrest emulator", description=__doc__)
    app.state.emulator = Emulator(token=token, api_key=api_key)
    app.include_router(mozrest)
    app.include_router(control)
    return app


class _AnnouncingServer(uvicorn.Server):
    """A uvicorn server that prints one line once it listens."""

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            base_url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
            print(f"mozrest emulator listening on {base_url} (webhook: {base_url}/rms)", flush=True)


def _not_injected_drop(record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], ConnectionDropped))


def serve(
    *,
    host: str = "127.0.0.1",
    port: int = 8090,
    token: str | None = None,
    api_key: str | None = None,
) -> None:
    """Run the emulator with uvicorn until interrupted."""
    config = uvicorn.Config(
        create_app(token=token, api_key=api_key),
        host=host,
        port=port,
        log_level="warning",
        access_log=False,
    )
    # After Config, which configures uvicorn's loggers: drops are deliberate, not app errors.
    logging.getLogger("uvicorn.error").addFilter(_not_injected_drop)
    from app.runtime import bind_socket

    sock = bind_socket(host, port, port_setting="--port", host_setting="--host")
    try:
        _AnnouncingServer(config).run(sockets=[sock])
    finally:
        sock.close()
