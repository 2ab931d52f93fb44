"""`/api/venues`: the venues the relay has seen, pause and resume, per-venue settings."""

from __future__ import annotations

import base64
import binascii
import logging
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.exceptions import RequestValidationError

from app.deps import CallerDep, ContextDep, audit_as
from app.logs import get_logger, log_event
from app.routes_common import NOT_FOUND, Limit, reject_unknown_query
from app.schemas import (
    Error,
    PauseRequest,
    ResyncRequest,
    ResyncResult,
    Venue,
    VenuePage,
    VenueUpdate,
)
from app.text import storable

log = get_logger("api")
#: A resync without `since` takes the bookings whose newest state was written this recently.
DEFAULT_RESYNC_WINDOW = timedelta(hours=24)

router = APIRouter(
    dependencies=[Depends(reject_unknown_query)],
    responses={
        401: {"model": Error, "description": "Missing or wrong admin token."},
        503: {"model": Error, "description": "RELAY_ADMIN_TOKEN is not set, or no database."},
    },
    tags=["venues"],
)

VenueId = Annotated[
    str,
    Path(min_length=1, max_length=64, description="The RMS venue id (`venueId`)."),
]


def encode_venue_cursor(venue_id: str) -> str:
    return base64.urlsafe_b64encode(f"venue:{venue_id}".encode()).decode().rstrip("=")


def _venue_cursor(
    cursor: Annotated[
        str | None,
        Query(
            max_length=200, description="`next_cursor` of the previous page; omit for the first."
        ),
    ] = None,
) -> str | None:
    if not cursor:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    prefix, _, venue_id = raw.partition(":")
    if prefix != "venue" or not venue_id or encode_venue_cursor(venue_id) != cursor:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("query", "cursor"),
                    "msg": "Value error, not a cursor from this list: pass next_cursor as it came",
                    "input": cursor,
                }
            ]
        )
    return venue_id


VenueCursor = Annotated[str | None, Depends(_venue_cursor)]


@router.get("/venues", summary="Venues with deliveries or settings, by venue id")
async def list_venues(context: ContextDep, cursor: VenueCursor, limit: Limit = 50) -> VenuePage:
    rows = await context.store.list_venues(after_id=cursor, limit=limit + 1)
    next_cursor = encode_venue_cursor(rows[limit - 1]["venue_id"]) if len(rows) > limit else None
    return VenuePage(items=[Venue(**row) for row in rows[:limit]], next_cursor=next_cursor)


@router.get("/venues/{venue_id}", summary="One venue", responses=NOT_FOUND)
async def get_venue(venue_id: VenueId, context: ContextDep) -> Venue:
    return Venue(**await context.store.get_venue(venue_id))


@router.post(
    "/venues/{venue_id}/pause",
    summary="Pause a venue: its states are ingested, nothing is sent",
    openapi_extra=audit_as("venue.pause"),
)
async def pause_venue(
    venue_id: VenueId, context: ContextDep, caller: CallerDep, body: PauseRequest | None = None
) -> Venue:
    reason = storable(body.reason) if body is not None and body.reason is not None else None
    row = await context.store.pause_venue(
        venue_id, by=caller.name, reason=reason, audit=caller.audit("venue.pause", venue_id)
    )
    _log("venue.pause", caller.name, venue_id)
    return Venue(**row)


@router.post(
    "/venues/{venue_id}/resume",
    summary="Resume a venue: each booking's newest waiting state is sent once",
    responses=NOT_FOUND,
    openapi_extra=audit_as("venue.resume"),
)
async def resume_venue(venue_id: VenueId, context: ContextDep, caller: CallerDep) -> Venue:
    row = await context.store.resume_venue(venue_id, audit=caller.audit("venue.resume", venue_id))
    _log("venue.resume", caller.name, venue_id)
    return Venue(**row)


@router.patch(
    "/venues/{venue_id}",
    summary="Change a venue's settings (`send_items`)",
    openapi_extra=audit_as("venue.update"),
)
async def update_venue(
    venue_id: VenueId, body: VenueUpdate, context: ContextDep, caller: CallerDep
) -> Venue:
    row = await context.store.update_venue(
        venue_id, send_items=body.send_items, audit=caller.audit("venue.update", venue_id)
    )
    _log("venue.update", caller.name, venue_id, send_items=body.send_items)
    return Venue(**row)


@router.post(
    "/venues/{venue_id}/resync",
    summary="Send again the newest state of each booking sent before, past the no-op rule",
    responses=NOT_FOUND,
    openapi_extra=audit_as("venue.resync"),
)
async def resync_venue(
    venue_id: VenueId, context: ContextDep, caller: CallerDep, body: ResyncRequest | None = None
) -> ResyncResult:
    since = body.since if body is not None and body.since is not None else None
    now = datetime.now(UTC)
    if since is None:
        since = now - DEFAULT_RESYNC_WINDOW
    elif (since if since.tzinfo else since.replace(tzinfo=UTC)) > now:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("body", "since"),
                    "msg": "Value error, since is in the future: nothing was written after it yet",
                    "input": since.isoformat(),
                }
            ]
        )
    queued = await context.store.resync_venue(
        venue_id, since=since, audit=caller.audit("venue.resync", venue_id)
    )
    _log("venue.resync", caller.name, venue_id, queued=queued, since=since.isoformat())
    return ResyncResult(queued=queued)


def _log(event: str, actor: str, venue_id: str, **fields: Any) -> None:
    log_event(log, logging.INFO, event, actor=actor, venue_id=venue_id, **fields)
