"""The operators' `/api/*` routes; `api.py` mounts them behind the admin token.

Lists are newest first, one keyset page at a time: the cursor is an opaque token naming the last
id answered, and the next page is the rows below it (`app.store.admin`).
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections import OrderedDict
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import AfterValidator

from app.deps import AppContext, CallerDep, ContextDep, audit_as
from app.logs import get_logger, log_event
from app.publisher import PartnerApiError
from app.schemas import (
    Attempt,
    Booking,
    Delivery,
    DeliveryDetail,
    DeliveryPage,
    DeliveryStatus,
    Error,
    LastSent,
    OutboxFilter,
    OutboxPage,
    OutboxRow,
    PosTable,
    PosTables,
    RequeueRequest,
    RequeueResult,
    Stats,
    TableMatch,
    TableMatching,
    WorkerList,
    WorkerProcess,
    storable_text,
)
from app.states import CircuitState, CredentialsState
from app.store import NotFoundError

log = get_logger("api")

#: Largest page a list answers, and the default.
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50
#: Ids are PostgreSQL `bigint`s: anything larger cannot name a row (and would not bind).
MAX_ID = 2**63 - 1
#: The workers list shows processes that checked in within this many heartbeat intervals.
WORKER_SEEN_HEARTBEATS = 10
#: Venues whose POS tables are kept at once.
POS_TABLES_CACHE_VENUES = 256

Responses = dict[int | str, dict[str, Any]]
NOT_FOUND: Responses = {404: {"model": Error, "description": "No such delivery or booking."}}
CONFLICT: Responses = {409: {"model": Error, "description": "Refused: the detail says why."}}
MOZREST_FAILED: Responses = {502: {"model": Error, "description": "Mozrest's Partner API failed."}}


def _query_names(dependant: Dependant) -> set[str]:
    """The query parameters a route reads, its dependencies' included."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def reject_unknown_query(request: Request) -> None:
    """A query parameter the route does not take is a 422 naming it: a typo such as
    `statuss=dead` must not silently list everything."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute) or not route.include_in_schema:
        return
    known = _query_names(route.dependant)
    unknown = [name for name in request.query_params if name not in known]
    if unknown:
        takes = ", ".join(sorted(known)) or "none"
        raise RequestValidationError(
            [
                {
                    "type": "extra_forbidden",
                    "loc": ("query", name),
                    "msg": f"unknown query parameter {name!r}; this route takes: {takes}",
                    "input": request.query_params[name],
                }
                for name in dict.fromkeys(unknown)
            ]
        )


router = APIRouter(
    dependencies=[Depends(reject_unknown_query)],
    responses={
        401: {"model": Error, "description": "Missing or wrong admin token."},
        403: {"model": Error, "description": "The token's role may not do this."},
        503: {"model": Error, "description": "RELAY_ADMIN_TOKEN is not set, or no database."},
    },
)

DeliveryId = Annotated[int, Path(ge=1, le=MAX_ID, description="A delivery id.")]
BookingKey = Annotated[
    str,
    Path(min_length=1, max_length=64, description="The RMS booking id (`bookingId`)."),
    AfterValidator(storable_text),
]
# Mozrest venue ids go into a Partner API path, so only URL-safe characters are accepted.
VenueKey = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,63}$",
        description="Mozrest's venue id (`venueId`): letters, digits and `.` `_` `~` `-`.",
    ),
]


def _storable(value: str | None) -> str | None:
    return None if value is None else storable_text(value)


BookingFilter = Annotated[
    str | None,
    Query(min_length=1, max_length=64, description="Only this booking's rows."),
    AfterValidator(_storable),
]
VenueFilter = Annotated[
    str | None,
    Query(min_length=1, max_length=64, description="Only this venue's rows."),
    AfterValidator(_storable),
]
Limit = Annotated[
    int,
    Query(ge=1, le=MAX_PAGE_SIZE, description=f"Rows per page, at most {MAX_PAGE_SIZE}."),
]


# -- cursors --------------------------------------------------------------------------------


def encode_cursor(kind: str, last_id: int) -> str:
    """An opaque cursor naming the last row of a page of `kind` rows."""
    return base64.urlsafe_b64encode(f"{kind}:{last_id}".encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str) -> int:
    """The id a cursor of `kind` names; ValueError if it is not one this API made."""
    invalid = ValueError("not a cursor from this list: pass next_cursor as it came")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        prefix, _, number = raw.decode("ascii").partition(":")
        last_id = int(number) if number.isdigit() else 0
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise invalid from None
    # Only the exact text `encode_cursor` makes: no padding variants, leading zeros or junk.
    if prefix != kind or not 1 <= last_id <= MAX_ID or encode_cursor(kind, last_id) != cursor:
        raise invalid
    return last_id


def _cursor_of(kind: str) -> Any:
    def cursor(
        cursor: Annotated[
            str | None,
            Query(
                max_length=64,
                description="`next_cursor` of the previous page; omit for the newest page.",
            ),
        ] = None,
    ) -> int | None:
        if not cursor:
            return None
        try:
            return decode_cursor(kind, cursor)
        except ValueError as exc:
            raise RequestValidationError(
                [
                    {
                        "type": "value_error",
                        "loc": ("query", "cursor"),
                        "msg": f"Value error, {exc}",
                        "input": cursor,
                    }
                ]
            ) from None

    return cursor


DeliveryCursor = Annotated[int | None, Depends(_cursor_of("delivery"))]
OutboxCursor = Annotated[int | None, Depends(_cursor_of("outbox"))]


def _page(kind: str, rows: list[dict[str, Any]], limit: int) -> tuple[list[Any], str | None]:
    """Rows of one page (fetched with one extra) and the cursor of the next, if any."""
    if len(rows) > limit:
        return rows[:limit], encode_cursor(kind, rows[limit - 1]["id"])
    return rows, None


# -- deliveries -----------------------------------------------------------------------------


@router.get("/deliveries", tags=["deliveries"], summary="List deliveries, newest first")
async def list_deliveries(
    context: ContextDep,
    cursor: DeliveryCursor,
    status: Annotated[DeliveryStatus | None, Query(description="Only this status.")] = None,
    venue_id: VenueFilter = None,
    booking_id: BookingFilter = None,
    limit: Limit = DEFAULT_PAGE_SIZE,
) -> DeliveryPage:
    rows = await context.store.list_deliveries(
        status=status, venue_id=venue_id, booking_id=booking_id, before_id=cursor, limit=limit + 1
    )
    items, next_cursor = _page("delivery", rows, limit)
    return DeliveryPage(items=[Delivery(**row) for row in items], next_cursor=next_cursor)


@router.post(
    "/deliveries/retry",
    tags=["deliveries"],
    summary="Requeue dead (or cancelled) deliveries in bulk",
    description="Each matching delivery is sent again unless a newer state of its booking was "
    "written since (so of several dead deliveries of one booking only the newest goes). Works "
    "in short transactions, so it is safe on a large backlog after an outage.",
    openapi_extra=audit_as("deliveries.retry_bulk"),
)
async def requeue_deliveries(
    body: RequeueRequest, context: ContextDep, caller: CallerDep
) -> RequeueResult:
    target = body.model_dump_json(exclude_none=True)
    requeued = await context.store.requeue_deliveries(
        status=body.status,
        venue_id=body.venue_id,
        created_since=body.since,
        created_until=body.until,
        audit=caller.audit("deliveries.retry_bulk", target),
    )
    log_event(
        log,
        logging.INFO,
        "deliveries.requeued",
        actor=caller.name,
        status=body.status,
        venue_id=body.venue_id,
        since=body.since.isoformat() if body.since else None,
        until=body.until.isoformat() if body.until else None,
        requeued=requeued,
    )
    return RequeueResult(requeued=requeued)


@router.api_route(
    "/deliveries/retry", methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False
)
async def requeue_deliveries_wrong_method() -> None:
    """Without this, `GET /deliveries/retry` would be read as delivery id "retry" (a 422)."""
    raise HTTPException(405, "Method Not Allowed", headers={"Allow": "POST"})


@router.get(
    "/deliveries/{delivery_id}",
    tags=["deliveries"],
    summary="One delivery with its payload and attempts",
    responses=NOT_FOUND,
)
async def get_delivery(delivery_id: DeliveryId, context: ContextDep) -> DeliveryDetail:
    row, attempts = await context.store.get_delivery(delivery_id)
    return DeliveryDetail(**row, attempts=[Attempt(**a) for a in attempts])


@router.post(
    "/deliveries/{delivery_id}/retry",
    tags=["deliveries"],
    summary="Requeue a dead or cancelled delivery",
    description="409 if a newer state of the booking was queued, sent or delivered since, or "
    "if the delivery is in another status.",
    responses={**NOT_FOUND, **CONFLICT},
    openapi_extra=audit_as("delivery.retry"),
)
async def requeue_delivery(
    delivery_id: DeliveryId, context: ContextDep, caller: CallerDep
) -> Delivery:
    # 404 and 409 by the app's handlers, audited as refused by the store.
    row = await context.store.requeue_delivery(
        delivery_id, audit=caller.audit("delivery.retry", str(delivery_id))
    )
    log_event(
        log,
        logging.INFO,
        "delivery.requeued",
        actor=caller.name,
        delivery_id=delivery_id,
        booking_id=row["booking_id"],
    )
    return Delivery(**row)


@router.post(
    "/deliveries/{delivery_id}/cancel",
    tags=["deliveries"],
    summary="Cancel a pending or retrying delivery",
    description="409 if it is in another status, or on the wire right now (try again shortly).",
    responses={**NOT_FOUND, **CONFLICT},
    openapi_extra=audit_as("delivery.cancel"),
)
async def cancel_delivery(
    delivery_id: DeliveryId, context: ContextDep, caller: CallerDep
) -> Delivery:
    # 404 and 409 by the app's handlers, audited as refused by the store.
    row = await context.store.cancel_delivery(
        delivery_id, audit=caller.audit("delivery.cancel", str(delivery_id))
    )
    log_event(
        log,
        logging.INFO,
        "delivery.cancelled",
        actor=caller.name,
        delivery_id=delivery_id,
        booking_id=row["booking_id"],
    )
    return Delivery(**row)


# -- bookings and outbox --------------------------------------------------------------------


@router.get(
    "/bookings/{booking_id}",
    tags=["bookings"],
    summary="A booking's last accepted state and its deliveries",
    responses=NOT_FOUND,
)
async def get_booking(booking_id: BookingKey, context: ContextDep) -> Booking:
    try:
        record = await context.store.get_booking(booking_id)
    except NotFoundError:
        raise HTTPException(
            404,
            f"no booking {booking_id!r}: none of its states was queued or held "
            "(see /api/outbox?booking_id= for invalid rows)",
        ) from None
    last_sent = None
    if record.accepted_payload is not None:
        last_sent = LastSent(
            payload=record.accepted_payload,
            sent_at=record.accepted_at,
            outbox_id=record.accepted_outbox_id,
        )
    return Booking(
        booking_id=record.booking_id,
        venue_id=record.venue_id,
        last_sent=last_sent,
        deliveries=[Delivery(**row) for row in record.deliveries],
    )


@router.get("/outbox", tags=["outbox"], summary="List outbox rows, newest first")
async def list_outbox(
    context: ContextDep,
    cursor: OutboxCursor,
    outcome: Annotated[
        OutboxFilter | None,
        Query(description="Only this outcome; `unprocessed` for rows not decided yet."),
    ] = None,
    booking_id: BookingFilter = None,
    limit: Limit = DEFAULT_PAGE_SIZE,
) -> OutboxPage:
    rows = await context.store.list_outbox(
        outcome=None if outcome == "unprocessed" else outcome,
        unprocessed=outcome == "unprocessed",
        booking_id=booking_id,
        before_id=cursor,
        limit=limit + 1,
    )
    items, next_cursor = _page("outbox", rows, limit)
    return OutboxPage(items=[OutboxRow(**row) for row in items], next_cursor=next_cursor)


# -- the relay ------------------------------------------------------------------------------


@router.get("/stats", tags=["relay"], summary="Relay-wide counts, circuit and credentials")
async def get_stats(context: ContextDep) -> Stats:
    gauges = await context.store.gauges(
        stale_after_seconds=3 * context.settings.relay_heartbeat_interval_seconds
    )
    circuit, credentials = gauges.circuit, gauges.credentials
    worker = context.worker
    # This process's own worker knows its state before its next heartbeat says so.
    if worker is not None and worker.circuit_state != CircuitState.CLOSED:
        circuit = worker.circuit_state
    if worker is not None and worker.credentials_state != CredentialsState.OK:
        credentials = worker.credentials_state
    return Stats.model_validate(
        {
            "deliveries": gauges.deliveries,
            "outbox_unprocessed": gauges.outbox_unprocessed,
            "oldest_pending_age_seconds": gauges.oldest_pending_age_seconds,
            "circuit": circuit,
            "credentials": credentials,
            "venues_paused": gauges.venues_paused,
            "rate_limit": context.settings.relay_rate_limit,
            "request_rate": round(gauges.request_rate, 2),
        }
    )


@router.get("/workers", tags=["relay"], summary="Relay processes seen recently")
async def list_workers(context: ContextDep) -> WorkerList:
    rows = await context.store.list_workers(
        seen_within_seconds=WORKER_SEEN_HEARTBEATS
        * context.settings.relay_heartbeat_interval_seconds
    )
    return WorkerList(items=[WorkerProcess(**row) for row in rows])


# -- POS tables -----------------------------------------------------------------------------


class PosTablesCache:
    """Mozrest's POS tables per venue for `ttl_seconds`, for at most `max_venues` venues."""

    def __init__(self, *, ttl_seconds: float, max_venues: int = POS_TABLES_CACHE_VENUES) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_venues = max_venues
        self._answers: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def get(self, venue_id: str) -> dict[str, Any] | None:
        entry = self._answers.get(venue_id)
        if entry is None or entry[0] <= time.monotonic():
            self._answers.pop(venue_id, None)
            return None
        return entry[1]

    def put(self, venue_id: str, answer: dict[str, Any]) -> None:
        if self.ttl_seconds <= 0:
            return
        self._answers.pop(venue_id, None)
        self._answers[venue_id] = (time.monotonic() + self.ttl_seconds, answer)
        while len(self._answers) > self.max_venues:
            self._answers.popitem(last=False)


