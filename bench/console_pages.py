"""The operator console's pages over the same 1,000,000 deliveries (`make bench-api`).

`bench/api.py` loads deliveries and outbox rows; `load_console_world` adds what the console reads
beside them, as a relay that ran for a week leaves it: the venues (a few paused), one booking row
per booking, every attempt (one per delivered delivery, three per dead or retrying one, with
Mozrest's answers: a few causes, so the failure groups have something to group) and 20,000 audit
rows. Then one client signs in through the form like a browser and asks each page `samples`
times in a row; p50 and p99 of the wall time per page, client side. Target: every page under
300 ms.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from bench.common import log, percentile, pg_connect

TARGET_MS = 300.0
#: Venues paused for the Overview and Venues pages to show.
PAUSED_VENUES = 3
AUDIT_ROWS = 20_000
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_GROUP = re.compile(r'href="/console/groups/([0-9a-f]+)/retry"')
_NEXT = re.compile(r'href="(/console/deliveries\?[^"]*cursor=[^"]+)" rel="next"')

# Dead deliveries' answers: Mozrest's 400s and 422s, one of five causes by delivery id.
_DEAD_ANSWER = """
CASE d.id % 5
  WHEN 0 THEN '{"detail": "Unknown SKU(s): GHOST-' || (d.id % 3) || '"}'
  WHEN 1 THEN '{"detail": "partySize: must be an integer of at least 1, got 0"}'
  WHEN 2 THEN '{"detail": "tables: must be an array of strings, got null", "field": "tables"}'
  WHEN 3 THEN '{"detail": "venue is not connected to a POS"}'
  ELSE '{"detail": "Unknown SKU(s): PIZZA-' || (d.id % 2) || '"}'
END
"""


async def load_console_world(database: str) -> dict[str, float]:
    """Venues, bookings, attempts and audit rows beside the loaded deliveries."""
    started = time.monotonic()
    conn = await pg_connect(database)
    try:
        await conn.execute(
            """
            INSERT INTO mozrest_venue (venue_id, created_at, updated_at)
            SELECT venue_id, min(created_at), min(created_at) FROM mozrest_delivery
            GROUP BY venue_id
            """
        )
        await conn.execute(
            """
            UPDATE mozrest_venue SET paused = true, paused_at = now() - interval '2 hours',
                   paused_by = 'otto', pause_reason = 'POS swap tonight'
            WHERE venue_id IN (SELECT venue_id FROM mozrest_venue ORDER BY venue_id LIMIT $1)
            """,
            PAUSED_VENUES,
        )
        await conn.execute(
            """
            INSERT INTO mozrest_booking (booking_id, venue_id, last_outbox_id, sent_outbox_id,
                reached_send_status, accepted_outbox_id, accepted_at, created_at, updated_at)
            SELECT booking_id, min(venue_id), max(outbox_id), max(outbox_id), true,
                   max(outbox_id) FILTER (WHERE status = 'delivered'), max(delivered_at),
                   min(created_at), max(updated_at)
            FROM mozrest_delivery GROUP BY booking_id
            """
        )
        await conn.execute(
            f"""
            INSERT INTO mozrest_attempt (delivery_id, worker_id, started_at, duration_ms,
                                         status_code, error, response_body)
            SELECT d.id, 'bench-worker', d.updated_at - (d.attempt_count - n) * interval '1 min',
                   20 + d.id % 60, d.last_status_code, d.last_error,
                   CASE WHEN d.status = 'delivered'
                        THEN '{{"status": "ok", "bookingId": "' || d.booking_id || '"}}'
                        WHEN d.status = 'dead' THEN {_DEAD_ANSWER}
                        ELSE '{{"detail": "Service Unavailable"}}' END
            FROM mozrest_delivery d, generate_series(1, d.attempt_count) n
            WHERE d.attempt_count > 0
            ORDER BY d.id, n
            """
        )
        await conn.execute(
            """
            INSERT INTO mozrest_audit (at, actor, action, target, result, detail, client)
            SELECT now() - (g * interval '30 seconds'), (ARRAY['otto', 'admin', 'vera'])[1 + g % 3],
                   (ARRAY['delivery.retry', 'venue.pause', 'venue.resume',
                          'deliveries.retry_bulk'])[1 + g % 4],
                   (g * 37)::text, CASE WHEN g % 3 = 2 THEN 'refused' ELSE 'ok' END,
                   '{}'::jsonb, '10.0.0.' || (g % 250)
            FROM generate_series(1, $1) g
            """,
            AUDIT_ROWS,
        )
        for table in ("mozrest_venue", "mozrest_booking", "mozrest_attempt", "mozrest_audit"):
            await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()
    return {"console_load_seconds": round(time.monotonic() - started, 1)}


async def console_values(database: str) -> dict[str, Any]:
    conn = await pg_connect(database)
    try:
        dead = await conn.fetch(
            "SELECT id FROM mozrest_delivery WHERE status = 'dead' ORDER BY random() LIMIT 500"
        )
        delivered = await conn.fetch(
            "SELECT id FROM mozrest_delivery TABLESAMPLE SYSTEM (1) WHERE status = 'delivered' "
            "LIMIT 500"
        )
    finally:
        await conn.close()
    return {"dead_ids": [r[0] for r in dead], "delivered_ids": [r[0] for r in delivered]}


async def sign_in(session: aiohttp.ClientSession, base: str, token: str) -> None:
    """Through the form, as a browser does: the page's CSRF nonce, then the POST."""
    async with session.get(f"{base}/console/sign-in") as page:
        found = _CSRF.search(await page.text())
    assert found is not None, "no CSRF token on the sign-in page"
    async with session.post(
        f"{base}/console/sign-in",
        data={"token": token, "csrf": found.group(1), "next": "/console"},
        allow_redirects=False,
    ) as answer:
        if answer.status != 303:
            raise RuntimeError(f"console sign-in: {answer.status} {await answer.text()}")


