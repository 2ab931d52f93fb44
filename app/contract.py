"""Mozrest's reservation webhook payload: validation, normalisation, serialisation and diff.

A *state* is the normalised payload as a plain dict: documented keys only, in documented order,
optional fields omitted when absent (never `None`), an empty `items` list removed. A state is
exactly what goes on the wire, so `serialize(parse_state(x))` is what Mozrest receives.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from app.text import shown

State = dict[str, Any]


class WireState(dict[str, Any]):
    """A state parsed from an outbox row, with its wire body serialised once at parsing.

    The body is what `serialize` returns and what the database stores for the delivery
    (`json_text`), so a state read, checked, stored and sent is encoded once. Treat it as
    read-only: the body is not recomputed if the dict is changed.
    """

    __slots__ = ("wire",)

    def __init__(self, state: State, wire: bytes) -> None:
        super().__init__(state)
        self.wire = wire


#: Top-level fields in Mozrest's documented order; serialisation keeps this order.
FIELDS = (
    "bookingId",
    "venueId",
    "partySize",
    "status",
    "tables",
    "date",
    "prepayment",
    "contact",
    "notes",
    "items",
)
REQUIRED_FIELDS = frozenset({"bookingId", "venueId", "partySize", "status", "tables", "date"})
CONTACT_FIELDS = ("firstname", "lastname", "email", "telephone", "locale")
ITEM_FIELDS = ("sku", "quantity", "notes")
#: Column limits of `mozrest_outbox.booking_id` / `venue_id`; keep in step with `models.py`.
MAX_ID_LENGTH = 64
DEFAULT_MAX_PAYLOAD_BYTES = 65536
#: Stored JSON text may be this many times the serialised state (a `\u` escape is six
#: characters for one); longer text is refused before parsing.
STORED_TEXT_FACTOR = 8
#: Unicode's control characters (general category Cc): C0, DEL and C1. A character class rather
#: than `unicodedata.category` per character, which cost more than the rest of a row's checks.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class ContractError(ValueError):
    """A payload breaks the webhook contract; `field` names where, `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def _kind(value: object) -> str:
    """Name a JSON value's type without echoing it (values may be guest personal data)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _string(value: object, field: str, *, non_empty: bool, max_length: int | None = None) -> str:
    if not isinstance(value, str):
        raise ContractError(field, f"must be a string, got {_kind(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ContractError(field, "contains invalid Unicode (an unpaired surrogate)") from None
    if "\x00" in value:
        raise ContractError(field, "contains a NUL character")
    if non_empty and not value.strip():
        raise ContractError(field, "must be a non-empty string")
    if max_length is not None and len(value) > max_length:
        raise ContractError(field, f"must be at most {max_length} characters")
    return value


def _identifier(value: object, field: str) -> str:
    """An id Mozrest keys on: compared exactly on every backend, so nothing a
    collation could pad, fold or trim. MariaDB's PAD SPACE collations found `"B1 "` under
    `"B1"`'s row."""
    text = _string(value, field, non_empty=True, max_length=MAX_ID_LENGTH)
    if text != text.strip():
        raise ContractError(field, "must not have leading or trailing whitespace")
    if _CONTROL.search(text):
        raise ContractError(field, "must not contain control characters")
    return text


def _integer(value: object, field: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ContractError(field, f"must be an integer, got {_kind(value)}")
    if value < minimum:
        raise ContractError(field, f"must be an integer of at least {minimum}, got {value}")
    return value


def _number(value: object, field: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ContractError(field, f"must be a number, got {_kind(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ContractError(field, "must be a finite number")
    if value < 0:
        raise ContractError(field, "must not be negative")
    return value


def _absent(data: dict[str, Any], key: str, field: str, *, strict: bool) -> bool:
    """True when an optional field is missing; `null` counts as missing unless `strict`."""
    if key not in data:
        return True
    if data[key] is None:
        if strict:
            raise ContractError(field, "must be omitted rather than sent as null")
        return True
    return False


def _reject_unknown(data: dict[str, Any], known: tuple[str, ...], prefix: str) -> None:
    for key in data:
        if key not in known:
            # Name the key (it is what the RMS developer must fix), escaped and never at length.
            raise ContractError(
                f"{prefix}{shown(key)}", "is not a field of the Mozrest webhook payload"
            )


def _contact(value: object, *, strict: bool) -> dict[str, str] | None:
    if not isinstance(value, dict):
        raise ContractError("contact", f"must be an object, got {_kind(value)}")
    _reject_unknown(value, CONTACT_FIELDS, "contact.")
    contact: dict[str, str] = {}
    for key in CONTACT_FIELDS:
        field = f"contact.{key}"
        if not _absent(value, key, field, strict=strict):
            contact[key] = _string(value[key], field, non_empty=False)
    return contact


def _items(value: object, *, strict: bool) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise ContractError("items", f"must be an array, got {_kind(value)}")
    items = []
    for index, raw in enumerate(value):
        prefix = f"items[{index}]"
        if not isinstance(raw, dict):
            raise ContractError(prefix, f"must be an object, got {_kind(raw)}")
        _reject_unknown(raw, ITEM_FIELDS, f"{prefix}.")
        if "sku" not in raw or raw["sku"] is None:
            raise ContractError(f"{prefix}.sku", "is required")
        if "quantity" not in raw or raw["quantity"] is None:
            raise ContractError(f"{prefix}.quantity", "is required")
        item: dict[str, Any] = {
            "sku": _string(raw["sku"], f"{prefix}.sku", non_empty=True),
            "quantity": _integer(raw["quantity"], f"{prefix}.quantity", minimum=1),
        }
        if not _absent(raw, "notes", f"{prefix}.notes", strict=strict):
            item["notes"] = _string(raw["notes"], f"{prefix}.notes", non_empty=False)
        items.append(item)
    return items


def parse_state(data: object, *, strict: bool = False) -> State:
    """Validate a payload and return its normalised state, or raise `ContractError`.

    `strict` is the wire check (the emulator's): optional fields sent as `null` are refused. Off
    the wire (an outbox row), `null` for an optional field means "absent" and is dropped.
    """
    if not isinstance(data, dict):
        raise ContractError("payload", f"must be a JSON object, got {_kind(data)}")
    _reject_unknown(data, FIELDS, "")

    def required(key: str) -> Any:
        if data.get(key) is None:
            raise ContractError(key, "is required")
        return data[key]

    state: State = {
        "bookingId": _identifier(required("bookingId"), "bookingId"),
        "venueId": _identifier(required("venueId"), "venueId"),
        "partySize": _integer(required("partySize"), "partySize", minimum=1),
        "status": _string(required("status"), "status", non_empty=True),
    }
    tables = required("tables")
    if not isinstance(tables, list):
        raise ContractError("tables", f"must be an array of strings, got {_kind(tables)}")
    state["tables"] = [
        _string(table, f"tables[{i}]", non_empty=True) for i, table in enumerate(tables)
    ]
    state["date"] = _integer(required("date"), "date", minimum=0)
    if not _absent(data, "prepayment", "prepayment", strict=strict):
        state["prepayment"] = _number(data["prepayment"], "prepayment")
    if not _absent(data, "contact", "contact", strict=strict):
        contact = _contact(data["contact"], strict=strict)
        if contact:
            state["contact"] = contact
    if not _absent(data, "notes", "notes", strict=strict):
        state["notes"] = _string(data["notes"], "notes", non_empty=False)
    if not _absent(data, "items", "items", strict=strict):
        items = _items(data["items"], strict=strict)
        if items:
            state["items"] = items
    return state


def parse_row(
    payload_text: str | bytes | None,
    *,
    booking_id: str,
    venue_id: str,
    send_items: bool = True,
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> State:
    """Parse an outbox row's payload column and check it against the row's own columns."""
    if payload_text is None:
        raise ContractError("payload", "is null")
    if isinstance(payload_text, bytes):  # SQLite keeps whatever bytes were written
        try:
            payload_text = payload_text.decode("utf-8")
        except UnicodeDecodeError:
            raise ContractError("payload", "is not valid UTF-8 text") from None
    # The limit is on what Mozrest receives (checked below, after normalising); stored text can
    # be several times larger (spaces, `\u` escapes), so this only bounds the parsing work.
    if len(payload_text) > STORED_TEXT_FACTOR * max_payload_bytes:
        raise ContractError("payload", f"is larger than the {max_payload_bytes}-byte limit")
    try:
        data = json.loads(payload_text)
    except (ValueError, RecursionError):
        raise ContractError("payload", "is not valid JSON") from None
    state = parse_state(data)
    if state["bookingId"] != booking_id:
        raise ContractError("bookingId", "does not match the row's booking_id column")
    if state["venueId"] != venue_id:
        raise ContractError("venueId", "does not match the row's venue_id column")
    if not send_items:
        state.pop("items", None)
    wire = serialize(state)
    if len(wire) > max_payload_bytes:
        raise ContractError("payload", f"is larger than the {max_payload_bytes}-byte limit")
    return WireState(state, wire)


def serialize(state: State) -> bytes:
    """The exact JSON body Mozrest receives: compact, UTF-8, documented key order.

    The order is imposed here, not trusted from the dict: a state read back from PostgreSQL's
    `jsonb` comes with its keys reordered.
    """
    if type(state) is WireState:
        return state.wire
    return json.dumps(
        _documented_order(state), ensure_ascii=False, separators=(",", ":"), allow_nan=False
    ).encode()


def json_text(value: Any) -> str:
    """JSON text of a column value (the engine's `json_serializer`): a parsed state's wire
    body as it is, anything else as SQLAlchemy would encode it."""
    if type(value) is WireState:
        return value.wire.decode()
    return json.dumps(value)


def _documented_order(state: State) -> State:
    ordered = {key: state[key] for key in FIELDS if key in state}
    if isinstance(ordered.get("contact"), dict):
        contact = ordered["contact"]
        ordered["contact"] = {key: contact[key] for key in CONTACT_FIELDS if key in contact}
    if isinstance(ordered.get("items"), list):
        ordered["items"] = [
            {key: item[key] for key in ITEM_FIELDS if key in item} for item in ordered["items"]
        ]
    return ordered


def canonical(state: State) -> State:
    """The state as compared: numbers by value, optional absences already normalised away."""
    return {key: _canonical_value(value) for key, value in state.items()}


def _canonical_value(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float):
        # 50 and 50.0 are the same amount; JSON numbers carry no type.
        return float(value) if isinstance(value, float) and not value.is_integer() else int(value)
    if isinstance(value, list):
        return [_canonical_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _canonical_value(v) for k, v in value.items()}
    return value


def states_equal(a: State | None, b: State | None) -> bool:
    """Canonical equality: what Mozrest would see as the same booking state."""
    if a is None or b is None:
        return a is b
    return canonical(a) == canonical(b)


def changed_fields(old: State | None, new: State) -> list[str]:
    """The top-level fields that differ between two states, in documented order."""
    if old is None:
        return [key for key in FIELDS if key in new]
    old_c, new_c = canonical(old), canonical(new)
    return [key for key in FIELDS if old_c.get(key) != new_c.get(key)]


def delivery_warnings(old: State | None, new: State) -> list[str]:
    """Warnings an operator should see on a delivery of `new` after `old`."""
    if old is not None and old.get("items") and not new.get("items"):
        return [
            "items were emptied: Mozrest keeps previously sent items when items is omitted, "
            "so the POS may still hold them"
        ]
    return []
