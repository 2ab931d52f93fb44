"""Tracing's pure parts: which `traceparent` values are honoured, when the settings turn
tracing on, and the trace ids on log lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from opentelemetry.sdk.trace import TracerProvider

from app import tracing
from app.logs import JsonFormatter, TraceFields, log_event
from app.settings import Settings
from app.store import Claim

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (VALID, VALID),
        (f"  {VALID}\n", VALID),
        (VALID.encode(), VALID),
        # A later version is read by its first four fields (W3C), and sent as version 00.
        ("cc" + VALID[2:] + "-what-comes-later", VALID),
        ("cc" + VALID[2:] + "x", None),
        (VALID + "-extra", None),  # version 00 has exactly four fields
        ("ff" + VALID[2:], None),
        (VALID.replace("4bf92f3577b34da6a3ce929d0e0e4736", "0" * 32), None),
        (VALID.replace("00f067aa0ba902b7", "0" * 16), None),
        (VALID.upper(), None),
        (VALID[:-1], None),
        ("", None),
        (None, None),
        (42, None),
        (b"\xff\x00", None),
    ],
)
def test_only_a_well_formed_traceparent_is_honoured(value: object, expected: str | None) -> None:
    """Malformed values (length, version ff, zero ids, not lowercase hex) are ignored."""
    assert tracing.parse_traceparent(value) == expected


@pytest.mark.parametrize(
    ("variables", "wanted"),
    [
        ({}, False),
        ({"otel_traces_exporter": "otlp"}, True),
        ({"otel_traces_exporter": "console"}, True),
        ({"otel_traces_exporter": "none", "otel_exporter_otlp_endpoint": "http://c:4318"}, False),
        ({"otel_exporter_otlp_endpoint": "http://c:4318"}, True),
        ({"otel_exporter_otlp_traces_endpoint": "http://c:4318/v1/traces"}, True),
        ({"otel_traces_exporter": "otlp", "otel_sdk_disabled": "true"}, False),
    ],
)
def test_tracing_is_on_only_when_the_otel_variables_ask_for_an_exporter(
    variables: dict[str, str], wanted: bool
) -> None:
    """Off by default; an exporter or an OTLP endpoint turns it on; OTEL_SDK_DISABLED wins."""
    assert tracing.wanted(Settings(_env_file=None, **variables)) is wanted


@pytest.fixture
def traced() -> Iterator[None]:
    tracing.use(TracerProvider())
    try:
        yield
    finally:
        tracing.shutdown()


def _logged(logger: logging.Logger, event: str) -> dict[str, object]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TraceFields())
    logger.addHandler(handler)
    try:
        log_event(logger, logging.WARNING, event, delivery_id=7)
    finally:
        logger.removeHandler(handler)
    line: dict[str, object] = json.loads(stream.getvalue())
    return line


def test_a_line_logged_inside_a_span_carries_its_trace_and_span_ids(traced: None) -> None:
    """Inside `webhook.post` a log line carries the span's ids (those of the POST's
    `traceparent`); outside any span it carries none."""
    logger = logging.getLogger("mozrest_relay.test_tracing")
    claim = Claim(
        delivery_id=7,
        booking_id="bk-1",
        venue_id="v-1",
        outbox_id=3,
        payload={},
        attempt_count=0,
        created_at=datetime.now(UTC),
        outbox_created_at=None,
        retry_window_started_at=datetime.now(UTC),
        lease_token="t",
        lease_expires_at=datetime.now(UTC),
        traceparent=VALID,
    )
    with tracing.webhook_post(claim, probe=False) as span:
        inside = _logged(logger, "test.inside")
    assert span.traceparent is not None
    _, trace_id, span_id, _ = span.traceparent.split("-")
    assert (inside["trace_id"], inside["span_id"]) == (trace_id, span_id)
    assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    outside = _logged(logger, "test.outside")
    assert "trace_id" not in outside and "span_id" not in outside


def test_a_deliverys_log_lines_outside_its_spans_name_its_trace() -> None:
    """The recorder's lines carry the delivery's trace id; a delivery without one, none."""
    assert tracing.log_fields(VALID) == {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736"}
    assert tracing.log_fields(None) == {}
