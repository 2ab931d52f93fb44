"""The benchmark scenarios of issue 6. Each returns a plain dict of results (JSON-ready)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import json
import random
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg

from app.contract import parse_state, states_equal
from bench.common import (
    DB_PREFIX,
    MARIADB_HOST,
    MARIADB_PORT,
    PG_HOST,
    PG_PORT,
    PG_USER,
    PYTHON,
    RELAY,
    ROOT,
    AutovacuumStandIn,
    CpuMeter,
    Receiver,
    RelayConfig,
    change,
    copy_outbox,
    dumps,
    log,
    migrate,
    percentile,
    pg_connect,
    pg_database,
    pg_url,
    rate_trace,
    run_child,
    seated_payload,
    spawn,
    start_worker,
    venue_id,
    wait_registered_pg,
)

if TYPE_CHECKING:  # PgQueuer is a `bench` extra: the smoke runs without it
    from bench.peers.pgqueuer_relay import PeerSettings

#: A drain that has not finished by then is reported as failed (bounded waits everywhere).
DRAIN_TIMEOUT = 600.0
#: Seconds between the harness's autovacuum passes (see `AutovacuumStandIn`); None: none.
#: `bench.run` sets it to PostgreSQL's default naptime when the server's autovacuum is off.
AUTOVACUUM_NAPTIME: float | None = None


def check_final_states(dump: dict[str, Any], expected: dict[str, dict]) -> dict[str, Any]:
    """Compare the receiver's last state per booking with the newest state written for it."""
    bookings = dump["bookings"]
    lost = [b for b in expected if b not in bookings]
    stale = []
    for b, want in expected.items():
        got = bookings.get(b)
        if got is None:
            continue
        try:
            ok = states_equal(parse_state(json.loads(got[3])), parse_state(want))
        except (ValueError, KeyError):
            ok = False
        if not ok:
            stale.append(b)
    unexpected = [b for b in bookings if b not in expected]
    return {
        "expected": len(expected),
        "lost": len(lost),
        "stale": len(stale),
        "unexpected": len(unexpected),
        "ok": not lost and not stale and not unexpected,
        "examples": (lost[:3] + stale[:3] + unexpected[:3]),
    }


# -- drain ----------------------------------------------------------------------------------------


async def _delivered_count(database: str) -> int:
    conn = await pg_connect(database)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM mozrest_delivery WHERE status = 'delivered'")
        )
    finally:
        await conn.close()


async def drain_pg(
    workdir: Path,
    *,
    n: int,
    tag: int,
    replicas: int = 1,
    config: RelayConfig | None = None,
    old_rows: int = 0,
    profile: Path | None = None,
    label: str = "drain",
    diagnose: Sequence[str] | None = None,
    preload: bool = False,
    receiver: Receiver | None = None,
    within: float = DRAIN_TIMEOUT,
    prepare: Callable[[str], Awaitable[None]] | None = None,
) -> dict[str, Any]:
    """Start the workers idle, commit `n` seated bookings in one COPY, time until the last one
    arrives at the receiver. With `old_rows`, the tables first get that many old processed
    outbox rows, delivered deliveries, their attempts and snapshots.

    With `preload`, the bookings are committed first and the workers started after (a backlog
    waiting for the relay), and the rate runs from the first POST to the last at the receiver.
    `receiver`: a running receiver to use (reset first), so that runs compared with each other
    share it; otherwise one of its own. `prepare`: called with the database's name right after
    the migration (to change the schema under comparison, `bench/index_cost.py`)."""
    config = config or RelayConfig()
    async with pg_database(label) as database, _receiver_scope(workdir, receiver) as receiver:
        url = pg_url(database)
        await migrate(url, notify=config.notify, workdir=workdir)
        if prepare is not None:
            await prepare(database)
        if old_rows:
            await load_old_rows(database, old_rows)
        payloads = [seated_payload(tag, i) for i in range(n)]
        if preload:
            conn = await pg_connect(database)
            try:
                async with conn.transaction():
                    await copy_outbox(conn, payloads)
            finally:
                await conn.close()
        if diagnose is None:
            procs = [
                start_worker(f"worker{k}", url, receiver.url, config, workdir)
                for k in range(replicas)
            ]
        else:
            argv = [PYTHON, "-m", "bench.diagnose"]
            for variant in diagnose:
                argv += ["--variant", variant]
            env = {**config.env(url, receiver.url), "PYTHONPATH": str(ROOT)}
            procs = [spawn(f"worker{k}", argv, env=env, workdir=workdir) for k in range(replicas)]
        profiler: subprocess.Popen[bytes] | None = None
        try:
            meter = CpuMeter(
                {f"worker{k}": p.pid for k, p in enumerate(procs)} | _receiver_pid(receiver)
            )
            if preload:
                # The clock of a preloaded drain is the receiver's (first POST to last): the
                # workers' start-up counts in neither the rate nor the CPU.
                t0 = time.monotonic_ns()
                await receiver.wait_for(1, within=DRAIN_TIMEOUT, poll=0.005)
            else:
                await wait_registered_pg(database, procs)
                await asyncio.sleep(0.5)  # let start-up work (retention, heartbeats) settle
                conn = await pg_connect(database)
                try:
                    async with conn.transaction():
                        await copy_outbox(conn, payloads)
                    t0 = time.monotonic_ns()
                finally:
                    await conn.close()
            meter.start()
            vacuum = AutovacuumStandIn(database, AUTOVACUUM_NAPTIME)
            vacuum.start()
            if profile is not None:
                profiler = _start_profiler(procs[0].pid, profile, seconds=60)
            stats = await receiver.wait_for(n, within=within)
            cpu = meter.stop()
            vacuums = await vacuum.stop()
            if stats["received"] < n:
                raise RuntimeError(
                    f"drain incomplete: {stats['received']}/{n} arrived in {within:g}s\n"
                    + procs[0].tail()
                )
            first_to_last = max((stats["last_ns"] - stats["first_ns"]) / 1e9, 1e-9)
            elapsed = first_to_last if preload else (stats["last_ns"] - t0) / 1e9
            # The relay records the answers just after; wait for every delivery to say so.
            deadline = time.monotonic() + 60
            delivered = await _delivered_count(database)
            while delivered < n and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                delivered = await _delivered_count(database)
            recorded_s = (time.monotonic_ns() - t0) / 1e9
            rss = [p.vm_hwm_kb() for p in procs]
            dump = await receiver.dump()
        finally:
            if profiler is not None:
                _stop_profiler(profiler)
            codes = [p.stop() for p in procs]
    check = check_final_states(dump, {p["bookingId"]: p for p in payloads})
    counters = None
    if diagnose is not None:
        lines = [x for x in procs[0].tail(50).splitlines() if x.startswith("DIAGNOSE ")]
        counters = json.loads(lines[-1][len("DIAGNOSE ") :]) if lines else None
    arrivals = sorted(v[1] for v in dump["bookings"].values())
    result = {
        "n": n,
        "rate_trace_per_5s": rate_trace(arrivals, t0),
        "rate_by_tenth": tenth_rates(arrivals),
        "autovacuum_standin": vacuums,
        "replicas": replicas,
        "diagnose": {"variants": list(diagnose), "counters": counters}
        if diagnose is not None
        else None,
        "old_rows": old_rows,
        "preload": preload,
        "seconds": round(elapsed, 3),
        "rate": round(n / elapsed, 1),
        "rate_first_to_last_post": round(n / first_to_last, 1),
        "posts": dump["received"],
        "all_recorded_delivered": delivered >= n,
        "recorded_seconds": round(recorded_s, 3),
        "peak_rss_mb": [round(kb / 1024, 1) if kb else None for kb in rss],
        "cpu_cores": cpu,
        "exit_codes": codes,
        "correct": check,
        "config": config.describe(),
    }
    log(
        f"{label}: {n} in {elapsed:.2f}s = {n / elapsed:,.0f}/s, preload={preload}, "
        f"replicas={replicas}, "
        f"old_rows={old_rows:,}, rss={result['peak_rss_mb']} MB, cpu={cpu}, ok={check['ok']}"
    )
    return result


