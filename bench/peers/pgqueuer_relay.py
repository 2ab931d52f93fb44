"""The peer: the relay's job done the way a user who picked PgQueuer would build it.

The RMS enqueues one PgQueuer job per booking state (the serialised state as the job's payload);
a consumer (PgQueuer's `QueueManager`, asyncpg) POSTs each job's payload as it is, with aiohttp
and a connection pool sized to the HTTP concurrency. It uses nothing of the relay (no
`app.publisher`, no validation, no newest-wins, no coalescing, no snapshots, no per-booking
order): it is what a generic PostgreSQL queue costs, tuned by trying its knobs (`bench/peers/
tune.py`) and run with the best settings found (`BEST`).

    python -m bench.peers.pgqueuer_relay install --dsn postgresql://...
    python -m bench.peers.pgqueuer_relay consume --dsn ... --url http://127.0.0.1:P/rms
        [--batch-size 50] [--max-concurrent-tasks 128] [--loop uvloop|asyncio]
    python -m bench.peers.pgqueuer_relay ceiling --url ... --n 20000
        the same HTTP client posting the same bodies with no database (one JSON line)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, TypeVar

import aiohttp
import asyncpg
from pgqueuer import QueueManager
from pgqueuer.db import AsyncpgDriver
from pgqueuer.models import Job
from pgqueuer.queries import Queries

from bench.common import WEBHOOK_TOKEN, dumps, seated_payload

T = TypeVar("T")
ENTRYPOINT = "mozrest_webhook"
HEADERS = {
    "Authorization": f"Bearer {WEBHOOK_TOKEN}",
    "Content-Type": "application/json",
    "Accept": "application/json",
}


@dataclass(frozen=True)
class PeerSettings:
    """PgQueuer's knobs, and the HTTP side's."""

    batch_size: int
    #: PgQueuer's cap on the jobs a worker holds; 0: none (its default).
    max_concurrent_tasks: int
    uvloop: bool
    #: Requests in flight (the aiohttp pool's size): the relay's `RELAY_CONCURRENCY` default.
    http_concurrency: int = 64

    def valid(self) -> bool:
        # PgQueuer refuses to run otherwise (`QueueManager.run`).
        return self.max_concurrent_tasks == 0 or self.max_concurrent_tasks >= 2 * self.batch_size

    def describe(self) -> dict[str, object]:
        return asdict(self)


#: The peer's settings in `make bench`: the best that `python -m bench.peers.tune` found
#: (2026-11-30, 20,000 preloaded states, 2 cores shared, load average 1-7 during the runs).
#: The full grid (bench/results/peer-tune.json): batch 10 at most 2,805/s, batch 25 3,050/s,
#: batch 200 2,575/s; batch 50 and 100 with max_concurrent_tasks 256 or no cap the top group
#: (best of two passes 3,487-4,552/s). Its confirmation rounds: batch 50, no cap, uvloop had the
#: best median (2,072 / 4,268 / 6,272 -> 4,268/s; batch 100 no cap uvloop 3,686, batch 50 256
#: uvloop 3,756, batch 100 no cap asyncio 2,810). A second run (peer-tune-confirm.json) put
#: batch 50 / 128 / uvloop (median 2,874) a little ahead of batch 50 / no cap / uvloop (2,636),
#: within noise; head to head, five rounds each in turn (peer-tune-final.json), no cap was faster
#: in every round (median 1,870 against 1,611/s). uvloop and asyncio are within noise of each
#: other. No cap is PgQueuer's default: with one consumer it holds the whole backlog, which is
#: fine here (a fleet of consumers would want a cap, 256 costs little above).
BEST = PeerSettings(batch_size=50, max_concurrent_tasks=0, uvloop=True)


class WebhookRejected(Exception):
    """The webhook did not accept the state; PgQueuer records the job as failed."""


def bodies_for(tag: int, n: int) -> list[bytes]:
    """The drain's states, serialised once, as the RMS would enqueue them."""
    return [dumps(seated_payload(tag, i)).encode() for i in range(n)]


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
        part: list[bytes | None] = list(bodies[start : start + chunk])
        await queries.enqueue([ENTRYPOINT] * len(part), part, [0] * len(part))


def http_session(concurrency: int) -> aiohttp.ClientSession:
    """aiohttp with one keep-alive connection per request in flight."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency),
        headers=HEADERS,
        timeout=aiohttp.ClientTimeout(total=10.0),
        skip_auto_headers=("User-Agent",),
    )


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> int:
    async with session.post(url, data=body) as response:
        await response.read()
        return response.status


async def consume(dsn: str, url: str, settings: PeerSettings) -> None:
    conn = await asyncpg.connect(dsn)
    session = http_session(settings.http_concurrency)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint(ENTRYPOINT)
    async def deliver(job: Job) -> None:
        status = await post(session, url, job.payload or b"")
        if not 200 <= status < 300:
            raise WebhookRejected(str(status))

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, qm.shutdown.set)
    print(f"consumer ready {json.dumps(settings.describe())}", flush=True)
    try:
        await qm.run(
            batch_size=settings.batch_size,
            max_concurrent_tasks=settings.max_concurrent_tasks,
            dequeue_timeout=timedelta(seconds=1),
        )
    finally:
        await session.close()
        with contextlib.suppress(Exception):
            await conn.close()


async def ceiling(url: str, bodies: Sequence[bytes], concurrency: int) -> dict[str, float]:
    """The consumer's HTTP side alone: the same session posting the same bodies, no database."""
    session = http_session(concurrency)
    errors = 0
    next_index = 0

    async def lane() -> None:
        nonlocal errors, next_index
        while next_index < len(bodies):
            body = bodies[next_index]
            next_index += 1
            if await post(session, url, body) != 200:
                errors += 1

    try:
        start = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(lane() for _ in range(concurrency))), 600)
        elapsed = time.monotonic() - start
    finally:
        await session.close()
    n = len(bodies)
    return {"n": n, "seconds": round(elapsed, 3), "rate": round(n / elapsed, 1), "errors": errors}


def _run(coro: Coroutine[Any, Any, T], use_uvloop: bool) -> T:
    if use_uvloop:
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_install = sub.add_parser("install")
    p_install.add_argument("--dsn", required=True)
    for name in ("consume", "ceiling"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True)
        p.add_argument("--http-concurrency", type=int, default=BEST.http_concurrency)
        p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
        if name == "consume":
            p.add_argument("--dsn", required=True)
            p.add_argument("--batch-size", type=int, default=BEST.batch_size)
            p.add_argument("--max-concurrent-tasks", type=int, default=BEST.max_concurrent_tasks)
        else:
            p.add_argument("--n", type=int, default=20_000)
            p.add_argument("--tag", type=int, default=1)
    args = parser.parse_args()
    if args.command == "install":
        asyncio.run(install(args.dsn))
    elif args.command == "consume":
        settings = PeerSettings(
            batch_size=args.batch_size,
            max_concurrent_tasks=args.max_concurrent_tasks,
            uvloop=args.loop == "uvloop",
            http_concurrency=args.http_concurrency,
        )
        if not settings.valid():
            parser.error("PgQueuer needs --max-concurrent-tasks 0 or >= 2 x --batch-size")
        _run(consume(args.dsn, args.url, settings), settings.uvloop)
    else:
        bodies = bodies_for(args.tag, args.n)
        result = _run(ceiling(args.url, bodies, args.http_concurrency), args.loop == "uvloop")
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
