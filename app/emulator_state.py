"""What the emulated Mozrest holds (bookings, the request log, the monitoring trace, menus,
POS tables, the keys it expects) and how its webhook checks a request. `app.emulator` serves it.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, NoReturn

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from app.contract import DEFAULT_MAX_PAYLOAD_BYTES, ContractError, parse_state
from app.emulator_faults import Fault, Faults, FaultTarget, fault_response

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

#: What `decode_json` answers for a body that is not JSON (or is too large to parse).
NOT_JSON: Final = object()


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
class Booking:
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
class Menu:
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
        self.bookings: dict[str, Booking] = {}
        self.requests: deque[dict[str, Any]] = deque(maxlen=REQUEST_LOG_LIMIT)
        self.trace: deque[dict[str, Any]] = deque(maxlen=TRACE_LIMIT)
        self.faults: Faults | None = None
        self.menus: dict[str, Menu] = {}
        self.tables: dict[str, list[dict[str, Any]]] = {}
        self.received = 0
        self.accepted = 0
        self.dropped = 0
        self.by_status: dict[int, int] = {}

    def draw_fault(self, endpoint: FaultTarget) -> tuple[float, Fault | None]:
        return (0.0, None) if self.faults is None else self.faults.draw(endpoint)

    def fault_response(self, fault: Fault) -> Response:
        assert self.faults is not None  # a fault was drawn from them
        return fault_response(fault, self.faults.settings)

    def accept(self, request: Request, raw: bytes, body: Any) -> Response:
        """Check one webhook request that drew no fault and store its state if it is valid."""
        rejection = bearer_rejection(request.headers.get("authorization"), self.token)
        if rejection is not None:
            return unauthorized(rejection)
        media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media_type != "application/json":
            return JSONResponse({"detail": "Content-Type must be application/json"}, 400)
        try:
            if len(raw) > DEFAULT_MAX_PAYLOAD_BYTES:
                raise ContractError(
                    "payload", f"is larger than the {DEFAULT_MAX_PAYLOAD_BYTES}-byte limit"
                )
            if body is NOT_JSON:
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
            booking = self.bookings[booking_id] = Booking(state=body)
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
        fault: Fault | None,
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


def bearer_rejection(authorization: str | None, expected: str | None) -> str | None:
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


def unauthorized(detail: str) -> Response:
    return JSONResponse({"detail": detail}, 401, headers={"WWW-Authenticate": "Bearer"})


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def decode_json(raw: bytes) -> Any:
    """The parsed body, or `NOT_JSON`; bodies over the size limit are not parsed."""
    if len(raw) > DEFAULT_MAX_PAYLOAD_BYTES:
        return NOT_JSON
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return NOT_JSON