async def measure_console(
    base: str, token: str, samples: int, values: dict[str, Any], rng: random.Random
) -> dict[str, Any]:
    """p50 and p99 per console page; the pages are asked one after another, never at once."""
    jar = aiohttp.CookieJar(unsafe=True)  # cookies for 127.0.0.1
    results: dict[str, Any] = {}
    async with aiohttp.ClientSession(cookie_jar=jar) as session:
        await sign_in(session, base, token)

        async def get(path: str) -> tuple[float, str]:
            start = time.perf_counter()
            async with session.get(base + path, allow_redirects=False) as response:
                body = await response.text()
                elapsed = (time.perf_counter() - start) * 1000
                if response.status != 200:
                    raise RuntimeError(f"GET {path}: {response.status} {body[:300]!r}")
            return elapsed, body

        _, deliveries = await get("/console/deliveries")
        group = _GROUP.search(deliveries)
        next_page = _NEXT.search(deliveries)
        assert group is not None and next_page is not None, "no failure group or Next link"
        day = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
        window = f"since={day:%Y-%m-%dT%H:%M:%S}&until={day + timedelta(hours=1):%Y-%m-%dT%H:%M:%S}"
        big, small = values["big_venues"], values["small_venues"]
        cases: dict[str, Callable[[], str]] = {
            "Overview /console": lambda: "/console",
            "Deliveries /console/deliveries (with failure groups)": lambda: "/console/deliveries",
            "Deliveries ?status=dead": lambda: "/console/deliveries?status=dead",
            "Deliveries ?venue_id= (big venue)": lambda: (
                f"/console/deliveries?venue_id={rng.choice(big)}"
            ),
            "Deliveries ?venue_id= (small venue)": lambda: (
                f"/console/deliveries?venue_id={rng.choice(small)}"
            ),
            "Deliveries ?status=dead&venue_id= (big venue)": lambda: (
                f"/console/deliveries?status=dead&venue_id={rng.choice(big)}"
            ),
            "Deliveries ?booking_id=": lambda: (
                f"/console/deliveries?booking_id={rng.choice(values['bookings'])}"
            ),
            "Deliveries ?since=&until= (one hour, 3 days ago)": lambda: (
                f"/console/deliveries?{window}"
            ),
            "Deliveries ?status=dead&since=&until=": lambda: (
                f"/console/deliveries?status=dead&{window}"
            ),
            "Deliveries, Next page (cursor)": lambda: next_page.group(1).replace("&amp;", "&"),
            "Retry all matching: confirm ?status=dead": lambda: (
                "/console/deliveries/retry?status=dead"
            ),
            "Retry group: confirm (the largest group)": lambda: (
                f"/console/groups/{group.group(1)}/retry"
            ),
            "Delivery /console/deliveries/{id} (dead)": lambda: (
                f"/console/deliveries/{rng.choice(values['dead_ids'])}"
            ),
            "Delivery /console/deliveries/{id} (delivered)": lambda: (
                f"/console/deliveries/{rng.choice(values['delivered_ids'])}"
            ),
            "Booking /console/bookings/{id}": lambda: (
                f"/console/bookings/{rng.choice(values['bookings'])}"
            ),
            "Erase: confirm /console/erase?booking_id=": lambda: (
                f"/console/erase?booking_id={rng.choice(values['bookings'])}"
            ),
            "Outbox /console/outbox": lambda: "/console/outbox",
            "Outbox ?outcome=invalid": lambda: "/console/outbox?outcome=invalid",
            "Venues /console/venues": lambda: "/console/venues",
            "Resync: confirm ?venue_id= (big venue)": lambda: (
                f"/console/venues/resync?venue_id={rng.choice(big)}"
            ),
            "Audit /console/audit": lambda: "/console/audit",
            "Audit ?action=venue.pause": lambda: "/console/audit?action=venue.pause",
            "Sign-in /console/sign-in": lambda: "/console/sign-in",
        }
        for name, path_of in cases.items():
            for _ in range(min(5, samples)):  # warm-up: connection, caches, prepared plans
                await get(path_of())
            times = [(await get(path_of()))[0] for _ in range(samples)]
            p50, p99 = percentile(times, 50) or 0.0, percentile(times, 99) or 0.0
            results[name] = {
                "p50_ms": round(p50, 1),
                "p99_ms": round(p99, 1),
                "max_ms": round(max(times), 1),
                "samples": samples,
                "over_target": p99 > TARGET_MS,
            }
            flag = "  OVER 300 ms" if p99 > TARGET_MS else ""
            log(f"console {name}: p50 {p50:.1f} ms, p99 {p99:.1f} ms{flag}")
    return results


def console_target(pages: dict[str, Any]) -> dict[str, Any]:
    worst_name, worst = max(pages.items(), key=lambda kv: kv[1]["p99_ms"])
    return {
        "every page p99 < 300 ms": not any(p["over_target"] for p in pages.values()),
        "over": sorted(name for name, p in pages.items() if p["over_target"]),
        "worst_p99_ms": worst["p99_ms"],
        "worst": worst_name,
    }


def print_console(report: dict[str, Any]) -> None:
    pages = report.get("console_pages")
    if not pages:
        return
    samples = next(iter(pages.values()))["samples"]
    print(f"\nconsole pages over the same deliveries ({samples} requests each, one client)")
    print(f"{'page':<52} {'p50 ms':>8} {'p99 ms':>8}")
    for name, r in pages.items():
        flag = "  OVER 300 ms" if r["over_target"] else ""
        print(f"{name:<52} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f}{flag}")
    t = report["console_target"]
    met = "met" if t["every page p99 < 300 ms"] else "NOT met: " + ", ".join(t["over"])
    print(f"target: every console page under 300 ms at p99: {met} (worst {t['worst_p99_ms']} ms)")
