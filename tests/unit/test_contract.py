"""Unit tests for `app.contract`: the Mozrest webhook payload (SPEC 3.5, 3.7, 3.8)."""

from __future__ import annotations

import copy
import json
import math
import unicodedata
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.contract import (
    CONTACT_FIELDS,
    DEFAULT_MAX_PAYLOAD_BYTES,
    FIELDS,
    MAX_ID_LENGTH,
    REQUIRED_FIELDS,
    ContractError,
    changed_fields,
    delivery_warnings,
    json_text,
    parse_row,
    parse_state,
    serialize,
    states_equal,
)

# The two example payloads exactly as Mozrest's POS integration page prints them
# (/work/shared/mozrest/pos-integration.txt), including `50.00`.
SEATED_EXAMPLE = """{
"bookingId": "60e890aca5f07b6ee5b950b1",
"venueId": "60e890aca5f07b6ee5b950b1",
"partySize": 4,
"status": "seated",
"tables": ["28c3ce8b-8c10-4a64-8099-f0dffcc549a8"],
"date": 1639578600,
"prepayment": 50.00,
"contact": {
"firstname": "John",
"lastname": "Doe",
"email": "john.doe@mail.com",
"telephone": "34646223399",
"locale": "en"
},
"notes": "I am allergic to peanuts"
}"""

ITEMS_EXAMPLE = """{
"bookingId": "60e890aca5f07b6ee5b950b1",
"venueId": "60e890aca5f07b6ee5b950b1",
"partySize": 2,
"status": "seated",
"tables": ["28c3ce8b-8c10-4a64-8099-f0dffcc549a8"],
"date": 1639578600,
"contact": {
"firstname": "John",
"lastname": "Doe",
"email": "john.doe@mail.com",
"telephone": "34646223399",
"locale": "en"
},
"items": [
{ "sku": "PIZZA-001", "quantity": 2 },
{ "sku": "WINE-012", "quantity": 1, "notes": "no ice" }
]
}"""

BOOKING_ID = "60e890aca5f07b6ee5b950b1"
VENUE_ID = "60e890aca5f07b6ee5b950b1"

REQUIRED = ("bookingId", "venueId", "partySize", "status", "tables", "date")

FAST = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
FEW = settings(
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def seated() -> dict[str, Any]:
    """A fresh copy of Mozrest's seated example payload."""
    example: dict[str, Any] = json.loads(SEATED_EXAMPLE)
    return example


def with_items() -> dict[str, Any]:
    """A fresh copy of Mozrest's pre-ordered items example payload."""
    example: dict[str, Any] = json.loads(ITEMS_EXAMPLE)
    return example


def compact(payload: object, *, ensure_ascii: bool = False) -> str:
    """The payload as compact JSON text, as an RMS would store it in the outbox."""
    return json.dumps(payload, ensure_ascii=ensure_ascii, separators=(",", ":"))


def row(payload: object, **kwargs: Any) -> dict[str, Any]:
    """parse_row over a payload with matching booking_id/venue_id columns."""
    return parse_row(compact(payload), booking_id=BOOKING_ID, venue_id=VENUE_ID, **kwargs)


# --------------------------------------------------------------------------------------------
# Mozrest's own examples
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [SEATED_EXAMPLE, ITEMS_EXAMPLE], ids=["seated", "items"])
def test_documented_examples_round_trip_unchanged(text: str) -> None:
    """Each documented example parses (strictly too) and serialises back to the same JSON object."""
    document = json.loads(text)
    state = parse_state(document)
    assert parse_state(document, strict=True) == state
    assert json.loads(serialize(state)) == document
    assert serialize(state) == compact(document).encode("utf-8")


@pytest.mark.parametrize("text", [SEATED_EXAMPLE, ITEMS_EXAMPLE], ids=["seated", "items"])
def test_documented_examples_keep_documented_key_order(text: str) -> None:
    """Serialised keys (top level, contact, items) follow the order Mozrest documents."""
    document = json.loads(text)
    wire = json.loads(serialize(parse_state(document)))
    assert list(wire) == list(document)
    assert list(wire) == [key for key in FIELDS if key in document]
    assert list(wire["contact"]) == list(CONTACT_FIELDS)
    for sent, documented in zip(wire.get("items", []), document.get("items", []), strict=True):
        assert list(sent) == list(documented)


def test_key_order_is_documented_whatever_the_input_order() -> None:
    """A payload whose keys arrive shuffled is serialised in the documented order."""
    document = with_items()
    document["notes"] = "window seat"
    document["prepayment"] = 20
    shuffled = dict(reversed(list(document.items())))
    shuffled["contact"] = dict(reversed(list(document["contact"].items())))
    shuffled["items"] = [dict(reversed(list(item.items()))) for item in document["items"]]
    wire = json.loads(serialize(parse_state(shuffled)))
    assert list(wire) == [key for key in FIELDS if key in document]
    assert list(wire["contact"]) == list(CONTACT_FIELDS)
    assert [list(item) for item in wire["items"]] == [
        ["sku", "quantity"],
        ["sku", "quantity", "notes"],
    ]


def test_seated_example_changed_fields_from_nothing() -> None:
    """With no previous state, every present field of the seated example counts as changed."""
    state = parse_state(seated())
    assert changed_fields(None, state) == [
        "bookingId",
        "venueId",
        "partySize",
        "status",
        "tables",
        "date",
        "prepayment",
        "contact",
        "notes",
    ]


