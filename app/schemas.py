"""The admin API's request and response models, so `/docs` shows every shape."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    WithJsonSchema,
    field_validator,
)

from app import states
from app.states import CircuitState, CredentialsState, DeliveryReason, stored_values

# The API spells each state's values out (the OpenAPI schema lists them inline); each is the
# values of its `app.states` enum, as the asserts below keep it.
DeliveryStatus = Literal["pending", "retrying", "delivered", "dead", "superseded", "cancelled"]
Outcome = Literal["queued", "unchanged", "held", "superseded", "invalid"]
#: The outbox filter: an outcome, or `unprocessed` for rows not decided yet.
OutboxFilter = Literal[Outcome, "unprocessed"]
RequeueableStatus = Literal["dead", "cancelled"]
Circuit = Literal["closed", "open", "half_open"]
Credentials = Literal["ok", "rejected"]
Reason = Literal["change", "replay", "resync"]
assert get_args(DeliveryStatus) == stored_values(states.DeliveryStatus)
assert get_args(Outcome) == stored_values(states.Outcome)
assert set(get_args(RequeueableStatus)) <= set(get_args(DeliveryStatus))
assert get_args(Circuit) == stored_values(CircuitState)
assert get_args(Credentials) == stored_values(CredentialsState)
assert get_args(Reason) == stored_values(DeliveryReason)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat()


#: A timestamp answered as ISO 8601 with an explicit `+00:00` offset.
Timestamp = Annotated[
    datetime,
    PlainSerializer(_iso, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


def storable_text(value: str) -> str:
    """Refuse text no database column can hold (NUL, lone surrogates) with a 422, not a 500."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text") from None
    return value


#: A booking or venue id as the outbox columns hold them.
Key = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(storable_text)]


class Error(BaseModel):
    """Every error answer; request validation errors (422) carry FastAPI's list instead."""

    detail: str


class Delivery(BaseModel):
    """One queued state of a booking and how sending it went."""

    id: int
    booking_id: str
    venue_id: str
    outbox_id: int = Field(description="The outbox row whose state this delivery sends.")
    status: DeliveryStatus
    attempt_count: int = Field(description="Webhook requests made for it so far.")
    changed_fields: list[str] = Field(
        description="Top-level fields that differ from what Mozrest held."
    )
    warnings: list[str]
    created_at: Timestamp
    updated_at: Timestamp
    next_attempt_at: Timestamp | None = Field(description="When it is due (pending, retrying).")
    delivered_at: Timestamp | None
    last_status_code: int | None = Field(description="Mozrest's last HTTP status, if any.")
    last_error: str | None
    venue_paused: bool = Field(
        description="Its venue is paused: nothing is sent for it until the venue resumes."
    )
    reason: Reason = Field(
        description="Why it was made: a new state (`change`), an operator's requeue (`replay`), "
        "a venue's resync (`resync`)."
    )


class Attempt(BaseModel):
    """One webhook request and Mozrest's answer (or why none came back)."""

    started_at: Timestamp
    duration_ms: int
    status_code: int | None = Field(description="None when no answer came back.")
    error: str | None
    response_body: str | None = Field(description="Mozrest's answer, cut to 4 KiB.")


class DeliveryDetail(Delivery):
    """A delivery with the exact state it sends and its attempts."""

    payload: dict[str, Any] = Field(description="The state POSTed to the webhook.")
    attempts: list[Attempt] = Field(description="Newest first, at most the 100 newest.")


class DeliveryPage(BaseModel):
    items: list[Delivery]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next (older) page; null on the last page."
    )


class RequeueRequest(BaseModel):
    """Which deliveries to send again; unknown keys are refused so a typo cannot widen it."""

    model_config = ConfigDict(extra="forbid")

    status: RequeueableStatus
    venue_id: Key | None = None
    since: datetime | None = Field(
        None, description="Deliveries created at or after this time (ISO 8601; naive is UTC)."
    )
    until: datetime | None = Field(
        None, description="Deliveries created before this time (ISO 8601; naive is UTC)."
    )

    @field_validator("since", "until")
    @classmethod
    def _as_utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        try:
            return value.astimezone(UTC)
        except OverflowError:
            raise ValueError("is out of range") from None


class RequeueResult(BaseModel):
    requeued: int = Field(
        description="Deliveries made pending again; those with a newer state were skipped."
    )


