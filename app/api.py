"""The admin HTTP API: health, metrics, and the operators' `/api/*` routes (README, "For
operators")."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest

from app import __version__, metrics, tracing
from app.console import router as console_router
from app.deps import (
    DOCTOR_HINT,
    AppContext,
    ContextDep,
    require_admin,
    require_role,
    require_schema,
    schema_check,
)
from app.logs import configure_logging, get_logger, log_event
from app.partner_api import PartnerApi, PosTablesCache
from app.routes import router
from app.routes_access import access_router
from app.routes_venues import router as venues_router
from app.runtime import assemble, bind_socket
from app.secret_files import SecretSource
from app.settings import Settings
from app.states import CircuitState, CredentialsState
from app.store import ConflictError, NotFoundError, StoreError
from app.worker import Worker

log = get_logger("api")

# `*_created` series (one per counter and histogram) only clutter a scrape of this service.
disable_created_metrics()  # type: ignore[no-untyped-call]


class _AsciiJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def unknown_routes(*routers: APIRouter) -> APIRouter:
    """Unknown `/api/*` paths answer 404 only after the admin token check, like the rest; a
    known path asked with another method answers 405 naming the methods it takes."""
    fallback = APIRouter()

    @fallback.api_route(
        "/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )
    async def unknown_route(path: str) -> None:
        allowed: set[str] = set()
        for route in (route for routes in routers for route in routes.routes):
            if isinstance(route, APIRoute) and route.include_in_schema:
                if route.path_regex.match(f"/{path}"):
                    allowed |= route.methods or set()
        if allowed:
            raise HTTPException(
                405, "Method Not Allowed", headers={"Allow": ", ".join(sorted(allowed))}
            )
        raise HTTPException(404, "Not Found")

    return fallback


def create_app(settings: Settings, *, with_worker: bool = False) -> FastAPI:
    """The admin API; with `with_worker` the same process also runs the worker."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with assemble(settings, with_worker=with_worker) as parts:
            partner_api = PartnerApi(
                base_url=settings.api_url,
                # Re-read from MOZREST_API_KEY_FILE on a 401: a rotated key needs no restart.
                api_key=SecretSource.from_settings(settings, "MOZREST_API_KEY"),
                timeout_seconds=settings.relay_http_timeout_seconds,
            )
            context = AppContext(
                settings=settings,
                store=parts.store,
                partner_api=partner_api,
                pos_tables=PosTablesCache(ttl_seconds=settings.relay_pos_tables_cache_seconds),
                worker=parts.worker,
            )
            app.state.context = context
            worker_task: asyncio.Task[None] | None = None
            if parts.worker is not None:
                worker_task = asyncio.create_task(parts.worker.run(), name="worker")
                worker_task.add_done_callback(_exit_if_failed)
            log_event(
                log,
                logging.INFO,
                "api.started",
                host=settings.relay_host,
                port=settings.relay_port,
                admin_token_set=settings.relay_admin_token is not None,
                api_tokens=len(settings.relay_api_tokens),
            )
            try:
                yield
            finally:
                if parts.worker is not None and worker_task is not None:
                    parts.worker.stop()
                    await asyncio.gather(worker_task, return_exceptions=True)
                await partner_api.aclose()

    tracing.configure(settings)
    app = FastAPI(
        title="mozrest-relay admin API",
        version=__version__,
        description="Deliveries of reservation states to Mozrest: inspect, replay, monitor.",
        lifespan=lifespan,
        telemetry=tracing.fastapi_telemetry(),
    )

    @app.exception_handler(StoreError)
    async def _store_unavailable(request: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"detail": f"database unavailable: {exc}"}, status_code=503)

    @app.exception_handler(NotFoundError)
    async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ConflictError)
    async def _conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer, ASCII-escaped: the errors echo the input, and a lone surrogate
        # (a JSON "\\ud800" escape) cannot be encoded as UTF-8, which would be a 500.
        return _AsciiJSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)

    @app.get("/healthz", tags=["health"], summary="Liveness: the process runs")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: database and schema; worker and Mozrest credentials as reasons",
        responses={503: {"description": "database unreachable or schema not at head"}},
    )
    async def readyz(context: ContextDep) -> JSONResponse:
        checks = await readiness_checks(context)
        ready = checks["database"] == "ok" and checks["schema"] == "ok"
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def metrics_endpoint(context: ContextDep) -> Response:
        # The gauges keep their last values while the database or its schema is not right;
        # `/readyz` says which.
        with contextlib.suppress(StoreError, TimeoutError):
            if time.monotonic() < context.schema_ok_until or await schema_check(context) == "ok":
                await asyncio.wait_for(refresh_gauges(context), timeout=2)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    guarded = [Depends(require_admin), Depends(require_schema), Depends(require_role)]
    routers = (router, access_router, venues_router)
    for routes in routers:
        app.include_router(routes, prefix="/api", dependencies=guarded)
    # Last: what no route above matched.
    app.include_router(unknown_routes(*routers), prefix="/api", dependencies=guarded)
    app.include_router(console_router)  # the operator console (app/console)
    return app


