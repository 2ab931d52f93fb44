"""The practical HTTP ceiling of this machine: the relay's own webhook publisher
(`app.publisher.make_publisher`, same transport and concurrency) posting the drain's payloads,
with no database.

Prints one JSON line: {"n", "seconds", "rate", "errors"}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from app.contract import parse_state, serialize
from app.publisher import make_publisher
from bench.common import WEBHOOK_TOKEN, seated_payload


async def run(url: str, n: int, concurrency: int, tag: int, transport: str) -> dict[str, float]:
    bodies = [serialize(parse_state(seated_payload(tag, i))) for i in range(n)]
    publisher = make_publisher(
        url=url,
        token=WEBHOOK_TOKEN,
        timeout_seconds=10.0,
        concurrency=concurrency,
        transport=transport,  # type: ignore[arg-type]
    )
    errors = 0
    next_index = 0

    async def lane() -> None:
        nonlocal errors, next_index
        while next_index < n:
            body = bodies[next_index]
            next_index += 1
            answer = await publisher.publish(body)
            if answer.status_code != 200:
                errors += 1

    try:
        start = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(lane() for _ in range(concurrency))), 600)
        elapsed = time.monotonic() - start
    finally:
        await publisher.aclose()
    return {"n": n, "seconds": round(elapsed, 3), "rate": round(n / elapsed, 1), "errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--tag", type=int, default=1)
    parser.add_argument("--transport", default="aiohttp", choices=("aiohttp", "httpx"))
    args = parser.parse_args()
    result = asyncio.run(run(args.url, args.n, args.concurrency, args.tag, args.transport))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
