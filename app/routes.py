"""The operators' `/api/*` routes of deliveries, bookings, the outbox and the relay; `api.py`
mounts them behind the admin token. What the routers share is in `app.routes_common`; the POS
tables routes, in `app.routes_pos`, are included here.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query

from app.deps import CallerDep, ContextDep, audit_as
from app.logs import get_logger, log_event
from app.routes_common import (
    API_RESPONSES,
    CONFLICT,
    DEFAULT_PAGE_SIZE,
    NOT_FOUND,
    BookingFilter,
    BookingKey,
    DeliveryCursor,
    DeliveryId,
    Limit,
    OutboxCursor,
    VenueFilter,
    page_of,
    reject_unknown_query,
)
from app.routes_common import decode_cursor as decode_cursor  # callers import them from here
from app.routes_common import encode_cursor as encode_cursor
from app.routes_pos import match_tables as match_tables
from app.routes_pos import router as pos_router
from app.schemas import (
    Attempt,
    Booking,
    Delivery,
    DeliveryDetail,
    DeliveryPage,
    DeliveryStatus,
    LastSent,
    OutboxFilter,
    OutboxPage,
    OutboxRow,
    RequeueRequest,
    RequeueResult,
    Stats,
    WorkerList,
    WorkerProcess,
)
from app.states import CircuitState, CredentialsState
from app.store import NotFoundError

log = get_logger("api")

#: The workers list shows processes that checked in within this many heartbeat intervals.
WORKER_SEEN_HEARTBEATS = 10

router = APIRouter(dependencies=[Depends(reject_unknown_query)], responses=API_RESPONSES)


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
    items, next_cursor = page_of("delivery", rows, limit)
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
    items, next_cursor = page_of("outbox", rows, limit)
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


# Last, as they were declared here before they had a module of their own.
router.include_router(pos_router)
