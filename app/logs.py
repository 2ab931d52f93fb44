"""Structured logs: one event per line with a stable `event` name and ids, never personal data."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, event, then the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time level event key=value ...` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{key}={value}"
            for key, value in record.__dict__.items()
            if key not in _RESERVED and not key.startswith("_")
        )
        when = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S.%f")[:-3]
        line = f"{when} {record.levelname.lower():7} {record.getMessage()} {fields}".rstrip()
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


trace_ids: Callable[[], tuple[str, str] | None] | None = None
"""Set by `app.tracing` while tracing is on: the current span's `(trace_id, span_id)`."""


class TraceFields(logging.Filter):
    """Give a line written inside a span that span's `trace_id` and `span_id`, so logs and
    traces join (nothing while tracing is off)."""

    def filter(self, record: logging.LogRecord) -> bool:
        reader = trace_ids
        if reader is not None:
            ids = reader()
            if ids is not None:
                record.trace_id, record.span_id = ids
        return True


def configure_logging(*, level: str = "info", fmt: str = "json") -> None:
    """Send the relay's events to stderr in the chosen format; quiet the libraries."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(TraceFields())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("mozrest_relay").setLevel(level.upper())
    # uvicorn's access log would print every probe and request path; operators get metrics.
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"mozrest_relay.{name}")


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log `event` with `fields` as structured data (ids and counts only)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra=fields)