# --------------------------------------------------------------------------------------------
# Normalisation and comparison
# --------------------------------------------------------------------------------------------


def test_empty_items_equals_absent_items_and_is_dropped() -> None:
    """An empty `items` array is dropped and compares equal to a payload without `items`."""
    without = seated()
    empty = {**seated(), "items": []}
    state_empty = parse_state(empty)
    state_without = parse_state(without)
    assert "items" not in state_empty
    assert b'"items"' not in serialize(state_empty)
    assert state_empty == state_without
    assert states_equal(state_empty, state_without)
    assert changed_fields(state_without, state_empty) == []
    assert parse_state(empty, strict=True) == state_without


NULL_CASES: list[tuple[tuple[Any, ...], str]] = [
    (("prepayment",), "prepayment"),
    (("contact",), "contact"),
    (("notes",), "notes"),
    (("items",), "items"),
    (("contact", "firstname"), "contact.firstname"),
    (("contact", "lastname"), "contact.lastname"),
    (("contact", "email"), "contact.email"),
    (("contact", "telephone"), "contact.telephone"),
    (("contact", "locale"), "contact.locale"),
    (("items", 1, "notes"), "items[1].notes"),
]


def _set_path(document: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    target: Any = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value


def _del_path(document: dict[str, Any], path: tuple[Any, ...]) -> None:
    target: Any = document
    for step in path[:-1]:
        target = target[step]
    del target[path[-1]]


def _full_payload() -> dict[str, Any]:
    document = with_items()
    document["prepayment"] = 12.5
    document["notes"] = "birthday"
    return document


@pytest.mark.parametrize(("path", "field"), NULL_CASES, ids=[f for _, f in NULL_CASES])
def test_null_optional_field_is_dropped_off_the_wire(path: tuple[Any, ...], field: str) -> None:
    """Off the wire (strict=False), `null` in an optional field means absent and is omitted."""
    nulled = _full_payload()
    _set_path(nulled, path, None)
    omitted = _full_payload()
    _del_path(omitted, path)
    state = parse_state(nulled)
    assert state == parse_state(omitted)
    assert list(state) == list(parse_state(omitted))
    assert b"null" not in serialize(state)


@pytest.mark.parametrize(("path", "field"), NULL_CASES, ids=[f for _, f in NULL_CASES])
def test_null_optional_field_is_refused_when_strict(path: tuple[Any, ...], field: str) -> None:
    """On the wire (strict=True), `null` for an optional field is refused, naming that field."""
    nulled = _full_payload()
    _set_path(nulled, path, None)
    with pytest.raises(ContractError) as caught:
        parse_state(nulled, strict=True)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")


def test_contact_with_only_null_subfields_is_dropped() -> None:
    """A contact whose subfields are all `null` is omitted entirely, as for a walk-in."""
    document = seated()
    document["contact"] = dict.fromkeys(CONTACT_FIELDS)
    state = parse_state(document)
    assert "contact" not in state
    assert b"contact" not in serialize(state)


def test_integer_and_float_amounts_compare_equal() -> None:
    """`50` and `50.0` are the same prepayment: equal states, no changed fields."""
    as_int = parse_state({**seated(), "prepayment": 50})
    as_float = parse_state({**seated(), "prepayment": 50.0})
    assert states_equal(as_int, as_float)
    assert states_equal(as_float, as_int)
    assert changed_fields(as_int, as_float) == []
    different = parse_state({**seated(), "prepayment": 50.5})
    assert not states_equal(as_int, different)
    assert changed_fields(as_int, different) == ["prepayment"]


def test_list_order_counts() -> None:
    """Reversing tables or items makes a different state."""
    document = with_items()
    document["tables"] = ["T1", "T2", "T3"]
    base = parse_state(document)
    tables_reversed = parse_state({**document, "tables": ["T3", "T2", "T1"]})
    items_reversed = parse_state({**document, "items": list(reversed(document["items"]))})
    assert not states_equal(base, tables_reversed)
    assert changed_fields(base, tables_reversed) == ["tables"]
    assert not states_equal(base, items_reversed)
    assert changed_fields(base, items_reversed) == ["items"]


def test_states_equal_with_none() -> None:
    """No state equals no state, and never equals an actual state."""
    state = parse_state(seated())
    assert states_equal(None, None)
    assert not states_equal(None, state)
    assert not states_equal(state, None)


def test_changed_fields_are_listed_in_documented_order() -> None:
    """changed_fields names every differing top-level field, in Mozrest's documented order."""
    old = parse_state(_full_payload())
    changed_input = _full_payload()
    del changed_input["contact"]  # removal counts as a change
    changed_input["items"] = [{"sku": "PIZZA-001", "quantity": 3}]
    changed_input["notes"] = "anniversary"
    changed_input["tables"] = ["T99"]
    changed_input["partySize"] = 5
    changed_input["status"] = "finished"
    new = parse_state(dict(reversed(list(changed_input.items()))))
    assert changed_fields(old, new) == [
        "partySize",
        "status",
        "tables",
        "contact",
        "notes",
        "items",
    ]
    assert changed_fields(old, old) == []


def test_changed_fields_counts_a_new_optional_field() -> None:
    """Adding an optional field that was absent is a change of that field only."""
    old = parse_state(seated())
    new = parse_state({**seated(), "items": [{"sku": "A", "quantity": 1}]})
    assert changed_fields(old, new) == ["items"]


@pytest.mark.parametrize("text", [SEATED_EXAMPLE, ITEMS_EXAMPLE], ids=["seated", "items"])
def test_changed_fields_from_nothing_lists_present_fields(text: str) -> None:
    """With old=None, changed_fields lists exactly the fields present, in documented order."""
    state = parse_state(json.loads(text))
    assert changed_fields(None, state) == [key for key in FIELDS if key in state]


ITEMS_A = [{"sku": "PIZZA-001", "quantity": 2}]
ITEMS_B = [{"sku": "WINE-012", "quantity": 1}]


@pytest.mark.parametrize(
    ("old_items", "new_items", "warns"),
    [
        (ITEMS_A, None, True),
        (ITEMS_A, [], True),
        (ITEMS_A, ITEMS_A, False),
        (ITEMS_A, ITEMS_B, False),
        (None, ITEMS_A, False),
        (None, None, False),
        (None, [], False),
        ("no-old-state", None, False),
        ("no-old-state", ITEMS_A, False),
    ],
    ids=[
        "items-to-absent",
        "items-to-empty",
        "same-items",
        "other-items",
        "absent-to-items",
        "absent-to-absent",
        "absent-to-empty",
        "first-state-no-items",
        "first-state-with-items",
    ],
)
def test_delivery_warnings_exactly_when_items_are_emptied(
    old_items: Any, new_items: Any, warns: bool
) -> None:
    """A warning is recorded exactly when items go from non-empty to absent (or empty)."""

    def state(items: Any) -> dict[str, Any]:
        document = seated()
        if items is not None:
            document["items"] = copy.deepcopy(items)
        return parse_state(document)

    old = None if old_items == "no-old-state" else state(old_items)
    warnings = delivery_warnings(old, state(new_items))
    if warns:
        assert len(warnings) == 1
        assert "items" in warnings[0]
    else:
        assert warnings == []


# --------------------------------------------------------------------------------------------
# parse_row: the outbox row
# --------------------------------------------------------------------------------------------


def test_parse_row_accepts_a_matching_row() -> None:
    """A row whose columns match its payload parses to the same state as parse_state."""
    assert row(seated()) == parse_state(seated())


@pytest.mark.parametrize(
    ("column", "field"),
    [("booking_id", "bookingId"), ("venue_id", "venueId")],
)
def test_parse_row_names_the_mismatched_column(column: str, field: str) -> None:
    """A payload disagreeing with its booking_id/venue_id column is refused naming that field."""
    columns = {"booking_id": BOOKING_ID, "venue_id": VENUE_ID, column: "something-else"}
    with pytest.raises(ContractError) as caught:
        parse_row(compact(seated()), booking_id=columns["booking_id"], venue_id=columns["venue_id"])
    assert caught.value.field == field


@pytest.mark.parametrize(
    "text",
    ["", "{", '{"bookingId": ', "not json", "{'bookingId': 'x'}", '{"a":1}{"b":2}', "[" * 10_000],
    ids=["empty", "open-brace", "truncated", "words", "single-quotes", "two-objects", "deep"],
)
def test_parse_row_refuses_text_that_is_not_json(text: str) -> None:
    """Text that is not JSON is refused with field `payload`."""
    with pytest.raises(ContractError) as caught:
        parse_row(text, booking_id=BOOKING_ID, venue_id=VENUE_ID)
    assert caught.value.field == "payload"


def test_parse_row_refuses_a_null_column() -> None:
    """A NULL payload column is refused with field `payload`."""
    with pytest.raises(ContractError) as caught:
        parse_row(None, booking_id=BOOKING_ID, venue_id=VENUE_ID)
    assert caught.value.field == "payload"


@pytest.mark.parametrize(
    "text",
    ["[]", f"[{SEATED_EXAMPLE}]", '"seated"', "42", "4.5", "null", "true"],
    ids=["empty-array", "array-of-payload", "string", "integer", "float", "null", "boolean"],
)
def test_parse_row_refuses_json_that_is_not_an_object(text: str) -> None:
    """A JSON array, string, number, boolean or null payload is refused with field `payload`."""
    with pytest.raises(ContractError) as caught:
        parse_row(text, booking_id=BOOKING_ID, venue_id=VENUE_ID)
    assert caught.value.field == "payload"


def _payload_of_size(size: int) -> str:
    """Compact payload text of exactly `size` UTF-8 bytes, padded with multi-byte notes."""
    base = seated()
    base["notes"] = ""
    overhead = len(compact(base).encode("utf-8"))
    padding = size - overhead
    assert padding >= 0
    emoji, rest = divmod(padding, 4)
    base["notes"] = "😀" * emoji + "a" * rest
    text = compact(base)
    assert len(text.encode("utf-8")) == size
    return text


@pytest.mark.parametrize("limit", [1024, 4096, DEFAULT_MAX_PAYLOAD_BYTES])
def test_parse_row_size_limit_on_utf8_bytes(limit: int) -> None:
    """Payloads up to the byte limit pass; one byte more fails, counted in UTF-8 bytes."""
    kwargs: dict[str, Any] = {"booking_id": BOOKING_ID, "venue_id": VENUE_ID}
    if limit != DEFAULT_MAX_PAYLOAD_BYTES:
        kwargs["max_payload_bytes"] = limit
    for size in (limit - 1, limit):
        state = parse_row(_payload_of_size(size), **kwargs)
        assert len(serialize(state)) == size
    over = _payload_of_size(limit + 1)
    # Far fewer characters than bytes: a limit counted in characters would let this through.
    assert len(over) < limit
    with pytest.raises(ContractError) as caught:
        parse_row(over, **kwargs)
    assert caught.value.field == "payload"


def test_parse_row_default_limit_is_64_kib() -> None:
    """The documented default payload limit is 64 KiB."""
    assert DEFAULT_MAX_PAYLOAD_BYTES == 64 * 1024


@pytest.mark.parametrize("send_items", [True, False])
def test_parse_row_send_items_switch(send_items: bool) -> None:
    """send_items=False strips pre-ordered items; send_items=True keeps them unchanged."""
    state = row(with_items(), send_items=send_items)
    if send_items:
        assert state["items"] == with_items()["items"]
    else:
        assert "items" not in state
        assert b"items" not in serialize(state)
        expected = with_items()
        del expected["items"]
        assert json.loads(serialize(state)) == expected


UNICODE_SAMPLES = [
    "👩‍👩‍👧‍👦 🇪🇸 🎂🍕🍷",  # ZWJ family, flag (regional indicators), emoji
    "שולחן ליד החלון",  # Hebrew (right to left)
    "\u200fحساسية من الفول السوداني\u200e",  # Arabic with RLM / LRM marks
    "abc \u202bمرحبا\u202c def",  # bidi embedding controls
    "花生过敏・ピーナッツアレルギー・땅콩 알레르기",  # CJK
    "मूंगफली से एलर्जी",  # Devanagari
    "e\u0301 vs \u00e9, A\u030a vs \u00c5",  # combining vs precomposed: no normalisation
    'line\u2028sep\u2029para\ttab\nnewline "quoted" \\ back',  # separators and escapes
    "\U0001d54f\U0001f9d1\u200d\U0001f373 \ufeff zero\u200bwidth",  # astral, ZWJ, BOM, ZWSP
]


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
@pytest.mark.parametrize("ensure_ascii", [False, True], ids=["raw-utf8", "escaped"])
def test_unicode_survives_parse_row_and_serialize(text: str, ensure_ascii: bool) -> None:
    """Emoji, right-to-left text and other scripts come out byte-for-byte as they went in."""
    document = with_items()
    # Ids keep no control characters nor outer whitespace (SPEC 9.6); other fields keep all.
    plain = "".join(c for c in text[:20] if unicodedata.category(c) != "Cc").strip()
    document["bookingId"] = document["venueId"] = "bk-" + plain
    document["status"] = "seated " + text
    document["tables"] = [text, "T-" + text]
    document["notes"] = text
    document["contact"]["firstname"] = text
    document["contact"]["lastname"] = text[::-1]
    document["items"][1]["notes"] = text
    document["items"][0]["sku"] = "SKU-" + text
    document = {key: document[key] for key in FIELDS if key in document}  # documented order
    payload_text = compact(document, ensure_ascii=ensure_ascii)
    state = parse_row(payload_text, booking_id=document["bookingId"], venue_id=document["venueId"])
    assert state == document
    assert serialize(state) == compact(document).encode("utf-8")
    if json.dumps(text, ensure_ascii=False)[1:-1] == text:  # nothing JSON must escape
        assert text.encode("utf-8") in serialize(state)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "must be a non-empty string"),
        ("B" * 65, "at most 64 characters"),
        ("B1 ", "leading or trailing whitespace"),
        (" B1", "leading or trailing whitespace"),
        ("B1\u00a0", "leading or trailing whitespace"),
        ("B\t1", "control characters"),
        ("B\u00001", "NUL"),
        ("B\u007f1", "control characters"),
    ],
)
@pytest.mark.parametrize("field", ["bookingId", "venueId"])
def test_ids_that_a_collation_could_pad_or_trim_are_invalid(
    field: str, value: str, reason: str
) -> None:
    """An id compared exactly on every backend: empty, over 64 characters, outer whitespace or
    a control character make the row invalid, naming the field (MariaDB's PAD SPACE collation
    once matched "B1 " with "B1")."""
    document = seated()
    text = compact(document).replace(
        f'"{field}":"{document[field]}"', f'"{field}":{json.dumps(value)}'
    )
    with pytest.raises(ContractError) as caught:
        parse_row(text, booking_id=BOOKING_ID, venue_id=VENUE_ID)
    assert caught.value.field == field
    assert reason in caught.value.reason


