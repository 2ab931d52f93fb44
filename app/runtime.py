"""Assembling the relay from its settings: store, publisher, worker, servers, signals."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from app import tracing
from app.db import create_engine
from app.logs import get_logger, log_event
from app.migrate import current_revision, schema_problem
from app.policy import RetryPolicy
from app.publisher import make_publisher
from app.secret_files import SecretSource
from app.settings import Settings
from app.store import Store
from app.worker import Worker
from app.worker_config import WorkerConfig

log = get_logger("runtime")

#: How long a start-up check waits for the database before calling it unreachable.
DATABASE_CHECK_SECONDS = 10.0
#: Exit statuses: a set-up the user must fix (bad setting, schema), and a database that does
#: not answer (may pass on its own: a supervisor's restart can help).
EXIT_SETUP = 2
EXIT_UNAVAILABLE = 3


class CommandError(Exception):
    """A command cannot go on as set up; the message is one line naming what to fix."""

    def __init__(self, message: str, *, exit_status: int = EXIT_SETUP) -> None:
        super().__init__(message)
        self.exit_status = exit_status


def safe_database_url(database_url: str) -> str:
    """The URL with its password masked, fit for a terminal or a log."""
    try:
        return make_url(database_url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return "(unparseable URL)"


def describe_database_error(error: BaseException) -> str:
    """Why the database could not be used, in a few words: the driver's own first line for
    connection problems, never a SQL statement or its parameters (they may hold guest data)."""
    if isinstance(error, TimeoutError | sa_exc.TimeoutError):
        return "it did not answer in time"
    seen: set[int] = set()
    cause: BaseException | None = error
    reason: str | None = None
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, sa_exc.StatementError):
            # Its str() carries the statement and parameters; only the driver's error is safe.
            cause = cause.orig
            continue
        if isinstance(cause, socket.gaierror):
            reason = f"cannot resolve its host name ({cause.strerror})"
            break
        if isinstance(cause, OSError) and cause.errno and cause.errno > 0:
            reason = os.strerror(cause.errno)
            break
        text = str(cause).strip()
        if text:
            reason = text.splitlines()[0]
        cause = cause.__cause__ or cause.__context__
    reason = (reason or type(error).__name__)[:200]
    return reason


async def check_database(settings: Settings, *, require_schema: bool) -> str | None:
    """Connect once and read the schema revision. Raise `CommandError` when the database does
    not answer, or (with `require_schema`) when its schema is not this relay's newest; else
    answer the schema problem, if any."""
    url = safe_database_url(settings.database_url)
    engine = create_engine(settings.database_url, pool_size=1)
    try:
        async with asyncio.timeout(DATABASE_CHECK_SECONDS):
            async with engine.connect() as conn:
                revision = await conn.run_sync(current_revision)
    except (sa_exc.SQLAlchemyError, OSError, TimeoutError) as exc:
        raise CommandError(
            f"DATABASE_URL ({url}): cannot use the database: {describe_database_error(exc)}",
            exit_status=EXIT_UNAVAILABLE,
        ) from None
    finally:
        await engine.dispose()
    problem = schema_problem(revision)
    if problem is not None and require_schema:
        raise CommandError(f"DATABASE_URL ({url}): the relay's schema is {problem}")
    return problem


def bind_socket(
    host: str, port: int, *, port_setting: str = "RELAY_PORT", host_setting: str = "RELAY_HOST"
) -> socket.socket:
    """Bind `host:port` before anything starts, so a taken port is one clear line naming the
    setting, never an `api.started` followed by a bind error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CommandError(f"{host_setting}: cannot resolve {host!r}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    # As uvicorn does: a port left in TIME_WAIT by a previous run can be taken again at once.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CommandError(
                f"{port_setting}: {host}:{port} is already in use by another process: stop it, "
                f"or set {port_setting} to a free port"
            ) from None
        raise CommandError(
            f"{host_setting}/{port_setting}: cannot listen on {host}:{port}: {exc.strerror}"
        ) from None
    return sock


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (as uvicorn chooses for the API), else
    asyncio's own: the worker spends much of its time in socket calls, which uvloop makes
    cheaper."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency wherever it builds
        return None
    return uvloop.new_event_loop


