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
import logging
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from app.emulator_faults import ConnectionDropped, DroppedConnection, Faults, FaultSettings
from app.emulator_state import (
    DEFAULT_TABLES,
    NOT_JSON,
    Emulator,
    Menu,
    MenuSettings,
    TablesSettings,
    TokenSettings,
    bearer_rejection,
    decode_json,
    unauthorized,
)

# Callers import these from here.
__all__ = ["ConnectionDropped", "Emulator", "FaultSettings", "create_app", "serve"]


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
    body = decode_json(raw)
    delay_seconds, fault = emulator.draw_fault("rms")
    if delay_seconds:
        await asyncio.sleep(delay_seconds)
    if fault is None:
        response = emulator.accept(request, raw, body)
    else:
        response = emulator.fault_response(fault)
    emulator.log_request(
        body=None if body is NOT_JSON else body,
        status_code=None if isinstance(response, DroppedConnection) else response.status_code,
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
    rejection = bearer_rejection(request.headers.get("authorization"), emulator.api_key)
    if rejection is not None:
        return unauthorized(rejection)
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
    return (emulator.faults or Faults.from_settings(FaultSettings())).as_json()


@control.put("/faults")
async def put_faults(settings: FaultSettings, emulator: EmulatorDep) -> dict[str, Any]:
    """Replace the fault settings (omitted fields take their defaults)."""
    emulator.faults = Faults.from_settings(settings)
    return emulator.faults.as_json()


@control.delete("/faults")
async def clear_faults(emulator: EmulatorDep) -> dict[str, Any]:
    """Inject no faults."""
    emulator.faults = None
    return Faults.from_settings(FaultSettings()).as_json()


@control.put("/venues/{venue_id}/menu")
async def put_menu(venue_id: str, menu: MenuSettings, emulator: EmulatorDep) -> dict[str, Any]:
    """Configure the SKUs a venue's POS knows."""
    emulator.menus[venue_id] = Menu(frozenset(menu.skus), menu.reject_unknown)
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