def test_an_unknown_key_is_named_escaped_so_the_error_can_be_stored() -> None:
    """A key holding a lone surrogate and a NUL is named in the error with escapes, so the error
    text is valid UTF-8 without NUL on every backend (it once crash-looped ingest on SQLite)."""
    text = compact(seated())[:-1] + ',"bad\\ud800\\u0000key":1}'
    with pytest.raises(ContractError) as caught:
        parse_row(text, booking_id=BOOKING_ID, venue_id=VENUE_ID)
    message = str(caught.value)
    assert message == "bad\\ud800\\x00key: is not a field of the Mozrest webhook payload"
    message.encode("utf-8")


def test_a_payload_that_is_not_utf8_is_invalid() -> None:
    """Bytes that are not UTF-8 (SQLite keeps whatever an RMS wrote) are invalid, not a crash."""
    with pytest.raises(ContractError) as caught:
        parse_row(b"\xff\xfe", booking_id=BOOKING_ID, venue_id=VENUE_ID)
    assert (caught.value.field, caught.value.reason) == ("payload", "is not valid UTF-8 text")


def test_unpaired_surrogate_is_refused_naming_the_field() -> None:
    """A lone surrogate (not encodable as UTF-8) is refused with the field that holds it."""
    text = compact(seated()).replace("I am allergic", "I am \\ud83d allergic")
    with pytest.raises(ContractError) as caught:
        parse_row(text, booking_id=BOOKING_ID, venue_id=VENUE_ID)
    assert caught.value.field == "notes"


