"""Tracing (OpenTelemetry): a delivery's spans join the RMS's trace, retries stay in one trace,
the POST carries `traceparent`, and a malformed value is ignored.

The real worker runs on each backend against a raw HTTP stand-in for Mozrest on loopback that
keeps every request's headers; spans go to the SDK's in-memory exporter, configured in process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app import tracing
from app.api import create_app
from app.models import delivery, outbox
from app.runtime import build_store, build_worker
from app.settings import Settings, load_settings
from app.worker import Worker
from tests.conftest import PYTHON, ROOT, eventually
from tests.factories import state

TOKEN = "test-token"
FAST: dict[str, Any] = {
    "relay_poll_interval_seconds": 0.02,
    "relay_retry_base_delay_seconds": 0.05,
    "relay_retry_max_delay_seconds": 0.2,
    "relay_circuit_threshold": 50,
    "relay_lease_seconds": 3.0,
    "relay_http_timeout_seconds": 1.0,
    "relay_shutdown_grace_seconds": 2.0,
    "relay_heartbeat_interval_seconds": 1.0,
}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
FAIL = b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n"


@dataclass
class Mozrest:
    """A Mozrest stand-in on loopback answering each booking's scripted bytes (then 200), and
    keeping each request's headers (lower-cased) and body."""

    script: dict[str, list[bytes]] = field(default_factory=dict)
    received: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/rms"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                headers = {
                    name.strip().lower(): value.strip()
                    for name, _, value in (line.partition(":") for line in head.split("\r\n")[1:])
                    if name
                }
                length = int(headers.get("content-length", "0"))
                body = json.loads(await reader.readexactly(length)) if length else {}
                self.received.append((headers, body))
                pending = self.script.get(body.get("bookingId", ""), [])
                writer.write(pending.pop(0) if pending else OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def headers_of(self, booking_id: str) -> list[dict[str, str]]:
        return [h for h, body in self.received if body.get("bookingId") == booking_id]


@pytest.fixture
async def mozrest() -> AsyncIterator[Mozrest]:
    stand_in = Mozrest()
    stand_in.server = await asyncio.start_server(stand_in._serve, "127.0.0.1", 0)
    try:
        yield stand_in
    finally:
        stand_in.server.close()
        await stand_in.server.wait_closed()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on, in process: every span ends up in this exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use(provider)
    try:
        yield exporter
    finally:
        tracing.shutdown()


class Relay:
    """The database, the stand-in and one real worker."""

    def __init__(self, engine: AsyncEngine, database_url: str, mozrest: Mozrest) -> None:
        self.engine = engine
        self.database_url = database_url
        self.mozrest = mozrest
        self.worker: Worker | None = None
        self.task: asyncio.Task[None] | None = None

    def settings(self, **overrides: Any) -> Settings:
        return Settings(
            _env_file=None,
            database_url=self.database_url,
            mozrest_webhook_url=self.mozrest.url,
            mozrest_webhook_token=TOKEN,
            **{**FAST, **overrides},
        )

    async def start(self) -> None:
        settings = self.settings()
        self.worker = build_worker(settings, build_store(settings, self.engine))
        self.task = asyncio.create_task(self.worker.run())

    async def stop(self) -> None:
        if self.worker is not None and self.task is not None:
            self.worker.stop()
            await asyncio.wait_for(self.task, 10)
            await self.worker.publisher.aclose()

    async def insert(self, payload: dict[str, Any], traceparent: str | None = None) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                text(
                    "INSERT INTO mozrest_outbox (booking_id, venue_id, payload, traceparent) "
                    "VALUES (:b, :v, :p, :t) RETURNING id"
                ),
                {
                    "b": payload["bookingId"],
                    "v": payload["venueId"],
                    "p": json.dumps(payload),
                    "t": traceparent,
                },
            )
            return int(result.scalar_one())

    async def delivered(self, outbox_id: int) -> Any:
        async def check() -> Any:
            async with self.engine.connect() as conn:
                row = (
                    await conn.execute(select(delivery).where(delivery.c.outbox_id == outbox_id))
                ).first()
            return row if row is not None and row.status == "delivered" else None

        return await eventually(check, timeout=10, message=f"delivery of row {outbox_id}")

    async def outbox_row(self, outbox_id: int) -> Any:
        async with self.engine.connect() as conn:
            return (await conn.execute(select(outbox).where(outbox.c.id == outbox_id))).one()


