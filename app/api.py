"""The admin HTTP API: health, metrics, and the operators' `/api/*` routes (README, "For
operators")."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest

from app import __version__, metrics
from app.logs import configure_logging, get_logger, log_event
from app.migrate import schema_problem
from app.publisher import PartnerApi
from app.runtime import (
    bind_socket,
    build_engine,
    build_store,
    build_worker,
    freeze_startup_objects,
    start_listener,
)
from app.settings import Settings
from app.store import Store, StoreError
from app.store_admin import ConflictError, NotFoundError
from app.worker import Worker

log = get_logger("api")

# `*_created` series (one per counter and histogram) only clutter a scrape of this service.
disable_created_metrics()


@dataclass
class Runtime:
    """What the routes share: settings, the store, the Partner API, and the worker if any."""

    settings: Settings
    store: Store
    partner_api: PartnerApi
    worker: Worker | None = None
    #: Until when (monotonic) the schema is taken to be at head without asking again.
    schema_ok_until: float = 0.0


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def require_admin(request: Request, runtime: RuntimeDep) -> None:
    """`/api/*` needs `Authorization: Bearer $RELAY_ADMIN_TOKEN`; with no token set, it is shut."""
    expected = runtime.settings.relay_admin_token
    if expected is None:
        raise HTTPException(503, "RELAY_ADMIN_TOKEN is not set")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        raise HTTPException(
            401, "missing or wrong admin token", headers={"WWW-Authenticate": "Bearer"}
        )


class _AsciiJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


def create_app(settings: Settings, *, with_worker: bool = False) -> FastAPI:
    """The admin API; with `with_worker` the same process also runs the worker."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = build_engine(settings)
        store = build_store(settings, engine)
        partner_api = PartnerApi(
            base_url=settings.api_url,
            api_key=settings.mozrest_api_key,
            timeout_seconds=settings.relay_http_timeout,
        )
        runtime = Runtime(settings=settings, store=store, partner_api=partner_api)
        app.state.runtime = runtime
        worker_task: asyncio.Task[None] | None = None
        listener: asyncio.Task[None] | None = None
        if with_worker:
            runtime.worker = build_worker(settings, store)
            worker_task = asyncio.create_task(runtime.worker.run(), name="worker")
            worker_task.add_done_callback(_exit_if_failed)
            listener = await start_listener(settings, runtime.worker)
        freeze_startup_objects()
        log_event(
            log,
            logging.INFO,
            "api.started",
            host=settings.relay_host,
            port=settings.relay_port,
            admin_token_set=settings.relay_admin_token is not None,
        )
        try:
            yield
        finally:
            if runtime.worker is not None and worker_task is not None:
                runtime.worker.stop()
                await asyncio.gather(worker_task, return_exceptions=True)
                await runtime.worker.publisher.aclose()
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
            await partner_api.aclose()
            await engine.dispose()

    app = FastAPI(
        title="mozrest-relay admin API",
        version=__version__,
        description="Deliveries of reservation states to Mozrest: inspect, replay, monitor.",
        lifespan=lifespan,
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
    async def readyz(runtime: RuntimeDep) -> JSONResponse:
        checks = await readiness_checks(runtime)
        ready = checks["database"] == "ok" and checks["schema"] == "ok"
        return JSONResponse(
            {"status": "ready" if ready else "not_ready", "checks": checks},
            status_code=200 if ready else 503,
        )

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    async def metrics_endpoint(runtime: RuntimeDep) -> Response:
        # The gauges keep their last values while the database or its schema is not right;
        # `/readyz` says which.
        with contextlib.suppress(StoreError, TimeoutError):
            if time.monotonic() < runtime.schema_ok_until or await schema_check(runtime) == "ok":
                await asyncio.wait_for(refresh_gauges(runtime), timeout=2)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    from app.routes import router

    app.include_router(
        router, prefix="/api", dependencies=[Depends(require_admin), Depends(require_schema)]
    )
    return app


#: Every reason `/readyz` gives ends by pointing here: it checks the whole set-up.
DOCTOR_HINT = " (mozrest-relay doctor checks the whole set-up)"
#: A schema found at head is trusted this long before `/api/*` reads the revision again.
SCHEMA_RECHECK_SECONDS = 10.0


async def schema_check(runtime: Runtime) -> str:
    """`"ok"` or what is wrong with the schema (`app.migrate.schema_problem`); raises
    `StoreError` or `TimeoutError` when the database does not answer."""
    revision = await asyncio.wait_for(runtime.store.schema_revision(), timeout=2)
    problem = schema_problem(revision)
    if problem is None:
        runtime.schema_ok_until = time.monotonic() + SCHEMA_RECHECK_SECONDS
        return "ok"
    runtime.schema_ok_until = 0.0
    return problem


async def require_schema(runtime: RuntimeDep) -> None:
    """`/api/*` answers 503 with `/readyz`'s schema reason while the schema is not at head."""
    if time.monotonic() < runtime.schema_ok_until:
        return
    try:
        check = await schema_check(runtime)
    except TimeoutError:
        raise StoreError("the database did not answer within 2s") from None
    if check != "ok":
        raise HTTPException(503, check + DOCTOR_HINT)  # word for word `/readyz`'s reason


async def readiness_checks(runtime: Runtime) -> dict[str, str]:
    """Each check is "ok" or a short reason. Reasons never carry a driver's words (the check
    is open to anyone): the log has them."""
    checks = {"database": "ok", "schema": "ok", "worker": "ok", "mozrest": "ok"}
    try:
        await asyncio.wait_for(runtime.store.ping(), timeout=2)
    except (StoreError, TimeoutError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
        log_event(log, logging.WARNING, "readyz.database_unreachable", error=reason[:300])
        checks.update(
            database="unreachable" + DOCTOR_HINT,
            schema="unknown: the database is unreachable",
            worker="unknown: the database is unreachable",
        )
    else:
        try:
            checks["schema"] = await schema_check(runtime)
        except (StoreError, TimeoutError) as exc:
            log_event(log, logging.WARNING, "readyz.schema_unknown", error=str(exc)[:300])
            checks["schema"] = "unknown: the database did not answer" + DOCTOR_HINT
    if runtime.worker is not None:
        if runtime.worker.credentials_state != "ok":
            checks["mozrest"] = "credentials rejected (401): check MOZREST_WEBHOOK_TOKEN"
        elif runtime.worker.circuit_state != "closed":
            checks["mozrest"] = f"circuit {runtime.worker.circuit_state}: Mozrest is failing"
    if checks["database"] == "ok" and checks["schema"] != "ok":
        checks["worker"] = "unknown: no worker runs on a schema that is not right"
    if checks["schema"] == "ok":
        try:
            fleet = await asyncio.wait_for(
                runtime.store.fleet_health(
                    stale_after_seconds=3 * runtime.settings.relay_heartbeat_interval
                ),
                timeout=2,
            )
        except (StoreError, TimeoutError):
            fleet = None
        if fleet is None:
            checks["worker"] = "unknown: the database did not answer"
        else:
            # Only a heartbeat in the database says a worker runs, this process's own included
            # (it registers once the database first answers).
            if fleet.live_workers == 0:
                checks["worker"] = "no worker heartbeat recently"
            if runtime.worker is None and checks["mozrest"] == "ok":
                if fleet.credentials_rejected:
                    checks["mozrest"] = "credentials rejected (401): check MOZREST_WEBHOOK_TOKEN"
                elif fleet.circuit_open:
                    checks["mozrest"] = "circuit open: Mozrest is failing"
    if runtime.worker is not None and runtime.worker.failure is not None:
        checks["worker"] = "stopped after an internal error (worker.loop_failed): restarting"
    return {
        name: check if check == "ok" or check.endswith(DOCTOR_HINT) else check + DOCTOR_HINT
        for name, check in checks.items()
    }


async def refresh_gauges(runtime: Runtime) -> None:
    """Set the relay-wide gauges from the database."""
    stats = await runtime.store.gauges(
        stale_after_seconds=3 * runtime.settings.relay_heartbeat_interval
    )
    for status, count in stats.deliveries.items():
        metrics.DELIVERIES.labels(status=status).set(count)
    metrics.OLDEST_PENDING_AGE.set(stats.oldest_pending_age_seconds or 0.0)
    metrics.LIVE_WORKERS.set(stats.live_workers)
    # This process's own worker knows its circuit before its next heartbeat says so.
    own_circuit_open = runtime.worker is not None and runtime.worker.circuit_state != "closed"
    metrics.CIRCUIT_OPEN.set(1 if stats.circuit != "closed" or own_circuit_open else 0)


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


__all__ = ["Runtime", "create_app", "serve"]
