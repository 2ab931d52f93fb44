"""What the fault scenarios share: scale, an RMS writing changes, the receiver's log, settling,
a private PostgreSQL server, and the figures each scenario reports.

Everything here is synchronous on purpose: the relay and the emulator are real processes, the RMS
is a few threads with their own database connections, and the test only watches.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, Text, cast, create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from app.models import delivery, outbox
from mozrest_outbox import outbox_insert
from tests.chaos.checker import OutboxRow, ReceivedRequest, Report, check, timeline
from tests.conftest import Launcher, Process, free_port

SCALES = ("smoke", "full")
SCALE = os.environ.get("CHAOS_SCALE", "smoke").strip().lower() or "smoke"
if SCALE not in SCALES:
    raise RuntimeError(f"CHAOS_SCALE must be one of {', '.join(SCALES)}, got {SCALE!r}")

WEBHOOK_TOKEN = "chaos-token"
ADMIN_TOKEN = "chaos-admin"


def scaled(smoke: Any, full: Any) -> Any:
    """The value for the scale this run uses (CHAOS_SCALE=smoke|full, default smoke)."""
    return full if SCALE == "full" else smoke


def change_count(smoke: int, full: int) -> int:
    """How many changes a scenario writes; CHAOS_CHANGES overrides it (for quick trials)."""
    override = os.environ.get("CHAOS_CHANGES", "").strip()
    return int(override) if override else int(scaled(smoke, full))


# -- figures ------------------------------------------------------------------------------


@dataclass(slots=True)
class Figures:
    """One scenario's row: what was written, and what the checker found."""

    scenario: str
    changes: int
    lost: int
    stale: int
    overlaps: int
    duplicates: int
    recovery_seconds: float | None
    notes: str = ""
    report: Report | None = field(default=None, repr=False)
    #: Scenario-specific measurements the test asserts on (exit codes, requests in an outage).
    facts: dict[str, Any] = field(default_factory=dict)

    HEADER = (
        "| scenario | scale | changes | lost | stale | overlaps | duplicates | recovery | notes |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    )

    @classmethod
    def from_report(
        cls,
        scenario: str,
        report: Report,
        recovery_seconds: float | None,
        notes: str = "",
        **facts: Any,
    ) -> Figures:
        return cls(
            scenario,
            report.changes,
            report.lost,
            report.stale,
            report.overlaps,
            report.duplicates,
            recovery_seconds,
            notes,
            report,
            facts,
        )

    def row(self) -> str:
        recovery = "-" if self.recovery_seconds is None else f"{self.recovery_seconds:.1f} s"
        return (
            f"| {self.scenario} | {SCALE} | {self.changes:,} | {self.lost} | {self.stale} | "
            f"{self.overlaps} | {self.duplicates} | {recovery} | {self.notes} |"
        )


#: Every row printed this session, for the terminal summary (tests/chaos/conftest.py).
RESULTS: list[Figures] = []


def publish(figures: Figures) -> Figures:
    """Print a scenario's row and keep it for the session's summary table."""
    RESULTS.append(figures)
    print(f"\n{Figures.HEADER}\n{figures.row()}")
    if figures.report is not None and not figures.report.ok:
        print(figures.report.describe())
    return figures


# -- databases ----------------------------------------------------------------------------


def sync_url(database_url: str) -> str:
    """The relay's async URL, for the test's own (synchronous) connections."""
    url = make_url(database_url)
    driver = {"postgresql": "postgresql+psycopg2", "mysql": "mysql+pymysql"}.get(
        url.get_backend_name(), "sqlite"
    )
    return url.set(drivername=driver).render_as_string(hide_password=False)


class Rms:
    """The RMS side of the database: writes outbox rows, reads outcomes and deliveries."""

    def __init__(self, database_url: str, *, pool_size: int = 4) -> None:
        self.database_url = database_url
        url = sync_url(database_url)
        kwargs: dict[str, Any] = {}
        if url.startswith(("postgresql", "mysql")):
            kwargs = {"pool_size": pool_size, "max_overflow": 0, "pool_pre_ping": True}
        else:
            kwargs = {"connect_args": {"timeout": 30}}
        self.engine: Engine = create_engine(url, **kwargs)
        self.dialect = self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    def write(self, payload: dict[str, Any]) -> None:
        """One RMS transaction: the booking's new state, through the shipped helper."""
        with self.engine.begin() as conn:
            conn.execute(outbox_insert(payload))

    def write_many(self, payloads: list[dict[str, Any]], *, chunk: int = 2000) -> None:
        """Many bookings' states at once (a backlog), a few thousand rows a transaction."""
        for first in range(0, len(payloads), chunk):
            rows = [
                {"booking_id": p["bookingId"], "venue_id": p["venueId"], "payload": p}
                for p in payloads[first : first + chunk]
            ]
            with self.engine.begin() as conn:
                conn.execute(outbox.insert(), rows)

    def write_text(self, booking_id: str, venue_id: str, payload_text: str) -> int:
        """A row with exactly this payload text (which the database may refuse)."""
        value = "CAST(:payload AS jsonb)" if self.dialect == "postgresql" else ":payload"
        with self.engine.begin() as conn:
            row_id = conn.execute(
                text(
                    "INSERT INTO mozrest_outbox (booking_id, venue_id, payload) "
                    f"VALUES (:booking_id, :venue_id, {value}) RETURNING id"
                ),
                {"booking_id": booking_id, "venue_id": venue_id, "payload": payload_text},
            ).scalar_one()
        return int(row_id)

    def outbox_rows(self) -> list[OutboxRow]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(
                    outbox.c.id,
                    outbox.c.booking_id,
                    outbox.c.venue_id,
                    cast(outbox.c.payload, Text).label("payload_text"),
                    outbox.c.outcome,
                ).order_by(outbox.c.id)
            ).all()
        return [OutboxRow(r.id, r.booking_id, r.venue_id, r.payload_text, r.outcome) for r in rows]

    def outcomes(self) -> dict[int, tuple[str | None, str | None]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(outbox.c.id, outbox.c.outcome, outbox.c.error)).all()
        return {r.id: (r.outcome, r.error) for r in rows}

    def backlog(self) -> tuple[int, int]:
        """(outbox rows without an outcome, deliveries still pending or retrying)."""
        with self.engine.connect() as conn:
            unprocessed = conn.execute(
                select(func.count()).select_from(outbox).where(outbox.c.processed_at.is_(None))
            ).scalar_one()
            active = conn.execute(
                select(func.count())
                .select_from(delivery)
                .where(delivery.c.status.in_(("pending", "retrying")))
            ).scalar_one()
        return int(unprocessed), int(active)


