"""The soak: two relay workers on a fresh PostgreSQL database for a long run against the emulator
failing on purpose, one replica SIGKILLed (and restarted) every few minutes; then the fault
suite's checker reads the whole history. `make soak` (30 minutes), or shorter:

    SOAK_MINUTES=2 SOAK_RATE=100 SOAK_KILL_INTERVAL=60 make soak     # what CI runs

Settings (environment): `SOAK_MINUTES` (30), `SOAK_RATE` RMS changes a second (300),
`SOAK_KILL_INTERVAL` seconds between SIGKILLs (300; 0: none), `SOAK_FAILURE_RATE` answered 500
(0.05), `SOAK_DROP_RATE` connections dropped (0.01), `SOAK_REPLICAS` (2), `SOAK_WARMUP_MINUTES`
(5, or a fifth of a shorter run), `SOAK_DATABASE_URL` a PostgreSQL server to create the run's
database on (default `TEST_DATABASE_URL`, else postgres@127.0.0.1:5432), `SOAK_RESULTS` where
the figures go as JSON (bench/results/soak.json).

Each minute it prints one row: states the RMS committed, states Mozrest accepted, the p50 and p99
lag of the states that reached Mozrest that minute (commit to the end of the request that put
them, or a newer state of their booking, there: the checker's `delivery_lags` rule, computed as
the run goes), requests and failed ones, the backlog, and per replica its RSS and its open TCP
connections (database/HTTP). At the end: the checker's figures (nothing lost, nothing stale, no
overlap) and the verdict, which also wants the RSS of the last stretch within 10% of the stretch
after warm-up and the per-minute p99 lag flat (the last stretch's median within 50%, or 0.5 s, of
the first's). The exit status is 0 only when the verdict passes.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from app.contract import canonical, parse_state, serialize
from app.migrate import upgrade
from tests.chaos.checker import DEFAULT_SEND_STATUSES, OutboxRow, ReceivedRequest, Report, check
from tests.chaos.harness import Receiver, Rms, booking_histories, relay_env, wait_for_log
from tests.conftest import Launcher, Process

ROOT = Path(__file__).resolve().parent.parent
#: The relay's settings for the run: production defaults, but a 10 s lease (5 s request deadline)
#: so that a killed replica's claims come back within a minute's figures.
RELAY_SETTINGS = {
    "lease_seconds": "10s",
    "http_timeout": "5s",
    "retry_base_delay": "1s",
    "retry_max_delay": "30s",
    "circuit_cooldown": "5s",
    "heartbeat_interval": "5s",
    "shutdown_grace": "5s",
}
WRITER_THREADS = 4
#: Events newer than this are not judged yet: a request or a commit may still be on its way in.
SETTLE_NS = 2_000_000_000


def setting(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


@dataclass
class Config:
    minutes: float = setting("SOAK_MINUTES", 30)
    rate: float = setting("SOAK_RATE", 300)
    kill_interval: float = setting("SOAK_KILL_INTERVAL", 300)
    failure_rate: float = setting("SOAK_FAILURE_RATE", 0.05)
    drop_rate: float = setting("SOAK_DROP_RATE", 0.01)
    replicas: int = int(setting("SOAK_REPLICAS", 2))
    warmup_minutes: int = int(setting("SOAK_WARMUP_MINUTES", -1))

    def __post_init__(self) -> None:
        if self.warmup_minutes < 0:
            self.warmup_minutes = min(5, max(1, int(self.minutes) // 5))


# -- the RMS ----------------------------------------------------------------------------------


def state_key(payload: Any) -> str | None:
    """A state as the checker compares it (normalised), or None when it is not one."""
    try:
        return serialize(canonical(parse_state(payload)))
    except Exception:
        return None


class Writer:
    """The RMS: `WRITER_THREADS` threads writing booking histories at `rate` changes a second
    in all, generated as they go (a long run's histories would not fit in memory at once). Each
    thread owns its bookings, so a booking's states commit in order."""

    def __init__(self, rms: Rms, *, rate: float) -> None:
        self.rms = rms
        self.rate = rate
        self.commits: deque[tuple[str, str, bool, int]] = deque()
        """(booking id, state key, sendable, commit time ns) as they commit."""
        self.written = 0
        self.retried = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(n,), name=f"rms-{n}", daemon=True)
            for n in range(WRITER_THREADS)
        ]
        self.error: BaseException | None = None

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self, number: int) -> None:
        interval = WRITER_THREADS / self.rate
        next_at = time.monotonic()
        chunk = 0
        try:
            while not self._stop.is_set():
                histories = booking_histories(
                    200, seed=number * 100_003 + chunk, prefix=f"s{number}c{chunk}"
                )
                chunk += 1
                queue = _interleave(histories, seed=chunk)
                for payload, sendable in queue:
                    if self._stop.is_set():
                        return
                    while True:
                        try:
                            self.rms.write(payload)
                            break
                        except DBAPIError:
                            self.retried += 1
                            time.sleep(0.2)
                    committed_ns = time.monotonic_ns()
                    key = state_key(payload)
                    assert key is not None
                    self.commits.append((payload["bookingId"], key, sendable, committed_ns))
                    with self._lock:
                        self.written += 1
                    next_at += interval
                    delay = next_at - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    elif delay < -1:
                        next_at = time.monotonic()  # behind: do not burst to catch up
        except BaseException as exc:
            self.error = exc