# --------------------------------------------------------------------------------------------
# Error messages never echo guest personal data
# --------------------------------------------------------------------------------------------

SECRET_NAME = "Zebulon"
SECRET_PHONE = 34646223399


def _pii_case(mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    document = seated()
    mutate(document)
    return document


PII_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    (
        "email-as-number",
        lambda d: d["contact"].__setitem__("email", SECRET_PHONE),
        "contact.email",
        str(SECRET_PHONE),
    ),
    (
        "telephone-as-number",
        lambda d: d["contact"].__setitem__("telephone", SECRET_PHONE),
        "contact.telephone",
        str(SECRET_PHONE),
    ),
    (
        "firstname-at-top-level",
        lambda d: d.__setitem__("firstname", SECRET_NAME),
        "firstname",
        SECRET_NAME,
    ),
    (
        "name-under-unknown-contact-key",
        lambda d: d["contact"].__setitem__("name", f"{SECRET_NAME} Doe"),
        "contact.name",
        SECRET_NAME,
    ),
    (
        "firstname-as-object",
        lambda d: d["contact"].__setitem__("firstname", {"given": SECRET_NAME}),
        "contact.firstname",
        SECRET_NAME,
    ),
    (
        "contact-as-string",
        lambda d: d.__setitem__("contact", f"{SECRET_NAME} Doe <zeb@mail.com>"),
        "contact",
        SECRET_NAME,
    ),
    (
        "notes-as-array",
        lambda d: d.__setitem__("notes", [f"{SECRET_NAME} is allergic to peanuts"]),
        "notes",
        SECRET_NAME,
    ),
    (
        "firstname-in-party-size",
        lambda d: d.__setitem__("partySize", SECRET_NAME),
        "partySize",
        SECRET_NAME,
    ),
    (
        "telephone-in-tables",
        lambda d: d.__setitem__("tables", [SECRET_PHONE]),
        "tables[0]",
        str(SECRET_PHONE),
    ),
    (
        "firstname-as-too-long-booking-id",
        lambda d: d.__setitem__("bookingId", SECRET_NAME * 10),
        "bookingId",
        SECRET_NAME,
    ),
    (
        "name-in-item-notes-as-array",
        lambda d: d.__setitem__("items", [{"sku": "A", "quantity": 1, "notes": [SECRET_NAME]}]),
        "items[0].notes",
        SECRET_NAME,
    ),
]


