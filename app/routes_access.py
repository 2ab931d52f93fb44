"""The audit trail and erasure under `/api/`; `api.py` mounts them beside
`routes.router`, behind the same token, schema and role checks."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query
from pydantic import AfterValidator, BaseModel

from app.deps import CallerDep, ContextDep, audit_as
from app.logs import get_logger, log_event
from app.routes_common import (
    CONFLICT,
    DEFAULT_PAGE_SIZE,
    NOT_FOUND,
    BookingKey,
    Limit,
    cursor_of,
    page_of,
    reject_unknown_query,
)
from app.schemas import storable_text

log = get_logger("api")

AuditAction = Literal[
    "delivery.retry",
    "delivery.cancel",
    "deliveries.retry_bulk",
    "venue.pause",
    "venue.resume",
    "venue.update",
    "venue.resync",
    "booking.erase",
]


class AuditRow(BaseModel):
    """One audited call: who did what to which target, and whether it was done."""

    id: int
    at: datetime
    actor: str
    action: str
    target: str
    result: Literal["ok", "refused"]
    detail: dict[str, Any]
    client: str | None


class AuditPage(BaseModel):
    items: list[AuditRow]
    next_cursor: str | None


class ErasedCounts(BaseModel):
    outbox_rows: int
    deliveries: int
    snapshots: int


class Erasure(BaseModel):
    """What an erasure removed the booking's personal fields from."""

    booking_id: str
    erased: ErasedCounts


access_router = APIRouter(dependencies=[Depends(reject_unknown_query)])

AuditCursor = Annotated[int | None, Depends(cursor_of("audit"))]
ActorFilter = Annotated[
    str | None,
    Query(min_length=1, max_length=64, description="Only this token name's calls."),
    AfterValidator(lambda value: None if value is None else storable_text(value)),
]


@access_router.get("/audit", tags=["audit"], summary="The audit trail, newest first")
async def list_audit(
    context: ContextDep,
    cursor: AuditCursor,
    actor: ActorFilter = None,
    action: Annotated[AuditAction | None, Query(description="Only this action.")] = None,
    limit: Limit = DEFAULT_PAGE_SIZE,
) -> AuditPage:
    rows = await context.store.audit.list(
        actor=actor, action=action, before_id=cursor, limit=limit + 1
    )
    items, next_cursor = page_of("audit", rows, limit)
    return AuditPage(items=[AuditRow(**row) for row in items], next_cursor=next_cursor)


@access_router.post(
    "/bookings/{booking_id}/erase",
    tags=["bookings"],
    summary="Erase a booking's guest personal data from every table",
    description="Removes `contact`, `notes` and every `items[].notes` from the booking's outbox "
    "rows, deliveries and snapshot, and blanks stored answers that quote them; keeps the rest. "
    "409 while one of its deliveries is pending or retrying, or a state of it is not read yet.",
    responses={**NOT_FOUND, **CONFLICT},
    openapi_extra=audit_as("booking.erase"),
)
async def erase_booking(booking_id: BookingKey, context: ContextDep, caller: CallerDep) -> Erasure:
    # 404 and 409 by the app's handlers, audited as refused by the store.
    erased = await context.store.erase_booking(
        booking_id, audit=caller.audit("booking.erase", booking_id)
    )
    log_event(
        log,
        logging.INFO,
        "booking.erased",
        actor=caller.name,
        booking_id=booking_id,
        **erased.as_dict(),
    )
    return Erasure(booking_id=booking_id, erased=ErasedCounts(**erased.as_dict()))
