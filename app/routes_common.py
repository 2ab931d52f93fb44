"""What every `/api/` router shares: the unknown-query check, path and filter types, page
cursors, and the documented error answers.

Lists are newest first, one keyset page at a time: the cursor is an opaque token naming the last
id answered, and the next page is the rows below it (`app.store.admin`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import AfterValidator

from app.schemas import Error, storable_text

#: Largest page a list answers, and the default.
MAX_PAGE_SIZE = 500
DEFAULT_PAGE_SIZE = 50
#: Ids are PostgreSQL `bigint`s: anything larger cannot name a row (and would not bind).
MAX_ID = 2**63 - 1

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


#: The answers every `/api/` route may give besides its own.
API_RESPONSES: Responses = {
    401: {"model": Error, "description": "Missing or wrong admin token."},
    403: {"model": Error, "description": "The token's role may not do this."},
    503: {"model": Error, "description": "RELAY_ADMIN_TOKEN is not set, or no database."},
}

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


def cursor_of(kind: str) -> Any:
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


DeliveryCursor = Annotated[int | None, Depends(cursor_of("delivery"))]
OutboxCursor = Annotated[int | None, Depends(cursor_of("outbox"))]


def page_of(kind: str, rows: list[dict[str, Any]], limit: int) -> tuple[list[Any], str | None]:
    """Rows of one page (fetched with one extra) and the cursor of the next, if any."""
    if len(rows) > limit:
        return rows[:limit], encode_cursor(kind, rows[limit - 1]["id"])
    return rows, None
