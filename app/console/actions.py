"""The console's buttons (POST): each checks the form's CSRF token and the session's role
(`sessions.refuse_write`), then makes the very store call `/api/` makes, audited the same way
under the session's token name."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Form, Request
from fastapi.responses import RedirectResponse, Response

from app.console.forms import DeliveryFilter, form_values
from app.console.pages import find_group
from app.console.sessions import ConsoleSession, SessionDep, refuse_write
from app.console.views import SECURITY_HEADERS, message, query
from app.deps import AppContext, ContextDep
from app.logs import get_logger, log_event
from app.settings import parse_duration
from app.states import DeliveryStatus
from app.store import ConflictError, NotFoundError
from app.text import storable

log = get_logger("console")

router = APIRouter()

Csrf = Annotated[str, Form(max_length=200)]
#: What the items switch's choices mean for `send_items` (None: follow RELAY_SEND_ITEMS).
SEND_ITEMS = {"default": None, "send": True, "strip": False}


def _client(request: Request) -> str | None:
    return request.client.host if request.client is not None else None


def _back(location: str) -> Response:
    return RedirectResponse(location, status_code=303, headers=SECURITY_HEADERS)


def _refused(request: Request, exc: Exception) -> Response:
    """A change the store refused (already audited there), as a page."""
    if isinstance(exc, NotFoundError):
        return message(request, 404, "Not found", str(exc))
    return message(request, 409, "Not done", str(exc))


async def _guard(
    request: Request,
    context: AppContext,
    session: ConsoleSession,
    csrf: str,
    action: str,
    target: str,
) -> tuple[Response | None, Any]:
    refusal = await refuse_write(request, context, session, csrf=csrf, action=action, target=target)
    return refusal, session.audit(action, target, _client(request))


# -- deliveries -----------------------------------------------------------------------------


@router.post("/console/deliveries/retry")
async def retry_matching(request: Request, context: ContextDep, session: SessionDep) -> Response:
    values = await form_values(request)
    wanted = DeliveryFilter.read(values)
    refusal, audit = await _guard(
        request,
        context,
        session,
        values.get("csrf", ""),
        "deliveries.retry_bulk",
        wanted.audit_target(),
    )
    if refusal is not None:
        return refusal
    if not wanted.requeueable or wanted.status is None:
        return message(request, 422, "Nothing to retry", "Choose dead or cancelled first.")
    requeued = await context.store.requeue_deliveries(
        status=wanted.status,
        venue_id=wanted.venue_id,
        booking_id=wanted.booking_id,
        created_since=wanted.since,
        created_until=wanted.until,
        audit=audit,
    )
    log_event(log, logging.INFO, "deliveries.requeued", actor=session.name, requeued=requeued)
    return message(
        request,
        200,
        "Requeued",
        f"Requeued {requeued} deliveries: they will be sent again shortly.",
        link=f"/console/deliveries?{query(wanted.raw, status=DeliveryStatus.PENDING)}",
        link_text="See them",
    )


@router.post("/console/groups/{key}/retry")
async def retry_group(
    key: str, request: Request, context: ContextDep, session: SessionDep, csrf: Csrf = ""
) -> Response:
    group = await find_group(context, key)
    target = json.dumps(
        {"status": DeliveryStatus.DEAD, "group": group.cause if group is not None else key},
        separators=(",", ":"),
    )
    refusal, audit = await _guard(request, context, session, csrf, "deliveries.retry_bulk", target)
    if refusal is not None:
        return refusal
    if group is None:
        return message(request, 404, "No such group", "This failure group has no deliveries now.")
    requeued = await context.store.requeue_deliveries(
        status=DeliveryStatus.DEAD, delivery_ids=group.dead_ids, audit=audit
    )
    log_event(log, logging.INFO, "deliveries.requeued", actor=session.name, requeued=requeued)
    return message(
        request,
        200,
        "Requeued",
        f"Requeued {requeued} deliveries of the group “{group.cause}”.",
        link="/console/deliveries",
        link_text="Back to Deliveries",
    )


@router.post("/console/deliveries/{delivery_id}/retry")
async def retry_delivery(
    delivery_id: int, request: Request, context: ContextDep, session: SessionDep, csrf: Csrf = ""
) -> Response:
    refusal, audit = await _guard(
        request, context, session, csrf, "delivery.retry", str(delivery_id)
    )
    if refusal is not None:
        return refusal
    try:
        await context.store.requeue_delivery(delivery_id, audit=audit)
    except (NotFoundError, ConflictError) as exc:
        return _refused(request, exc)
    log_event(log, logging.INFO, "delivery.requeued", actor=session.name, delivery_id=delivery_id)
    return _back(f"/console/deliveries/{delivery_id}?done=retried")


@router.post("/console/deliveries/{delivery_id}/cancel")
async def cancel_delivery(
    delivery_id: int, request: Request, context: ContextDep, session: SessionDep, csrf: Csrf = ""
) -> Response:
    refusal, audit = await _guard(
        request, context, session, csrf, "delivery.cancel", str(delivery_id)
    )
    if refusal is not None:
        return refusal
    try:
        await context.store.cancel_delivery(delivery_id, audit=audit)
    except (NotFoundError, ConflictError) as exc:
        return _refused(request, exc)
    log_event(log, logging.INFO, "delivery.cancelled", actor=session.name, delivery_id=delivery_id)
    return _back(f"/console/deliveries/{delivery_id}?done=cancelled")


# -- bookings -------------------------------------------------------------------------------


@router.post("/console/bookings/erase")
async def erase_booking(
    request: Request,
    context: ContextDep,
    session: SessionDep,
    booking_id: Annotated[str, Form(min_length=1, max_length=64)],
    csrf: Csrf = "",
) -> Response:
    refusal, audit = await _guard(request, context, session, csrf, "booking.erase", booking_id)
    if refusal is not None:
        return refusal
    try:
        erased = await context.store.erase_booking(booking_id, audit=audit)
    except (NotFoundError, ConflictError) as exc:
        return _refused(request, exc)
    counts = erased.as_dict()
    log_event(log, logging.INFO, "booking.erased", actor=session.name, **counts)
    return message(
        request,
        200,
        "Erased",
        f"Guest personal data erased from {counts['outbox_rows']} outbox rows, "
        f"{counts['deliveries']} deliveries and {counts['snapshots']} snapshots.",
        link=f"/console/bookings/{booking_id}",
        link_text="Back to the booking",
    )


# -- venues ---------------------------------------------------------------------------------

VenueField = Annotated[str, Form(min_length=1, max_length=64)]


def _venue_page(venue_id: str, done: str) -> Response:
    return _back(f"/console/venues?{query({'venue_id': venue_id, 'done': done})}")


@router.post("/console/venues/pause")
async def pause_venue(
    request: Request,
    context: ContextDep,
    session: SessionDep,
    venue_id: VenueField,
    reason: Annotated[str, Form(max_length=500)] = "",
    csrf: Csrf = "",
) -> Response:
    refusal, audit = await _guard(request, context, session, csrf, "venue.pause", venue_id)
    if refusal is not None:
        return refusal
    await context.store.pause_venue(
        venue_id, by=session.name, reason=storable(reason.strip()) or None, audit=audit
    )
    log_event(log, logging.INFO, "venue.pause", actor=session.name, venue_id=venue_id)
    return _venue_page(venue_id, "paused")


@router.post("/console/venues/resume")
async def resume_venue(
    request: Request,
    context: ContextDep,
    session: SessionDep,
    venue_id: VenueField,
    csrf: Csrf = "",
) -> Response:
    refusal, audit = await _guard(request, context, session, csrf, "venue.resume", venue_id)
    if refusal is not None:
        return refusal
    try:
        await context.store.resume_venue(venue_id, audit=audit)
    except (NotFoundError, ConflictError) as exc:
        return _refused(request, exc)
    log_event(log, logging.INFO, "venue.resume", actor=session.name, venue_id=venue_id)
    return _venue_page(venue_id, "resumed")


@router.post("/console/venues/resync")
async def resync_venue(
    request: Request,
    context: ContextDep,
    session: SessionDep,
    venue_id: VenueField,
    since: Annotated[str, Form(max_length=20)] = "24h",
    csrf: Csrf = "",
) -> Response:
    refusal, audit = await _guard(request, context, session, csrf, "venue.resync", venue_id)
    if refusal is not None:
        return refusal
    try:
        window = parse_duration(since)
    except ValueError:
        return message(request, 422, "Not resent", "Give a duration such as 30m, 24h or 7d.")
    try:
        queued = await context.store.resync_venue(
            venue_id, since=datetime.now(UTC) - timedelta(seconds=window), audit=audit
        )
    except (NotFoundError, ConflictError) as exc:
        return _refused(request, exc)
    log_event(log, logging.INFO, "venue.resync", actor=session.name, venue_id=venue_id)
    return message(
        request,
        200,
        "Resent",
        f"The newest state of {queued} bookings of venue {venue_id} is queued again.",
        link=f"/console/venues?{query({'venue_id': venue_id})}",
        link_text="Back to the venues",
    )


@router.post("/console/venues/items")
async def update_venue_items(
    request: Request,
    context: ContextDep,
    session: SessionDep,
    venue_id: VenueField,
    send_items: Annotated[str, Form()] = "default",
    csrf: Csrf = "",
) -> Response:
    refusal, audit = await _guard(request, context, session, csrf, "venue.update", venue_id)
    if refusal is not None:
        return refusal
    if send_items not in SEND_ITEMS:
        return message(request, 422, "Not saved", "Choose default, send or strip.")
    await context.store.update_venue(venue_id, send_items=SEND_ITEMS[send_items], audit=audit)
    log_event(log, logging.INFO, "venue.update", actor=session.name, venue_id=venue_id)
    return _venue_page(venue_id, "updated")
