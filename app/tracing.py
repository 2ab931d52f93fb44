"""Tracing with OpenTelemetry: off unless the `OTEL_*` settings ask for an exporter.

While off, nothing of the SDK is imported and each hook below is a test of one module
global; a valid `traceparent` an RMS wrote is still passed on to Mozrest unchanged, so its trace
and Mozrest's line up even through a relay that exports nothing.

While on, a delivery's spans belong to one trace: the RMS's, when its outbox row carried a
valid `traceparent`, or else one started at ingest (`delivery.created`). That context is stored
on the delivery row, so every retry, from any process, is a span of the same trace.

| span | one per | parent, links |
| --- | --- | --- |
| `outbox.ingest` | ingest batch that found rows | links to the rows' traces |
| `delivery.created` | delivery queued from a row without a valid `traceparent` | a root |
| `webhook.post` | request to Mozrest (kind CLIENT) | the delivery's trace context |
| `GET /api/...` | admin API request (FastAPI's own, kind SERVER) | the caller's `traceparent` |
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from app import __version__, logs

if TYPE_CHECKING:
    from fastapi.telemetry import TelemetryConfig

    from app.publisher import WebhookAnswer
    from app.settings import Settings
    from app.store.records import Claim

log = logs.get_logger("tracing")

#: The name of the relay's instrumentation scope.
SCOPE = "mozrest-relay"
#: The admin API's requests never traced: probes and scrapes, many a minute.
UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

# version-traceid-parentid-flags, lowercase hex (W3C Trace Context, level 1).
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE_ID = "0" * 32
_ZERO_SPAN_ID = "0" * 16

_tracer: Any = None
"""The relay's tracer while tracing is on; None while off (every hook tests this first)."""
_provider: Any = None


def parse_traceparent(value: object) -> str | None:
    """A W3C `traceparent` as version 00, or None when it is absent or malformed (wrong length,
    version `ff`, all-zero ids, not lowercase hex). A later version's header is read by its
    first four fields, as the W3C recommendation says."""
    if isinstance(value, bytes | bytearray | memoryview):  # SQLite hands back what was written
        try:
            value = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    value = value.strip()
    match = _TRACEPARENT.match(value)
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    if version == "ff" or trace_id == _ZERO_TRACE_ID or span_id == _ZERO_SPAN_ID:
        return None
    if len(value) != 55 and (version == "00" or value[55] != "-"):
        return None
    return f"00-{trace_id}-{span_id}-{flags}"


def enabled() -> bool:
    return _tracer is not None


def wanted(settings: Settings) -> bool:
    """Whether the settings ask for traces: `OTEL_TRACES_EXPORTER` names an exporter, or an
    OTLP endpoint is given while it is unset; `OTEL_SDK_DISABLED=true` wins over both."""
    if settings.otel_sdk_disabled:
        return False
    exporter = settings.otel_traces_exporter
    if exporter is not None:
        return exporter != "none"
    return bool(settings.otel_exporter_otlp_endpoint or settings.otel_exporter_otlp_traces_endpoint)


def configure(settings: Settings) -> None:
    """Turn tracing on when the settings ask for it (once per process; later calls keep it).
    Only then are OpenTelemetry's SDK and exporter imported."""
    if _tracer is not None or not wanted(settings):
        return
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError:
        from app.settings import ConfigError

        raise ConfigError(
            "OTEL_TRACES_EXPORTER/OTEL_EXPORTER_OTLP_ENDPOINT ask for traces, but OpenTelemetry "
            "is not installed: pip install 'mozrest-relay[otel]'"
        ) from None
    resource = Resource.create(
        {"service.name": settings.otel_service_name, "service.version": __version__}
    )
    provider = TracerProvider(resource=resource)
    if settings.otel_traces_exporter == "console":
        exporter: Any = ConsoleSpanExporter()
    else:
        exporter = _otlp_exporter(settings)
    # Spans leave in batches from a thread of the SDK's own, off the event loop; the queue is
    # bounded (OTEL_BSP_MAX_QUEUE_SIZE): a collector that is down drops spans, never slows sends.
    provider.add_span_processor(BatchSpanProcessor(exporter))
    use(provider)
    logs.log_event(
        log,
        logging.INFO,
        "tracing.configured",
        exporter=settings.otel_traces_exporter or "otlp",
        service_name=settings.otel_service_name,
    )


def _otlp_exporter(settings: Settings) -> Any:
    """OTLP over HTTP (protobuf, port 4318): the endpoints as the OpenTelemetry specification
    reads them (a traces endpoint verbatim, the base one with `/v1/traces`); unset, the
    exporter's own environment defaults (headers, timeout, compression) apply."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = settings.otel_exporter_otlp_traces_endpoint
    if endpoint is None and settings.otel_exporter_otlp_endpoint:
        endpoint = settings.otel_exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint)


def use(provider: Any) -> None:
    """Trace with this `TracerProvider` (None: tracing off). Tests give one with an in-memory
    exporter; `configure` gives the one the settings describe."""
    global _tracer, _provider
    _provider = provider
    _tracer = None if provider is None else provider.get_tracer(SCOPE, __version__)
    logs.trace_ids = None if provider is None else _current_ids


def shutdown() -> None:
    """Export what is buffered and turn tracing off."""
    provider = _provider
    use(None)
    if provider is not None:
        provider.shutdown()


def fastapi_telemetry() -> TelemetryConfig:
    """FastAPI's own OpenTelemetry instrumentation, as `FastAPI(telemetry=...)` takes it: a
    SERVER span per admin API request (not the probes and scrapes) while tracing is on, off
    otherwise. Its metrics and logs stay off: `/metrics` and the relay's log lines have them."""
    if _tracer is None:
        return {"tracing": False, "metrics": False, "logs": False, "auto_configure": False}
    return {
        "tracer_provider": _provider,
        "metrics": False,
        "logs": False,
        "operation_spans": False,
        "auto_configure": False,
        "exclude": lambda scope: scope.get("path") in UNTRACED_PATHS,
    }