async def readiness_checks(context: AppContext) -> dict[str, str]:
    """Each check is "ok" or a short reason. Reasons never carry a driver's words (the check
    is open to anyone): the log has them."""
    checks = {"database": "ok", "schema": "ok", "worker": "ok", "mozrest": "ok"}
    await _check_database(context, checks)
    if context.worker is not None:
        if context.worker.credentials_state != CredentialsState.OK:
            checks["mozrest"] = CREDENTIALS_REJECTED + _token_read(context.worker)
        elif context.worker.circuit_state != CircuitState.CLOSED:
            checks["mozrest"] = f"circuit {context.worker.circuit_state}: Mozrest is failing"
    if checks["database"] == "ok" and checks["schema"] != "ok":
        checks["worker"] = "unknown: no worker runs on a schema that is not right"
    if checks["schema"] == "ok":
        await _check_fleet(context, checks)
    if context.worker is not None and context.worker.failure is not None:
        checks["worker"] = "stopped after an internal error (worker.loop_failed): restarting"
    return {
        name: check if check == "ok" or check.endswith(DOCTOR_HINT) else check + DOCTOR_HINT
        for name, check in checks.items()
    }


CREDENTIALS_REJECTED = "credentials rejected (401): check MOZREST_WEBHOOK_TOKEN"


def _token_read(worker: Worker) -> str:
    """When the token was last read from MOZREST_WEBHOOK_TOKEN_FILE (each probe re-reads it)."""
    read_at = worker.credentials_read_at
    return "" if read_at is None else f"; the token file was last read at {read_at.isoformat()}"


async def _check_database(context: AppContext, checks: dict[str, str]) -> None:
    """`database` and `schema`: the database answers, at the schema this version needs."""
    try:
        await asyncio.wait_for(context.store.ping(), timeout=2)
    except (StoreError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        log_event(log, logging.WARNING, "readyz.database_unreachable", error=reason[:300])
        checks.update(
            database="unreachable" + DOCTOR_HINT,
            schema="unknown: the database is unreachable",
            worker="unknown: the database is unreachable",
        )
        return
    try:
        checks["schema"] = await schema_check(context)
    except (StoreError, TimeoutError) as exc:
        log_event(log, logging.WARNING, "readyz.schema_unknown", error=str(exc)[:300])
        checks["schema"] = "unknown: the database did not answer" + DOCTOR_HINT


async def _check_fleet(context: AppContext, checks: dict[str, str]) -> None:
    """`worker` (and, in `api` alone, `mozrest`) from the processes' heartbeats."""
    try:
        fleet = await asyncio.wait_for(
            context.store.fleet_health(
                stale_after_seconds=3 * context.settings.relay_heartbeat_interval_seconds
            ),
            timeout=2,
        )
    except (StoreError, TimeoutError):
        checks["worker"] = "unknown: the database did not answer"
        return
    # Only a heartbeat in the database says a worker runs, this process's own included (it
    # registers once the database first answers).
    if fleet.live_workers == 0:
        checks["worker"] = "no worker heartbeat recently"
    if context.worker is None and checks["mozrest"] == "ok":
        if fleet.credentials_rejected:
            checks["mozrest"] = CREDENTIALS_REJECTED
        elif fleet.circuit_open:
            checks["mozrest"] = "circuit open: Mozrest is failing"


async def refresh_gauges(context: AppContext) -> None:
    """Set the relay-wide gauges from the database."""
    stats = await context.store.gauges(
        stale_after_seconds=3 * context.settings.relay_heartbeat_interval_seconds
    )
    for status, count in stats.deliveries.items():
        metrics.DELIVERIES.labels(status=status).set(count)
    metrics.OLDEST_PENDING_AGE.set(stats.oldest_pending_age_seconds or 0.0)
    metrics.LIVE_WORKERS.set(stats.live_workers)
    metrics.VENUES_PAUSED.set(stats.venues_paused)
    metrics.REQUEST_RATE.set(stats.request_rate)
    metrics.RATE_LIMIT.set(context.settings.relay_rate_limit)
    # This process's own worker knows its circuit before its next heartbeat says so.
    own_circuit_open = (
        context.worker is not None and context.worker.circuit_state != CircuitState.CLOSED
    )
    metrics.CIRCUIT_OPEN.set(1 if stats.circuit != CircuitState.CLOSED or own_circuit_open else 0)


def _exit_if_failed(task: asyncio.Task[None]) -> None:
    """The in-process worker died of a bug: shut the process down (the API with it) and exit
    non-zero, so its supervisor restarts it rather than serving an API over a dead worker."""
    if task.cancelled() or task.exception() is None:
        return
    global _worker_failed
    _worker_failed = True
    os.kill(os.getpid(), signal.SIGTERM)


_worker_failed = False


class _Server(uvicorn.Server):
    """uvicorn re-raises a SIGTERM it has already handled by shutting down gracefully, so the
    process would die of the signal; the relay exits 0 instead, as a SIGTERM'd replica should."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def serve(settings: Settings, *, with_worker: bool) -> None:
    """Run the API (and the worker) under uvicorn until SIGTERM or SIGINT."""
    configure_logging(level=settings.relay_log_level, fmt=settings.relay_log_format)
    config = uvicorn.Config(
        create_app(settings, with_worker=with_worker),
        host=settings.relay_host,
        port=settings.relay_port,
        log_config=None,
        access_log=False,
        # The worker drains within RELAY_SHUTDOWN_GRACE during lifespan shutdown.
        timeout_graceful_shutdown=5,
        lifespan="on",
    )
    sock = bind_socket(settings.relay_host, settings.relay_port)
    try:
        _Server(config).run(sockets=[sock])
    finally:
        sock.close()
    if _worker_failed:
        raise SystemExit(1)


__all__ = ["AppContext", "create_app", "serve"]
