"""The emulator's injected faults: what `PUT /_emulator/faults` sets, and what each request draws
from it (latency, a dropped connection, a failure answer). `app.emulator`'s docstring documents
them for its users."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, Literal

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

FaultTarget = Literal["rms", "pos-tables", "all"]


class ConnectionDropped(Exception):
    """Raised after a response has started so that the server closes the connection (a drop)."""


class FaultSettings(BaseModel):
    """Faults to inject; every field is optional and a PUT replaces the whole set."""

    model_config = ConfigDict(extra="forbid")

    target: FaultTarget = "rms"
    failure_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    failure_status: int = Field(default=500, ge=300, le=599)
    status: int | None = Field(default=None, ge=300, le=599)
    latency_ms: float = Field(default=0.0, ge=0.0, le=60_000)
    latency_jitter_ms: float = Field(default=0.0, ge=0.0, le=60_000)
    retry_after_seconds: int | None = Field(default=None, ge=0)
    retry_after_http_date: bool = False
    drop_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    fail_next: int = Field(default=0, ge=0)
    fail_next_status: int = Field(default=503, ge=300, le=599)
    seed: int | None = None


@dataclass(slots=True)
class Fault:
    """A fault drawn for one request: `status` None means drop the connection."""

    name: str
    status: int | None


@dataclass(slots=True)
class Faults:
    """Active fault settings with their random source and what is left of the counted burst."""

    settings: FaultSettings
    rng: random.Random
    fail_next_remaining: int

    @classmethod
    def from_settings(cls, settings: FaultSettings) -> Faults:
        return cls(settings, random.Random(settings.seed), settings.fail_next)

    def draw(self, endpoint: FaultTarget) -> tuple[float, Fault | None]:
        """The delay in seconds and the fault, if any, for one request to `endpoint`."""
        settings = self.settings
        if settings.target not in (endpoint, "all"):
            return 0.0, None
        delay_ms = settings.latency_ms
        if settings.latency_jitter_ms:
            delay_ms += self.rng.uniform(0.0, settings.latency_jitter_ms)
        delay_seconds = delay_ms / 1000
        if settings.drop_rate and self.rng.random() < settings.drop_rate:
            return delay_seconds, Fault("drop", None)
        if self.fail_next_remaining > 0:
            self.fail_next_remaining -= 1
            return delay_seconds, Fault("fail_next", settings.fail_next_status)
        if settings.status is not None:
            return delay_seconds, Fault("status", settings.status)
        if settings.failure_rate and self.rng.random() < settings.failure_rate:
            return delay_seconds, Fault("failure_rate", settings.failure_status)
        return delay_seconds, None

    def as_json(self) -> dict[str, Any]:
        return {**self.settings.model_dump(), "fail_next_remaining": self.fail_next_remaining}


class DroppedConnection(Response):
    """Starts an answer it never finishes, so that the server closes the connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {"type": "http.response.start", "status": 503, "headers": [(b"content-length", b"1")]}
        )
        raise ConnectionDropped


def fault_response(fault: Fault, settings: FaultSettings) -> Response:
    """The answer an injected fault gives (`DroppedConnection` for a drop)."""
    if fault.status is None:
        return DroppedConnection()
    headers = {}
    if settings.retry_after_seconds is not None:
        if settings.retry_after_http_date:
            when = datetime.now(UTC) + timedelta(seconds=settings.retry_after_seconds)
            headers["Retry-After"] = format_datetime(when, usegmt=True)
        else:
            headers["Retry-After"] = str(settings.retry_after_seconds)
    detail = f"Injected fault ({fault.name}): {fault.status}"
    return JSONResponse({"detail": detail}, status_code=fault.status, headers=headers)