@pytest.mark.parametrize(
    ("mutate", "field", "secret"),
    [case[1:] for case in PII_CASES],
    ids=[case[0] for case in PII_CASES],
)
def test_errors_do_not_echo_guest_data(
    mutate: Callable[[dict[str, Any]], None], field: str, secret: str
) -> None:
    """A misplaced or mistyped guest detail is named by field, never quoted in the error."""
    document = _pii_case(mutate)
    with pytest.raises(ContractError) as caught:
        parse_row(compact(document), booking_id=document["bookingId"], venue_id=VENUE_ID)
    assert caught.value.field == field
    assert secret not in str(caught.value)
    assert secret not in caught.value.reason


# --------------------------------------------------------------------------------------------
# Optional-field corruptions (example based)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "field"),
    [
        ("prepayment", -1, "prepayment"),
        ("prepayment", -0.01, "prepayment"),
        ("prepayment", "50", "prepayment"),
        ("prepayment", True, "prepayment"),
        ("prepayment", [50], "prepayment"),
        ("prepayment", math.nan, "prepayment"),
        ("prepayment", math.inf, "prepayment"),
        ("contact", [], "contact"),
        ("contact", "John", "contact"),
        ("contact", {"firstname": 1}, "contact.firstname"),
        ("contact", {"locale": True}, "contact.locale"),
        ("contact", {"phone": "1"}, "contact.phone"),
        ("notes", 5, "notes"),
        ("notes", {"text": "x"}, "notes"),
        ("items", {"sku": "A", "quantity": 1}, "items"),
        ("items", "PIZZA-001", "items"),
        ("items", ["PIZZA-001"], "items[0]"),
        ("items", [None], "items[0]"),
        ("unknownField", 1, "unknownField"),
    ],
)
def test_optional_field_corruption_is_named(key: str, value: Any, field: str) -> None:
    """A wrong optional field or an unknown top-level field is refused, naming it."""
    document = seated()
    document[key] = value
    with pytest.raises(ContractError) as caught:
        parse_state(document)
    assert caught.value.field == field