def wait_settled(rms: Rms, *, timeout: float, what: str = "the relay to settle") -> float:
    """Wait until every row has an outcome and no delivery is active; return when (monotonic)."""
    deadline = time.monotonic() + timeout
    last: tuple[int, int] | str = "never read"
    while time.monotonic() < deadline:
        try:
            last = rms.backlog()
        except DBAPIError as exc:
            last = f"database error: {str(exc).splitlines()[0]}"
        else:
            if last == (0, 0):
                return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what}; "
        f"(unprocessed rows, active deliveries) = {last}"
    )


# -- the receiver -------------------------------------------------------------------------


class Receiver:
    """The emulator's control API: faults in, what it received out (one short call each)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def set_faults(self, **settings: Any) -> None:
        httpx.put(f"{self.url}/_emulator/faults", json=settings, timeout=30).raise_for_status()

    def clear_faults(self) -> None:
        httpx.delete(f"{self.url}/_emulator/faults", timeout=30).raise_for_status()

    def requests(self) -> list[ReceivedRequest]:
        answer = httpx.get(f"{self.url}/_emulator/requests", timeout=120).raise_for_status()
        return [
            ReceivedRequest(
                booking_id=item["bookingId"],
                arrival_ns=item["arrival_ns"],
                finished_ns=item["finished_ns"],
                status_code=item["status_code"],
                body=item["body"],
                seq=item["seq"],
            )
            for item in answer.json()["items"]
        ]

    def bookings(self) -> dict[str, Any]:
        answer = httpx.get(f"{self.url}/_emulator/bookings", timeout=120).raise_for_status()
        items: dict[str, Any] = answer.json()["items"]
        return items


# -- relay processes ----------------------------------------------------------------------


def relay_env(database_url: str, emulator_url: str, **settings: Any) -> dict[str, str]:
    """The environment of a relay process pointed at the emulator; `settings` are RELAY_*."""
    env = {
        "DATABASE_URL": database_url,
        "MOZREST_WEBHOOK_URL": f"{emulator_url}/rms",
        "MOZREST_API_URL": emulator_url,
        "MOZREST_WEBHOOK_TOKEN": WEBHOOK_TOKEN,
        "MOZREST_API_KEY": "chaos-key",
        "RELAY_LOG_LEVEL": "info",
        "RELAY_LEASE_SECONDS": "3s",
        "RELAY_HTTP_TIMEOUT": "1s",
        "RELAY_RETRY_BASE_DELAY": "100ms",
        "RELAY_RETRY_MAX_DELAY": "1s",
        "RELAY_CIRCUIT_COOLDOWN": "1s",
        "RELAY_HEARTBEAT_INTERVAL": "1s",
        "RELAY_SHUTDOWN_GRACE": "3s",
    }
    env.update({f"RELAY_{key.upper()}": str(value) for key, value in settings.items()})
    return env


def start_emulator(launcher: Launcher) -> tuple[Process, Receiver]:
    process = launcher.emulator(token=WEBHOOK_TOKEN, api_key="chaos-key")
    assert process.url is not None
    return process, Receiver(process.url)


def start_worker(launcher: Launcher, env: dict[str, str]) -> Process:
    process = launcher.start("worker", env=env)
    wait_for_log(process, '"worker.started"', timeout=30)
    return process


def start_run(launcher: Launcher, env: dict[str, str]) -> tuple[Process, str]:
    """A `mozrest-relay run` process (API and worker); returns it and its base URL."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = launcher.start(
        "run", env={**env, "RELAY_PORT": str(port)}, wait_url=f"{base}/healthz"
    )
    wait_for_log(process, '"worker.started"', timeout=30)
    return process, base


