"""A catalogue of outbox rows an RMS might get wrong, and of awkward rows it gets right, run
through a real worker on SQLite and PostgreSQL (SPEC 3.7-3.8, CLARIFICATIONS on issue 7).

Malformed rows each get outcome `invalid` with an error that names the field; the worker keeps
going, and the valid rows written around them (and after them, for the same booking) are
delivered. Awkward but valid rows (other scripts, right-to-left text, emoji, notes just under the
size limit) reach Mozrest byte for byte, as their normalised state. Rows over the limit are
`invalid`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy.exc import DBAPIError

from app.contract import DEFAULT_MAX_PAYLOAD_BYTES, parse_state, serialize
from tests.chaos.harness import Rms, relay_env, start_emulator, start_worker, wait_settled
from tests.conftest import Launcher

pytestmark = pytest.mark.slow

LIMIT = DEFAULT_MAX_PAYLOAD_BYTES
SQLITE_ONLY = frozenset({"sqlite"})
# PostgreSQL's jsonb refuses \u0000 and lone surrogates; MariaDB's JSON check accepts the escapes.
NOT_POSTGRESQL = frozenset({"sqlite", "mysql"})
# MariaDB's JSON check refuses documents nested deeper than 32 levels.
NOT_MARIADB = frozenset({"sqlite", "postgresql"})


def payload(booking_id: str = "cat", **changes: Any) -> dict[str, Any]:
    """A valid seated state; `changes` set fields, and a value of `...` removes one."""
    state: dict[str, Any] = {
        "bookingId": booking_id,
        "venueId": "venue-1",
        "partySize": 2,
        "status": "seated",
        "tables": ["T1"],
        "date": 1790000000,
    }
    for key, value in changes.items():
        if value is ...:
            state.pop(key, None)
        else:
            state[key] = value
    return state


def nested(depth: int, leaf: Any = "junk") -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


@dataclass(frozen=True)
class Malformed:
    """A row the relay must refuse: its payload text and the field the error must name."""

    name: str
    field: str
    changes: dict[str, Any] | None = None
    text: str | None = None
    """The payload column's exact text, when it is not a variation of a valid payload."""
    booking_column: str | None = None
    backends: frozenset[str] = frozenset({"sqlite", "postgresql", "mysql"})

    def payload_text(self, booking_id: str) -> str:
        if self.text is not None:
            return self.text.replace("{booking}", booking_id)
        return json.dumps(payload(booking_id, **(self.changes or {})), ensure_ascii=False)


SIZED_ID_LENGTH = 10


