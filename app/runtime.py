"""Assembling the relay from its settings: store, publisher, worker, servers, signals."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import create_engine
from app.logs import get_logger, log_event
from app.policy import RetryPolicy
from app.publisher import make_publisher
from app.settings import Settings
from app.store import Store
from app.worker import Worker, WorkerConfig

log = get_logger("runtime")


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
            base_delay_seconds=settings.relay_retry_base_delay,
            max_delay_seconds=settings.relay_retry_max_delay,
            max_age_seconds=settings.relay_retry_max_age,
        ),
        credentials_cooldown_seconds=settings.relay_circuit_cooldown,
    )


def build_worker(settings: Settings, store: Store) -> Worker:
    """A worker that sends to the configured webhook; refuses to run without credentials."""
    settings.check_can_send()
    publisher = make_publisher(
        url=settings.webhook_url,
        token=settings.mozrest_webhook_token,
        timeout_seconds=settings.relay_http_timeout,
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
        http_timeout_seconds=settings.relay_http_timeout,
        notify=settings.relay_notify,
    )
    return worker


async def run_worker(settings: Settings) -> None:
    """`mozrest-relay worker`: the worker alone, until SIGTERM or SIGINT."""
    engine = build_engine(settings)
    store = build_store(settings, engine)
    worker = build_worker(settings, store)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, worker.stop)
    listener = await start_listener(settings, worker)
    freeze_startup_objects()
    try:
        await worker.run()
    finally:
        if listener is not None:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
        await worker.publisher.aclose()
        await engine.dispose()


async def start_listener(settings: Settings, worker: Worker) -> asyncio.Task[None] | None:
    """With RELAY_NOTIFY on PostgreSQL, wake ingest on each notification (polling stays)."""
    if not settings.relay_notify or settings.dialect != "postgresql":
        return None
    from app.notify import listen

    return asyncio.create_task(listen(settings.database_url, worker.wake_ingest), name="listen")