async def _pos_tables(request: Request, context: AppContext, venue_id: str) -> PosTables:
    cache: PosTablesCache | None = getattr(request.app.state, "pos_tables_cache", None)
    if cache is None:
        cache = PosTablesCache(ttl_seconds=context.settings.relay_pos_tables_cache_seconds)
        request.app.state.pos_tables_cache = cache
    answer = cache.get(venue_id)
    if answer is None:
        try:
            answer = await context.partner_api.pos_tables(venue_id)
        except PartnerApiError as exc:
            raise HTTPException(
                502, f"Mozrest's POS tables for venue {venue_id!r}: {exc}"
            ) from None
        cache.put(venue_id, answer)
    return PosTables.model_validate(answer)


@router.get(
    "/venues/{venue_id}/pos-tables",
    tags=["venues"],
    summary="The venue's POS tables, from Mozrest (cached briefly)",
    responses=MOZREST_FAILED,
)
async def get_pos_tables(venue_id: VenueKey, request: Request, context: ContextDep) -> PosTables:
    return await _pos_tables(request, context, venue_id)


def _normalised(name: str) -> str:
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def match_tables(
    venue_id: str, rms_table_ids: list[str], pos_tables: list[PosTable]
) -> TableMatching:
    """Pair RMS table ids with POS tables: equal ids first, then equal normalised id or name."""
    by_id = {table.id: table for table in pos_tables}
    by_normalised: dict[str, PosTable] = {}
    for table in pos_tables:
        for name in (table.id, table.name):
            by_normalised.setdefault(_normalised(name), table)
    by_normalised.pop("", None)
    matched: list[TableMatch] = []
    unmatched: list[str] = []
    for rms_id in rms_table_ids:
        if rms_id in by_id:
            matched.append(TableMatch(rms_table_id=rms_id, pos_table=by_id[rms_id], match="id"))
        elif (hint := by_normalised.get(_normalised(rms_id))) is not None:
            matched.append(TableMatch(rms_table_id=rms_id, pos_table=hint, match="normalised"))
        else:
            unmatched.append(rms_id)
    used = {m.pos_table.id for m in matched}
    return TableMatching(
        venue_id=venue_id,
        pos_tables=pos_tables,
        matched=matched,
        unmatched_rms_table_ids=unmatched,
        unused_pos_tables=[t for t in pos_tables if t.id not in used],
    )


@router.get(
    "/venues/{venue_id}/table-matching",
    tags=["venues"],
    summary="RMS table ids in recent states beside the venue's POS tables",
    description="Webhook states carry RMS table ids only, so ids are matched by equality; a "
    "`normalised` match (case, spaces and punctuation ignored, against a POS id or name) is a "
    "hint to check. Reads the venue's newest 1000 queued states.",
    responses=MOZREST_FAILED,
)
async def get_table_matching(
    venue_id: VenueKey, request: Request, context: ContextDep
) -> TableMatching:
    pos = await _pos_tables(request, context, venue_id)
    rms_table_ids = await context.store.recent_table_ids(venue_id)
    return match_tables(venue_id, rms_table_ids, pos.tables)
