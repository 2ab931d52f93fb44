"""What an index costs the drain: the same code drains a preloaded backlog with the index and
without it (dropped right after the migration), alternating, and reports medians.

    python -m bench.index_cost --index ix_mozrest_delivery_created_at --rounds 4 --n 20000

Writes `bench/results/index-cost.json` (`--output`). Each drain is `scenarios.drain_pg`; the rate
is first POST to last, CPU per delivery the worker's and PostgreSQL's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.common import log, machine_summary, pg_connect

RESULTS = Path(__file__).resolve().parent / "results"


def _dropping(index: str) -> Callable[[str], Awaitable[None]]:
    async def drop(database: str) -> None:
        conn = await pg_connect(database)
        try:
            await conn.execute(f'DROP INDEX "{index}"')
        finally:
            await conn.close()

    return drop


async def measure(index: str, rounds: int, n: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"with": [], "without": []}
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        for round_ in range(rounds):
            order = ("without", "with") if round_ % 2 else ("with", "without")
            for variant in order:
                run = await scenarios.drain_pg(
                    workdir,
                    n=n,
                    tag=700 + len(runs["with"]) + len(runs["without"]),
                    preload=True,
                    label=f"index_{variant}",
                    prepare=None if variant == "with" else _dropping(index),
                )
                if not run["correct"]["ok"]:
                    raise RuntimeError(f"a state was lost or stale: {run['correct']}")
                cpu = run["cpu_cores"]
                worker = sum(v for k, v in cpu.items() if k.startswith("worker"))
                runs[variant].append(
                    {
                        "rate": run["rate"],
                        "worker_ms": round(1000 * worker / run["rate"], 4),
                        "database_ms": round(1000 * cpu.get("database", 0.0) / run["rate"], 4),
                    }
                )
                log(f"{variant} {index}: {runs[variant][-1]}")
    medians = {
        variant: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for variant, rs in runs.items()
    }
    return {"index": index, "n": n, "rounds": rounds, "medians": medians, "runs": runs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", default="ix_mozrest_delivery_created_at")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--output", type=Path, default=RESULTS / "index-cost.json")
    args = parser.parse_args()
    report = asyncio.run(measure(args.index, args.rounds, args.n))
    report["machine"] = machine_summary()
    with_, without = report["medians"]["with"], report["medians"]["without"]
    print(
        f"{args.index}: median {with_['rate']:,.0f}/s with it, {without['rate']:,.0f}/s without "
        f"({with_['rate'] / without['rate'] - 1:+.1%}); PostgreSQL CPU per delivery "
        f"{with_['database_ms']:.3f} against {without['database_ms']:.3f} ms, worker "
        f"{with_['worker_ms']:.3f} against {without['worker_ms']:.3f} ms"
    )
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