def freeze_startup_objects() -> None:
    """Move what start-up allocated (modules, SQLAlchemy's and pydantic's structures: most of
    the process's objects) out of the garbage collector's reach. A full collection scans every
    tracked object; with them in it, one took 30-60 ms every second or two of a busy worker,
    the whole tail of its delivery latency (`docs/benchmarks.md`)."""
    gc.collect()
    gc.freeze()


def build_engine(settings: Settings) -> AsyncEngine:
    # Ingest, claim, record and heartbeat each hold at most one connection at a time; the rest
    # is headroom for the admin API.
    return create_engine(
        settings.database_url, pool_size=5, lock_limit_seconds=settings.relay_lease_seconds
    )


def build_store(settings: Settings, engine: AsyncEngine) -> Store:
    return Store(
        engine,
        send_statuses=settings.relay_send_statuses,
        send_items=settings.relay_send_items,
        max_payload_bytes=settings.relay_max_payload_bytes,
        retry_policy=RetryPolicy(
            base_delay_seconds=settings.relay_retry_base_delay_seconds,
            max_delay_seconds=settings.relay_retry_max_delay_seconds,
            max_age_seconds=settings.relay_retry_max_age_seconds,
        ),
        credentials_cooldown_seconds=settings.relay_circuit_cooldown_seconds,
        rate_limit=settings.relay_rate_limit,
    )


def build_worker(settings: Settings, store: Store) -> Worker:
    """A worker that sends to the configured webhook; refuses to run without credentials."""
    settings.check_can_send()
    publisher = make_publisher(
        url=settings.webhook_url,
        # Re-readable from MOZREST_WEBHOOK_TOKEN_FILE: `publisher.reload_credentials()`.
        token=SecretSource.from_settings(settings, "MOZREST_WEBHOOK_TOKEN"),
        timeout_seconds=settings.relay_http_timeout_seconds,
        concurrency=settings.relay_concurrency,
        transport=settings.relay_http_transport,
    )
    worker = Worker(store=store, publisher=publisher, config=WorkerConfig.from_settings(settings))
    log_event(
        log,
        logging.INFO,
        "worker.configured",
        webhook_url=settings.webhook_url,
        send_statuses=sorted(settings.relay_send_statuses),
        send_items=settings.relay_send_items,
        concurrency=settings.relay_concurrency,
        lease_seconds=settings.relay_lease_seconds,
        http_timeout_seconds=settings.relay_http_timeout_seconds,
        notify=settings.relay_notify,
    )
    return worker


@dataclass(frozen=True, slots=True)
class Parts:
    """One process's parts, built from its settings (`assemble`)."""

    settings: Settings
    engine: AsyncEngine
    store: Store
    worker: Worker | None
    """The worker, for `run` and `worker`; None for `api` alone."""


@contextlib.asynccontextmanager
async def assemble(settings: Settings, *, with_worker: bool) -> AsyncIterator[Parts]:
    """Build the parts every command runs (`run`, `api`, `worker`), and close them afterwards:
    the one start-up and shutdown path. The worker is built here but run by the caller, which
    stops it before leaving (its NOTIFY listener, if any, is stopped here)."""
    engine = build_engine(settings)
    listener: asyncio.Task[None] | None = None
    worker: Worker | None = None
    try:
        store = build_store(settings, engine)
        if with_worker:
            worker = build_worker(settings, store)
            listener = await start_listener(settings, worker)
        freeze_startup_objects()
        yield Parts(settings=settings, engine=engine, store=store, worker=worker)
    finally:
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        if worker is not None:
            await worker.publisher.aclose()
        await engine.dispose()


async def run_worker(settings: Settings) -> None:
    """`mozrest-relay worker`: the worker alone, until SIGTERM or SIGINT."""
    tracing.configure(settings)
    async with assemble(settings, with_worker=True) as parts:
        assert parts.worker is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, parts.worker.stop)
        await parts.worker.run()


async def start_listener(settings: Settings, worker: Worker) -> asyncio.Task[None] | None:
    """With RELAY_NOTIFY on PostgreSQL, wake ingest on each notification (polling stays)."""
    if not settings.relay_notify or settings.dialect != "postgresql":
        return None
    from app.notify import listen

    return asyncio.create_task(listen(settings.database_url, worker.wake_ingest), name="listen")
