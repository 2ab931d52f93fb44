"""Raw POST rates against the benchmark receiver, per HTTP client stack (for ADR 0004).

    python -m bench.transport [--seconds 5] [--rounds 3] [--json OUT]

Stacks: httpx's `AsyncClient` with its own transport (httpcore); `AsyncClient` over
httpx-aiohttp's `AiohttpTransport`; that transport driven directly with a prebuilt `httpx.Request`
(what `app/publisher.py` does since it stopped using `AsyncClient`); and raw aiohttp. Each at
1, 32 and 64 requests in flight, one keep-alive connection per request in flight, the body a
serialised seated booking. The receiver runs in its own process. Reports requests per second and
the client's CPU time per request (the CPU the relay's process would spend on HTTP alone), medians
over the rounds, interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from app.contract import parse_state, serialize
from bench.common import WEBHOOK_TOKEN, Receiver, Workdir, log, median, seated_payload

STACKS = ("httpx", "httpx+aiohttp", "aiohttp-transport direct", "aiohttp")
#: 1 and 64 as issue 6 asks, and 32: the relay's default RELAY_CONCURRENCY.
IN_FLIGHT = (1, 32, 64)
HEADERS = {
    "Authorization": f"Bearer {WEBHOOK_TOKEN}",
    "Content-Type": "application/json",
    "Accept": "application/json",
}


def _httpx_client(stack: str, in_flight: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    kwargs: dict[str, Any] = {"limits": limits, "timeout": None, "headers": HEADERS}
    if stack == "httpx+aiohttp":
        from httpx_aiohttp import AiohttpTransport

        kwargs["transport"] = AiohttpTransport(limits=limits)
    return httpx.AsyncClient(**kwargs)


async def measure(stack: str, url: str, in_flight: int, seconds: float) -> dict[str, float]:
    body = serialize(parse_state(seated_payload(7, 1)))
    done = 0
    errors = 0
    deadline = 0.0

    if stack == "aiohttp":
        connector = aiohttp.TCPConnector(limit=in_flight)
        session = aiohttp.ClientSession(connector=connector, headers=HEADERS)

        async def post() -> int:
            async with session.post(url, data=body) as response:
                await response.read()
                return response.status

        async def close() -> None:
            await session.close()
    elif stack == "aiohttp-transport direct":
        from httpx_aiohttp import AiohttpTransport

        limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
        transport = AiohttpTransport(limits=limits)
        target = httpx.URL(url)
        headers = list(HEADERS.items())

        async def post() -> int:
            request = httpx.Request("POST", target, headers=headers, content=body)
            response = await transport.handle_async_request(request)
            try:
                await response.aread()
            finally:
                await response.aclose()
            return response.status_code

        async def close() -> None:
            await transport.aclose()
    else:
        client = _httpx_client(stack, in_flight)

        async def post() -> int:
            response = await client.post(url, content=body)
            return response.status_code

        async def close() -> None:
            await client.aclose()

    async def lane() -> None:
        nonlocal done, errors
        while time.monotonic() < deadline:
            if await post() == 200:
                done += 1
            else:
                errors += 1

    try:
        # Warm the connections up, then measure.
        deadline = time.monotonic() + 0.5
        await asyncio.gather(*(lane() for _ in range(in_flight)))
        done = 0
        cpu0 = time.process_time()
        start = time.monotonic()
        deadline = start + seconds
        await asyncio.gather(*(lane() for _ in range(in_flight)))
        elapsed = time.monotonic() - start
        cpu = time.process_time() - cpu0
    finally:
        await close()
    return {
        "rate": round(done / elapsed, 1),
        "cpu_us_per_request": round(1e6 * cpu / max(done, 1), 1),
        "errors": errors,
    }


async def run(seconds: float, rounds: int, workdir: Path) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {}
    async with Receiver(workdir) as receiver:
        for round_index in range(rounds):
            for in_flight in IN_FLIGHT:
                for stack in STACKS:
                    key = f"{stack} @{in_flight}"
                    result = await measure(stack, receiver.url, in_flight, seconds)
                    samples.setdefault(key, []).append(result)
                    log(f"transport round {round_index + 1}: {key}: {result}")
                    await receiver.reset()
    table = {}
    for key, runs in samples.items():
        table[key] = {
            "rate": median(r["rate"] for r in runs),
            "cpu_us_per_request": median(r["cpu_us_per_request"] for r in runs),
            "rounds": [r["rate"] for r in runs],
        }
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    workdir = Workdir()
    try:
        table = asyncio.run(run(min(args.seconds, 60.0), min(args.rounds, 10), workdir.path))
    finally:
        workdir.cleanup()
    print(f"{'stack':<32} {'req/s':>9} {'client CPU µs/req':>18}   rounds")
    for key, row in table.items():
        rounds = ", ".join(f"{r:,.0f}" for r in row["rounds"])
        print(f"{key:<32} {row['rate']:>9,.0f} {row['cpu_us_per_request']:>18,.0f}   {rounds}")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
