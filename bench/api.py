"""`make bench-api`: latency of the admin API's list endpoints over 1,000,000 deliveries.

    python -m bench.api [--rows 1000000] [--samples 300] [--output bench/results/api.json]

A fresh PostgreSQL database gets `--rows` deliveries and as many outbox rows, bulk-inserted with
SQL over a week of history: statuses as a healthy relay leaves them (mostly delivered, some
superseded, a little dead, retrying, pending and cancelled), 500 venues of very different sizes
(a few big ones, a long tail), bookings with one to two deliveries each, and outbox outcomes
(mostly queued, some superseded, unchanged and held, 0.5% invalid with an error). Then
`mozrest-relay api` serves it and one client asks each endpoint `--samples` times in a row (closed
loop, random filter values per request); p50 and p99 of the wall time per request, client side.
Target (issue 6): p99 <= 20 ms for a filtered page.

Then the operator console's pages over the same rows (`bench/console_pages.py`, which adds the
venues, bookings, attempts and audit rows the console reads): p50 and p99 per page, each page
flagged when its p99 is 300 ms or more. `--console-samples` requests per page (default 100);
`--no-console` skips them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import (
    RELAY,
    Proc,
    Workdir,
    _clean_env,
    free_port,
    log,
    machine_summary,
    migrate,
    percentile,
    pg_connect,
    pg_database,
    pg_url,
    spawn,
)
from bench.console_pages import (
    console_target,
    console_values,
    load_console_world,
    measure_console,
    print_console,
)
from bench.profile_summary import summarise
from bench.scenarios import _start_profiler, _stop_profiler

RESULTS = Path(__file__).resolve().parent / "results"
TOKEN = "bench-admin-token"
VENUES = 500
TARGET_P99_MS = 20.0
#: Measured beside issue 6's endpoints, but not part of its target.
EXTRA_CASES = ("/api/deliveries?status=dead&venue_id= (big venue)",)

# Venue skew: v = floor(500 * r^3) puts about a fifth of the rows in the 5 biggest venues.
_VENUE = "'60e890aca5f0' || lpad(to_hex(floor(500 * power(random(), 3))::int), 12, '0')"
_BOOKING = "lpad(to_hex(g * 2 / 3), 24, '0')"
_PAYLOAD = (
    "jsonb_build_object('bookingId', {b}, 'venueId', {v}, 'partySize', 1 + g % 8, "
    "'status', 'seated', 'tables', jsonb_build_array('28c3ce8b-8c10-4a64-8099-' || "
    "lpad(to_hex(g % 4096), 12, '0')), 'date', 1764000000 + g, 'contact', jsonb_build_object("
    "'firstname', 'John', 'lastname', 'Doe', 'email', 'john.doe@mail.com', 'telephone', "
    "'34646223399', 'locale', 'en'), 'notes', 'I am allergic to peanuts')"
)


async def load(database: str, rows: int) -> dict[str, float]:
    """Deliveries and outbox rows over the last 7 days, ids in time order."""
    started = time.monotonic()

    async def deliveries() -> None:
        conn = await pg_connect(database)
        try:
            await conn.execute("SELECT setseed(0.42)")
            await conn.execute(
                f"""
                INSERT INTO mozrest_delivery (booking_id, venue_id, outbox_id, payload, status,
                    attempt_count, changed_fields, warnings, created_at, updated_at,
                    next_attempt_at, delivered_at, last_status_code, last_error,
                    outbox_created_at)
                SELECT b, v, g, {_PAYLOAD.format(b="b", v="v")}, s,
                       CASE WHEN s IN ('dead', 'retrying') THEN 3 WHEN s = 'delivered' THEN 1
                            ELSE 0 END,
                       '["status"]', '[]', t, t,
                       CASE WHEN s IN ('pending', 'retrying') THEN t + interval '1 minute' END,
                       CASE WHEN s = 'delivered' THEN t END,
                       CASE WHEN s = 'delivered' THEN 200 WHEN s = 'dead' THEN 400
                            WHEN s = 'retrying' THEN 503 END,
                       CASE WHEN s = 'dead' THEN 'HTTP 400' WHEN s = 'retrying' THEN 'HTTP 503'
                       END,
                       t
                FROM (
                    SELECT g, {_BOOKING} AS b, {_VENUE} AS v,
                           now() - interval '7 days' + (g * interval '7 days' / $1) AS t,
                           CASE WHEN r < 0.940 THEN 'delivered' WHEN r < 0.980 THEN 'superseded'
                                WHEN r < 0.988 THEN 'dead' WHEN r < 0.991 THEN 'retrying'
                                WHEN r < 0.995 THEN 'pending' ELSE 'cancelled' END AS s
                    FROM (SELECT g, random() AS r FROM generate_series(1, $1) g) x
                ) y
                """,
                rows,
            )
            await conn.execute("VACUUM ANALYZE mozrest_delivery")
        finally:
            await conn.close()

    async def outbox() -> None:
        conn = await pg_connect(database)
        try:
            await conn.execute("SELECT setseed(0.17)")
            await conn.execute(
                f"""
                INSERT INTO mozrest_outbox (booking_id, venue_id, payload, created_at,
                                            processed_at, outcome, error)
                SELECT b, v, {_PAYLOAD.format(b="b", v="v")}, t, t, o,
                       CASE WHEN o = 'invalid' THEN 'partySize: must be an integer, got a string'
                       END
                FROM (
                    SELECT g, {_BOOKING} AS b, {_VENUE} AS v,
                           now() - interval '7 days' + (g * interval '7 days' / $1) AS t,
                           CASE WHEN r < 0.850 THEN 'queued' WHEN r < 0.910 THEN 'superseded'
                                WHEN r < 0.960 THEN 'unchanged' WHEN r < 0.995 THEN 'held'
                                ELSE 'invalid' END AS o
                    FROM (SELECT g, random() AS r FROM generate_series(1, $1) g) x
                ) y
                """,
                rows,
            )
            await conn.execute("VACUUM ANALYZE mozrest_outbox")
        finally:
            await conn.close()

    await asyncio.gather(deliveries(), outbox())
    return {"load_seconds": round(time.monotonic() - started, 1)}


async def sample_values(database: str) -> dict[str, list[str]]:
    conn = await pg_connect(database)
    try:
        big = await conn.fetch(
            "SELECT venue_id FROM mozrest_delivery GROUP BY venue_id ORDER BY count(*) DESC LIMIT 5"
        )
        small = await conn.fetch(
            "SELECT venue_id FROM mozrest_delivery GROUP BY venue_id ORDER BY count(*) LIMIT 50"
        )
        bookings = await conn.fetch(
            "SELECT booking_id FROM mozrest_delivery TABLESAMPLE SYSTEM (1) LIMIT 2000"
        )
        counts = dict(
            await conn.fetch("SELECT status, count(*) FROM mozrest_delivery GROUP BY status")
        )
    finally:
        await conn.close()
    return {
        "big_venues": [r[0] for r in big],
        "small_venues": [r[0] for r in small],
        "bookings": [r[0] for r in bookings],
        "status_counts": {k: int(v) for k, v in counts.items()},  # type: ignore[dict-item]
    }


async def explain(database: str, big_venue: str) -> dict[str, str]:
    """The plans behind the slowest-looking filters, as evidence (EXPLAIN ANALYZE)."""
    queries = {
        "status=dead": "SELECT id FROM mozrest_delivery WHERE status = 'dead' "
        "ORDER BY id DESC LIMIT 51",
        "outcome=invalid": "SELECT id FROM mozrest_outbox WHERE outcome = 'invalid' "
        "ORDER BY id DESC LIMIT 51",
        "status=dead&venue_id=(big)": "SELECT id FROM mozrest_delivery WHERE status = 'dead' "
        "AND venue_id = $1 ORDER BY id DESC LIMIT 51",
    }
    conn = await pg_connect(database)
    try:
        out = {}
        for name, sql in queries.items():
            args = [big_venue] if "$1" in sql else []
            rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) {sql}", *args)
            out[name] = "\n".join(r[0] for r in rows)
        return out
    finally:
        await conn.close()


async def measure(
    base: str, samples: int, values: dict[str, Any], rng: random.Random
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    results: dict[str, Any] = {}
    async with aiohttp.ClientSession(headers=headers) as session:

        async def get(path: str) -> tuple[float, dict[str, Any]]:
            start = time.perf_counter()
            async with session.get(base + path) as response:
                body = await response.read()
                elapsed = (time.perf_counter() - start) * 1000
                if response.status != 200:
                    raise RuntimeError(f"GET {path}: {response.status} {body[:300]!r}")
            return elapsed, json.loads(body)

        # Cursors for the "second page" cases, taken from real first pages.
        _, first = await get("/api/deliveries")
        _, first_dead = await get("/api/deliveries?status=dead")
        cases: dict[str, Any] = {
            "/api/deliveries": lambda: "/api/deliveries",
            "/api/deliveries?status=dead": lambda: "/api/deliveries?status=dead",
            "/api/deliveries?status=retrying": lambda: "/api/deliveries?status=retrying",
            "/api/deliveries?venue_id= (big venue)": lambda: (
                f"/api/deliveries?venue_id={rng.choice(values['big_venues'])}"
            ),
            "/api/deliveries?venue_id= (small venue)": lambda: (
                f"/api/deliveries?venue_id={rng.choice(values['small_venues'])}"
            ),
            "/api/deliveries?booking_id=": lambda: (
                f"/api/deliveries?booking_id={rng.choice(values['bookings'])}"
            ),
            "/api/deliveries second page (cursor)": lambda: (
                f"/api/deliveries?cursor={first['next_cursor']}"
            ),
            "/api/deliveries?status=dead second page": lambda: (
                f"/api/deliveries?status=dead&cursor={first_dead['next_cursor']}"
            ),
            "/api/deliveries?status=dead&venue_id= (big venue)": lambda: (
                f"/api/deliveries?status=dead&venue_id={rng.choice(values['big_venues'])}"
            ),
            "/api/outbox?outcome=invalid": lambda: "/api/outbox?outcome=invalid",
        }
        for name, path_of in cases.items():
            for _ in range(min(20, samples)):  # warm-up: connection, caches, prepared plans
                await get(path_of())
            times = []
            items = 0
            for _ in range(samples):
                elapsed, body = await get(path_of())
                times.append(elapsed)
                items += len(body.get("items", []))
            results[name] = {
                "p50_ms": round(percentile(times, 50) or 0, 2),
                "p99_ms": round(percentile(times, 99) or 0, 2),
                "max_ms": round(max(times), 2),
                "samples": samples,
                "avg_items": round(items / samples, 1),
            }
            log(f"api {name}: p50 {results[name]['p50_ms']} ms, p99 {results[name]['p99_ms']} ms")
    return results


async def run(
    rows: int,
    samples: int,
    workdir: Path,
    profile: Path | None = None,
    console_samples: int = 100,
) -> dict[str, Any]:
    async with pg_database("api") as database:
        url = pg_url(database)
        await migrate(url, workdir=workdir)
        loaded = await load(database, rows)
        log(f"loaded {rows:,} deliveries and {rows:,} outbox rows in {loaded['load_seconds']}s")
        if console_samples:
            loaded.update(await load_console_world(database))
            log(f"loaded the console's venues, bookings, attempts, audit in {loaded}")
        values = await sample_values(database)
        port = free_port()
        env = {
            **_clean_env(),
            "DATABASE_URL": url,
            "RELAY_ADMIN_TOKEN": TOKEN,
            "RELAY_PORT": str(port),
        }
        proc: Proc = spawn("api", [RELAY, "api"], env=env, workdir=workdir)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 30
            async with aiohttp.ClientSession() as session:
                while True:
                    try:
                        async with session.get(base + "/readyz") as response:
                            if response.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    if time.monotonic() > deadline or not proc.alive():
                        raise RuntimeError(f"the API did not become ready:\n{proc.tail()}")
                    await asyncio.sleep(0.1)
            profiler = None
            if profile is not None:
                profiler = _start_profiler(proc.pid, profile, seconds=600)
            try:
                results = await measure(base, samples, values, random.Random(7))
                pages: dict[str, Any] = {}
                if console_samples:
                    values.update(await console_values(database))
                    pages = await measure_console(
                        base, TOKEN, console_samples, values, random.Random(11)
                    )
            finally:
                if profiler is not None:
                    _stop_profiler(profiler)
            plans = await explain(database, values["big_venues"][0])
        finally:
            proc.stop()
    # Issue 6's list: the plain list, each single filter, a second page, the outbox filter.
    # The combined status+venue filter is measured too but is not one of them.
    filtered = {
        k: v
        for k, v in results.items()
        if ("?" in k or "second page" in k) and k not in EXTRA_CASES
    }
    worst_name, worst = max(filtered.items(), key=lambda kv: kv[1]["p99_ms"])
    extra = {k: results[k] for k in EXTRA_CASES if k in results}
    return {
        "rows": rows,
        "load": loaded,
        "status_counts": values["status_counts"],
        "endpoints": results,
        "target": {
            "filtered page p99 <= 20 ms": worst["p99_ms"] <= TARGET_P99_MS,
            "worst_filtered_p99_ms": worst["p99_ms"],
            "worst_filtered": worst_name,
            "extra_cases_meeting_it": {k: v["p99_ms"] <= TARGET_P99_MS for k, v in extra.items()},
        },
        "plans": plans,
        **({"console_pages": pages, "console_target": console_target(pages)} if pages else {}),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--output", type=Path, default=RESULTS / "api.json")
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument("--console-samples", type=int, default=100)
    parser.add_argument("--no-console", dest="console_samples", action="store_const", const=0)
    args = parser.parse_args()
    workdir = Workdir()
    profile = workdir.path / "api-profile.txt" if args.profile else None
    try:
        report = asyncio.run(
            run(
                args.rows,
                min(args.samples, 5000),
                workdir.path,
                profile,
                console_samples=min(args.console_samples, 5000),
            )
        )
        if profile is not None and profile.exists():
            report["profile"] = summarise(profile, top=20)
    finally:
        workdir.cleanup()
    report["machine"] = machine_summary()
    RESULTS.mkdir(exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nadmin API over {args.rows:,} deliveries ({args.samples} requests each, one client)")
    print(f"{'endpoint':<52} {'p50 ms':>8} {'p99 ms':>8} {'items':>6}")
    for name, r in report["endpoints"].items():
        print(f"{name:<52} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['avg_items']:>6.0f}")
    t = report["target"]
    met = "met" if t["filtered page p99 <= 20 ms"] else "NOT met"
    print(
        f"target p99 <= 20 ms for a filtered page: {met} "
        f"(worst {t['worst_filtered_p99_ms']} ms, {t['worst_filtered']})"
    )
    for name, ok in t["extra_cases_meeting_it"].items():
        print(f"  beyond the issue's list: {name}: {'within' if ok else 'over'} 20 ms at p99")
    print_console(report)
    if report.get("profile"):
        print("where the API process spends its time (py-spy, inclusive % of samples):")
        for name, share in list(report["profile"]["components"].items())[:8]:
            print(f"  {share:5.1f}%  {name}")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
