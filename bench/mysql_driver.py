"""Which async MySQL driver the relay uses: asyncmy against aiomysql on the relay's own statements.

Usage: .venv/bin/python bench/mysql_driver.py  (MariaDB/MySQL on 127.0.0.1:3306, user root)
Runs an ingest-like batch (multi-row INSERT, IN-list SELECT, executemany UPDATE) and single-row
round trips, three rounds per driver, and prints medians.
"""

from __future__ import annotations

import asyncio
import statistics
import time

from sqlalchemy import bindparam, select, text, update

from app.db import create_engine
from app.migrate import upgrade
from app.models import outbox

DATABASE = "mozrest_driver_bench"
ROWS = 200
ROUNDS = 3
PAYLOAD = {
    "bookingId": "b",
    "venueId": "v1",
    "partySize": 4,
    "status": "seated",
    "tables": ["T1"],
    "date": 1639578600,
}


async def measure(driver: str) -> tuple[float, float]:
    engine = create_engine(f"mysql+{driver}://root@127.0.0.1:3306/{DATABASE}")
    try:
        start = time.perf_counter()
        for _ in range(500):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        round_trips = 500 / (time.perf_counter() - start)
        start = time.perf_counter()
        for batch in range(20):
            async with engine.begin() as conn:
                await conn.execute(
                    outbox.insert(),
                    [
                        {"booking_id": f"b{batch}-{i}", "venue_id": "v1", "payload": PAYLOAD}
                        for i in range(ROWS)
                    ],
                )
                ids = (
                    (
                        await conn.execute(
                            select(outbox.c.id)
                            .where(outbox.c.processed_at.is_(None))
                            .order_by(outbox.c.id)
                            .limit(ROWS)
                        )
                    )
                    .scalars()
                    .all()
                )
                await conn.execute(
                    update(outbox)
                    .where(outbox.c.id == bindparam("i"))
                    .values(outcome="queued", processed_at=text("UTC_TIMESTAMP(6)")),
                    [{"i": i} for i in ids],
                )
        rows_per_second = 20 * ROWS / (time.perf_counter() - start)
        return round_trips, rows_per_second
    finally:
        await engine.dispose()


async def main() -> None:
    admin = create_engine("mysql+asyncmy://root@127.0.0.1:3306/")
    async with admin.connect() as conn:
        await conn.execute(text(f"DROP DATABASE IF EXISTS {DATABASE}"))
        await conn.execute(text(f"CREATE DATABASE {DATABASE} CHARACTER SET utf8mb4"))
    await asyncio.to_thread(upgrade, f"mysql+asyncmy://root@127.0.0.1:3306/{DATABASE}")
    results: dict[str, list[tuple[float, float]]] = {"asyncmy": [], "aiomysql": []}
    for _ in range(ROUNDS):
        for driver in results:
            results[driver].append(await measure(driver))
    async with admin.connect() as conn:
        await conn.execute(text(f"DROP DATABASE IF EXISTS {DATABASE}"))
    await admin.dispose()
    for driver, runs in results.items():
        print(
            f"{driver:9} round trips/s {statistics.median(r[0] for r in runs):8.0f}   "
            f"ingest-like rows/s {statistics.median(r[1] for r in runs):8.0f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
