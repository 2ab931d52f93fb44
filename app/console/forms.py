"""What the console's pages and buttons take: the delivery filter (the API's query parameter
names, so a filtered page can be linked), read and checked into values or plain errors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fastapi import Request

from app.models import STATUSES
from app.routes_common import decode_cursor
from app.store.admin import REQUEUEABLE_STATUSES

#: Rows per list page.
PAGE_SIZE = 50
#: Longest booking or venue id (the outbox's columns).
MAX_KEY_LENGTH = 64


def parse_time(value: str) -> datetime:
    """`2026-11-30T10:00` (a browser's datetime-local, taken as UTC) or ISO 8601 with an offset."""
    moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


@dataclass
class DeliveryFilter:
    """The Deliveries page's filter: `status`, `venue_id`, `booking_id`, `since`, `until`."""

    status: str | None = None
    venue_id: str | None = None
    booking_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    raw: dict[str, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, values: dict[str, str]) -> DeliveryFilter:
        raw = {
            name: values.get(name, "").strip()
            for name in ("status", "venue_id", "booking_id", "since", "until")
        }
        found = cls(raw=raw)
        if raw["status"]:
            if raw["status"] in STATUSES:
                found.status = raw["status"]
            else:
                found.errors.append(f"status must be one of {', '.join(STATUSES)}")
        for name in ("venue_id", "booking_id"):
            if len(raw[name]) > MAX_KEY_LENGTH or "\x00" in raw[name]:
                found.errors.append(f"{name} must be at most {MAX_KEY_LENGTH} characters")
            elif raw[name]:
                setattr(found, name, raw[name])
        for name in ("since", "until"):
            if raw[name]:
                try:
                    setattr(found, name, parse_time(raw[name]))
                except ValueError:
                    found.errors.append(f"{name} must be a date and time, e.g. 2026-11-30T10:00")
        return found

    @property
    def requeueable(self) -> bool:
        """Whether `Retry all matching` applies: dead or cancelled deliveries only."""
        return self.status in REQUEUEABLE_STATUSES and not self.errors

    def audit_target(self) -> str:
        """The bulk retry's audit target, as `/api/deliveries/retry` writes it."""
        shown: dict[str, Any] = {"status": self.status}
        for name in ("venue_id", "booking_id"):
            if getattr(self, name) is not None:
                shown[name] = getattr(self, name)
        for name in ("since", "until"):
            moment = getattr(self, name)
            if moment is not None:
                shown[name] = moment.isoformat().replace("+00:00", "Z")
        return json.dumps(shown, separators=(",", ":"))


def read_cursor(request: Request, kind: str) -> int | None:
    """The `cursor` query parameter of a list of `kind` rows; a bad one starts from the top."""
    cursor = request.query_params.get("cursor")
    if not cursor:
        return None
    try:
        return decode_cursor(kind, cursor)
    except ValueError:
        return None


async def form_values(request: Request) -> dict[str, str]:
    """A POSTed form's fields as text (files are not taken)."""
    form = await request.form(max_files=0, max_fields=50)
    return {name: value for name, value in form.items() if isinstance(value, str)}