def tenth_rates(arrivals_ns: Sequence[int]) -> dict[str, float | None]:
    """The rate over the first and over the last tenth of the arrivals (each booking's first
    POST, sorted): a drain that slows as its tables fill shows it here."""
    tenth = len(arrivals_ns) // 10
    if tenth < 2:
        return {"first": None, "last": None}

    def rate(chunk: Sequence[int]) -> float:
        return round((len(chunk) - 1) / max((chunk[-1] - chunk[0]) / 1e9, 1e-9), 1)

    return {"first": rate(arrivals_ns[:tenth]), "last": rate(arrivals_ns[-tenth:])}


@contextlib.asynccontextmanager
async def _receiver_scope(workdir: Path, receiver: Receiver | None) -> AsyncIterator[Receiver]:
    """The given receiver, reset; or a new one for this run only."""
    if receiver is not None:
        await receiver.reset()
        yield receiver
        return
    async with Receiver(workdir) as own:
        yield own


def _receiver_pid(receiver: Receiver) -> dict[str, int]:
    return {"receiver": receiver.proc.pid} if receiver.proc is not None else {}


def _start_profiler(pid: int, out: Path, *, seconds: int) -> subprocess.Popen[bytes] | None:
    """py-spy in raw (collapsed stacks) format, if it is installed."""
    spy = Path(PYTHON).with_name("py-spy")
    if not spy.exists():
        log("py-spy is not installed (pip install -e '.[bench]'): no profile")
        return None
    return subprocess.Popen(
        [
            str(spy),
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(seconds),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop_profiler(profiler: subprocess.Popen[bytes]) -> None:
    # py-spy writes its output on SIGINT.
    if profiler.poll() is None:
        profiler.send_signal(2)
    try:
        profiler.wait(timeout=30)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait(timeout=10)


async def load_old_rows(database: str, rows: int) -> None:
    """History two days old: processed outbox rows, delivered deliveries with one attempt
    each, and the snapshots of their bookings (all inside the 7-day retention)."""
    started = time.monotonic()
    payload = (
        "jsonb_build_object('bookingId', 'old' || g, 'venueId', 'v' || (g % 200), "
        "'partySize', 1 + g % 8, 'status', 'seated', 'tables', jsonb_build_array('T' || g % 40), "
        "'date', 1764000000 + g, 'contact', jsonb_build_object('firstname', 'John', "
        "'lastname', 'Doe', 'email', 'john.doe@mail.com', 'telephone', '34646223399', "
        "'locale', 'en'), 'notes', 'I am allergic to peanuts')"
    )
    statements = {
        "mozrest_outbox": f"""
            INSERT INTO mozrest_outbox (booking_id, venue_id, payload, created_at, processed_at,
                                        outcome)
            SELECT 'old' || g, 'v' || (g % 200), {payload},
                   now() - interval '2 days', now() - interval '2 days', 'queued'
            FROM generate_series(1, $1) g
            """,
        "mozrest_delivery": f"""
            INSERT INTO mozrest_delivery (booking_id, venue_id, outbox_id, payload, status,
                attempt_count, changed_fields, warnings, created_at, updated_at, delivered_at,
                last_status_code, outbox_created_at)
            SELECT 'old' || g, 'v' || (g % 200), g, {payload}, 'delivered', 1, '[]', '[]',
                   now() - interval '2 days', now() - interval '2 days',
                   now() - interval '2 days', 200, now() - interval '2 days'
            FROM generate_series(1, $1) g
            """,
        "mozrest_attempt": """
            INSERT INTO mozrest_attempt (delivery_id, worker_id, started_at, duration_ms,
                                         status_code, response_body)
            SELECT g, 'old-worker', now() - interval '2 days', 3, 200, '{"status":"ok"}'
            FROM generate_series(1, $1) g
            """,
        "mozrest_booking": f"""
            INSERT INTO mozrest_booking (booking_id, venue_id, last_outbox_id, sent_outbox_id,
                accepted_payload, accepted_outbox_id, accepted_at, created_at, updated_at)
            SELECT 'old' || g, 'v' || (g % 200), g, g, {payload}, g,
                   now() - interval '2 days', now() - interval '2 days', now() - interval '2 days'
            FROM generate_series(1, $1) g
            """,
    }

    async def fill(table: str, sql: str) -> None:
        conn = await pg_connect(database)
        try:
            await conn.execute("SET synchronous_commit = off")
            await conn.execute(sql, rows)
            # As autovacuum would have done long ago: statistics and the visibility map.
            await conn.execute(f"VACUUM ANALYZE {table}")
        finally:
            await conn.close()

    # One connection per table: the four loads run side by side.
    await asyncio.gather(*(fill(table, sql) for table, sql in statements.items()))
    log(f"loaded {rows:,} old rows into each table in {time.monotonic() - started:.1f}s")


# -- latency ------------------------------------------------------------------------------------


async def _produce(
    pool: asyncpg.Pool, payloads: Sequence[dict], rate: float, commits: dict[str, int]
) -> dict[str, Any]:
    """Open loop: insert payload i at t0 + i/rate, each in its own transaction, without waiting
    for earlier inserts (or the relay); stamp monotonic_ns right after each COMMIT."""
    sql = "INSERT INTO mozrest_outbox (booking_id, venue_id, payload) VALUES ($1, $2, $3)"
    tasks: set[asyncio.Task[None]] = set()
    max_behind = 0.0

    async def one(p: dict) -> None:
        async with pool.acquire() as conn:
            await conn.execute(sql, p["bookingId"], p["venueId"], dumps(p))
        commits[p["bookingId"]] = time.monotonic_ns()

    start = time.monotonic() + 0.05
    for i, p in enumerate(payloads):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            max_behind = max(max_behind, -delay)
        task = asyncio.create_task(one(p))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    return {
        "offered_rate": rate,
        "achieved_rate": round(len(payloads) / max(time.monotonic() - start, 1e-9), 1),
        "producer_max_behind_ms": round(max_behind * 1000, 1),
    }


async def latency_pg(
    workdir: Path,
    *,
    phases: Sequence[tuple[str, float, int]],
    tag: int,
    notify: bool,
    config: RelayConfig | None = None,
) -> dict[str, Any]:
    """Commit-to-arrival latency with an open-loop producer, per (name, rate, count) phase."""
    config = config or RelayConfig()
    config = RelayConfig(**{**config.__dict__, "notify": notify})
    results: dict[str, Any] = {"notify": notify, "config": config.describe(), "phases": {}}
    async with pg_database(f"latency_{'notify' if notify else 'poll'}") as database:
        async with Receiver(workdir) as receiver:
            url = pg_url(database)
            await migrate(url, notify=notify, workdir=workdir)
            proc = start_worker("worker-latency", url, receiver.url, config, workdir)
            pool = await asyncpg.create_pool(
                host=url.split("@")[1].split(":")[0],
                port=int(url.rsplit(":", 1)[1].split("/")[0]),
                user="postgres",
                database=database,
                # Warm, as an RMS's pool is: a phase that needs more connections would
                # otherwise time the start of PostgreSQL backends, not the relay.
                min_size=16,
                max_size=16,
            )
            vacuum = AutovacuumStandIn(database, AUTOVACUUM_NAPTIME)
            try:
                await wait_registered_pg(database, [proc])
                await asyncio.sleep(1.0)
                vacuum.start()
                offset = 0
                for p_index, (name, rate, count) in enumerate(phases):
                    await receiver.reset()
                    payloads = [seated_payload(tag + p_index, offset + i) for i in range(count)]
                    offset += count
                    commits: dict[str, int] = {}
                    meter = CpuMeter({"worker": proc.pid} | _receiver_pid(receiver))
                    meter.start()
                    produced = await _produce(pool, payloads, rate, commits)
                    stats = await receiver.wait_for(count, within=120)
                    cpu = meter.stop()
                    dump = await receiver.dump()
                    lat_ms = [
                        (dump["bookings"][b][1] - ns) / 1e6
                        for b, ns in commits.items()
                        if b in dump["bookings"]
                    ]
                    # The worst latency of each second of the phase: a tail spread evenly and
                    # one made of a few stalls look alike in a percentile.
                    t0 = min(commits.values(), default=0)
                    per_second: dict[int, float] = {}
                    for b, ns in commits.items():
                        if b in dump["bookings"]:
                            second = (ns - t0) // 1_000_000_000
                            latency = (dump["bookings"][b][1] - ns) / 1e6
                            per_second[second] = max(per_second.get(second, 0.0), latency)
                    phase = {
                        "rate": rate,
                        "samples": len(lat_ms),
                        "lost": count - len(lat_ms),
                        "p50_ms": _r(percentile(lat_ms, 50)),
                        "p99_ms": _r(percentile(lat_ms, 99)),
                        "max_ms": _r(max(lat_ms) if lat_ms else None),
                        "max_ms_per_second": [round(per_second[k]) for k in sorted(per_second)],
                        "cpu_cores": cpu,
                        **produced,
                    }
                    if rate >= 100:
                        phase["p999_ms"] = _r(percentile(lat_ms, 99.9))
                    results["phases"][name] = phase
                    log(
                        f"latency notify={notify} {name} ({rate:g}/s): p50 {phase['p50_ms']} ms, "
                        f"p99 {phase['p99_ms']} ms, p99.9 {phase.get('p999_ms')} ms, "
                        f"n={len(lat_ms)}, arrived={stats['received']}"
                    )
                    await asyncio.sleep(0.5)
            finally:
                results["autovacuum_standin"] = await vacuum.stop()
                await pool.close()
                results["exit_code"] = proc.stop()
    return results


def _r(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# -- ceiling ------------------------------------------------------------------------------------


async def ceiling(
    workdir: Path, *, n: int, tag: int, concurrency: int | None = None
) -> dict[str, Any]:
    """The relay's HTTP client alone, same payloads and concurrency, no database."""
    concurrency = concurrency or RelayConfig().concurrency
    async with Receiver(workdir) as receiver:
        argv = [PYTHON, "-m", "bench.ceiling", "--url", receiver.url, "--n", str(n)]
        argv += ["--concurrency", str(concurrency), "--tag", str(tag)]
        _, out = await run_child(argv, within=DRAIN_TIMEOUT)
        result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        stats = await receiver.stats()
    result["received"] = stats["received"]
    result["concurrency"] = concurrency
    log(f"ceiling: {n} POSTs in {result['seconds']}s = {result['rate']:,.0f}/s")
    return result


# -- coalescing ---------------------------------------------------------------------------------


async def coalescing_pg(
    workdir: Path,
    *,
    bookings: int,
    changes: int,
    tag: int,
    config: RelayConfig | None = None,
) -> dict[str, Any]:
    """`bookings` × `changes` states written while the receiver is down (connection refused),
    then it comes up: POSTs sent (ideal: one per booking), time to drain, final states right."""
    config = config or RelayConfig()
    rng = random.Random(tag)
    async with pg_database("coalescing") as database:
        receiver = Receiver(workdir)  # not started: the port refuses connections
        url = pg_url(database)
        await migrate(url, notify=config.notify, workdir=workdir)
        proc = start_worker("worker-coalescing", url, receiver.url, config, workdir)
        try:
            await wait_registered_pg(database, [proc])
            states = [seated_payload(tag, i) for i in range(bookings)]
            newest = {s["bookingId"]: s for s in states}
            conn = await pg_connect(database)
            write_start = time.monotonic()
            try:
                for step in range(changes):
                    if step:
                        states = [change(s, step, rng) for s in states]
                    # One transaction per 100 bookings, as a busy RMS commits them.
                    for chunk in range(0, bookings, 100):
                        async with conn.transaction():
                            await copy_outbox(conn, states[chunk : chunk + 100])
                newest = {s["bookingId"]: s for s in states}
                write_seconds = time.monotonic() - write_start
                # Let the relay ingest everything (it runs all along), then bring Mozrest up.
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    left = await conn.fetchval(
                        "SELECT count(*) FROM mozrest_outbox WHERE processed_at IS NULL"
                    )
                    if left == 0:
                        break
                    await asyncio.sleep(0.1)
                failed_attempts = await conn.fetchval("SELECT count(*) FROM mozrest_attempt")
            finally:
                await conn.close()
            await receiver.start()
            up = time.monotonic_ns()
            stats = await receiver.wait_for(bookings, within=120)
            # Wait for stragglers (duplicates would show here), bounded.
            settle_deadline = time.monotonic() + 60
            while time.monotonic() < settle_deadline:
                dump = await receiver.dump()
                check = check_final_states(dump, newest)
                if check["ok"]:
                    break
                await asyncio.sleep(0.5)
            drained_ns = max((v[2] for v in dump["bookings"].values()), default=up)
            await asyncio.sleep(1.0)
            stats = await receiver.stats()
        finally:
            code = proc.stop()
            await receiver.stop()
    result = {
        "bookings": bookings,
        "changes": changes,
        "rows": bookings * changes,
        "write_seconds": round(write_seconds, 2),
        "failed_attempts_while_down": failed_attempts,
        "posts_after_up": stats["received"],
        "ideal_posts": bookings,
        "drain_seconds": round((drained_ns - up) / 1e9, 3),
        "first_post_after_up_seconds": round(
            (min((v[1] for v in dump["bookings"].values()), default=up) - up) / 1e9, 3
        ),
        "correct": check,
        "exit_code": code,
        "config": config.describe(),
    }
    log(
        f"coalescing: {bookings}x{changes} -> {stats['received']} POSTs after up "
        f"(ideal {bookings}), drained in {result['drain_seconds']}s, ok={check['ok']}"
    )
    return result


# -- the PgQueuer peer --------------------------------------------------------------------------


async def drain_pgqueuer(
    workdir: Path,
    *,
    n: int,
    tag: int,
    settings: PeerSettings | None = None,
    preload: bool = False,
    receiver: Receiver | None = None,
) -> dict[str, Any]:
    """The drain done by the PgQueuer peer (`bench/peers/pgqueuer_relay.py`, `settings`: its
    `PeerSettings`, by default its best), with the protocol of `drain_pg`: n jobs committed in
    one transaction while the consumer waits (time from COMMIT to the last POST), or, with
    `preload`, before it starts (time from the first POST to the last)."""
    from bench.peers import pgqueuer_relay

    settings = settings or pgqueuer_relay.BEST
    async with pg_database("pgqueuer") as database, _receiver_scope(workdir, receiver) as receiver:
        url = pg_url(database)
        await pgqueuer_relay.install(url)
        bodies = pgqueuer_relay.bodies_for(tag, n)

        async def commit_jobs() -> int:
            conn = await pg_connect(database)
            try:
                async with conn.transaction():
                    await pgqueuer_relay.enqueue(conn, bodies)
                return time.monotonic_ns()
            finally:
                await conn.close()

        if preload:
            await commit_jobs()
        argv = [PYTHON, "-m", "bench.peers.pgqueuer_relay", "consume", "--dsn", url]
        argv += ["--url", receiver.url, "--batch-size", str(settings.batch_size)]
        argv += ["--max-concurrent-tasks", str(settings.max_concurrent_tasks)]
        argv += ["--http-concurrency", str(settings.http_concurrency)]
        argv += ["--loop", "uvloop" if settings.uvloop else "asyncio"]
        proc = spawn("pgqueuer-consumer", argv, env=_env_with_root(), workdir=workdir)
        try:
            meter = CpuMeter({"consumer": proc.pid} | _receiver_pid(receiver))
            if preload:
                t0 = time.monotonic_ns()
                await receiver.wait_for(1, within=DRAIN_TIMEOUT, poll=0.005)
            else:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and "consumer ready" not in proc.tail():
                    if not proc.alive():
                        raise RuntimeError(f"pgqueuer consumer exited:\n{proc.tail()}")
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
                t0 = await commit_jobs()
            meter.start()
            vacuum = AutovacuumStandIn(database, AUTOVACUUM_NAPTIME)
            vacuum.start()
            stats = await receiver.wait_for(n, within=DRAIN_TIMEOUT)
            cpu = meter.stop()
            vacuums = await vacuum.stop()
            rss = proc.vm_hwm_kb()
            dump = await receiver.dump()
        finally:
            code = proc.stop()
    if stats["received"] < n:
        raise RuntimeError(f"pgqueuer drain incomplete: {stats['received']}/{n}\n{proc.tail()}")
    first_to_last = max((stats["last_ns"] - stats["first_ns"]) / 1e9, 1e-9)
    elapsed = first_to_last if preload else (stats["last_ns"] - t0) / 1e9
    expected = {}
    for body in bodies:
        payload = json.loads(body)
        expected[payload["bookingId"]] = payload
    check = check_final_states(dump, expected)
    result = {
        "n": n,
        "preload": preload,
        "seconds": round(elapsed, 3),
        "rate": round(n / elapsed, 1),
        "rate_first_to_last_post": round(n / first_to_last, 1),
        "rate_trace_per_5s": rate_trace([v[1] for v in dump["bookings"].values()], t0),
        "autovacuum_standin": vacuums,
        "posts": stats["received"],
        "peak_rss_mb": round(rss / 1024, 1) if rss else None,
        "cpu_cores": cpu,
        "exit_code": code,
        "correct": check,
        "config": settings.describe(),
    }
    log(
        f"pgqueuer peer: {n} in {elapsed:.2f}s = {n / elapsed:,.0f}/s, preload={preload}, "
        f"{settings.describe()}, cpu={cpu}, ok={check['ok']}"
    )
    return result


async def ceiling_peer_client(
    workdir: Path, *, n: int, tag: int, receiver: Receiver | None = None
) -> dict[str, Any]:
    """The peer's HTTP client (aiohttp, pre-serialised bodies, its pool) alone, no database:
    the bare ceiling of this machine, timed at the receiver from the first POST to the last."""
    from bench.peers import pgqueuer_relay

    settings = pgqueuer_relay.BEST
    async with _receiver_scope(workdir, receiver) as receiver:
        argv = [PYTHON, "-m", "bench.peers.pgqueuer_relay", "ceiling", "--url", receiver.url]
        argv += ["--n", str(n), "--tag", str(tag)]
        argv += ["--http-concurrency", str(settings.http_concurrency)]
        argv += ["--loop", "uvloop" if settings.uvloop else "asyncio"]
        _, out = await run_child(argv, within=DRAIN_TIMEOUT, env=_env_with_root())
        client: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        stats = await receiver.stats()
    first_to_last = max((stats["last_ns"] - stats["first_ns"]) / 1e9, 1e-9)
    result = {
        "n": n,
        "received": stats["received"],
        "seconds": round(first_to_last, 3),
        "rate": round(n / first_to_last, 1),
        "client": client,
        "http_concurrency": settings.http_concurrency,
        "uvloop": settings.uvloop,
    }
    log(f"bare HTTP client, no database: {n} POSTs = {result['rate']:,.0f}/s")
    return result


def _env_with_root() -> dict[str, str]:
    from bench.common import _clean_env

    return {**_clean_env(), "PYTHONPATH": str(ROOT)}


# -- SQLite and MariaDB drains ------------------------------------------------------------------


class SqliteDb:
    dialect = "sqlite"

    def __init__(self, workdir: Path, label: str) -> None:
        self.path = workdir / f"{DB_PREFIX}{label}.db"
        self.url = f"sqlite:///{self.path}"

    async def create(self) -> None:
        await asyncio.to_thread(self._remove)

    async def drop(self) -> None:
        await asyncio.to_thread(self._remove)

    def _remove(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)

    def _query(self, sql: str) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path, timeout=30)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    async def scalar(self, sql: str) -> Any:
        return (await asyncio.to_thread(self._query, sql))[0][0]

    async def pids(self) -> set[int]:
        rows = await asyncio.to_thread(
            self._query, "SELECT pid FROM mozrest_worker WHERE stopped_at IS NULL"
        )
        return {int(r[0]) for r in rows}

    def _insert(self, payloads: Sequence[dict]) -> None:
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(
                "INSERT INTO mozrest_outbox (booking_id, venue_id, payload) VALUES (?, ?, ?)",
                [(p["bookingId"], p["venueId"], dumps(p)) for p in payloads],
            )
            conn.execute("COMMIT")
        finally:
            conn.close()

    async def insert(self, payloads: Sequence[dict]) -> None:
        await asyncio.to_thread(self._insert, payloads)


class MariaDb:
    dialect = "mysql"

    def __init__(self, label: str) -> None:
        import os

        self.name = f"{DB_PREFIX}{label}_{os.getpid()}"
        self.url = f"mysql://root@{MARIADB_HOST}:{MARIADB_PORT}/{self.name}"

    async def _conn(self, database: str | None = None) -> Any:
        import asyncmy

        return await asyncmy.connect(
            host=MARIADB_HOST, port=MARIADB_PORT, user="root", password="", db=database
        )

    async def _exec(self, sql: str, database: str | None = None) -> list[tuple[Any, ...]]:
        conn = await self._conn(database)
        try:
            async with conn.cursor() as cur:
                await cur.execute(sql)
                rows = await cur.fetchall()
            await conn.commit()
            return list(rows or [])
        finally:
            conn.close()

    async def create(self) -> None:
        await self._exec(f"DROP DATABASE IF EXISTS `{self.name}`")
        await self._exec(f"CREATE DATABASE `{self.name}` CHARACTER SET utf8mb4")

    async def drop(self) -> None:
        await self._exec(f"DROP DATABASE IF EXISTS `{self.name}`")

    async def scalar(self, sql: str) -> Any:
        return (await self._exec(sql, self.name))[0][0]

    async def pids(self) -> set[int]:
        rows = await self._exec(
            "SELECT pid FROM mozrest_worker WHERE stopped_at IS NULL", self.name
        )
        return {int(r[0]) for r in rows}

    async def insert(self, payloads: Sequence[dict]) -> None:
        conn = await self._conn(self.name)
        try:
            async with conn.cursor() as cur:
                rows = [(p["bookingId"], p["venueId"], dumps(p)) for p in payloads]
                for start in range(0, len(rows), 1000):
                    await cur.executemany(
                        "INSERT INTO mozrest_outbox (booking_id, venue_id, payload) "
                        "VALUES (%s, %s, %s)",
                        rows[start : start + 1000],
                    )
            await conn.commit()
        finally:
            conn.close()


async def drain_other(
    workdir: Path, db: SqliteDb | MariaDb, *, n: int, tag: int, config: RelayConfig | None = None
) -> dict[str, Any]:
    """The drain on SQLite or MariaDB: same protocol as `drain_pg`."""
    config = config or RelayConfig()
    await db.create()
    try:
        async with Receiver(workdir) as receiver:
            await migrate(db.url, workdir=workdir)
            payloads = [seated_payload(tag, i) for i in range(n)]
            proc = start_worker(f"worker-{db.dialect}", db.url, receiver.url, config, workdir)
            try:
                deadline = time.monotonic() + 30
                while proc.pid not in await db.pids():
                    if time.monotonic() > deadline or not proc.alive():
                        raise RuntimeError(f"worker did not register:\n{proc.tail()}")
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.5)
                servers = ("mariadbd", "mysqld") if db.dialect == "mysql" else ()
                meter = CpuMeter({"worker": proc.pid} | _receiver_pid(receiver), servers)
                await db.insert(payloads)
                t0 = time.monotonic_ns()
                meter.start()
                stats = await receiver.wait_for(n, within=DRAIN_TIMEOUT)
                cpu = meter.stop()
                if stats["received"] < n:
                    raise RuntimeError(
                        f"{db.dialect} drain incomplete: {stats['received']}/{n}\n{proc.tail()}"
                    )
                elapsed = (stats["last_ns"] - t0) / 1e9
                deadline = time.monotonic() + 60
                delivered = 0
                while time.monotonic() < deadline:
                    delivered = int(
                        await db.scalar(
                            "SELECT count(*) FROM mozrest_delivery WHERE status = 'delivered'"
                        )
                    )
                    if delivered >= n:
                        break
                    await asyncio.sleep(0.2)
                rss = proc.vm_hwm_kb()
                dump = await receiver.dump()
            finally:
                code = proc.stop()
    finally:
        await db.drop()
    check = check_final_states(dump, {p["bookingId"]: p for p in payloads})
    result = {
        "dialect": db.dialect,
        "n": n,
        "seconds": round(elapsed, 3),
        "rate": round(n / elapsed, 1),
        "posts": dump["received"],
        "all_recorded_delivered": delivered >= n,
        "peak_rss_mb": round(rss / 1024, 1) if rss else None,
        "cpu_cores": cpu,
        "exit_code": code,
        "correct": check,
    }
    log(f"{db.dialect} drain: {n} in {elapsed:.2f}s = {n / elapsed:,.0f}/s, ok={check['ok']}")
    return result


# -- scale-out against a slow Mozrest ------------------------------------------------------------


def steady_rate(arrivals_ns: Sequence[int], trim: float = 0.1) -> dict[str, Any]:
    """The rate in the middle of a drain: requests ordered by arrival, the first and last `trim`
    of them left out (the workers' start and ramp-up, and the tail where slots empty), and the
    rest divided by the time between the first and last of them."""
    ordered = sorted(arrivals_ns)
    if len(ordered) < 10:
        return {"rate": None, "seconds": None, "requests": len(ordered)}
    lo = int(len(ordered) * trim)
    hi = len(ordered) - 1 - lo
    seconds = max((ordered[hi] - ordered[lo]) / 1e9, 1e-9)
    return {
        "rate": round((hi - lo) / seconds, 1),
        "seconds": round(seconds, 2),
        "requests": hi - lo,
        "trim": trim,
    }


def _middle_slice(arrivals_ns: Sequence[int], *, seconds: float, window_s: float) -> list[int]:
    if not arrivals_ns:
        return []
    ordered = sorted(arrivals_ns)
    start = ordered[len(ordered) // 2] - int(seconds * 1e9 / 2)
    buckets = [0] * int(seconds / window_s)
    for ns in ordered:
        k = int((ns - start) / 1e9 // window_s)
        if 0 <= k < len(buckets):
            buckets[k] += 1
    return buckets


async def _in_flight_bookings(conn: asyncpg.Connection, limit: int) -> list[str]:
    """Bookings whose delivery is leased now (its request most likely on the wire), newest
    leases first (the relay's status index, read backwards)."""
    rows = await conn.fetch(
        "SELECT booking_id FROM mozrest_delivery WHERE status = 'pending' "
        "AND lease_owner IS NOT NULL ORDER BY id DESC LIMIT $1",
        limit,
    )
    return [r["booking_id"] for r in rows]


async def _change_in_flight(
    database: str,
    newest: dict[str, dict],
    receiver: Receiver,
    *,
    rate: float,
    until_received: int,
    rng: random.Random,
) -> int:
    """While the drain runs (until the receiver has `until_received` requests), every 100 ms
    commit a new state for a few bookings whose request is in flight: the relay must hold each
    until the answer to the one on the wire came back (the receiver counts any overlap).
    Returns how many states it wrote; `newest` keeps each booking's newest."""
    per_tick = max(1, round(rate / 10))
    written = 0
    step = 1
    conn = await pg_connect(database)
    try:
        while (await receiver.stats())["received"] < until_received:
            started = time.monotonic()
            candidates = await _in_flight_bookings(conn, per_tick * 4)
            chosen = rng.sample(candidates, min(per_tick, len(candidates)))
            states = []
            for b in chosen:
                step += 1
                newest[b] = change(newest[b], step, rng)
                states.append(newest[b])
            if states:
                async with conn.transaction():
                    await copy_outbox(conn, states)
                written += len(states)
            await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - started)))
    finally:
        await conn.close()
    return written


