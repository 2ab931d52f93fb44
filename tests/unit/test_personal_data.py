"""Where guest personal data can be stored: every text or JSON column is reviewed."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import JSON, String, Text

from app.db import metadata
from app.personal import ERASED_TEXT, personal_values, redact_text, strip_personal
from tests import factories

ROOT = Path(__file__).resolve().parents[2]

#: Columns that can hold guest personal data: erased by `app.store.privacy`, listed in
#: docs/personal-data.md.
PERSONAL_COLUMNS = {
    "mozrest_outbox.payload",
    "mozrest_outbox.error",
    "mozrest_delivery.payload",
    "mozrest_delivery.last_error",
    "mozrest_booking.accepted_payload",
    "mozrest_attempt.response_body",
    "mozrest_attempt.error",
}
#: Text and JSON columns reviewed as holding none: ids, statuses, field names, process names.
REVIEWED_WITHOUT = {
    "mozrest_outbox.booking_id",
    "mozrest_outbox.venue_id",
    "mozrest_outbox.outcome",
    "mozrest_booking.booking_id",
    "mozrest_booking.venue_id",
    "mozrest_delivery.booking_id",
    "mozrest_delivery.venue_id",
    "mozrest_delivery.status",
    "mozrest_delivery.changed_fields",
    "mozrest_delivery.warnings",
    "mozrest_delivery.lease_owner",
    "mozrest_delivery.lease_token",
    "mozrest_attempt.worker_id",
    "mozrest_worker.id",
    "mozrest_worker.hostname",
    "mozrest_worker.role",
    "mozrest_worker.circuit",
    "mozrest_worker.credentials",
    "mozrest_lock.name",
    "mozrest_audit.actor",
    "mozrest_audit.action",
    "mozrest_audit.target",
    "mozrest_audit.result",
    "mozrest_audit.detail",
    "mozrest_audit.client",
    "mozrest_scrub_mark.name",
    "mozrest_venue.venue_id",
    "mozrest_venue.paused_by",
    # An operator's words about a venue ("POS being replaced"), never written by the RMS.
    "mozrest_venue.pause_reason",
    "mozrest_rate.name",
    # W3C trace contexts: random ids, no guest data.
    "mozrest_outbox.traceparent",
    "mozrest_delivery.traceparent",
    "mozrest_delivery.reason",
    # A console session: the hash of its id, the token's name and role.
    "mozrest_console_session.id_hash",
    "mozrest_console_session.token_name",
    "mozrest_console_session.role",
}


def test_every_text_or_json_column_was_reviewed_for_personal_data() -> None:
    """A new column that could hold guest data fails here until it is erased or reviewed."""
    columns = {
        f"{table.name}.{column.name}"
        for table in metadata.sorted_tables
        for column in table.columns
        if isinstance(column.type, String | Text | JSON)
    }
    assert columns - PERSONAL_COLUMNS - REVIEWED_WITHOUT == set()


def test_docs_list_every_personal_column() -> None:
    """docs/personal-data.md names each table and column that can hold personal data."""
    page = (ROOT / "docs" / "personal-data.md").read_text()
    for name in PERSONAL_COLUMNS:
        table, column = name.split(".")
        assert f"`{table}`" in page and f"`{column}`" in page, name


def test_strip_keeps_everything_but_the_personal_fields() -> None:
    """contact, notes and every items[].notes go; ids, items' SKUs and the rest stay."""
    state = factories.documented(items=[{"sku": "A", "quantity": 1, "notes": "no ice"}])
    stripped, changed = strip_personal(state)
    assert changed
    assert "contact" not in stripped and "notes" not in stripped
    assert stripped["items"] == [{"sku": "A", "quantity": 1}]
    assert stripped["bookingId"] == state["bookingId"] and stripped["tables"] == state["tables"]
    assert strip_personal(stripped) == (stripped, False)


def test_stored_text_quoting_a_personal_value_is_blanked() -> None:
    """An answer that echoes the guest's email, escaped or not, is replaced; others stay."""
    values = personal_values(factories.documented())
    assert redact_text('{"email":"john.doe@mail.com"}', values) == (ERASED_TEXT, True)
    assert redact_text("HTTP 503", values) == ("HTTP 503", False)