# --------------------------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------------------------

# Valid text: any character but lone surrogates and NUL (both are refused by the contract).
_CHARS = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
_TEXT = st.text(_CHARS, max_size=30)
_NON_BLANK = st.text(_CHARS, min_size=1, max_size=30).filter(lambda s: s.strip() != "")
#: Ids as SPEC 9.6 allows them: no control characters, no outer whitespace.
_IDS = st.text(
    st.characters(exclude_categories=["Cs", "Cc"]), min_size=1, max_size=MAX_ID_LENGTH
).filter(lambda s: s.strip() == s and s != "")
_AMOUNTS = st.integers(min_value=0, max_value=10**12) | st.floats(
    min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False
)


@st.composite
def _items(draw: st.DrawFn) -> list[dict[str, Any]]:
    items = []
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        item: dict[str, Any] = {
            "sku": draw(_NON_BLANK),
            "quantity": draw(st.integers(min_value=1, max_value=10_000)),
        }
        if draw(st.booleans()):
            item["notes"] = draw(_TEXT)
        items.append(item)
    return items


@st.composite
def valid_states(draw: st.DrawFn, *, items: bool | None = None) -> dict[str, Any]:
    """A normalised state: every documented field, optional ones sometimes absent."""
    state: dict[str, Any] = {
        "bookingId": draw(_IDS),
        "venueId": draw(_IDS),
        "partySize": draw(st.integers(min_value=1, max_value=500)),
        "status": draw(_NON_BLANK | st.sampled_from(["seated", "finished", "cancelled"])),
        "tables": draw(st.lists(_NON_BLANK, max_size=4)),
        "date": draw(st.integers(min_value=0, max_value=2**40)),
    }
    if draw(st.booleans()):
        state["prepayment"] = draw(_AMOUNTS)
    if draw(st.booleans()):
        keys = draw(st.lists(st.sampled_from(CONTACT_FIELDS), min_size=1, unique=True))
        state["contact"] = {key: draw(_TEXT) for key in CONTACT_FIELDS if key in keys}
    if draw(st.booleans()):
        state["notes"] = draw(_TEXT)
    if items is True or (items is None and draw(st.booleans())):
        state["items"] = draw(_items())
    return state


@FAST
@given(valid_states())
def test_property_serialize_parse_round_trip(state: dict[str, Any]) -> None:
    """parse_state(json.loads(serialize(s))) == s, and serialising again gives the same bytes."""
    body = serialize(state)
    parsed = parse_state(json.loads(body))
    assert parsed == state
    assert list(parsed) == list(state)
    assert serialize(parsed) == body
    assert parse_state(state) == state
    assert serialize(parse_state(state)) == body
    assert parse_state(json.loads(body), strict=True) == state
    assert body.decode("utf-8") == compact(state)


@FAST
@given(valid_states(), st.data())
def test_property_raw_forms_normalise_to_the_state(
    state: dict[str, Any], data: st.DataObject
) -> None:
    """Shuffled keys, `null` optionals and empty items all normalise to the same state."""
    raw: dict[str, Any] = copy.deepcopy(state)
    for key in ("prepayment", "contact", "notes", "items"):
        if key not in raw and data.draw(st.booleans()):
            absent: list[list[Any] | None] = [None, []] if key == "items" else [None]
            raw[key] = data.draw(st.sampled_from(absent))
    if "contact" in raw and raw["contact"] is not None:
        for key in CONTACT_FIELDS:
            if key not in raw["contact"] and data.draw(st.booleans()):
                raw["contact"][key] = None
    for item in raw.get("items") or []:
        if "notes" not in item and data.draw(st.booleans()):
            item["notes"] = None
    order = data.draw(st.permutations(list(raw)))
    raw = {key: raw[key] for key in order}
    text = compact(raw)
    parsed = parse_row(text, booking_id=state["bookingId"], venue_id=state["venueId"])
    assert parsed == state
    assert serialize(parsed) == serialize(state)


_MUTATIONS = (
    "same",
    "copy-with-float-amount",
    "reverse-tables",
    "bump-party",
    "drop-optional",
    "other-state",
    "empty-items-added",
)


@FAST
@given(valid_states(), st.sampled_from(_MUTATIONS), st.data())
def test_property_changed_fields_empty_iff_states_equal(
    a: dict[str, Any], mutation: str, data: st.DataObject
) -> None:
    """changed_fields(a, b) == [] exactly when states_equal(a, b), in both directions."""
    b = copy.deepcopy(a)
    if mutation == "copy-with-float-amount" and "prepayment" in b:
        amount = b["prepayment"]
        b["prepayment"] = float(amount) if isinstance(amount, int) else amount
    elif mutation == "reverse-tables":
        b["tables"] = list(reversed(b["tables"]))
    elif mutation == "bump-party":
        b["partySize"] += 1
    elif mutation == "drop-optional":
        present = [key for key in FIELDS if key in b and key not in REQUIRED]
        if present:
            del b[data.draw(st.sampled_from(present))]
    elif mutation == "other-state":
        b = data.draw(valid_states())
    elif mutation == "empty-items-added":
        b = parse_state({**b, "items": b.get("items", [])})
    for x, y in ((a, b), (b, a)):
        changes = changed_fields(x, y)
        assert (changes == []) == states_equal(x, y)
        assert changes == [key for key in FIELDS if key in changes]  # documented order
        assert len(set(changes)) == len(changes)
    assert set(changed_fields(a, b)) == set(changed_fields(b, a))
    if mutation in ("same", "copy-with-float-amount", "empty-items-added"):
        assert states_equal(a, b)
    if mutation == "bump-party":
        assert changed_fields(a, b) == ["partySize"]


