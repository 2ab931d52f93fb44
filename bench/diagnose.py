"""The relay's worker, run in-process with counters, to explain a drain's numbers.

    python -m bench.diagnose [--variant NAME ...]    (same environment as `mozrest-relay worker`)

Counts, per store transaction kind (ingest, claim_due, record): calls, rows, wall time; and the SQL
statements and connection checkouts of the whole process. At exit it prints one JSON line on
stderr. The variants patch the relay *in this process only* (no file in app/ changes) to measure
what a suggested change would gain before anyone writes it:

    no-pre-ping      the engine without `pool_pre_ping` (one round trip less per transaction)
    claim-ahead      dispatch claims up to RELAY_BATCH_SIZE at a time, whatever the free request
                     slots; the HTTP client's pool (RELAY_CONCURRENCY connections) still bounds
                     the requests on the wire, the others wait for a connection
    quiet            RELAY_LOG_LEVEL=warning semantics for the per-delivery INFO lines only
    analyze          after every 5,000 rows ingested, ANALYZE the outbox, delivery and booking
                     tables (PostgreSQL): the planner's statistics follow a burst instead of
                     waiting up to a minute for autovacuum (see docs/benchmarks.md)

`bench.run --only drain --diagnose VARIANTS` runs drains with it; see docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import json
import logging
import os
import sys
import time
from typing import Any

from sqlalchemy import event

import app.db
import app.runtime
from app import slots as slots_module
from app.logs import configure_logging
from app.runtime import run_worker
from app.settings import load_settings
from app.store import dispatch as store_dispatch
from app.store import ingest as store_ingest
from app.store import outcomes as store_outcomes

STATS: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0, 0.0])
COUNTS: collections.Counter[str] = collections.Counter()


def _instrument_store() -> None:
    # The store's concerns, as the `Store` facade delegates to them.
    sizes = {
        "ingest": (store_ingest.Ingest, "run", lambda r: r.rows if r else 0),
        "claim_due": (store_dispatch.Dispatch, "claim_due", len),
        "record": (store_outcomes.Outcomes, "record", len),
    }
    for name, (owner, attribute, size) in sizes.items():
        original = getattr(owner, attribute)

        def make(original: Any = original, name: str = name, size: Any = size) -> Any:
            async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                result = await original(self, *args, **kwargs)
                entry = STATS[name]
                entry[0] += 1
                entry[1] += size(result)
                entry[2] += time.perf_counter() - start
                return result

            return wrapper

        setattr(owner, attribute, make())


def _instrument_engine(no_pre_ping: bool) -> None:
    original = app.db.create_engine

    def create_engine(database_url: str, **kwargs: Any) -> Any:
        engine = original(database_url, **kwargs)
        if no_pre_ping:
            engine.sync_engine.pool._pre_ping = False

        @event.listens_for(engine.sync_engine, "before_cursor_execute")
        def _statement(*_: Any) -> None:
            COUNTS["statements"] += 1

        @event.listens_for(engine.sync_engine.pool, "checkout")
        def _checkout(*_: Any) -> None:
            COUNTS["checkouts"] += 1

        return engine

    app.db.create_engine = create_engine
    app.runtime.create_engine = create_engine  # type: ignore[attr-defined]


def _claim_ahead(batch_size: int) -> None:
    """Let dispatch claim a whole batch beyond the request slots."""

    def free(self: Any) -> int:
        return max(0, batch_size - len(self.in_flight))

    slots_module.RequestSlots.free = free  # type: ignore[method-assign]


def _analyze_on_burst(every_rows: int = 5000) -> None:
    original = store_ingest.Ingest.run
    state = {"since": 0}

    async def ingest(self: Any, *args: Any, **kwargs: Any) -> Any:
        report = await original(self, *args, **kwargs)
        if report is not None and report.rows and self.tools.dialect == "postgresql":
            state["since"] += report.rows
            if state["since"] >= every_rows:
                state["since"] = 0
                async with self.tools.engine.connect() as conn:
                    await conn.exec_driver_sql(
                        "ANALYZE mozrest_outbox, mozrest_delivery, mozrest_booking"
                    )
                    await conn.commit()
                COUNTS["analyzes"] += 1
        return report

    store_ingest.Ingest.run = ingest  # type: ignore[method-assign]


def _quiet() -> None:
    logging.getLogger("mozrest_relay.worker").setLevel(logging.WARNING)


def report() -> None:
    usage = os.times()
    out: dict[str, Any] = {
        name: {
            "calls": int(v[0]),
            "rows": int(v[1]),
            "rows_per_call": round(v[1] / max(v[0], 1), 1),
            "ms_per_call": round(1000 * v[2] / max(v[0], 1), 2),
        }
        for name, v in STATS.items()
    }
    delivered = max(STATS["record"][1], 1)
    out["statements"] = COUNTS["statements"]
    out["checkouts"] = COUNTS["checkouts"]
    out["analyzes"] = COUNTS["analyzes"]
    out["statements_per_delivery"] = round(COUNTS["statements"] / delivered, 2)
    out["cpu_seconds"] = round(usage.user + usage.system, 2)
    out["cpu_ms_per_delivery"] = round(1000 * (usage.user + usage.system) / delivered, 3)
    print("DIAGNOSE " + json.dumps(out), file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        choices=("no-pre-ping", "claim-ahead", "quiet", "analyze"),
    )
    args = parser.parse_args()
    _instrument_store()
    _instrument_engine("no-pre-ping" in args.variant)
    settings = load_settings()
    if "claim-ahead" in args.variant:
        _claim_ahead(settings.relay_batch_size)
    if "analyze" in args.variant:
        _analyze_on_burst()
    settings.check_can_send()
    configure_logging(level=settings.relay_log_level, fmt=settings.relay_log_format)
    if "quiet" in args.variant:
        _quiet()
    atexit.register(report)
    asyncio.run(run_worker(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