def log_fields(traceparent: str | None) -> dict[str, str]:
    """The delivery's `trace_id`, for its log lines written outside its spans (the recorder's
    `delivery.retry_scheduled`, `delivery.dead`, ...), so they join its trace too."""
    return {"trace_id": traceparent[3:35]} if traceparent else {}


def _current_ids() -> tuple[str, str] | None:
    """The current span's ids as the log lines carry them (`app.logs`)."""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


# -- ingest ---------------------------------------------------------------------------------


@contextlib.contextmanager
def ingest_span(rows: Sequence[Any]) -> Iterator[None]:
    """`outbox.ingest` around one batch's decisions, linked to the valid trace contexts its
    outbox rows carry (`row.traceparent`)."""
    if _tracer is None:
        yield
        return
    parents = (parse_traceparent(row.traceparent) for row in rows)
    links = [_link(parent) for parent in parents if parent is not None]
    with _tracer.start_as_current_span(
        "outbox.ingest", links=links, attributes={"relay.rows": len(rows)}
    ):
        yield


def delivery_traceparent(
    row_traceparent: object, *, booking_id: str, venue_id: str, outbox_id: int
) -> str | None:
    """The trace context a new delivery keeps: its row's valid `traceparent`, else (while
    tracing is on) that of a `delivery.created` span starting a trace of its own."""
    parent = parse_traceparent(row_traceparent) if row_traceparent is not None else None
    if parent is not None or _tracer is None:
        return parent
    from opentelemetry import context, trace

    batch = trace.get_current_span()
    span = _tracer.start_span(
        "delivery.created",
        context=context.Context(),  # a root: this delivery's own trace
        links=[trace.Link(batch.get_span_context())] if batch.is_recording() else None,
        attributes={
            "mozrest.booking_id": booking_id,
            "mozrest.venue_id": venue_id,
            "relay.outbox_id": outbox_id,
        },
    )
    span.end()
    own = _format(span.get_span_context())
    if batch.is_recording():
        batch.add_link(span.get_span_context())
    return own


# -- webhook requests -------------------------------------------------------------------------


class _Untraced:
    """A request while tracing is off: the delivery's trace context goes on as it is."""

    __slots__ = ("traceparent",)

    def __init__(self, traceparent: str | None) -> None:
        self.traceparent = traceparent

    def __enter__(self) -> _Untraced:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        return None

    def answered(self, answer: WebhookAnswer) -> WebhookAnswer:
        return answer


class _Post(_Untraced):
    """`webhook.post`: one request, a span in its delivery's trace, current while it runs (so
    log lines written meanwhile carry its ids)."""

    __slots__ = ("_scope", "_span")

    def __init__(self, claim: Claim, *, probe: bool) -> None:
        from opentelemetry import trace

        parent = _parent_context(claim.traceparent)
        self._span = _tracer.start_span(
            "webhook.post",
            context=parent,
            kind=trace.SpanKind.CLIENT,
            attributes={
                "http.request.method": "POST",
                "mozrest.booking_id": claim.booking_id,
                "mozrest.venue_id": claim.venue_id,
                "relay.delivery_id": claim.delivery_id,
                "relay.outbox_id": claim.outbox_id,
                "relay.retry": claim.attempt_count,
                "relay.probe": probe,
            },
        )
        self._scope = trace.use_span(self._span, end_on_exit=True)
        super().__init__(_format(self._span.get_span_context()))

    def __enter__(self) -> _Post:
        self._scope.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._scope.__exit__(kind, error, trace)

    def answered(self, answer: WebhookAnswer) -> WebhookAnswer:
        from opentelemetry.trace import Status, StatusCode

        span = self._span
        if answer.status_code is not None:
            span.set_attribute("http.response.status_code", answer.status_code)
        if answer.status_code is None or not 200 <= answer.status_code < 300:
            span.set_attribute(
                "error.type", str(answer.status_code) if answer.status_code else "no_answer"
            )
            # The error is the relay's own words (no guest data): `WebhookAnswer.error`.
            span.set_status(Status(StatusCode.ERROR, answer.error))
        span.set_attribute("relay.written", answer.written)
        return answer


def webhook_post(claim: Claim, *, probe: bool) -> _Untraced:
    """The span of one request for `claim`; its `traceparent` is the header the POST carries
    (while off, the delivery's own, when it has one)."""
    if _tracer is None:
        return _Untraced(claim.traceparent)
    return _Post(claim, probe=probe)


def _parent_context(traceparent: str | None) -> Any:
    """The delivery's stored context as a remote parent; None (a root) when it has none."""
    from opentelemetry import trace

    parsed = parse_traceparent(traceparent) if traceparent is not None else None
    if parsed is None:
        return None
    return trace.set_span_in_context(trace.NonRecordingSpan(_span_context(parsed)))


def _span_context(traceparent: str) -> Any:
    from opentelemetry.trace import SpanContext, TraceFlags

    _, trace_id, span_id, flags = traceparent.split("-")
    return SpanContext(
        trace_id=int(trace_id, 16),
        span_id=int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16)),
    )


def _link(traceparent: str) -> Any:
    from opentelemetry.trace import Link

    return Link(_span_context(traceparent))


def _format(context: Any) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
