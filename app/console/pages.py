"""The console's pages (GET): what an operator reads. Writes are in `actions.py`."""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse, Response

from app.console.forms import PAGE_SIZE, DeliveryFilter, read_cursor
from app.console.sessions import SessionDep
from app.console.views import STATIC, field_changes, message, render
from app.deps import AppContext, ContextDep
from app.models import OUTCOMES, STATUSES
from app.partner_api import PartnerApiError
from app.routes import WORKER_SEEN_HEARTBEATS
from app.routes_access import AuditAction
from app.routes_common import page_of
from app.routes_pos import match_tables, pos_tables_of
from app.routes_venues import encode_venue_cursor
from app.schemas import PosTables
from app.settings import parse_duration
from app.states import CircuitState, CredentialsState, DeliveryStatus
from app.store import NotFoundError
from app.store.console import FailureGroup

#: Notices a page shows after a button sent the browser back to it (`?done=`).
NOTICES = {
    "retried": "Requeued: it will be sent again shortly.",
    "cancelled": "Cancelled: it will not be sent.",
    "paused": "Paused: nothing is sent for this venue until it is resumed.",
    "resumed": "Resumed: each booking's newest waiting state is sent once.",
    "updated": "Saved.",
}
#: Files under `/console/static/`: the one stylesheet and the one (optional) script.
STATIC_FILES = {"console.css": "text/css", "console.js": "text/javascript"}
#: Venues the Overview lists as paused, at most.
PAUSED_SHOWN = 100
#: Deliveries the Overview counts per status, at most: past it, "more than 10,000".
STATUS_COUNT_CAP = 10_000

router = APIRouter()


@router.get("/console/static/{name}")
async def static_file(name: str) -> Response:
    if name not in STATIC_FILES:
        raise HTTPException(404, "Not Found")
    return FileResponse(
        STATIC / name,
        media_type=STATIC_FILES[name],
        headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
    )


def _notice(request: Request) -> str | None:
    return NOTICES.get(request.query_params.get("done", ""))


# -- overview -------------------------------------------------------------------------------


@router.get("/console")
async def overview(request: Request, context: ContextDep, session: SessionDep) -> Response:
    from app.api import readiness_checks  # app.api mounts this router: import when called

    heartbeat = context.settings.relay_heartbeat_interval_seconds
    checks = await readiness_checks(context)
    gauges = await context.store.gauges(
        stale_after_seconds=3 * heartbeat, status_count_cap=STATUS_COUNT_CAP
    )
    circuit, credentials = gauges.circuit, gauges.credentials
    if context.worker is not None and context.worker.circuit_state != CircuitState.CLOSED:
        circuit = context.worker.circuit_state
    if context.worker is not None and context.worker.credentials_state != CredentialsState.OK:
        credentials = context.worker.credentials_state
    workers = await context.store.list_workers(
        seen_within_seconds=WORKER_SEEN_HEARTBEATS * heartbeat
    )
    paused = await context.store.console.paused_venues(limit=PAUSED_SHOWN)
    chart_start, per_minute = await context.store.console.accepted_per_minute()
    return render(
        request,
        "overview.html",
        checks=checks,
        gauges=gauges,
        circuit=circuit,
        credentials=credentials,
        workers=workers,
        paused=paused,
        statuses=STATUSES,
        count_cap=STATUS_COUNT_CAP,
        chart=_chart(chart_start, per_minute),
    )


def _chart(start: datetime, counts: list[int]) -> dict[str, Any]:
    """The accepted-per-minute bars as SVG geometry: x, y, height, label per minute."""
    width, height, bar = 600, 120, 10
    peak = max(counts, default=0) or 1
    bars = []
    for index, count in enumerate(counts):
        tall = round(count / peak * (height - 10)) if count else 0
        minute = start + timedelta(minutes=index)
        bars.append(
            {
                "x": index * bar,
                "y": height - tall,
                "height": tall,
                "label": f"{minute:%H:%M} UTC: {count} accepted",
            }
        )
    return {
        "width": width,
        "height": height,
        "bar": bar - 2,
        "bars": bars,
        "peak": max(counts, default=0),
        "total": sum(counts),
    }


# -- deliveries -----------------------------------------------------------------------------


