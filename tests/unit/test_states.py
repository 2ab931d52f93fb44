"""The named states equal the strings the database stores and the API answers."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import get_args

from app import schemas
from app.models import ACTIVE_STATUSES, AUDIT_RESULTS, OUTCOMES, STATUSES
from app.routes_access import AuditRow
from app.states import (
    AuditResult,
    CircuitState,
    CredentialsState,
    DeliveryReason,
    DeliveryStatus,
    Outcome,
    stored_values,
)


def test_each_state_equals_its_stored_string() -> None:
    """`DeliveryStatus.DEAD == "dead"`: code may compare a row's plain string to the name."""
    stored: str = "dead"  # as a row's column reads
    assert DeliveryStatus.DEAD == stored
    assert {"pending": 1}[DeliveryStatus.PENDING] == 1
    assert STATUSES == ("pending", "retrying", "delivered", "dead", "superseded", "cancelled")
    assert OUTCOMES == ("queued", "unchanged", "held", "superseded", "invalid")
    assert ACTIVE_STATUSES == ("pending", "retrying")
    assert AUDIT_RESULTS == ("ok", "refused")
    assert all(type(value) is str for value in (*STATUSES, *OUTCOMES, *AUDIT_RESULTS))


def test_the_api_literals_list_exactly_the_states_values() -> None:
    """The API's models spell the values out; they are the enums' values, in their order."""
    assert get_args(schemas.DeliveryStatus) == stored_values(DeliveryStatus)
    assert get_args(schemas.Outcome) == stored_values(Outcome)
    assert get_args(schemas.Circuit) == stored_values(CircuitState)
    assert get_args(schemas.Credentials) == stored_values(CredentialsState)
    assert get_args(schemas.Reason) == stored_values(DeliveryReason)
    assert get_args(AuditRow.model_fields["result"].annotation) == stored_values(AuditResult)


def test_json_shows_plain_strings() -> None:
    """A state handed to the API's models or to `json.dumps` is written as its plain value."""
    row = AuditRow.model_validate(
        {
            "id": 1,
            "at": datetime(2026, 11, 30, tzinfo=UTC),
            "actor": "ana",
            "action": "delivery.retry",
            "target": "1",
            "result": AuditResult.REFUSED,
            "detail": {"status": DeliveryStatus.DEAD},
            "client": None,
        }
    )
    dumped = json.loads(row.model_dump_json())
    assert dumped["result"] == "refused" and dumped["detail"] == {"status": "dead"}
    assert json.dumps({DeliveryStatus.DEAD: CircuitState.HALF_OPEN}) == '{"dead": "half_open"}'