async def _relay_settled(database: str, within: float) -> bool:
    """Wait until every outbox row is read and no delivery waits or retries."""
    conn = await pg_connect(database)
    try:
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            unread = await conn.fetchval(
                "SELECT count(*) FROM mozrest_outbox WHERE processed_at IS NULL"
            )
            waiting = await conn.fetchval(
                "SELECT count(*) FROM mozrest_delivery WHERE status IN ('pending', 'retrying')"
            )
            if unread == 0 and waiting == 0:
                return True
            await asyncio.sleep(0.2)
        return False
    finally:
        await conn.close()


async def scaleout_pg(
    workdir: Path,
    *,
    receiver: Receiver,
    processes: int,
    concurrency: int,
    n: int,
    tag: int,
    batch_size: int | None = None,
    changes_per_second: float = 50.0,
) -> dict[str, Any]:
    """A backlog of `n` seated bookings committed, then `processes` workers started at
    `concurrency` each against `receiver`, which answers after its delay. The ceiling is
    processes x concurrency / delay; the rate is the steady one (`steady_rate`). Meanwhile new
    states of bookings in flight are written (`_change_in_flight`), and at the end every
    booking's last body must be its newest state and the receiver must have seen no overlap."""
    config = RelayConfig(concurrency=concurrency)
    if batch_size is not None:
        config.batch_size = batch_size
    delay_s = receiver.delay_ms / 1000.0
    ceiling = processes * concurrency / delay_s
    rng = random.Random(tag)
    async with pg_database("scaleout") as database, _receiver_scope(workdir, receiver) as receiver:
        url = pg_url(database)
        await migrate(url, workdir=workdir)
        payloads = [seated_payload(tag, i) for i in range(n)]
        newest = {p["bookingId"]: p for p in payloads}
        conn = await pg_connect(database)
        try:
            async with conn.transaction():
                await copy_outbox(conn, payloads)
        finally:
            await conn.close()
        procs = [
            start_worker(f"worker{k}", url, receiver.url, config, workdir) for k in range(processes)
        ]
        try:
            await receiver.wait_for(1, within=60, poll=0.005)
            meter = CpuMeter(
                {f"worker{k}": p.pid for k, p in enumerate(procs)} | _receiver_pid(receiver)
            )
            meter.start()
            changed = await asyncio.wait_for(
                _change_in_flight(
                    database,
                    newest,
                    receiver,
                    rate=changes_per_second,
                    until_received=int(n * 0.8),
                    rng=rng,
                ),
                timeout=DRAIN_TIMEOUT,
            )
            stats = await receiver.wait_for(n, within=DRAIN_TIMEOUT)
            cpu = meter.stop()
            if stats["received"] < n:
                raise RuntimeError(
                    f"scale-out drain incomplete: {stats['received']}/{n}\n" + procs[0].tail()
                )
            settled = await _relay_settled(database, within=60)
            for _ in range(200):  # the last answers leave the receiver (10 s at most)
                if not (await receiver.stats())["in_flight"]:
                    break
                await asyncio.sleep(0.05)
            dump = await receiver.dump(arrivals=True)
        finally:
            codes = [p.stop() for p in procs]
    check = check_final_states(dump, newest)
    arrivals = dump["arrivals_ns"]
    steady = steady_rate(arrivals)
    first_to_last = max((arrivals[-1] - arrivals[0]) / 1e9, 1e-9) if arrivals else None
    rate = steady["rate"]
    result = {
        "processes": processes,
        "concurrency": concurrency,
        "delay_ms": receiver.delay_ms,
        "n": n,
        "ceiling": round(ceiling, 1),
        "rate": rate,
        "of_ceiling": round(rate / ceiling, 3) if rate else None,
        "steady": steady,
        "rate_first_to_last_post": round(len(arrivals) / first_to_last, 1)
        if first_to_last
        else None,
        "posts": dump["received"],
        "states_changed_in_flight": changed,
        "overlaps": dump["overlaps"],
        "overlap_bookings": dump["overlap_bookings"],
        "max_in_flight": dump["max_in_flight"],
        "settled": settled,
        "rate_trace_per_1s": rate_trace(arrivals, arrivals[0], window_s=1.0) if arrivals else [],
        # Arrivals per 50 ms over 3 s from the middle of the drain: requests sent in waves
        # (every slot at once, then none until the wave is answered and recorded) show here.
        "arrivals_per_50ms_mid": _middle_slice(arrivals, seconds=3.0, window_s=0.05),
        "cpu_cores": cpu,
        "exit_codes": codes,
        "correct": check,
        "config": config.describe(),
    }
    log(
        f"scale-out {processes}x{concurrency} (batch {config.batch_size}), "
        f"{receiver.delay_ms:g} ms: steady {rate}/s of {ceiling:,.0f}/s "
        f"({result['of_ceiling']}), max in flight {dump['max_in_flight']}, "
        f"overlaps {dump['overlaps']}, {changed} states changed in flight, ok={check['ok']}"
    )
    return result