@router.get("/console/deliveries")
async def deliveries(request: Request, context: ContextDep, session: SessionDep) -> Response:
    wanted = DeliveryFilter.read(dict(request.query_params))
    rows: list[dict[str, Any]] = []
    next_cursor = None
    if not wanted.errors:
        rows = await context.store.list_deliveries(
            status=wanted.status,
            venue_id=wanted.venue_id,
            booking_id=wanted.booking_id,
            since=wanted.since,
            until=wanted.until,
            before_id=read_cursor(request, "delivery"),
            limit=PAGE_SIZE + 1,
        )
        rows, next_cursor = page_of("delivery", rows, PAGE_SIZE)
    groups = await context.store.console.failure_groups()
    return render(
        request,
        "deliveries.html",
        422 if wanted.errors else 200,
        filter=wanted,
        rows=rows,
        next_cursor=next_cursor,
        groups=groups,
        statuses=STATUSES,
        notice=_notice(request),
    )


@router.get("/console/deliveries/retry")
async def confirm_retry_matching(
    request: Request, context: ContextDep, session: SessionDep
) -> Response:
    wanted = DeliveryFilter.read(dict(request.query_params))
    if not wanted.requeueable:
        return message(
            request,
            422,
            "Nothing to retry",
            "Retry all matching works on dead or cancelled deliveries: choose one of those "
            "statuses in the filter first.",
        )
    assert wanted.status is not None
    count = await context.store.console.count_requeueable(
        status=wanted.status,
        venue_id=wanted.venue_id,
        booking_id=wanted.booking_id,
        since=wanted.since,
        until=wanted.until,
    )
    return render(
        request,
        "confirm_retry.html",
        count=count,
        filter=wanted,
        group=None,
        action=request.url.path,
    )


@router.get("/console/groups/{key}/retry")
async def confirm_retry_group(
    key: str, request: Request, context: ContextDep, session: SessionDep
) -> Response:
    group = await find_group(context, key)
    if group is None:
        return message(request, 404, "No such group", "This failure group has no deliveries now.")
    count = await context.store.console.count_requeueable(
        status=DeliveryStatus.DEAD, delivery_ids=group.dead_ids
    )
    return render(
        request,
        "confirm_retry.html",
        count=count,
        filter=None,
        group=group,
        action=request.url.path,
    )


async def find_group(context: AppContext, key: str) -> FailureGroup | None:
    group: FailureGroup | None = await context.store.console.failure_group(key)
    return group


@router.get("/console/deliveries/{delivery_id}")
async def delivery_page(
    delivery_id: int, request: Request, context: ContextDep, session: SessionDep
) -> Response:
    try:
        row, attempts = await context.store.get_delivery(delivery_id)
    except NotFoundError:
        return message(request, 404, "Not found", f"There is no delivery {delivery_id}.")
    before, before_id = await _state_before(context, row)
    return render(
        request,
        "delivery.html",
        row=row,
        attempts=attempts,
        before_id=before_id,
        changes=field_changes(before, row["payload"]),
        notice=_notice(request),
    )


async def _state_before(
    context: AppContext, row: dict[str, Any]
) -> tuple[dict[str, Any] | None, int | None]:
    """The state Mozrest held before this one: the booking's newest older delivered state."""
    try:
        record = await context.store.get_booking(row["booking_id"])
    except NotFoundError:
        return None, None
    older = [
        d
        for d in record.deliveries
        if d["status"] == DeliveryStatus.DELIVERED and d["outbox_id"] < row["outbox_id"]
    ]
    if not older:
        return None, None
    newest = max(older, key=lambda d: d["outbox_id"])
    previous, _ = await context.store.get_delivery(newest["id"])
    payload: dict[str, Any] = previous["payload"]
    return payload, newest["id"]


# -- bookings and outbox --------------------------------------------------------------------


@router.get("/console/bookings/{booking_id:path}")
async def booking_page(
    booking_id: str, request: Request, context: ContextDep, session: SessionDep
) -> Response:
    try:
        record = await context.store.get_booking(booking_id)
    except NotFoundError:
        record = None
    rows = await context.store.list_outbox(booking_id=booking_id, limit=200)
    if record is None and not rows:
        return message(request, 404, "Not found", f"The relay has no booking {booking_id!r}.")
    deliveries = record.deliveries if record is not None else []
    # Oldest first; at one instant the RMS's row comes before the delivery made of it.
    timeline: list[tuple[str, Any, int, dict[str, Any]]] = sorted(
        [("outbox", r["created_at"], r["id"], r) for r in rows]
        + [("delivery", d["created_at"], d["id"], d) for d in deliveries],
        key=lambda item: (item[1], item[0] != "outbox", item[2]),
    )
    return render(
        request,
        "booking.html",
        booking_id=booking_id,
        record=record,
        timeline=timeline,
        notice=_notice(request),
    )