def wait_for_log(process: Process, needle: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if needle in process.output():
            return
        if process.popen.poll() is not None:
            raise AssertionError(
                f"process exited ({process.popen.returncode}):\n{process.output()}"
            )
        time.sleep(0.05)
    raise AssertionError(f"{needle} not logged within {timeout}s:\n{process.output()[-3000:]}")


def log_events(process: Process, event: str) -> list[dict[str, Any]]:
    """The JSON log lines of one event."""
    found = []
    for line in process.output().splitlines():
        if f'"{event}"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == event:
            found.append(entry)
    return found


@dataclass(frozen=True, slots=True)
class Termination:
    """How a process took a SIGTERM."""

    code: int | None
    """Exit code, or None when it outlived the wait (it was then killed)."""
    exit_seconds: float
    """From the signal to the process's exit."""
    stopped_seconds: float | None
    """From the signal to its `worker.stopped` event: its work finished or released."""


def terminate(process: Process, *, timeout: float) -> Termination:
    """SIGTERM a process and wait for it to exit."""
    signalled_at = time.time()
    started = time.monotonic()
    process.popen.send_signal(signal.SIGTERM)
    try:
        code: int | None = process.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        code = None
        process.kill()
    exit_seconds = time.monotonic() - started
    stopped = log_events(process, "worker.stopped")
    stopped_seconds = (
        datetime.fromisoformat(stopped[-1]["time"]).timestamp() - signalled_at if stopped else None
    )
    return Termination(code, exit_seconds, stopped_seconds)


# -- the RMS's changes --------------------------------------------------------------------

STATUSES_BEFORE_SEATED = ("booked", "confirmed", "arrived")
SKUS = ("PIZZA-001", "WINE-012", "WATER-003", "SALAD-007", "CAKE-010")


def booking_histories(changes: int, *, seed: int, prefix: str) -> list[list[dict[str, Any]]]:
    """Per booking, the states an RMS would write, `changes` states in all.

    Most bookings are seated and then change (tables, party size, items, notes) and finish; some
    are cancelled before they are seated (never sent), some repeat a state (a no-op) or go back to
    an earlier one (A, B, A). States are full payloads in Mozrest's shape.
    """
    rng = random.Random(seed)
    histories: list[list[dict[str, Any]]] = []
    total = 0
    index = 0
    while total < changes:
        booking_id = f"{prefix}-{index:06d}"
        base: dict[str, Any] = {
            "bookingId": booking_id,
            "venueId": f"venue-{index % 7}",
            "partySize": rng.randint(1, 8),
            "status": "booked",
            "tables": [f"T{rng.randint(1, 40)}"],
            "date": 1_790_000_000 + index * 60,
        }
        if rng.random() < 0.7:
            base["contact"] = {"firstname": "Guest", "lastname": f"N{index}", "locale": "en"}
        states: list[dict[str, Any]] = []
        if rng.random() < 0.5:
            states.append(dict(base, status=rng.choice(STATUSES_BEFORE_SEATED)))
        if rng.random() < 0.1:
            states.append(dict(base, status="cancelled"))  # never seated: never sent
        else:
            current = dict(base, status="seated")
            states.append(current)
            for _ in range(rng.randint(0, 5)):
                current = _change(current, rng)
                states.append(current)
                if rng.random() < 0.08:
                    states.append(dict(current))  # the RMS wrote the same state again
                if rng.random() < 0.05 and len(states) >= 2:
                    states.append(dict(states[-2]))  # and back again: A, B, A
            if rng.random() < 0.6:
                states.append(dict(current, status=rng.choice(("finished", "finished", "left"))))
            elif rng.random() < 0.2:
                states.append(dict(current, status="cancelled"))
        histories.append(states)
        total += len(states)
        index += 1
    while total > changes:  # trim the last bookings to hit the exact count
        last, excess = histories[-1], total - changes
        if excess >= len(last):
            histories.pop()
            total -= len(last)
        else:
            del last[-excess:]
            total -= excess
    return histories


def _change(current: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    new = json.loads(json.dumps(current))
    kind = rng.choice(("tables", "party", "items", "items", "notes", "prepayment"))
    if kind == "tables":
        new["tables"] = [f"T{rng.randint(1, 40)}" for _ in range(rng.randint(1, 2))]
    elif kind == "party":
        new["partySize"] = max(1, new["partySize"] + rng.choice((-2, -1, 1, 2, 3)))
    elif kind == "items":
        if new.get("items") and rng.random() < 0.2:
            new["items"] = []  # emptied (the relay warns: Mozrest keeps old items)
        else:
            new["items"] = [
                {"sku": rng.choice(SKUS), "quantity": rng.randint(1, 4)}
                for _ in range(rng.randint(1, 3))
            ]
    elif kind == "notes":
        new["notes"] = rng.choice(("window seat", "birthday", "allergic to peanuts", "high chair"))
        new["notes"] += f" #{rng.randint(1, 999)}"
    else:
        new["prepayment"] = rng.choice((10, 25.5, 50, 50.0))
    return new


class ChangeWriter:
    """Writes the histories as an RMS would, from `threads` threads at about `rate` changes/s.

    Each thread owns whole bookings, so a booking's states are committed in order. A write that
    fails (the database is restarting) is retried until it commits: the RMS's own transaction
    retry. `on_progress` is called with the number of changes written so far.
    """

    def __init__(
        self, rms: Rms, histories: list[list[dict[str, Any]]], *, rate: float, threads: int = 4
    ) -> None:
        self.rms = rms
        self.rate = rate
        self.written = 0
        self.failures = 0
        #: (booking id, when its write committed, monotonic ns), in commit order per booking.
        self.commits: list[tuple[str, int]] = []
        self.total = sum(len(h) for h in histories)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        rng = random.Random(len(histories))
        self._queues: list[list[dict[str, Any]]] = []
        for part in range(threads):
            mine = [list(h) for h in histories[part::threads]]
            queue: list[dict[str, Any]] = []
            while mine:  # interleave this thread's bookings, keeping each booking's order
                pick = rng.randrange(len(mine))
                queue.append(mine[pick].pop(0))
                if not mine[pick]:
                    mine.pop(pick)
            self._queues.append(queue)
        self._threads = [
            threading.Thread(target=self._run, args=(queue,), name=f"rms-{i}", daemon=True)
            for i, queue in enumerate(self._queues)
        ]
        self.started_at = 0.0
        self.finished_at: float | None = None

    def start(self) -> ChangeWriter:
        self.started_at = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self, queue: list[dict[str, Any]]) -> None:
        interval = len(self._threads) / self.rate
        next_at = time.monotonic()
        try:
            for payload in queue:
                while not self._stop.is_set():
                    try:
                        self.rms.write(payload)
                        break
                    except DBAPIError:
                        with self._lock:
                            self.failures += 1
                        time.sleep(0.2)
                if self._stop.is_set():
                    return
                committed_ns = time.monotonic_ns()
                with self._lock:
                    self.written += 1
                    self.commits.append((payload["bookingId"], committed_ns))
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        except BaseException as exc:  # surfaced by join()
            self._error = exc

    def wait_written(self, count: int, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.written < count and time.monotonic() < deadline:
            self._raise()
            time.sleep(0.02)
        self._raise()
        assert self.written >= count, f"only {self.written} of {count} changes written"

    def join(self, *, timeout: float) -> float:
        """Wait for every change to be written; return when that happened (monotonic)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._raise()
        assert self.written == self.total, f"only {self.written} of {self.total} changes written"
        self.finished_at = time.monotonic()
        return self.finished_at

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error


# -- checking -----------------------------------------------------------------------------


def commit_times(outbox: list[OutboxRow], commits: list[tuple[str, int]]) -> dict[int, int]:
    """Outbox id to commit time (monotonic ns): a booking's k-th commit is its k-th row, since
    one writer thread writes each booking's states in order (`ChangeWriter`)."""
    pending: dict[str, list[int]] = {}
    for booking_id, committed_ns in commits:
        pending.setdefault(booking_id, []).append(committed_ns)
    found: dict[int, int] = {}
    for row in outbox:  # in id order
        times = pending.get(row.booking_id)
        if times:
            found[row.id] = times.pop(0)
    return found


def check_history(rms: Rms, receiver: Receiver) -> Report:
    """Check what the RMS wrote against everything the receiver got; print the timelines of the
    first bookings that broke a rule."""
    outbox, received = rms.outbox_rows(), receiver.requests()
    report = check(outbox, received)
    broken = list(dict.fromkeys(v.booking_id for v in report.violations if v.booking_id))
    for booking_id in broken[:3]:
        print(timeline(booking_id, outbox, received))
    return report


@contextmanager
def ticker(interval: float, action: Callable[[int], None]) -> Iterator[threading.Event]:
    """Call `action(n)` every `interval` seconds in a thread until the block ends."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        n = 0
        while not stop.wait(interval):
            try:
                action(n)
            except BaseException as exc:
                errors.append(exc)
                return
            n += 1

    thread = threading.Thread(target=run, name="ticker", daemon=True)
    thread.start()
    try:
        yield stop
    finally:
        stop.set()
        thread.join(30)
    if errors:
        raise errors[0]


# -- a private PostgreSQL server ----------------------------------------------------------


class PrivatePostgres:
    """A throwaway PostgreSQL server in a temporary folder on its own port, for tests that stop
    or restart the database: the shared server on 5432 is never touched (CLARIFICATIONS)."""

    def __init__(self) -> None:
        bindir = subprocess.run(
            ["pg_config", "--bindir"], check=True, capture_output=True, text=True
        ).stdout.strip()
        self.bindir = Path(bindir)
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="mozrest-chaos-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.root, "postgres", "postgres")
            runuser = shutil.which("runuser")
            self._as_user = (
                [runuser, "-u", "postgres", "--"] if runuser else ["su", "postgres", "-c"]
            )

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self._as_user[-1:] == ["-c"]:
            command = [*self._as_user, " ".join(f"'{part}'" for part in command)]
        else:
            command = [*self._as_user, *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = self.log.read_text() if self.log.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}{result.stderr}{log}")

    def init(self) -> PrivatePostgres:
        self._run(
            "initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        return self

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
            " -c max_connections=100 -c shared_buffers=32MB"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self, name: str) -> str:
        engine = create_engine(
            sync_url(self.url("postgres")), isolation_level="AUTOCOMMIT", pool_size=1
        )
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    def remove(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def readiness_watch(base_url: str) -> tuple[list[tuple[float, int | None]], threading.Event]:
    """Poll `/readyz` every 100 ms in a thread; returns the (time, status) log and a stop flag."""
    log: list[tuple[float, int | None]] = []
    stop = threading.Event()

    def run() -> None:
        with httpx.Client(timeout=3) as client:
            while not stop.is_set():
                try:
                    status: int | None = client.get(f"{base_url}/readyz").status_code
                except httpx.HTTPError:
                    status = None
                log.append((time.monotonic(), status))
                stop.wait(0.1)

    threading.Thread(target=run, name="readyz", daemon=True).start()
    return log, stop