@pytest.fixture
async def relay(engine: AsyncEngine, database_url: str, mozrest: Mozrest) -> AsyncIterator[Relay]:
    harness = Relay(engine, database_url, mozrest)
    try:
        yield harness
    finally:
        await harness.stop()


def _posts(exporter: InMemorySpanExporter, booking_id: str) -> list[ReadableSpan]:
    return [
        s
        for s in exporter.get_finished_spans()
        if s.name == "webhook.post" and (s.attributes or {}).get("mozrest.booking_id") == booking_id
    ]


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _ids(traceparent: str) -> tuple[str, str]:
    _, trace_id, span_id, _ = traceparent.split("-")
    return trace_id, span_id


def _hex(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return f"{span.context.trace_id:032x}", f"{span.context.span_id:016x}"


async def test_a_row_with_a_traceparent_gives_spans_of_its_trace_and_the_post_carries_it(
    relay: Relay, spans: InMemorySpanExporter
) -> None:
    """The RMS's trace context on the row: the request's `webhook.post` span is a child of the
    RMS's span, carries the booking, venue, delivery and answer, and the POST's `traceparent`
    names that span in that trace; the batch's `outbox.ingest` links to the RMS's trace."""
    await relay.start()
    row_id = await relay.insert(state("bk-traced", venue_id="v-7"), TRACEPARENT)
    row = await relay.delivered(row_id)
    assert row.traceparent == TRACEPARENT
    (post,) = _posts(spans, "bk-traced")
    assert _hex(post)[0] == TRACE_ID
    assert post.parent is not None and f"{post.parent.span_id:016x}" == PARENT_ID
    assert post.kind is trace.SpanKind.CLIENT
    assert (
        dict(post.attributes or {}).items()
        >= {
            "mozrest.booking_id": "bk-traced",
            "mozrest.venue_id": "v-7",
            "relay.delivery_id": row.id,
            "http.response.status_code": 200,
            "relay.retry": 0,
            "relay.probe": False,
        }.items()
    )
    (headers,) = relay.mozrest.headers_of("bk-traced")
    assert _ids(headers["traceparent"]) == _hex(post)
    ingests = _named(spans, "outbox.ingest")
    linked = {f"{link.context.trace_id:032x}" for span in ingests for link in span.links}
    assert TRACE_ID in linked


async def test_retries_of_one_delivery_are_spans_of_one_trace(
    relay: Relay, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A 503 then a 200, without a row traceparent: both attempts are `webhook.post` spans of
    the delivery's own trace (under its `delivery.created` root), numbered by retry, the failed
    one marked an error; each POST's `traceparent` names its own attempt's span, and the
    `delivery.retry_scheduled` log line names the trace."""
    caplog.set_level(logging.INFO, logger="mozrest_relay")
    relay.mozrest.script["bk-retry"] = [FAIL]
    await relay.start()
    row_id = await relay.delivered(await relay.insert(state("bk-retry")))
    first, second = sorted(_posts(spans, "bk-retry"), key=lambda s: s.start_time or 0)
    assert _hex(first)[0] == _hex(second)[0] == _ids(row_id.traceparent)[0]
    (root,) = [
        s for s in _named(spans, "delivery.created") if _hex(s)[0] == _ids(row_id.traceparent)[0]
    ]
    assert root.parent is None
    assert first.parent is not None and first.parent.span_id == root.context.span_id
    assert second.parent is not None and second.parent.span_id == root.context.span_id
    assert [(s.attributes or {})["relay.retry"] for s in (first, second)] == [0, 1]
    assert (first.attributes or {})["http.response.status_code"] == 503
    assert first.status.status_code is trace.StatusCode.ERROR
    assert second.status.status_code is trace.StatusCode.UNSET
    headers = relay.mozrest.headers_of("bk-retry")
    assert [_ids(h["traceparent"]) for h in headers] == [_hex(first), _hex(second)]
    (scheduled,) = [r for r in caplog.records if r.getMessage() == "delivery.retry_scheduled"]
    assert scheduled.__dict__["trace_id"] == _hex(first)[0]


MALFORMED = {
    "wrong length": f"00-{TRACE_ID}-{PARENT_ID}-011",
    "short": f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01",
    "version ff": f"ff-{TRACE_ID}-{PARENT_ID}-01",
    "zero trace id": f"00-{'0' * 32}-{PARENT_ID}-01",
    "zero parent id": f"00-{TRACE_ID}-{'0' * 16}-01",
    "not hex": f"00-{TRACE_ID[:-1]}g-{PARENT_ID}-01",
    "upper case": f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
    "empty": "",
    "junk": "not a trace 🎉",
}


async def test_a_malformed_traceparent_is_ignored_and_the_row_delivered(
    relay: Relay, spans: InMemorySpanExporter
) -> None:
    """Each malformed value (wrong length, version ff, all-zero ids, not lowercase hex): the
    row is queued and delivered, never invalid, in a trace of the relay's own."""
    await relay.start()
    ids = {
        name: await relay.insert(state(f"bk-bad-{n}"), value)
        for n, (name, value) in enumerate(MALFORMED.items())
    }
    for n, (name, row_id) in enumerate(ids.items()):
        row = await relay.delivered(row_id)
        assert (await relay.outbox_row(row_id)).outcome == "queued", name
        (post,) = _posts(spans, f"bk-bad-{n}")
        assert _hex(post)[0] != TRACE_ID, name
        assert _ids(row.traceparent)[0] == _hex(post)[0], name
        (headers,) = relay.mozrest.headers_of(f"bk-bad-{n}")
        assert _ids(headers["traceparent"]) == _hex(post), name


async def test_without_a_traceparent_each_delivery_has_its_own_trace(
    relay: Relay, spans: InMemorySpanExporter
) -> None:
    """Rows without the column each start a trace; the batch that ingested them links to
    each of those traces."""
    await relay.start()
    rows = [await relay.insert(state(f"bk-own-{n}")) for n in range(3)]
    for row_id in rows:
        await relay.delivered(row_id)
    traces = {_hex(_posts(spans, f"bk-own-{n}")[0])[0] for n in range(3)}
    assert len(traces) == 3
    linked = {
        f"{link.context.trace_id:032x}"
        for span in _named(spans, "outbox.ingest")
        for link in span.links
    }
    assert traces <= linked


async def test_tracing_off_adds_no_spans_and_passes_the_rows_traceparent_on(
    relay: Relay,
) -> None:
    """With tracing off nothing is traced, yet a row's valid `traceparent` goes to Mozrest as
    it is (its trace and Mozrest's still line up) and a row without one sends none."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))  # given to nobody
    assert not tracing.enabled()
    await relay.start()
    await relay.delivered(await relay.insert(state("bk-off"), TRACEPARENT))
    await relay.delivered(await relay.insert(state("bk-off-plain")))
    assert relay.mozrest.headers_of("bk-off")[0]["traceparent"] == TRACEPARENT
    assert "traceparent" not in relay.mozrest.headers_of("bk-off-plain")[0]
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_a_traceparent_that_is_not_text_is_ignored(
    relay: Relay, spans: InMemorySpanExporter
) -> None:
    """SQLite keeps whatever bytes an RMS wrote: a value that is not UTF-8 is ignored too."""
    await relay.start()
    async with relay.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO mozrest_outbox (booking_id, venue_id, payload, traceparent) "
                "VALUES ('bk-bytes', 'venue-1', :p, X'FF00FE')"
            ),
            {"p": json.dumps(state("bk-bytes"))},
        )
    async with relay.engine.connect() as conn:
        row_id = (await conn.execute(text("SELECT max(id) FROM mozrest_outbox"))).scalar_one()
    await relay.delivered(row_id)
    assert (await relay.outbox_row(row_id)).outcome == "queued"


async def test_the_admin_apis_requests_are_spans_but_not_its_probes(
    database_url: str, spans: InMemorySpanExporter
) -> None:
    """An `/api/*` request is a SERVER span in the caller's trace; `/healthz` is not traced."""
    settings = load_settings(_env_file=None, database_url=database_url, relay_admin_token="admin")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://relay") as client:
            assert (await client.get("/healthz")).status_code == 200
            answer = await client.get(
                "/api/deliveries",
                headers={"Authorization": "Bearer admin", "traceparent": TRACEPARENT},
            )
            assert answer.status_code == 200
    (server,) = [s for s in spans.get_finished_spans() if s.kind is trace.SpanKind.SERVER]
    assert server.name.startswith("GET /api/deliveries")
    assert _hex(server)[0] == TRACE_ID


# -- end to end: the real OTLP/HTTP exporter and a collector stand-in --------------------------


class _Collector(BaseHTTPRequestHandler):
    received: list[ExportTraceServiceRequest]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.received.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[ExportTraceServiceRequest]]]:
    received: list[ExportTraceServiceRequest] = []
    handler = type("Collector", (_Collector,), {"received": received})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_spans_reach_an_otlp_collector_with_their_attributes(
    relay: Relay, collector: tuple[str, list[ExportTraceServiceRequest]]
) -> None:
    """Configured by the standard variables alone (an OTLP endpoint), the relay exports its
    spans over OTLP/HTTP: the collector decodes `webhook.post` with its attributes, in the
    row's trace, from service `mozrest-relay`."""
    url, received = collector
    tracing.configure(relay.settings(otel_exporter_otlp_endpoint=url))
    try:
        assert tracing.enabled()
        await relay.start()
        await relay.delivered(await relay.insert(state("bk-otlp"), TRACEPARENT))
        await relay.stop()
    finally:
        await asyncio.to_thread(tracing.shutdown)  # flushes the batch processor
    found = {}
    for request in received:
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found[span.name] = (resource, span)
    assert {"outbox.ingest", "webhook.post"} <= set(found)
    resource, post = found["webhook.post"]
    assert resource["service.name"] == "mozrest-relay"
    assert post.trace_id.hex() == TRACE_ID and post.parent_span_id.hex() == PARENT_ID
    attributes = {a.key: a.value for a in post.attributes}
    assert attributes["mozrest.booking_id"].string_value == "bk-otlp"
    assert attributes["http.response.status_code"].int_value == 200
    assert attributes["relay.delivery_id"].int_value > 0


def test_the_relay_runs_without_the_sdk_while_tracing_is_off() -> None:
    """With the SDK and exporter unimportable, the relay's modules load, an app is built and
    tracing stays off; nothing of the SDK is imported along the way."""
    script = (
        "import sys\n"
        "for name in ('opentelemetry.sdk', 'opentelemetry.exporter'):\n"
        "    sys.modules[name] = None\n"
        "import app.cli, app.runtime, app.worker, app.sender\n"
        "from app import tracing\n"
        "from app.api import create_app\n"
        "from app.settings import Settings\n"
        "settings = Settings(_env_file=None, database_url='sqlite:///unused.db')\n"
        "create_app(settings)\n"
        "assert not tracing.enabled()\n"
        "loaded = [m for m, v in sys.modules.items() if v and m.startswith('opentelemetry.sdk')]\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [PYTHON, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip() == "ok", done.stderr