@router.get("/console/erase")
async def confirm_erase(request: Request, context: ContextDep, session: SessionDep) -> Response:
    booking_id = request.query_params.get("booking_id", "")
    if not booking_id:
        return message(request, 422, "Which booking?", "Open the booking's page first.")
    return render(request, "confirm_erase.html", booking_id=booking_id)


@router.get("/console/venues/resync")
async def confirm_resync(request: Request, context: ContextDep, session: SessionDep) -> Response:
    venue_id = request.query_params.get("venue_id", "")
    since_text = request.query_params.get("since", "24h")
    if not venue_id:
        return message(request, 422, "Which venue?", "Open the venues page first.")
    try:
        seconds = parse_duration(since_text)
    except ValueError:
        return message(request, 422, "Since when?", "Give a duration such as 30m, 24h or 7d.")
    since = datetime.now(UTC) - timedelta(seconds=seconds)
    count = await context.store.count_resync(venue_id, since=since)
    return render(request, "confirm_resync.html", venue_id=venue_id, since=since_text, count=count)


@router.get("/console/outbox")
async def outbox_page(request: Request, context: ContextDep, session: SessionDep) -> Response:
    outcome = request.query_params.get("outcome") or None
    if outcome not in (None, *OUTCOMES, "unprocessed"):
        outcome = None
    rows = await context.store.list_outbox(
        outcome=None if outcome == "unprocessed" else outcome,
        unprocessed=outcome == "unprocessed",
        before_id=read_cursor(request, "outbox"),
        limit=PAGE_SIZE + 1,
    )
    rows, next_cursor = page_of("outbox", rows, PAGE_SIZE)
    return render(
        request,
        "outbox.html",
        rows=rows,
        outcome=outcome,
        outcomes=(*OUTCOMES, "unprocessed"),
        next_cursor=next_cursor,
    )


# -- venues and audit -----------------------------------------------------------------------


def _venue_after(request: Request) -> str | None:
    cursor = request.query_params.get("cursor", "")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    prefix, _, venue_id = raw.partition(":")
    return venue_id if prefix == "venue" and venue_id else None


@router.get("/console/venues")
async def venues_page(request: Request, context: ContextDep, session: SessionDep) -> Response:
    rows = await context.store.list_venues(after_id=_venue_after(request), limit=PAGE_SIZE + 1)
    next_cursor = None
    if len(rows) > PAGE_SIZE:
        rows = rows[:PAGE_SIZE]
        next_cursor = encode_venue_cursor(rows[-1]["venue_id"])
    chosen = request.query_params.get("venue_id") or None
    tables = await _tables(request, context, chosen) if chosen else None
    return render(
        request,
        "venues.html",
        rows=rows,
        next_cursor=next_cursor,
        chosen=chosen,
        tables=tables,
        send_items_default=context.settings.relay_send_items,
        notice=_notice(request),
    )


async def _tables(request: Request, context: AppContext, venue_id: str) -> dict[str, Any]:
    """The venue's POS tables and the table-matching report, or Mozrest's failure."""
    try:
        pos: PosTables = await pos_tables_of(request, context, venue_id)  # the API's cache
    except HTTPException as exc:
        return {"error": str(exc.detail)}
    except PartnerApiError as exc:
        return {"error": str(exc)}
    rms_table_ids = await context.store.recent_table_ids(venue_id)
    return {"error": None, "matching": match_tables(venue_id, rms_table_ids, pos.tables)}


@router.get("/console/audit")
async def audit_page(request: Request, context: ContextDep, session: SessionDep) -> Response:
    actor = (request.query_params.get("actor") or "")[:64] or None
    action = request.query_params.get("action") or None
    actions = get_args(AuditAction)
    if action not in actions:
        action = None
    rows = await context.store.audit.list(
        actor=actor, action=action, before_id=read_cursor(request, "audit"), limit=PAGE_SIZE + 1
    )
    rows, next_cursor = page_of("audit", rows, PAGE_SIZE)
    return render(
        request,
        "audit.html",
        rows=rows,
        actor=actor,
        action=action,
        actions=actions,
        next_cursor=next_cursor,
    )