def _interleave(
    histories: list[list[dict[str, Any]]], *, seed: int
) -> list[tuple[dict[str, Any], bool]]:
    """The histories' states mixed, each booking's in order, each marked sendable from its first
    state with a send status on (the states whose lag is measured)."""
    import random

    rng = random.Random(seed)
    marked = []
    for states in histories:
        seen = False
        row = []
        for payload in states:
            seen = seen or payload["status"] in DEFAULT_SEND_STATUSES
            row.append((payload, seen))
        marked.append(row)
    mixed = []
    while marked:
        pick = rng.randrange(len(marked))
        mixed.append(marked[pick].pop(0))
        if not marked[pick]:
            marked.pop(pick)
    return mixed


# -- lag as the run goes ----------------------------------------------------------------------


@dataclass
class Booking:
    states: list[str] = field(default_factory=list)
    held: str | None = None
    pending: list[tuple[int, int]] = field(default_factory=list)
    """(index in `states`, commit ns) of sendable states Mozrest does not hold yet."""


class LagTracker:
    """For each sendable state: from its commit until Mozrest held it or a newer state of its
    booking (as `tests.chaos.checker.delivery_lags`), fed commits and accepted requests in time
    order up to a watermark."""

    def __init__(self) -> None:
        self.bookings: dict[str, Booking] = defaultdict(Booking)
        self.lags_by_minute: dict[int, list[float]] = defaultdict(list)
        self.start_ns = 0
        self._commits: list[tuple[int, str, str, bool]] = []
        self._accepts: list[tuple[int, str, str]] = []

    def add_commit(self, booking_id: str, key: str, sendable: bool, at_ns: int) -> None:
        self._commits.append((at_ns, booking_id, key, sendable))

    def add_accept(self, booking_id: str, key: str, finished_ns: int) -> None:
        self._accepts.append((finished_ns, booking_id, key))

    def advance(self, watermark_ns: int) -> None:
        events = [(at, 0, b, k, s) for at, b, k, s in self._commits if at <= watermark_ns]
        events += [(at, 1, b, k, False) for at, b, k in self._accepts if at <= watermark_ns]
        self._commits = [e for e in self._commits if e[0] > watermark_ns]
        self._accepts = [e for e in self._accepts if e[0] > watermark_ns]
        for at, kind, booking_id, key, sendable in sorted(events, key=lambda e: (e[0], e[1])):
            booking = self.bookings[booking_id]
            if kind == 0:
                booking.states.append(key)
                if not sendable:
                    continue
                if booking.held == key:
                    self._record(at, 0.0)
                else:
                    booking.pending.append((len(booking.states) - 1, at))
                continue
            booking.held = key
            newest = max((i for i, s in enumerate(booking.states) if s == key), default=-1)
            still = []
            for index, committed_ns in booking.pending:
                if index <= newest:
                    self._record(at, (at - committed_ns) / 1e9)
                else:
                    still.append((index, committed_ns))
            booking.pending = still

    def _record(self, at_ns: int, seconds: float) -> None:
        self.lags_by_minute[int((at_ns - self.start_ns) // 60_000_000_000)].append(seconds)

    def unresolved(self) -> int:
        return sum(len(b.pending) for b in self.bookings.values())


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# -- processes --------------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def open_connections(pid: int, *, database_port: int, http_port: int) -> tuple[int, int]:
    """(to the database, to the emulator): the process's established TCP connections."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    except OSError:
        return 0, 0
    ports: Counter[int] = Counter()
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[9] in inodes and parts[3] == "01":
                ports[int(parts[2].rsplit(":", 1)[1], 16)] += 1
    return ports[database_port], ports[http_port]


class Replicas:
    """The relay workers; `kill_one` SIGKILLs the next in turn and starts it again."""

    def __init__(self, launcher: Launcher, env: dict[str, str], count: int) -> None:
        self.launcher = launcher
        self.env = env
        self.processes: list[Process] = [self._start() for _ in range(count)]
        self.started_at = [time.monotonic()] * count
        self.kills = 0

    def _start(self) -> Process:
        process = self.launcher.start("worker", env=self.env)
        wait_for_log(process, '"worker.started"', timeout=60)
        return process

    def kill_one(self) -> int:
        slot = self.kills % len(self.processes)
        self.processes[slot].popen.send_signal(signal.SIGKILL)
        self.processes[slot].popen.wait(10)
        self.processes[slot] = self._start()
        self.started_at[slot] = time.monotonic()
        self.kills += 1
        return slot

    def check_alive(self) -> None:
        for slot, process in enumerate(self.processes):
            code = process.popen.poll()
            if code is not None:
                raise RuntimeError(f"replica {slot} exited ({code}):\n{process.output()[-3000:]}")

    def stop(self) -> None:
        for process in self.processes:
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.popen.wait(30)
            except Exception:
                process.kill()


# -- the run ----------------------------------------------------------------------------------


class Database:
    """A fresh database on the PostgreSQL server, migrated; dropped at the end."""

    def __init__(self) -> None:
        admin = (
            os.environ.get("SOAK_DATABASE_URL")
            or os.environ.get("TEST_DATABASE_URL")
            or "postgresql://postgres@127.0.0.1:5432/postgres"
        )
        self.admin = make_url(admin).set(drivername="postgresql+psycopg2")
        self.name = f"mozrest_soak_{uuid.uuid4().hex[:10]}"
        self.engine = create_engine(
            self.admin.render_as_string(hide_password=False), isolation_level="AUTOCOMMIT"
        )
        with self.engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = (
            self.admin.set(drivername="postgresql+asyncpg", database=self.name)
        ).render_as_string(hide_password=False)
        self.port = self.admin.port or 5432
        upgrade(self.url)

    def drop(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.engine.dispose()


@dataclass
class Minute:
    minute: int
    written: int = 0
    accepted: int = 0
    requests: int = 0
    failed: int = 0
    p50: float | None = None
    p99: float | None = None
    backlog: tuple[int, int] = (0, 0)
    rss_mib: list[float | None] = field(default_factory=list)
    connections: list[tuple[int, int]] = field(default_factory=list)
    note: str = ""

    HEADER = (
        "| min | written | accepted | p50 lag | p99 lag | requests (failed) | backlog "
        "| RSS MiB per replica | connections db/http | note |\n"
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |"
    )

    def row(self) -> str:
        def seconds(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f} s"

        rss = " / ".join("-" if r is None else f"{r:.0f}" for r in self.rss_mib)
        connections = " / ".join(f"{d}/{h}" for d, h in self.connections)
        return (
            f"| {self.minute + 1} | {self.written:,} | {self.accepted:,} | {seconds(self.p50)} | "
            f"{seconds(self.p99)} | {self.requests:,} ({self.failed:,}) | "
            f"{self.backlog[0]:,}+{self.backlog[1]:,} | {rss} | {connections} | {self.note} |"
        )


class Soak:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.tracker = LagTracker()
        self.received: list[tuple[str | None, int, int, int | None, str, int]] = []
        self.last_seq = 0
        self.minutes: list[Minute] = []
        self.counts: dict[int, Counter[str]] = defaultdict(Counter)
        self.notes: dict[int, list[str]] = defaultdict(list)

    def minute_of(self, at_ns: int) -> int:
        return int((at_ns - self.tracker.start_ns) // 60_000_000_000)

    def poll(self, receiver: Receiver, writer: Writer) -> None:
        """Take what the emulator received and what the RMS committed since the last poll."""
        answer = httpx.get(
            f"{receiver.url}/_emulator/requests", params={"since_seq": self.last_seq}, timeout=60
        ).raise_for_status()
        items = answer.json()["items"]
        if items and items[0]["seq"] != self.last_seq + 1 and self.last_seq:
            raise RuntimeError("the emulator's request log overflowed between two polls")
        for item in items:
            self.last_seq = item["seq"]
            body = item["body"]
            self.received.append(
                (
                    item["bookingId"],
                    item["arrival_ns"],
                    item["finished_ns"],
                    item["status_code"],
                    json.dumps(body, ensure_ascii=False, separators=(",", ":")),
                    item["seq"],
                )
            )
            minute = self.minute_of(item["finished_ns"])
            self.counts[minute]["requests"] += 1
            status = item["status_code"]
            if status is not None and 200 <= status < 300:
                self.counts[minute]["accepted"] += 1
                key = state_key(body)
                if key is not None and item["bookingId"]:
                    self.tracker.add_accept(item["bookingId"], key, item["finished_ns"])
            else:
                self.counts[minute]["failed"] += 1
        while writer.commits:
            booking_id, key, sendable, at = writer.commits.popleft()
            self.counts[self.minute_of(at)]["written"] += 1
            self.tracker.add_commit(booking_id, key, sendable, at)
        self.tracker.advance(time.monotonic_ns() - SETTLE_NS)

    def report_minute(
        self, minute: int, rms: Rms, replicas: Replicas, database_port: int, http_port: int
    ) -> Minute:
        counts = self.counts[minute]
        lags = self.tracker.lags_by_minute.get(minute, [])
        try:
            backlog = rms.backlog()
        except DBAPIError:
            backlog = (-1, -1)
        row = Minute(
            minute,
            written=counts["written"],
            accepted=counts["accepted"],
            requests=counts["requests"],
            failed=counts["failed"],
            p50=percentile(lags, 0.50),
            p99=percentile(lags, 0.99),
            backlog=backlog,
            rss_mib=[rss_mib(p.popen.pid) for p in replicas.processes],
            connections=[
                open_connections(p.popen.pid, database_port=database_port, http_port=http_port)
                for p in replicas.processes
            ],
            note="; ".join(self.notes.get(minute, [])),
        )
        self.minutes.append(row)
        print(row.row(), flush=True)
        return row

    def run(self) -> int:
        config = self.config
        print(
            f"soak: {config.minutes:g} min at {config.rate:g} states/s, {config.replicas} "
            f"workers on PostgreSQL, emulator failing {config.failure_rate:.0%} (500) and "
            f"dropping {config.drop_rate:.0%}, SIGKILL every {config.kill_interval:g} s",
            flush=True,
        )
        database = Database()
        workdir = Path(tempfile.mkdtemp(prefix="mozrest-soak-"))
        launcher = Launcher(workdir)
        rms = Rms(database.url, pool_size=WRITER_THREADS + 2)
        try:
            emulator = launcher.emulator(token="soak-token", api_key="soak-key")
            assert emulator.url is not None
            receiver = Receiver(emulator.url)
            http_port = int(emulator.url.rsplit(":", 1)[1])
            receiver.set_faults(
                failure_rate=config.failure_rate, drop_rate=config.drop_rate, seed=20
            )
            env = relay_env(database.url, emulator.url, **RELAY_SETTINGS)
            env["MOZREST_WEBHOOK_TOKEN"] = "soak-token"
            replicas = Replicas(launcher, env, config.replicas)
            writer = Writer(rms, rate=config.rate)
            print(Minute.HEADER, flush=True)
            start = time.monotonic()
            self.tracker.start_ns = time.monotonic_ns()
            writer.start()
            end = start + config.minutes * 60
            next_kill = start + config.kill_interval if config.kill_interval > 0 else float("inf")
            reported = 0
            while True:
                now = time.monotonic()
                if now >= end:
                    break
                if writer.error is not None:
                    raise writer.error
                replicas.check_alive()
                if now >= next_kill and now < end - 1:
                    slot = replicas.kill_one()
                    self.notes[int((now - start) // 60)].append(f"SIGKILL replica {slot + 1}")
                    next_kill += config.kill_interval
                self.poll(receiver, writer)
                # A minute is reported once the watermark has passed its end.
                while (now - start) >= (reported + 1) * 60 + SETTLE_NS / 1e9 + 1:
                    self.report_minute(reported, rms, replicas, database.port, http_port)
                    reported += 1
                time.sleep(1.0)
            writer.stop()
            written = writer.written
            settle_started = time.monotonic()
            settled = self._wait_settled(rms, receiver, writer, timeout=300)
            settle_seconds = time.monotonic() - settle_started
            time.sleep(1.5)  # the last requests' log entries
            self.poll(receiver, writer)
            self.tracker.advance(time.monotonic_ns())
            while reported < int(config.minutes + 0.999):
                self.report_minute(reported, rms, replicas, database.port, http_port)
                reported += 1
            replicas.stop()
            report = self.check(rms)
            return self.conclude(report, written, settled, settle_seconds, replicas.kills, writer)
        finally:
            launcher.stop_all()
            rms.close()
            database.drop()

    def _wait_settled(self, rms: Rms, receiver: Receiver, writer: Writer, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll(receiver, writer)
            try:
                if rms.backlog() == (0, 0):
                    return True
            except DBAPIError:
                pass
            time.sleep(1.0)
        return False

    def check(self, rms: Rms) -> Report:
        """The checker over the whole history, a slice of bookings at a time (a long run's
        requests as parsed JSON would not fit in memory at once)."""
        outbox = rms.outbox_rows()
        slices = 16
        rows_by: dict[int, list[OutboxRow]] = defaultdict(list)
        for row in outbox:
            rows_by[hash(row.booking_id) % slices].append(row)
        requests_by: dict[int, list[tuple[Any, ...]]] = defaultdict(list)
        for entry in self.received:
            requests_by[hash(entry[0]) % slices].append(entry)
        total = Report(changes=0, bookings=0, requests=0, accepted=0, duplicates=0)
        for part in range(slices):
            received = [
                ReceivedRequest(booking, arrival, finished, status, json.loads(body), seq)
                for booking, arrival, finished, status, body, seq in requests_by[part]
            ]
            report = check(rows_by[part], received)
            total.changes += report.changes
            total.bookings += report.bookings
            total.requests += report.requests
            total.accepted += report.accepted
            total.duplicates += report.duplicates
            total.violations.extend(report.violations)
        return total

    def conclude(
        self,
        report: Report,
        written: int,
        settled: bool,
        settle_seconds: float,
        kills: int,
        writer: Writer,
    ) -> int:
        config = self.config
        warm = config.warmup_minutes
        after = [m for m in self.minutes if m.minute >= warm]
        span = 10 if len(after) >= 20 else len(after) // 2
        first, last = after[:span], after[-span:] if span else []

        def mean_rss(rows: list[Minute]) -> float | None:
            values = [r for m in rows for r in m.rss_mib if r is not None]
            return statistics.fmean(values) if values else None

        def median_p99(rows: list[Minute]) -> float | None:
            values = [m.p99 for m in rows if m.p99 is not None]
            return statistics.median(values) if values else None

        rss_first, rss_last = mean_rss(first), mean_rss(last)
        p99_first, p99_last = median_p99(first), median_p99(last)
        checks: list[tuple[str, bool | None, str]] = []
        checks.append(
            (
                "history",
                report.ok and settled,
                f"{report.changes:,} changes, {report.bookings:,} bookings, {report.requests:,} "
                f"requests ({report.accepted:,} accepted, {report.duplicates:,} duplicates): lost "
                f"{report.lost}, stale {report.stale}, overlaps {report.overlaps}, other "
                f"{len(report.violations) - report.lost - report.stale - report.overlaps}; "
                + (
                    f"settled {settle_seconds:.1f} s after the writes stopped"
                    if settled
                    else "never settled"
                ),
            )
        )
        if rss_first and rss_last:
            drift = rss_last / rss_first - 1
            checks.append(
                (
                    "rss",
                    abs(drift) <= 0.10,
                    f"mean RSS {rss_first:.1f} MiB in minutes {first[0].minute + 1}-"
                    f"{first[-1].minute + 1}, {rss_last:.1f} MiB in minutes {last[0].minute + 1}-"
                    f"{last[-1].minute + 1} ({drift:+.1%}; bound 10%)",
                )
            )
        else:
            checks.append(("rss", None, "run too short to compare two stretches after warm-up"))
        if p99_first is not None and p99_last is not None:
            bound = max(p99_first * 1.5, p99_first + 0.5)
            checks.append(
                (
                    "p99 lag",
                    p99_last <= bound,
                    f"median per-minute p99 {p99_first:.2f} s first, {p99_last:.2f} s last "
                    f"(bound {bound:.2f} s)",
                )
            )
        else:
            checks.append(("p99 lag", None, "run too short to compare two stretches"))
        all_lags = [s for lags in self.tracker.lags_by_minute.values() for s in lags]
        print(
            f"\nwritten {written:,} states ({writer.retried} RMS writes retried), "
            f"{kills} SIGKILLs; lag over the run: p50 {percentile(all_lags, 0.5) or 0:.2f} s, "
            f"p99 {percentile(all_lags, 0.99) or 0:.2f} s, max {max(all_lags, default=0):.2f} s; "
            f"{self.tracker.unresolved()} sendable states never reached Mozrest (held back: "
            "seated and cancelled before the first send, which the checker allows)"
        )
        for name, ok, detail in checks:
            verdict = "n/a " if ok is None else ("ok  " if ok else "FAIL")
            print(f"{verdict} {name}: {detail}")
        if not report.ok:
            print(report.describe())
        passed = all(ok is not False for _, ok, _ in checks)
        print(f"verdict: {'PASS' if passed else 'FAIL'}", flush=True)
        self.save(checks, passed, written, kills)
        return 0 if passed else 1

    def save(
        self, checks: list[tuple[str, bool | None, str]], passed: bool, written: int, kills: int
    ) -> None:
        path = Path(os.environ.get("SOAK_RESULTS") or ROOT / "bench" / "results" / "soak.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "config": self.config.__dict__,
            "relay_settings": RELAY_SETTINGS,
            "written": written,
            "kills": kills,
            "minutes": [m.__dict__ for m in self.minutes],
            "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in checks],
            "passed": passed,
        }
        path.write_text(json.dumps(data, indent=1, default=list) + "\n")
        print(f"figures written to {path}")


def main() -> int:
    return Soak(Config()).run()


if __name__ == "__main__":
    sys.exit(main())
