"""The peer: the same relay job done with PgQueuer (https://pypi.org/project/pgqueuer/).

An honest best effort at "a relay built on a PostgreSQL job queue": the RMS enqueues one job per
booking state (the serialised state as the job's payload), and a consumer POSTs each job to the
webhook with the relay's own HTTP client (`app.publisher.make_publisher`: aiohttp) and the same
number of requests in flight. It does none of the relay's per-booking work (no validation, no
newest-wins, no coalescing, no snapshots, no per-booking ordering): it is the cost of a generic
queue, the floor a purpose-built relay is compared with.

    python -m bench.peers.pgqueuer_relay install --dsn postgresql://...
    python -m bench.peers.pgqueuer_relay consume --dsn ... --url http://127.0.0.1:P/rms
        [--concurrency 32] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from datetime import timedelta

import asyncpg
from pgqueuer import QueueManager
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.queries import Queries

from app.publisher import make_publisher
from bench.common import WEBHOOK_TOKEN

ENTRYPOINT = "mozrest_webhook"


class WebhookRejected(Exception):
    """Mozrest did not accept the state; PgQueuer records the job as failed."""


async def install(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await Queries(AsyncpgDriver(conn)).install()
    finally:
        await conn.close()


async def enqueue(conn: asyncpg.Connection, bodies: Sequence[bytes], chunk: int = 5000) -> None:
    """One job per booking state, in the caller's transaction."""
    queries = Queries(AsyncpgDriver(conn))
    for start in range(0, len(bodies), chunk):
        part = list(bodies[start : start + chunk])
        await queries.enqueue([ENTRYPOINT] * len(part), part, [0] * len(part))


async def consume(dsn: str, url: str, concurrency: int, batch_size: int) -> None:
    conn = await asyncpg.connect(dsn)
    publisher = make_publisher(
        url=url, token=WEBHOOK_TOKEN, timeout_seconds=10.0, concurrency=concurrency
    )
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint(ENTRYPOINT)
    async def post(job: Job) -> None:
        answer = await publisher.publish(job.payload or b"")
        if answer.status_code is None or not 200 <= answer.status_code < 300:
            raise WebhookRejected(answer.error or str(answer.status_code))

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, qm.shutdown.set)
    print("consumer ready", flush=True)
    try:
        await qm.run(
            batch_size=batch_size,
            # PgQueuer's cap on picked jobs: the same number of requests in flight as the relay.
            max_concurrent_tasks=max(concurrency, 2 * batch_size),
            dequeue_timeout=timedelta(seconds=1),
        )
    finally:
        await publisher.aclose()
        with contextlib.suppress(Exception):
            await conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_install = sub.add_parser("install")
    p_install.add_argument("--dsn", required=True)
    p_consume = sub.add_parser("consume")
    p_consume.add_argument("--dsn", required=True)
    p_consume.add_argument("--url", required=True)
    p_consume.add_argument("--concurrency", type=int, default=32)
    p_consume.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if args.command == "install":
        asyncio.run(install(args.dsn))
    else:
        asyncio.run(consume(args.dsn, args.url, args.concurrency, args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
