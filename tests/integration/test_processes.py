"""Real `mozrest-relay` processes: several workers on one database, SIGKILL, SIGTERM, start-up
refusals and `enqueue`, against the emulator served by `mozrest-relay emulator`.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import READ_ONLY
from app.models import attempt, delivery, outbox
from app.models import worker as worker_table
from tests.conftest import PYTHON, Launcher, Process, eventually
from tests.factories import state

TOKEN = "test-token"


def worker_env(database_url: str, emulator: Process, **extra: str) -> dict[str, str]:
    assert emulator.url is not None
    return {
        "DATABASE_URL": database_url,
        "MOZREST_WEBHOOK_URL": f"{emulator.url}/rms",
        "MOZREST_WEBHOOK_TOKEN": TOKEN,
        "RELAY_POLL_INTERVAL": "20ms",
        "RELAY_RETRY_BASE_DELAY": "50ms",
        "RELAY_RETRY_MAX_DELAY": "200ms",
        "RELAY_CIRCUIT_COOLDOWN": "300ms",
        "RELAY_HEARTBEAT_INTERVAL": "1s",
        "RELAY_LOG_LEVEL": "info",
        **extra,
    }


class World:
    """The database and the emulator's control API, as a test reads and drives them."""

    def __init__(self, engine: AsyncEngine, emulator: httpx.AsyncClient) -> None:
        self.engine = engine
        self.reader = engine.execution_options(**{READ_ONLY: True})
        self.emulator = emulator

    async def insert(self, *payloads: dict[str, Any]) -> list[int]:
        """One transaction per state, as the RMS writes them."""
        ids = []
        for payload in payloads:
            async with self.engine.begin() as conn:
                result = await conn.execute(
                    outbox.insert()
                    .values(
                        booking_id=payload["bookingId"],
                        venue_id=payload["venueId"],
                        payload=payload,
                    )
                    .returning(outbox.c.id)
                )
                ids.append(int(result.scalar_one()))
        return ids

    async def insert_many(self, payloads: list[dict[str, Any]]) -> None:
        """Many states in one transaction."""
        async with self.engine.begin() as conn:
            await conn.execute(
                outbox.insert(),
                [
                    {"booking_id": p["bookingId"], "venue_id": p["venueId"], "payload": p}
                    for p in payloads
                ],
            )

    async def rows(self, table: Any) -> list[Any]:
        async with self.reader.connect() as conn:
            return list(await conn.execute(select(table).order_by(*table.primary_key.columns)))

    async def registered(self, count: int) -> bool:
        async with self.reader.connect() as conn:
            rows = (
                await conn.execute(
                    select(worker_table.c.id).where(worker_table.c.stopped_at.is_(None))
                )
            ).all()
        return len(rows) == count

    async def set_faults(self, **faults: Any) -> None:
        (await self.emulator.put("/_emulator/faults", json=faults)).raise_for_status()

    async def clear_faults(self) -> None:
        (await self.emulator.delete("/_emulator/faults")).raise_for_status()

    async def requests(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = (await self.emulator.get("/_emulator/requests")).json()[
            "items"
        ]
        return items

    async def landed(self) -> dict[str, Any]:
        items = (await self.emulator.get("/_emulator/bookings")).json()["items"]
        return {booking_id: found["state"] for booking_id, found in items.items()}


@pytest.fixture
async def world(engine: AsyncEngine, launcher: Launcher) -> AsyncIterator[tuple[World, Process]]:
    emulator = launcher.emulator(token=TOKEN)
    async with httpx.AsyncClient(base_url=str(emulator.url), timeout=10) as client:
        yield World(engine, client), emulator


def by_booking(requests: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for request in requests:
        grouped[request["bookingId"]].append(request)
    for seen in grouped.values():
        seen.sort(key=lambda r: r["arrival_ns"])
    return grouped


def assert_one_at_a_time(requests: list[dict[str, Any]]) -> None:
    """No two requests for one booking overlapped in time at the emulator."""
    for booking_id, seen in by_booking(requests).items():
        for before, after in itertools.pairwise(seen):
            assert after["arrival_ns"] >= before["finished_ns"], f"{booking_id} overlapped"


def stop(process: Process) -> None:
    """SIGTERM and wait; a worker that does not exit 0 fails the test with its output."""
    code = process.terminate(timeout=20)
    assert code == 0, process.output()


# -- several processes --------------------------------------------------------------------------


async def test_two_workers_lose_nothing_and_keep_each_booking_in_order(
    world: tuple[World, Process], launcher: Launcher, database_url: str
) -> None:
    """Two workers on 200 bookings x 3 changes: every row processed, every final state landed,
    never two requests of one booking at once, never an older state after a newer one."""
    db, emulator = world
    await db.set_faults(latency_ms=30)
    env = worker_env(database_url, emulator)
    workers = [launcher.start("worker", env=env) for _ in range(2)]
    await eventually(lambda: db.registered(2), timeout=20, message="two workers registered")

    bookings = [f"bk-{n:03d}" for n in range(200)]
    rounds = [
        [state(b, partySize=2, notes="v1") for b in bookings],
        [state(b, partySize=3, notes="v2") for b in bookings],
        [state(b, partySize=4, notes="v3", tables=["T2"]) for b in bookings],
    ]
    for changes in rounds:
        # Each round in one transaction, so the rounds overlap with requests on the wire.
        await db.insert_many(changes)
        await asyncio.sleep(0.1)
    final = {s["bookingId"]: s for s in rounds[-1]}

    async def settled() -> bool:
        rows = await db.rows(outbox)
        deliveries = await db.rows(delivery)
        active = [d for d in deliveries if d.status in ("pending", "retrying")]
        return all(r.outcome is not None for r in rows) and not active

    await eventually(settled, timeout=60, message="every row processed and every delivery done")
    await eventually(lambda: _landed_equals(db, final), timeout=10, message="final states")
    for process in workers:
        stop(process)

    rows = await db.rows(outbox)
    assert len(rows) == 600
    assert {r.outcome for r in rows} <= {"queued", "superseded", "unchanged"}
    assert {d.status for d in await db.rows(delivery)} <= {"delivered", "superseded"}
    requests = await db.requests()
    assert all(r["status_code"] == 200 for r in requests)
    assert_one_at_a_time(requests)
    for booking_id, seen in by_booking(requests).items():
        sizes = [r["body"]["partySize"] for r in seen]
        assert sizes == sorted(sizes), f"{booking_id} went back in time: {sizes}"
    attempts = await db.rows(attempt)
    assert len(attempts) == len(requests)
    assert len({a.worker_id for a in attempts}) == 2, "both workers sent"


async def _landed_equals(db: World, expected: dict[str, Any]) -> bool:
    return await db.landed() == expected


async def test_a_killed_workers_claim_is_finished_by_another_after_its_lease(
    world: tuple[World, Process], launcher: Launcher, database_url: str
) -> None:
    """SIGKILL while a request is on the wire: another worker sends the booking once the lease
    ends, not before, and the delivery ends delivered."""
    db, emulator = world
    await db.set_faults(latency_ms=2000)
    env = worker_env(database_url, emulator, RELAY_LEASE_SECONDS="3", RELAY_HTTP_TIMEOUT="2")
    first = launcher.start("worker", env=env)
    await eventually(lambda: db.registered(1), timeout=20, message="worker registered")
    wanted = state("bk-killed")
    (row_id,) = await db.insert(wanted)

    async def claimed() -> Any:
        found = [d for d in await db.rows(delivery) if d.outbox_id == row_id]
        return found[0] if found and found[0].lease_owner is not None else None

    lease = await eventually(claimed, timeout=10, message="the delivery was claimed")
    await asyncio.sleep(0.3)  # the request is on the wire
    first.popen.send_signal(signal.SIGKILL)
    first.popen.wait(5)
    await db.clear_faults()

    launcher.start("worker", env=env)
    killed_at = time.monotonic()

    async def delivered() -> Any:
        found = [d for d in await db.rows(delivery) if d.outbox_id == row_id]
        return found[0] if found and found[0].status == "delivered" else None

    done = await eventually(delivered, timeout=3 + 10, message="delivered by the second worker")
    assert time.monotonic() - killed_at < 3 + 8
    assert (await db.landed())["bk-killed"] == wanted
    attempts = [a for a in await db.rows(attempt) if a.delivery_id == done.id]
    assert attempts, "the second worker recorded its attempt"
    assert all(a.worker_id != lease.lease_owner for a in attempts)
    # One at a time: the second worker waited for the killed worker's lease to end.
    assert min(a.started_at for a in attempts) >= lease.lease_expires_at
    requests = await db.requests()
    assert len(requests) == 2, "the killed worker's request reached Mozrest too"
    assert_one_at_a_time(requests)


async def test_sigterm_drains_in_flight_requests_and_exits_zero(
    world: tuple[World, Process], launcher: Launcher, database_url: str
) -> None:
    """SIGTERM with requests on the wire: exit 0 within the grace, every request that reached
    Mozrest recorded, unsent claims released; a new worker finishes the rest, nothing lost."""
    db, emulator = world
    await db.set_faults(latency_ms=1000)
    env = worker_env(
        database_url,
        emulator,
        RELAY_SHUTDOWN_GRACE="5",
        RELAY_CONCURRENCY="5",
        RELAY_LEASE_SECONDS="5",
        RELAY_HTTP_TIMEOUT="3",
    )
    first = launcher.start("worker", env=env)
    await eventually(lambda: db.registered(1), timeout=20, message="worker registered")
    wanted = {s["bookingId"]: s for s in (state(f"bk-{n:02d}") for n in range(20))}
    await db.insert(*wanted.values())

    async def in_flight() -> bool:
        return sum(d.lease_token is not None for d in await db.rows(delivery)) == 5

    await eventually(in_flight, timeout=10, message="five requests in flight")
    await asyncio.sleep(0.3)
    signalled = time.monotonic()
    first.popen.send_signal(signal.SIGTERM)
    code = first.popen.wait(5 + 5)
    assert code == 0, first.output()
    assert time.monotonic() - signalled <= 5 + 1
    assert "worker.stopped" in first.output()

    sent = await db.requests()
    assert sent, "requests were in flight at SIGTERM"
    deliveries = {d.id: d for d in await db.rows(delivery)}
    recorded = {
        (deliveries[a.delivery_id].booking_id, a.status_code) for a in await db.rows(attempt)
    }
    assert {(r["bookingId"], r["status_code"]) for r in sent} == recorded
    assert all(d.lease_token is None for d in deliveries.values()), "claims left behind"

    await db.clear_faults()
    second = launcher.start("worker", env=env)
    await eventually(lambda: _landed_equals(db, wanted), timeout=15, message="all landed")
    stop(second)
    assert {d.status for d in await db.rows(delivery)} == {"delivered"}
    assert all(r.outcome == "queued" for r in await db.rows(outbox))
    assert len(await db.requests()) == len(wanted)  # nothing sent twice


# -- start-up refusals --------------------------------------------------------------------------


def _clean_env(**values: str) -> dict[str, str]:
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RELAY_", "MOZREST_", "DATABASE_URL"))
    }
    return {**keep, **values}


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (
            {
                "MOZREST_WEBHOOK_URL": "http://127.0.0.1:9/rms",
                "RELAY_HTTP_TIMEOUT": "30",
                "RELAY_LEASE_SECONDS": "30",
            },
            ["RELAY_HTTP_TIMEOUT", "RELAY_LEASE_SECONDS"],
        ),
        ({"MOZREST_WEBHOOK_URL": "https://example.invalid/rms"}, ["MOZREST_WEBHOOK_TOKEN"]),
        (
            {"MOZREST_WEBHOOK_URL": "http://127.0.0.1:9/rms", "RELAY_POLL_INTERVAL": "abc"},
            ["RELAY_POLL_INTERVAL"],
        ),
    ],
    ids=["lease-not-longer-than-timeout", "no-token-for-a-real-url", "bad-duration"],
)
def test_worker_refuses_to_start_with_one_line_naming_the_variables(
    tmp_path: Path, settings: dict[str, str], named: list[str]
) -> None:
    """A configuration that breaks a rule stops `worker` at once, with one line on stderr."""
    env = _clean_env(DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/relay.db", **settings)
    result = subprocess.run(
        [PYTHON, "-m", "app", "worker"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for variable in named:
        assert variable in lines[0]
    if "MOZREST_WEBHOOK_TOKEN" not in named:
        assert TOKEN not in result.stderr


# -- enqueue ------------------------------------------------------------------------------------


def _enqueue(
    database_url: str, cwd: Path, argument: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "app", "enqueue", argument],
        cwd=cwd,
        env=_clean_env(DATABASE_URL=database_url),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def _outbox(engine: AsyncEngine) -> list[tuple[str, str, Any, Any]]:
    """The outbox as a plain SELECT shows it."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT booking_id, venue_id, payload, processed_at FROM mozrest_outbox ORDER BY id"
            )
        )
        return [
            (b, v, json.loads(p) if isinstance(p, str) else p, processed)
            for b, v, p, processed in rows
        ]


async def test_enqueue_inserts_a_row_from_a_file_or_stdin_and_refuses_bad_payloads(
    engine: AsyncEngine, database_url: str, tmp_path: Path
) -> None:
    """`enqueue FILE` and `enqueue -` insert the payload as the RMS would; an invalid one exits 2
    naming the field and writes nothing."""
    good = state("bk-file", prepayment=50.0, notes="by the window")
    path = tmp_path / "good.json"
    path.write_text(json.dumps(good))
    result = _enqueue(database_url, tmp_path, str(path))
    assert result.returncode == 0, result.stderr
    assert await _outbox(engine) == [("bk-file", "venue-1", good, None)]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(state("bk-bad", partySize=0)))
    result = _enqueue(database_url, tmp_path, str(bad))
    assert result.returncode == 2
    assert "partySize" in result.stderr
    assert len(await _outbox(engine)) == 1

    piped = state("bk-stdin", status="booked")
    result = _enqueue(database_url, tmp_path, "-", stdin=json.dumps(piped))
    assert result.returncode == 0, result.stderr
    assert (await _outbox(engine))[-1] == ("bk-stdin", "venue-1", piped, None)