def notes_of_size(total_bytes: int, unit: str = "x") -> dict[str, Any]:
    """A valid payload whose serialised state is exactly `total_bytes` long, for a booking id of
    `SIZED_ID_LENGTH` characters (the catalogue's `awkward-NN` and `over-N` ids are padded)."""
    base = len(serialize(parse_state(payload("s" * SIZED_ID_LENGTH, notes=""))))
    room = total_bytes - base
    notes = unit * (room // len(unit.encode())) + "x" * (room % len(unit.encode()))
    state = payload("s" * SIZED_ID_LENGTH, notes=notes)
    assert len(serialize(parse_state(state))) == total_bytes
    return state


MALFORMED = [
    Malformed("a JSON array", "payload", text='[{"bookingId": "{booking}"}]'),
    Malformed("a JSON string", "payload", text='"{booking}"'),
    Malformed("a JSON number", "payload", text="42"),
    Malformed("JSON null", "payload", text="null"),
    Malformed("JSON true", "payload", text="true"),
    Malformed("not JSON at all", "payload", text='{"bookingId": "{booking}",',
              backends=SQLITE_ONLY),
    Malformed("no bookingId", "bookingId", {"bookingId": ...}),
    Malformed("no venueId", "venueId", {"venueId": ...}),
    Malformed("no partySize", "partySize", {"partySize": ...}),
    Malformed("no status", "status", {"status": ...}),
    Malformed("no tables", "tables", {"tables": ...}),
    Malformed("no date", "date", {"date": ...}),
    Malformed("bookingId null", "bookingId", {"bookingId": None}),
    Malformed("partySize a string", "partySize", {"partySize": "4"}),
    Malformed("partySize a boolean", "partySize", {"partySize": True}),
    Malformed("partySize zero", "partySize", {"partySize": 0}),
    Malformed("partySize negative", "partySize", {"partySize": -2}),
    Malformed("partySize fractional", "partySize", {"partySize": 2.5}),
    Malformed("date an ISO string", "date", {"date": "2026-11-27T20:00:00Z"}),
    Malformed("date negative", "date", {"date": -1}),
    Malformed("date fractional", "date", {"date": 1790000000.5}),
    Malformed("tables a string", "tables", {"tables": "T1"}),
    Malformed("a table a number", "tables[0]", {"tables": [7]}),
    Malformed("a table empty", "tables[1]", {"tables": ["T1", ""]}),
    Malformed("status empty", "status", {"status": ""}),
    Malformed("status a number", "status", {"status": 3}),
    Malformed("items an object", "items", {"items": {"sku": "A", "quantity": 1}}),
    Malformed("an item a string", "items[0]", {"items": ["PIZZA-001"]}),
    Malformed("an item without sku", "items[0].sku", {"items": [{"quantity": 1}]}),
    Malformed("an empty sku", "items[0].sku", {"items": [{"sku": "", "quantity": 1}]}),
    Malformed("a blank sku", "items[1].sku", {"items": [{"sku": "A", "quantity": 1},
                                                          {"sku": "\u3000\u00a0", "quantity": 1}]}),
    Malformed("quantity zero", "items[0].quantity", {"items": [{"sku": "A", "quantity": 0}]}),
    Malformed("quantity negative", "items[0].quantity", {"items": [{"sku": "A", "quantity": -3}]}),
    Malformed("quantity fractional", "items[0].quantity",
              {"items": [{"sku": "A", "quantity": 1.5}]}),
    Malformed("quantity a string", "items[0].quantity", {"items": [{"sku": "A", "quantity": "2"}]}),
    Malformed("an item field unknown", "items[0].price",
              {"items": [{"sku": "A", "quantity": 1, "price": 9}]}),
    Malformed("a top-level field unknown", "guestName", {"guestName": "Ann"}),
    Malformed("contact a string", "contact", {"contact": "ann@example.com"}),
    Malformed("contact email a number", "contact.email", {"contact": {"email": 5}}),
    Malformed("prepayment negative", "prepayment", {"prepayment": -10}),
    Malformed("prepayment a string", "prepayment", {"prepayment": "50"}),
    Malformed("prepayment NaN", "prepayment", text='{"bookingId": "{booking}", "venueId": '
              '"venue-1", "partySize": 2, "status": "seated", "tables": ["T1"], '
              '"date": 1790000000, "prepayment": NaN}', backends=SQLITE_ONLY),
    Malformed("bookingId disagrees with its column", "bookingId", {"bookingId": "someone-else"}),
    Malformed("venueId disagrees with its column", "venueId", {"venueId": "venue-2"}),
    Malformed("bookingId in another Unicode normal form", "bookingId",
              {"bookingId": "cafe\u0301"}, booking_column="caf\u00e9"),
    Malformed("bookingId of 65 characters", "bookingId", {"bookingId": "\U0001f355" * 65}),
    Malformed("1 MB of notes", "payload", {"notes": "n" * 1_000_000}),
    Malformed("a lone surrogate in notes", "notes", text='{"bookingId": "{booking}", "venueId": '
              '"venue-1", "partySize": 2, "status": "seated", "tables": ["T1"], '
              '"date": 1790000000, "notes": "\\ud83c"}', backends=SQLITE_ONLY),
    Malformed("a NUL in notes", "notes", {"notes": "table 4\u0000DROP"}, backends=NOT_POSTGRESQL),
    Malformed("a NUL in bookingId", "bookingId", {"bookingId": "nul\u0000id"},
              backends=NOT_POSTGRESQL),
    Malformed("a raw NUL byte in the text", "payload", text='{"bookingId": "{booking}", '
              '"notes": "a\x00b"}', backends=SQLITE_ONLY),
    Malformed("deep junk in items", "items[0]", {"items": [nested(60)]}, backends=NOT_MARIADB),
    Malformed("deep junk in a contact field", "contact.firstname",
              {"contact": {"firstname": nested(60)}}, backends=NOT_MARIADB),
    Malformed("deep junk as partySize", "partySize", {"partySize": nested(30, 2)}),
    Malformed("deep junk in an unknown field", "extra", {"extra": nested(300)},
              backends=NOT_MARIADB),
    Malformed("nesting deeper than any parser should follow", "payload",
              text="[" * 5000 + "]" * 5000, backends=NOT_MARIADB),
]  # fmt: skip

AWKWARD = {
    "emoji": payload(
        notes="🎉🍕 birthday 👨‍👩‍👧‍👦 🇪🇸 🏳️‍🌈",
        contact={"firstname": "Zoë 😀", "lastname": "O'Brien", "locale": "es"},
        items=[{"sku": "🍕-PIZZA", "quantity": 2, "notes": "🌶️ extra hot"}],
    ),
    "cjk": payload(
        contact={"firstname": "山田", "lastname": "太郎", "locale": "ja"},
        notes="窓側の席をお願いします。誕生日です🎂",
        tables=["桜-1", "桜-2"],
    ),
    "arabic, right to left": payload(
        contact={"firstname": "محمد", "lastname": "العربي", "locale": "ar"},
        notes="\u200fطاولة بجانب النافذة، من فضلك\u200f (2 أطفال)",
    ),
    "hebrew with bidi controls": payload(notes="\u202eabc\u202c שלום \u2066עולם\u2069 123"),
    "decomposed and composed accents": payload(
        contact={"firstname": "Jose\u0301", "lastname": "Jos\u00e9"}, notes="cafe\u0301 / caf\u00e9"
    ),
    "astral planes": payload(notes="𝕳𝖊𝖑𝖑𝖔 𓀀 𐍈 🀄 \U0010fffd"),
    "joiners and invisible marks": payload(notes="a\u200db\u200cc\ufeffd\u00ade\u2060f"),
    "control characters": payload(notes='line 1\nline 2\ttab\r\n"quoted" \\ back\u0007'),
    "indic and thai": payload(notes="नमस्ते क्षत्रिय · สวัสดีครับ · ស្វាគមន៍"),
    "emoji ids": payload("🍕" * 64, venueId="🏠" * 64, tables=["🪑"]),
    "normalised on the way": payload(
        prepayment=50.0, items=[], notes=None, contact={"email": None, "firstname": "Ann"}
    ),
    "notes one byte under the limit": notes_of_size(LIMIT - 1),
    "notes exactly at the limit": notes_of_size(LIMIT),
    "multibyte notes just under the limit": notes_of_size(LIMIT - 3, "é"),
    "emoji notes just under the limit": notes_of_size(LIMIT - 5, "🎉"),
}
OVER_LIMIT = {
    "notes one byte over the limit": notes_of_size(LIMIT + 1),
    "emoji notes just over the limit": notes_of_size(LIMIT + 2, "🎉"),
}


def exact(state: Any) -> bytes:
    """Every byte of every key and value, numbers as written; key order is pinned separately
    (test_states_arrive_in_the_documented_key_order)."""
    return json.dumps(state, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def with_id(state: dict[str, Any], booking_id: str) -> dict[str, Any]:
    return {**state, "bookingId": booking_id}


def test_the_catalogue(launcher: Launcher, database_url: str, backend: str) -> None:
    """Every malformed row is `invalid` naming its field, every awkward valid row arrives byte
    for byte, rows over the size limit are `invalid`, and the worker never stops."""
    _, receiver = start_emulator(launcher)
    worker = start_worker(launcher, relay_env(database_url, receiver.url))
    rms = Rms(database_url)
    malformed_rows: dict[int, Malformed] = {}
    refused_at_insert: list[str] = []
    delivered: dict[str, dict[str, Any]] = {}
    try:
        for index, case in enumerate(MALFORMED):
            before = with_id(payload(), f"ok-{index}")
            rms.write(before)
            delivered[before["bookingId"]] = before
            column = case.booking_column or f"bad-{index}"
            text = case.payload_text(column)
            if backend not in case.backends:
                # The database refuses it (jsonb, or MariaDB's JSON check): the RMS's own INSERT
                # fails, nothing to relay.
                with pytest.raises((DBAPIError, ValueError)):  # ValueError: psycopg2 itself
                    rms.write_text(column, "venue-1", text)
                refused_at_insert.append(case.name)
                continue
            malformed_rows[rms.write_text(column, "venue-1", text)] = case
            # A later valid row of the same booking proceeds normally (SPEC 3.8).
            after = with_id(payload(notes="fixed"), column)
            rms.write(after)
            delivered[column] = after
        over_rows = {}
        for index, (name, state) in enumerate(AWKWARD.items()):
            booking_id = state["bookingId"] if name == "emoji ids" else f"awkward-{index:02d}"
            rms.write(with_id(state, booking_id))
            delivered[booking_id] = with_id(state, booking_id)
        for index, (name, state) in enumerate(OVER_LIMIT.items()):
            rms.write(with_id(state, f"over-{index:05d}"))
            over_rows[f"over-{index:05d}"] = name
        wait_settled(rms, timeout=60, what="the catalogue to be processed")
        outcomes = rms.outcomes()
        rows = rms.outbox_rows()
    finally:
        rms.close()

    assert worker.popen.poll() is None, "the worker stopped:\n" + worker.output()[-3000:]
    wrong = []
    for row_id, case in malformed_rows.items():
        outcome, error = outcomes[row_id]
        if outcome != "invalid" or not (error or "").startswith(f"{case.field}:"):
            wrong.append(f"{case.name}: outcome {outcome!r}, error {error!r}")
    for row in rows:
        if row.booking_id in over_rows:
            outcome, error = outcomes[row.id]
            if outcome != "invalid" or not (error or "").startswith("payload:"):
                wrong.append(f"{over_rows[row.booking_id]}: outcome {outcome!r}, error {error!r}")
    held = receiver.bookings()
    for booking_id, state in delivered.items():
        got = held.get(booking_id)
        if got is None:
            said = [outcomes[r.id] for r in rows if r.booking_id == booking_id]
            wrong.append(f"{booking_id[:40]!r} never delivered; outbox says {said}"[:400])
        elif exact(got["state"]) != exact(parse_state(state)):
            wrong.append(f"{booking_id[:40]!r} arrived altered: {got['state']!r:.300}")
    assert not wrong, f"{len(wrong)} rows mishandled on {backend}:\n" + "\n".join(wrong)
    assert len(malformed_rows) + len(refused_at_insert) == len(MALFORMED) >= 30


def test_states_arrive_in_the_documented_key_order(
    launcher: Launcher, database_url: str, backend: str
) -> None:
    """The body on the wire is `serialize(state)`: documented fields in documented order, also
    inside `contact` and `items` (app/contract.py), whatever order the database keeps."""
    _, receiver = start_emulator(launcher)
    start_worker(launcher, relay_env(database_url, receiver.url))
    state = payload(
        "order-1",
        prepayment=12.5,
        contact={"firstname": "Ann", "lastname": "Lee", "email": "a@example.com", "locale": "en"},
        notes="by the window",
        items=[{"sku": "PIZZA-001", "quantity": 2, "notes": "no olives"}],
    )
    rms = Rms(database_url)
    try:
        rms.write(state)
        wait_settled(rms, timeout=20, what="one booking to be delivered")
    finally:
        rms.close()
    received = receiver.bookings()["order-1"]["state"]
    assert exact(received) == exact(state)
    assert list(received) == list(state), f"key order on {backend}: {list(received)}"
    assert serialize(received) == serialize(parse_state(state))