# -- the RMS beside the relay ----------------------------------------------------------------------

#: How the RMS-like clients name their sessions; relay sessions are `mozrest-relay/<pid>`.
RMS_APPLICATION = "rms-bench"
#: Each RMS session, and for one waiting on a heavyweight lock, who holds it (pg_blocking_pids
#: is called only for those: it briefly takes the lock manager's locks).
_LOCK_SAMPLE = """
    SELECT w.pid, w.wait_event_type, w.wait_event,
           CASE WHEN w.wait_event_type = 'Lock' THEN ARRAY(
               SELECT b.application_name || ' ' || b.pid || ': ' || left(b.query, 100)
               FROM pg_stat_activity b WHERE b.pid = ANY(pg_blocking_pids(w.pid))
           ) END AS blockers,
           left(w.query, 100) AS query
    FROM pg_stat_activity w
    WHERE w.application_name = $1 AND w.state = 'active'
"""


class LockSampler:
    """Samples, every `interval` seconds, the RMS sessions that wait on a lock, and who holds it:
    `relay_waits` counts (sample, RMS session) pairs blocked by a relay session."""

    def __init__(self, database: str, interval: float = 0.02) -> None:
        self.database = database
        self.interval = interval
        self.samples = 0
        self.relay_waits = 0
        self.lock_waits = 0
        self.wait_events: dict[str, int] = {}
        self.examples: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0
        self._stopped = 0.0

    async def _loop(self) -> None:
        conn = await pg_connect(self.database)
        try:
            while True:
                started = time.monotonic()
                rows = await conn.fetch(_LOCK_SAMPLE, RMS_APPLICATION)
                self.samples += 1
                for row in rows:
                    if row["wait_event_type"]:
                        event = f"{row['wait_event_type']}:{row['wait_event']}"
                        self.wait_events[event] = self.wait_events.get(event, 0) + 1
                    blockers = row["blockers"] or []
                    if row["wait_event_type"] == "Lock":
                        self.lock_waits += 1
                    if any(b.startswith("mozrest-relay/") for b in blockers):
                        self.relay_waits += 1
                        if len(self.examples) < 5:
                            self.examples.append(
                                {"query": row["query"], "blockers": list(blockers)}
                            )
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))
        finally:
            await conn.close()

    def start(self) -> None:
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        seconds = time.monotonic() - self._started
        return {
            "samples": self.samples,
            "mean_interval_ms": round(1000 * seconds / max(self.samples, 1), 1),
            "rms_waits_on_relay": self.relay_waits,
            "rms_lock_waits_any": self.lock_waits,
            "rms_wait_events": dict(sorted(self.wait_events.items(), key=lambda kv: -kv[1])),
            "examples": self.examples,
        }