@FAST
@given(valid_states())
def test_property_changed_fields_from_none(state: dict[str, Any]) -> None:
    """With no old state, changed_fields lists all present fields in documented order."""
    assert changed_fields(None, state) == [key for key in FIELDS if key in state]


def _delete(key: str) -> Callable[[dict[str, Any]], None]:
    def corrupt(document: dict[str, Any]) -> None:
        del document[key]

    return corrupt


def _put(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def corrupt(document: dict[str, Any]) -> None:
        document[key] = copy.deepcopy(value)

    return corrupt


_STRING_FIELD_CORRUPTIONS: list[tuple[str, Any]] = [
    ("null", None),
    ("list", ["x"]),
    ("empty-list", []),
    ("dict", {"x": "y"}),
    ("bool", True),
    ("false", False),
    ("int", 123),
    ("float", 1.5),
    ("empty-string", ""),
    ("blank-string", "   "),
]
_ID_CORRUPTIONS = [*_STRING_FIELD_CORRUPTIONS, ("too-long", "x" * (MAX_ID_LENGTH + 1))]
_POSITIVE_INT_CORRUPTIONS: list[tuple[str, Any]] = [
    ("null", None),
    ("list", [4]),
    ("dict", {"n": 4}),
    ("bool", True),
    ("false", False),
    ("str-for-int", "4"),
    ("float-for-int", 4.0),
    ("fractional", 2.5),
    ("zero", 0),
    ("negative", -1),
    ("empty-string", ""),
]
_DATE_CORRUPTIONS: list[tuple[str, Any]] = [
    ("null", None),
    ("list", [1639578600]),
    ("dict", {"t": 1639578600}),
    ("bool", True),
    ("str-for-int", "1639578600"),
    ("iso-string", "2021-12-15T14:30:00Z"),
    ("float-for-int", 1639578600.0),
    ("fractional", 1639578600.5),
    ("negative", -1),
    ("empty-string", ""),
]
_TABLES_CORRUPTIONS: list[tuple[str, Any]] = [
    ("null", None),
    ("dict", {"id": "T1"}),
    ("bool", True),
    ("str-not-array", "T12"),
    ("int", 12),
    ("empty-string", ""),
]

_REQUIRED_CASES: list[tuple[str, str, Callable[[dict[str, Any]], None]]] = []
for _field, _corruptions in (
    ("bookingId", _ID_CORRUPTIONS),
    ("venueId", _ID_CORRUPTIONS),
    ("status", _STRING_FIELD_CORRUPTIONS),
    ("partySize", _POSITIVE_INT_CORRUPTIONS),
    ("date", _DATE_CORRUPTIONS),
    ("tables", _TABLES_CORRUPTIONS),
):
    _REQUIRED_CASES.append((_field, "deleted", _delete(_field)))
    for _name, _value in _corruptions:
        _REQUIRED_CASES.append((_field, _name, _put(_field, _value)))


@pytest.mark.parametrize(
    ("field", "corrupt"),
    [(field, corrupt) for field, _, corrupt in _REQUIRED_CASES],
    ids=[f"{field}-{name}" for field, name, _ in _REQUIRED_CASES],
)
@FEW
@given(state=valid_states())
def test_property_required_field_corruption_names_the_field(
    field: str, corrupt: Callable[[dict[str, Any]], None], state: dict[str, Any]
) -> None:
    """Any corruption of a required field raises ContractError whose field is that field."""
    document = copy.deepcopy(state)
    corrupt(document)
    for strict in (False, True):
        with pytest.raises(ContractError) as caught:
            parse_state(document, strict=strict)
        assert caught.value.field == field
    with pytest.raises(ContractError) as caught:
        parse_row(compact(document), booking_id=state["bookingId"], venue_id=state["venueId"])
    assert caught.value.field == field


_TABLE_ELEMENT_CORRUPTIONS: list[Any] = [None, 12, 1.5, True, "", "  ", ["T1"], {"id": "T1"}]


@pytest.mark.parametrize("bad", _TABLE_ELEMENT_CORRUPTIONS, ids=repr)
@FEW
@given(state=valid_states(), data=st.data())
def test_property_table_element_corruption_names_the_index(
    bad: Any, state: dict[str, Any], data: st.DataObject
) -> None:
    """A bad element of `tables` raises ContractError naming `tables[i]` for its index."""
    document = copy.deepcopy(state)
    index = data.draw(st.integers(min_value=0, max_value=len(document["tables"])))
    document["tables"].insert(index, bad)
    with pytest.raises(ContractError) as caught:
        parse_state(document)
    assert caught.value.field == f"tables[{index}]"
    assert caught.value.field.startswith("tables")


def _item_delete(key: str) -> Callable[[dict[str, Any]], None]:
    def corrupt(item: dict[str, Any]) -> None:
        item.pop(key, None)

    return corrupt


def _item_put(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def corrupt(item: dict[str, Any]) -> None:
        item[key] = copy.deepcopy(value)

    return corrupt


_ITEM_CASES: list[tuple[str, str, Callable[[dict[str, Any]], None]]] = [
    ("quantity-zero", "quantity", _item_put("quantity", 0)),
    ("quantity-negative", "quantity", _item_put("quantity", -2)),
    ("quantity-fractional", "quantity", _item_put("quantity", 1.5)),
    ("quantity-float-for-int", "quantity", _item_put("quantity", 2.0)),
    ("quantity-string", "quantity", _item_put("quantity", "2")),
    ("quantity-bool", "quantity", _item_put("quantity", True)),
    ("quantity-null", "quantity", _item_put("quantity", None)),
    ("quantity-missing", "quantity", _item_delete("quantity")),
    ("quantity-list", "quantity", _item_put("quantity", [1])),
    ("sku-empty", "sku", _item_put("sku", "")),
    ("sku-blank", "sku", _item_put("sku", "  ")),
    ("sku-missing", "sku", _item_delete("sku")),
    ("sku-null", "sku", _item_put("sku", None)),
    ("sku-int", "sku", _item_put("sku", 1001)),
    ("sku-bool", "sku", _item_put("sku", False)),
    ("sku-list", "sku", _item_put("sku", ["PIZZA-001"])),
    ("sku-dict", "sku", _item_put("sku", {"code": "PIZZA-001"})),
    ("notes-int", "notes", _item_put("notes", 7)),
    ("notes-list", "notes", _item_put("notes", ["no ice"])),
    ("unknown-key-price", "price", _item_put("price", 9.5)),
    ("unknown-key-name", "name", _item_put("name", "Pizza")),
    ("unknown-key-sku-case", "SKU", _item_put("SKU", "PIZZA-001")),
]


@pytest.mark.parametrize(
    ("subfield", "corrupt"),
    [(subfield, corrupt) for _, subfield, corrupt in _ITEM_CASES],
    ids=[name for name, _, _ in _ITEM_CASES],
)
@FEW
@given(state=valid_states(items=True), data=st.data())
def test_property_item_corruption_names_the_item_field(
    subfield: str,
    corrupt: Callable[[dict[str, Any]], None],
    state: dict[str, Any],
    data: st.DataObject,
) -> None:
    """Any bad item raises ContractError naming `items[i].<field>` for that item."""
    document = copy.deepcopy(state)
    index = data.draw(st.integers(min_value=0, max_value=len(document["items"]) - 1))
    corrupt(document["items"][index])
    for strict in (False, True):
        with pytest.raises(ContractError) as caught:
            parse_state(document, strict=strict)
        assert caught.value.field == f"items[{index}].{subfield}"


def test_required_fields_match_the_spec() -> None:
    """The required fields are exactly the six SPEC 3.7 lists, first in documented order."""
    assert frozenset(REQUIRED) == REQUIRED_FIELDS
    assert FIELDS[: len(REQUIRED)] == REQUIRED
    assert FIELDS[len(REQUIRED) :] == ("prepayment", "contact", "notes", "items")


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_CHARS, max_size=10),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(_CHARS, max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
_FUZZ_PATHS = [
    *[(key,) for key in FIELDS],
    ("unknown",),
    ("tables", 0),
    ("contact", "email"),
    ("contact", "other"),
    ("items", 0),
    ("items", 1, "sku"),
    ("items", 1, "quantity"),
    ("items", 1, "notes"),
]


@FAST
@given(st.sampled_from(_FUZZ_PATHS), _JSON_VALUES, st.booleans())
def test_property_any_json_value_anywhere_gives_a_contract_error_or_a_state(
    path: tuple[Any, ...], value: Any, strict: bool
) -> None:
    """Whatever JSON sits in any field, parsing gives a round-trippable state or a ContractError."""
    document = _full_payload()
    _set_path(document, path, value)
    try:
        state = parse_state(json.loads(compact(document)), strict=strict)
    except ContractError as error:
        assert error.field
        assert "\n" not in str(error)
    else:
        assert parse_state(json.loads(serialize(state)), strict=True) == state


def test_a_parsed_state_is_encoded_once_and_stored_as_it_is_sent() -> None:
    """The wire body computed when a row is parsed is what is sent and what the database stores;
    a state read back from the database (a plain dict, keys reordered) is encoded afresh."""
    text = json.dumps(
        {"tables": ["T1"], "venueId": "v-1", "bookingId": "bk-1", "partySize": 2,
         "status": "seated", "date": 1639578600, "contact": {"lastname": "Núñez"}}
    )  # fmt: skip
    state = parse_row(text, booking_id="bk-1", venue_id="v-1")
    wire = serialize(state)
    assert wire == serialize(dict(reversed(list(state.items()))))
    assert wire.startswith(b'{"bookingId":"bk-1","venueId":"v-1"') and "Núñez".encode() in wire
    assert json.loads(json_text(state)) == json.loads(wire) == state
    assert json_text({"a": 1}) == '{"a": 1}'
