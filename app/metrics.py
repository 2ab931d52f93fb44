"""Prometheus metrics. Counters and histograms count this process's work; gauges
describe the whole relay and are read from the database at scrape time."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from app.states import DeliveryStatus, Outcome, stored_values

OUTBOX_ROWS = Counter(
    "mozrest_relay_outbox_rows", "Outbox rows given an outcome, by outcome.", ["outcome"]
)
WEBHOOK_REQUESTS = Counter(
    "mozrest_relay_webhook_requests",
    "Webhook requests sent, by HTTP status (`error` when no answer came back).",
    ["code"],
)
WEBHOOK_DURATION = Histogram(
    "mozrest_relay_webhook_duration_seconds",
    "Time from sending a webhook request to its answer.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
DELIVERY_LAG = Histogram(
    "mozrest_relay_delivery_lag_seconds",
    "Time from an outbox row's creation to Mozrest's acceptance of its state.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
DELIVERIES = Gauge("mozrest_relay_deliveries", "Deliveries by status (whole relay).", ["status"])
OLDEST_PENDING_AGE = Gauge(
    "mozrest_relay_oldest_pending_age_seconds",
    "Age of the oldest delivery still waiting to be accepted, or of the oldest unprocessed "
    "outbox row if older (whole relay); 0 when nothing waits.",
)
CIRCUIT_OPEN = Gauge(
    "mozrest_relay_circuit_open",
    "1 when a live relay process has its circuit open (Mozrest failing), else 0.",
)
LIVE_WORKERS = Gauge(
    "mozrest_relay_live_workers",
    "Relay worker processes with a recent heartbeat (whole relay).",
)
VENUES_PAUSED = Gauge("mozrest_relay_venues_paused", "Venues paused by an operator (whole relay).")
RATE_LIMIT = Gauge(
    "mozrest_relay_rate_limit",
    "RELAY_RATE_LIMIT: webhook requests per second for the whole relay; 0 for none.",
)
REQUEST_RATE = Gauge(
    "mozrest_relay_request_rate",
    "Webhook requests per second over the last 10 s, all live relay processes.",
)
PERSONAL_DATA_SCRUBBED = Counter(
    "mozrest_relay_personal_data_scrubbed_rows",
    "Rows whose guest personal fields payload retention removed (RELAY_PAYLOAD_RETENTION).",
    ["table"],
)

# Every label a dashboard expects exists from the start, at zero.
for _table in ("outbox", "deliveries", "snapshots"):
    PERSONAL_DATA_SCRUBBED.labels(table=_table)
for _outcome in stored_values(Outcome):
    OUTBOX_ROWS.labels(outcome=_outcome)
for _status in stored_values(DeliveryStatus):
    DELIVERIES.labels(status=_status)