async def _create_reservations(conn: asyncpg.Connection, payloads: Sequence[dict]) -> None:
    """The RMS's own table: one reservation row per booking."""
    await conn.execute(
        """
        CREATE TABLE reservation (
            id bigint PRIMARY KEY,
            booking_id text NOT NULL UNIQUE,
            venue_id text NOT NULL,
            status text NOT NULL,
            party_size integer NOT NULL,
            version integer NOT NULL DEFAULT 0,
            updated_at timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    await conn.copy_records_to_table(
        "reservation",
        records=[
            (i, p["bookingId"], p["venueId"], p["status"], p["partySize"])
            for i, p in enumerate(payloads)
        ],
        columns=["id", "booking_id", "venue_id", "status", "party_size"],
    )


async def _rms_load(
    database: str,
    bases: Sequence[dict],
    newest: dict[str, tuple[int, dict]],
    *,
    clients: int,
    rate: float,
    seconds: float,
    tag: int,
) -> dict[str, Any]:
    """`clients` connections, each running RMS transactions (UPDATE the reservation's row, then
    INSERT its outbox row, COMMIT) for `seconds`: at `rate` transactions/s in all (each client
    on its own fixed schedule, never waiting for the others), or back to back with `rate` 0.
    Latency: BEGIN to COMMIT returned, and the COMMIT alone."""
    update_sql = (
        "UPDATE reservation SET version = version + 1, party_size = 1 + (version + 1) % 12, "
        "updated_at = now() WHERE id = $1 RETURNING version, party_size"
    )
    insert_sql = "INSERT INTO mozrest_outbox (booking_id, venue_id, payload) VALUES ($1, $2, $3)"
    conns = [
        await asyncpg.connect(
            host=PG_HOST,
            port=PG_PORT,
            user=PG_USER,
            database=database,
            server_settings={"application_name": RMS_APPLICATION},
        )
        for _ in range(clients)
    ]
    tx_ms: list[float] = []
    commit_ms: list[float] = []
    behind = 0.0
    start = time.monotonic() + 0.05
    end = start + seconds

    async def client(k: int, conn: asyncpg.Connection) -> None:
        nonlocal behind
        rng = random.Random(tag * 1000 + k)
        i = 0
        per_client = rate / clients if rate else 0.0
        while True:
            due = start + (k / clients + i) / per_client if per_client else time.monotonic()
            if due >= end or time.monotonic() >= end:
                return
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                behind = max(behind, -delay)
            index = rng.randrange(len(bases))
            base = bases[index]
            t0 = time.perf_counter()
            tx = conn.transaction()
            await tx.start()
            try:
                row = await conn.fetchrow(update_sql, index)
                state = {**base, "partySize": row["party_size"], "notes": f"RMS {row['version']}"}
                await conn.execute(insert_sql, base["bookingId"], base["venueId"], dumps(state))
            except BaseException:
                await tx.rollback()
                raise
            t1 = time.perf_counter()
            await tx.commit()
            t2 = time.perf_counter()
            tx_ms.append((t2 - t0) * 1000)
            commit_ms.append((t2 - t1) * 1000)
            known = newest.get(base["bookingId"])
            if known is None or known[0] < row["version"]:
                newest[base["bookingId"]] = (row["version"], state)
            i += 1

    try:
        await asyncio.wait_for(
            asyncio.gather(*(client(k, c) for k, c in enumerate(conns))), timeout=seconds + 60
        )
    finally:
        for c in conns:
            await c.close()
    elapsed = max(time.monotonic() - start, 1e-9)
    return {
        "clients": clients,
        "offered_rate": rate or None,
        "transactions": len(tx_ms),
        "tx_per_s": round(len(tx_ms) / elapsed, 1),
        "tx_p50_ms": _r(percentile(tx_ms, 50)),
        "tx_p99_ms": _r(percentile(tx_ms, 99)),
        "tx_max_ms": _r(max(tx_ms) if tx_ms else None),
        "commit_p50_ms": _r(percentile(commit_ms, 50)),
        "commit_p99_ms": _r(percentile(commit_ms, 99)),
        "schedule_max_behind_ms": round(behind * 1000, 1),
    }


async def _backlog_left(database: str) -> dict[str, int]:
    conn = await pg_connect(database)
    try:
        unread = await conn.fetchval(
            "SELECT count(*) FROM mozrest_outbox WHERE processed_at IS NULL"
        )
        waiting = await conn.fetchval(
            "SELECT count(*) FROM mozrest_delivery WHERE status IN ('pending', 'retrying')"
        )
        return {"outbox_unread": int(unread), "deliveries_waiting": int(waiting)}
    finally:
        await conn.close()


async def rms_pg(
    workdir: Path,
    *,
    backlog: int,
    clients: int,
    rate: float,
    seconds: float,
    tag: int,
    config: RelayConfig | None = None,
) -> dict[str, Any]:
    """An RMS-like load beside the relay. A `reservation` table (one row per booking) and a
    backlog of `backlog` seated states are committed; the RMS load (`_rms_load`) runs `seconds`
    with the relay not started, then again while the worker drains that backlog (and the RMS's
    own rows) at full speed. Both times, `LockSampler` looks every 20 ms for an RMS session
    waiting on a lock held by a relay session. At the end, every booking's last body at the
    receiver must be its newest state (the highest reservation version the RMS committed)."""
    config = config or RelayConfig()
    async with pg_database("rms") as database, Receiver(workdir) as receiver:
        url = pg_url(database)
        await migrate(url, notify=config.notify, workdir=workdir)
        payloads = [seated_payload(tag, i) for i in range(backlog)]
        newest: dict[str, tuple[int, dict]] = {p["bookingId"]: (0, p) for p in payloads}
        conn = await pg_connect(database)
        try:
            async with conn.transaction():
                await _create_reservations(conn, payloads)
                await copy_outbox(conn, payloads)
            await conn.execute("ANALYZE reservation")
        finally:
            await conn.close()
        phases: dict[str, Any] = {}
        sampler = LockSampler(database)
        sampler.start()
        phases["relay idle"] = await _rms_load(
            database, payloads, newest, clients=clients, rate=rate, seconds=seconds, tag=tag
        )
        phases["relay idle"]["locks"] = await sampler.stop()
        proc = start_worker("worker-rms", url, receiver.url, config, workdir)
        try:
            await receiver.wait_for(1, within=60, poll=0.005)
            meter = CpuMeter({"worker": proc.pid} | _receiver_pid(receiver))
            meter.start()
            received_before = (await receiver.stats())["received"]
            sampler = LockSampler(database)
            sampler.start()
            phase = await _rms_load(
                database, payloads, newest, clients=clients, rate=rate, seconds=seconds, tag=tag + 1
            )
            phase["locks"] = await sampler.stop()
            phase["cpu_cores"] = meter.stop()
            stats = await receiver.stats()
            phase["relay_posts_per_s"] = round((stats["received"] - received_before) / seconds, 1)
            phase["backlog_left_at_end"] = await _backlog_left(database)
            phases["relay draining"] = phase
            settled = await _relay_settled(database, within=DRAIN_TIMEOUT)
            await asyncio.sleep(0.2)
            dump = await receiver.dump()
        finally:
            code = proc.stop()
    check = check_final_states(dump, {b: state for b, (_, state) in newest.items()})
    idle, busy = phases["relay idle"], phases["relay draining"]
    result = {
        "backlog": backlog,
        "clients": clients,
        "offered_rate": rate or None,
        "seconds": seconds,
        "phases": phases,
        "rms_waits_on_relay": busy["locks"]["rms_waits_on_relay"],
        "settled": settled,
        "posts": dump["received"],
        "exit_code": code,
        "correct": check,
        "config": config.describe(),
    }
    log(
        f"rms: {clients} clients; relay idle: {idle['tx_per_s']} tx/s, p50 {idle['tx_p50_ms']} "
        f"p99 {idle['tx_p99_ms']} ms; relay draining ({busy['relay_posts_per_s']}/s): "
        f"{busy['tx_per_s']} tx/s, p50 {busy['tx_p50_ms']} p99 {busy['tx_p99_ms']} ms; "
        f"waits on the relay {result['rms_waits_on_relay']} in {busy['locks']['samples']} "
        f"samples; ok={check['ok']}"
    )
    return result


# -- the rate limit and fairness under a backlog ---------------------------------------------------


def busiest_window(arrivals_s: Sequence[float], width: float) -> int:
    """The most requests any window of `width` seconds holds (one starts at every arrival)."""
    return max(
        (bisect.bisect_left(arrivals_s, t + width) - i for i, t in enumerate(arrivals_s)),
        default=0,
    )


def quietest_window(arrivals_s: Sequence[float], width: float, step: float = 0.1) -> int | None:
    """The fewest requests a window of `width` seconds inside the run holds, sliding by
    `step` from the first arrival to the last; None when the run is shorter than a window."""
    if not arrivals_s:
        return None
    start, end = arrivals_s[0], arrivals_s[-1]
    counts = [
        bisect.bisect_left(arrivals_s, begin + width) - bisect.bisect_left(arrivals_s, begin)
        for begin in (start + k * step for k in range(int((end - start - width) / step) + 1))
    ]
    return min(counts) if counts else None


async def rate_limit_pg(
    workdir: Path,
    *,
    limit: float,
    replicas: int,
    seconds: float,
    tag: int,
    window: float = 10.0,
    config: RelayConfig | None = None,
) -> dict[str, Any]:
    """`replicas` workers at RELAY_RATE_LIMIT=`limit` drain a backlog larger than the run can
    send; for `seconds` from the first POST, how close the relay keeps to the limit: its rate,
    and the busiest and quietest `window`-second windows against `window` x limit (the
    contract: at most (window + 1) x limit, at least 0.8 x window x limit while work waits)."""
    base = config or RelayConfig()
    config = dataclasses.replace(base, extra={**base.extra, "RELAY_RATE_LIMIT": f"{limit:g}"})
    backlog = int(limit * (seconds + 15) * 1.3) + 100
    async with pg_database("rate_limit") as database, Receiver(workdir) as receiver:
        url = pg_url(database)
        await migrate(url, notify=config.notify, workdir=workdir)
        conn = await pg_connect(database)
        try:
            async with conn.transaction():
                await copy_outbox(conn, [seated_payload(tag, i) for i in range(backlog)])
        finally:
            await conn.close()
        procs = [
            start_worker(f"worker{k}", url, receiver.url, config, workdir) for k in range(replicas)
        ]
        try:
            first = await receiver.wait_for(1, within=120, poll=0.005)
            if not first["received"]:
                raise RuntimeError("nothing arrived within 120 s\n" + procs[0].tail())
            meter = CpuMeter({f"worker{k}": p.pid for k, p in enumerate(procs)})
            meter.start()
            await asyncio.sleep(seconds)
            cpu = meter.stop()
            dump = await receiver.dump(arrivals=True)
        finally:
            codes = [p.stop() for p in procs]
    first_ns = dump["arrivals_ns"][0]
    arrivals = [(ns - first_ns) / 1e9 for ns in dump["arrivals_ns"]]
    arrivals = [t for t in arrivals if t <= seconds]
    busiest = busiest_window(arrivals, window)
    quietest = quietest_window(arrivals, window)
    span = max(arrivals[-1], 1e-9)
    result = {
        "limit": limit,
        "replicas": replicas,
        "seconds": round(span, 1),
        "window_seconds": window,
        "backlog": backlog,
        "requests": len(arrivals),
        "work_waited": len(arrivals) < backlog,
        "rate": round(len(arrivals) / span, 1),
        "busiest_window": busiest,
        "busiest_ratio": round(busiest / (window * limit), 3),
        "quietest_window": quietest,
        "quietest_ratio": round(quietest / (window * limit), 3) if quietest is not None else None,
        "per_second": rate_trace([int(t * 1e9) for t in arrivals], 0, window_s=1.0),
        "cpu_cores": cpu,
        "exit_codes": codes,
        "config": config.describe(),
    }
    log(
        f"rate limit {limit:g}/s x {replicas} replicas: {result['rate']:,.1f}/s over "
        f"{span:.1f} s; {window:g}-s windows {result['quietest_ratio']}x to "
        f"{result['busiest_ratio']}x of {window:g} x limit"
    )
    return result


#: How long the fairness scenario waits for venue B's states after writing the last.
LANDING_TIMEOUT = 120.0


async def _insert_state(conn: asyncpg.Connection, payload: dict[str, Any]) -> int:
    """One RMS transaction writing one state; returns when it committed (monotonic ns)."""
    await conn.execute(
        "INSERT INTO mozrest_outbox (booking_id, venue_id, payload) VALUES ($1, $2, $3::jsonb)",
        payload["bookingId"],
        payload["venueId"],
        dumps(payload),
    )
    return time.monotonic_ns()


async def fairness_pg(
    workdir: Path,
    *,
    backlog: int,
    samples: int,
    tag: int,
    rate_limit: float = 0.0,
    waiting_in: str = "deliveries",
    every: float = 0.05,
    config: RelayConfig | None = None,
) -> dict[str, Any]:
    """One worker with `backlog` states of venue A waiting (none: venue B alone); `samples`
    states of venue B are written one by one, `every` seconds, once A's backlog has begun to
    drain. Each B state's latency runs from its COMMIT to its arrival at the receiver.

    `waiting_in`: where A's backlog waits. `deliveries`: ingested while A was paused, then A
    resumed, so the whole backlog is due at once (a resumed venue; the claims' order decides).
    `outbox`: written by the RMS at once and not yet ingested (a backfill; ingest reads the
    outbox in the order it was written)."""
    base = config or RelayConfig()
    extra = {**base.extra, "RELAY_RATE_LIMIT": f"{rate_limit:g}"}
    config = dataclasses.replace(base, extra=extra)
    big = [dict(seated_payload(tag, i), venueId=venue_id(0)) for i in range(backlog)]
    small = [dict(seated_payload(tag + 1, i), venueId=venue_id(1)) for i in range(samples)]
    async with pg_database("fairness") as database, Receiver(workdir) as receiver:
        url = pg_url(database)
        await migrate(url, notify=config.notify, workdir=workdir)
        conn = await pg_connect(database)
        try:
            paused = bool(big) and waiting_in == "deliveries"
            if paused:
                await _venue(url, "pause", venue_id(0), workdir)
            if big:
                async with conn.transaction():
                    await copy_outbox(conn, big)
            proc = start_worker("worker", url, receiver.url, config, workdir)
            try:
                if paused:
                    deadline = time.monotonic() + DRAIN_TIMEOUT
                    while await conn.fetchval(
                        "SELECT count(*) FROM mozrest_outbox WHERE processed_at IS NULL"
                    ):
                        if time.monotonic() > deadline:
                            raise RuntimeError("the paused backlog was not ingested in time")
                        await asyncio.sleep(0.2)
                    await _venue(url, "resume", venue_id(0), workdir)
                if big:
                    await receiver.wait_for(1, within=120, poll=0.005)
                else:
                    await wait_registered_pg(database, [proc])
                    await asyncio.sleep(0.5)
                committed: dict[str, int] = {}
                next_at = time.monotonic()
                for payload in small:
                    committed[payload["bookingId"]] = await _insert_state(conn, payload)
                    next_at += every
                    await asyncio.sleep(max(0.0, next_at - time.monotonic()))
                sampled_ns = time.monotonic_ns()
                deadline = time.monotonic() + LANDING_TIMEOUT
                while True:
                    dump = await receiver.dump()
                    landed = [b for b in committed if b in dump["bookings"]]
                    if len(landed) == len(committed) or time.monotonic() > deadline:
                        break
                    await asyncio.sleep(0.2)
            finally:
                code = proc.stop()
        finally:
            await conn.close()
    latencies = [
        (dump["bookings"][b][1] - t) / 1e6 for b, t in committed.items() if b in dump["bookings"]
    ]
    big_ids = {p["bookingId"] for p in big}
    big_sent = sum(1 for b, v in dump["bookings"].items() if b in big_ids and v[1] <= sampled_ns)
    result = {
        "backlog": backlog,
        "waiting_in": waiting_in if backlog else None,
        "rate_limit": rate_limit,
        "samples": samples,
        "landed": len(latencies),
        "p50_ms": _round(percentile(latencies, 50)),
        # A state still waiting counts as slower than any that landed: no p99 without it.
        "p99_ms": _round(percentile(latencies, 99)) if len(latencies) == samples else None,
        "max_ms": _round(max(latencies, default=None)),
        "backlog_sent_while_sampling": big_sent,
        "backlog_waited_throughout": big_sent < backlog if backlog else None,
        "exit_code": code,
        "config": config.describe(),
    }
    log(
        f"fairness, backlog {backlog:,} in {waiting_in}, limit {rate_limit:g}: "
        f"B's p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms "
        f"({len(latencies)}/{samples} landed; A sent {big_sent:,})"
    )
    return result


async def _venue(url: str, action: str, venue: str, workdir: Path) -> None:
    """`mozrest-relay venue pause|resume VENUE` against the bench database."""
    env = RelayConfig().env(url, "http://127.0.0.1:9/rms")
    code, out = await run_child([RELAY, "venue", action, venue], within=60, env=env, cwd=workdir)
    if code != 0:
        raise RuntimeError(f"venue {action} failed:\n{out[-2000:]}")


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
