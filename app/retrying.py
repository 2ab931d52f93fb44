"""Riding out database outages: the same work again, with backoff, until it goes through."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from app.db import StoreError
from app.logs import get_logger, log_event
from app.policy import OUTAGE_BACKOFF, OutageBackoff

log = get_logger("worker")
T = TypeVar("T")


async def ride_out_outages(
    call: Callable[[], Awaitable[T]],
    what: str,
    *,
    until: asyncio.Event | None = None,
    backoff: OutageBackoff = OUTAGE_BACKOFF,
) -> T:
    """Run a store call, retrying it through database outages (`StoreError`, logged as
    `store.unavailable`) until it succeeds or, with `until`, that event is set: the last
    `StoreError` is then raised. Any other error goes up at once."""

    def log_retry(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        log_event(log, logging.WARNING, "store.unavailable", during=what, error=str(error))

    async for attempt in AsyncRetrying(
        retry=retry_if_exception_type(StoreError),
        wait=wait_random_exponential(multiplier=backoff.multiplier, max=backoff.max_seconds),
        before_sleep=log_retry,
        stop=lambda _: until is not None and until.is_set(),
        reraise=True,
    ):
        with attempt:
            return await call()
    raise AssertionError("unreachable")  # pragma: no cover
