"""Write a reservation's new state into the mozrest-relay outbox, inside the RMS's own transaction.

This module depends on SQLAlchemy only, so an RMS can import it without importing the relay:

    from mozrest_outbox import enqueue

    with Session(engine) as session, session.begin():
        reservation.status = "seated"       # the UPDATE that locks the reservation's row
        session.flush()                      # ... must come before the outbox INSERT
        enqueue(session, reservation_payload)

`enqueue` adds one row to `mozrest_outbox` and neither flushes the RMS's other changes nor commits:
the row commits, or rolls back, with the change it describes. For an `AsyncSession` use
`await enqueue_async(session, payload)`.

When OpenTelemetry is installed in the RMS and a span is current, the row also carries that
span's W3C `traceparent`, so the relay's work and Mozrest's answer join the RMS's trace. Without
OpenTelemetry (it is never required) the column is left NULL.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, Column, String, Table, insert
from sqlalchemy import MetaData as _MetaData
from sqlalchemy.dialects.postgresql import JSONB

__all__ = ["current_traceparent", "enqueue", "enqueue_async", "outbox_insert"]

_outbox = Table(
    "mozrest_outbox",
    _MetaData(),
    Column("booking_id", String(64)),
    Column("venue_id", String(64)),
    Column("payload", JSON().with_variant(JSONB(), "postgresql")),
    Column("traceparent", String(255)),
)

_trace: Any = None
"""`opentelemetry.trace` once imported; False when OpenTelemetry is not installed."""


def current_traceparent() -> str | None:
    """The current OpenTelemetry span's context as a W3C `traceparent`, or None (no span, or
    no OpenTelemetry in this process)."""
    global _trace
    if _trace is None:
        try:
            from opentelemetry import trace as _trace
        except ImportError:
            _trace = False
    if _trace is False:
        return None
    context = _trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def outbox_insert(payload: dict[str, Any]) -> Any:
    """The INSERT statement for one booking state (for RMSs using SQLAlchemy Core)."""
    if not isinstance(payload, dict):
        raise TypeError("payload must be a dict in the Mozrest webhook shape")
    booking_id, venue_id = payload.get("bookingId"), payload.get("venueId")
    if not isinstance(booking_id, str) or not booking_id:
        raise ValueError("payload['bookingId'] must be a non-empty string")
    if not isinstance(venue_id, str) or not venue_id:
        raise ValueError("payload['venueId'] must be a non-empty string")
    values = {"booking_id": booking_id, "venue_id": venue_id, "payload": payload}
    traceparent = current_traceparent()
    if traceparent is not None:  # only then: an outbox not yet migrated to it still works
        values["traceparent"] = traceparent
    return insert(_outbox).values(**values)


def enqueue(session: Any, payload: dict[str, Any]) -> None:
    """Add the booking's full current state to the outbox in `session`'s transaction."""
    statement = outbox_insert(payload)  # a bad payload is refused before the session is touched
    session.execute(statement)


async def enqueue_async(session: Any, payload: dict[str, Any]) -> None:
    """`enqueue` for an `AsyncSession` or `AsyncConnection`."""
    statement = outbox_insert(payload)
    await session.execute(statement)