class LastSent(BaseModel):
    """The snapshot: the state Mozrest last accepted for the booking."""

    payload: dict[str, Any]
    sent_at: Timestamp | None = Field(description="When Mozrest accepted it.")
    outbox_id: int | None = Field(description="The outbox row the state came from.")


class Booking(BaseModel):
    booking_id: str
    venue_id: str
    last_sent: LastSent | None = Field(description="Null until Mozrest accepts a state.")
    deliveries: list[Delivery] = Field(
        description="Newest first, at most the 100 newest: page through "
        "`/api/deliveries?booking_id=` for older ones."
    )


class OutboxRow(BaseModel):
    """An RMS outbox row and what the relay decided about it (without its payload)."""

    id: int
    booking_id: str
    venue_id: str
    created_at: Timestamp
    processed_at: Timestamp | None
    outcome: Outcome | None = Field(description="Null until processed.")
    error: str | None = Field(description="For `invalid`: which field is wrong and why.")


class OutboxPage(BaseModel):
    items: list[OutboxRow]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next (older) page; null on the last page."
    )


class Stats(BaseModel):
    deliveries: dict[DeliveryStatus, int] = Field(description="Deliveries by status.")
    outbox_unprocessed: int
    oldest_pending_age_seconds: float | None = Field(
        description="Age of the oldest state still waiting to be accepted; null if none waits."
    )
    circuit: Circuit = Field(
        description="`open` while Mozrest keeps failing for some relay process."
    )
    credentials: Credentials = Field(
        description="`rejected` while Mozrest answers 401 to the webhook token."
    )
    venues_paused: int = Field(description="Venues paused by an operator.")
    rate_limit: float = Field(
        description="RELAY_RATE_LIMIT: webhook requests per second for the whole relay; 0: none."
    )
    request_rate: float = Field(
        description="Webhook requests per second over the last 10 s, all live relay processes."
    )


class WorkerProcess(BaseModel):
    id: str
    hostname: str
    pid: int
    role: str
    started_at: Timestamp
    heartbeat_at: Timestamp
    circuit: str
    credentials: str


class WorkerList(BaseModel):
    items: list[WorkerProcess] = Field(
        description="Processes that have not stopped and checked in recently."
    )


class PosTable(BaseModel):
    id: str
    name: str
    area: str | None = None


class PosTables(BaseModel):
    """Mozrest's answer for a venue's POS tables, in Mozrest's own field names."""

    venueId: str  # Mozrest's name
    tables: list[PosTable]
    count: int


class TableMatch(BaseModel):
    rms_table_id: str
    pos_table: PosTable
    match: Literal["id", "normalised"] = Field(
        description="`id`: equal ids. `normalised`: equal once case, spaces and punctuation "
        "are ignored, against the POS table's id or name (a hint to check)."
    )


class TableMatching(BaseModel):
    """The RMS table ids in a venue's recent states beside the venue's POS tables."""

    venue_id: str
    pos_tables: list[PosTable]
    matched: list[TableMatch]
    unmatched_rms_table_ids: list[str] = Field(
        description="RMS table ids seen recently that match no POS table, most often seen first."
    )
    unused_pos_tables: list[PosTable] = Field(
        description="POS tables that no recent RMS table id matched."
    )


class VenueDeliveries(BaseModel):
    pending: int
    retrying: int
    dead: int


class Venue(BaseModel):
    """A venue the relay has seen, and its operators' settings."""

    venue_id: str
    paused: bool
    paused_at: Timestamp | None
    paused_by: str | None = Field(description="The name of the token that paused it.")
    pause_reason: str | None
    send_items: bool | None = Field(
        description="Whether pre-ordered items are sent to this venue; null: RELAY_SEND_ITEMS."
    )
    deliveries: VenueDeliveries = Field(description="Its waiting and dead deliveries.")
    dead_last_hour: int = Field(
        description="Its deliveries that went dead in the last hour (pause a venue whose "
        "answers are all 4xx)."
    )


class VenuePage(BaseModel):
    items: list[Venue]
    next_cursor: str | None


class PauseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(default=None, max_length=500)


class VenueUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    send_items: StrictBool | None = Field(
        description="true or false for this venue; null follows RELAY_SEND_ITEMS."
    )


class ResyncRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    since: Timestamp | None = Field(
        default=None,
        description="Only bookings whose newest state was written since; default 24 hours ago.",
    )


class ResyncResult(BaseModel):
    queued: int = Field(description="Bookings whose newest state was queued again.")
