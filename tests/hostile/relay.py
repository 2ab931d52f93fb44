"""One real `mozrest-relay run` process per backend and test module, pointed at the hostile
stand-in, reused across hypothesis examples; and the RMS side of its database.

An example that fails leaves the relay suspect (a dead worker, a recorder stuck on one answer):
the next example then gets a fresh database and a fresh process, so each example is judged on
its own and a failing one shrinks to its own cause, not to whatever an earlier one broke.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, create_engine, select, text
from sqlalchemy.exc import DBAPIError

from app.models import ACTIVE_STATUSES, delivery, outbox
from mozrest_outbox import outbox_insert
from tests.chaos.harness import sync_url, wait_for_log
from tests.conftest import Launcher, MysqlDatabases, PostgresDatabases, Process, free_port
from tests.hostile.answers import HostileMozrest

WEBHOOK_TOKEN = "hostile-token"
ADMIN_TOKEN = "hostile-admin"
#: RELAY_RETRY_MAX_AGE: small, so that a Retry-After beyond it is in reach of a test.
RETRY_MAX_AGE_SECONDS = 60.0
HTTP_TIMEOUT_SECONDS = 1.0
LEASE_SECONDS = 2.5
CIRCUIT_COOLDOWN_SECONDS = 0.5

RELAY_ENV = {
    "MOZREST_WEBHOOK_TOKEN": WEBHOOK_TOKEN,
    "RELAY_ADMIN_TOKEN": ADMIN_TOKEN,
    "RELAY_LOG_LEVEL": "info",
    "RELAY_POLL_INTERVAL": "50ms",
    "RELAY_RETRY_BASE_DELAY": "50ms",
    "RELAY_RETRY_MAX_DELAY": "200ms",
    "RELAY_RETRY_MAX_AGE": f"{RETRY_MAX_AGE_SECONDS:g}s",
    "RELAY_CIRCUIT_THRESHOLD": "5",
    "RELAY_CIRCUIT_COOLDOWN": f"{CIRCUIT_COOLDOWN_SECONDS * 1000:g}ms",
    "RELAY_LEASE_SECONDS": f"{LEASE_SECONDS:g}s",
    "RELAY_HTTP_TIMEOUT": f"{HTTP_TIMEOUT_SECONDS:g}s",
    "RELAY_HEARTBEAT_INTERVAL": "1s",
    "RELAY_SHUTDOWN_GRACE": "2s",
}


class Databases:
    """Fresh migrated databases of one backend, from the session's templates."""

    def __init__(
        self,
        backend: str,
        *,
        folder: Path,
        sqlite_template: Path,
        postgres: PostgresDatabases | None,
        mysql: MysqlDatabases | None,
    ) -> None:
        self.backend = backend
        self.folder = folder
        self.sqlite_template = sqlite_template
        self.server = postgres if backend == "postgresql" else mysql
        self._count = itertools.count()

    def create(self) -> tuple[str, Callable[[], None]]:
        """A new database's async URL, and how to drop it."""
        if self.backend == "sqlite":
            path = self.folder / f"relay-{next(self._count)}.db"
            path.write_bytes(self.sqlite_template.read_bytes())
            return f"sqlite+aiosqlite:///{path}", lambda: path.unlink(missing_ok=True)
        assert self.server is not None
        server = self.server
        name = server.create()
        return server.url(name), lambda: server.drop(name)


class Relay:
    """A `mozrest-relay run` process (worker and admin API), its database and the stand-in."""

    def __init__(self, databases: Databases, launcher: Launcher, mozrest: HostileMozrest) -> None:
        self.databases = databases
        self.backend = databases.backend
        self.launcher = launcher
        self.mozrest = mozrest
        self.process: Process | None = None
        self.engine: Engine | None = None
        self.api: httpx.Client | None = None
        self._drop: Callable[[], None] | None = None
        #: Set while an example runs; still set at the next one's start if it failed.
        self.suspect = False
        self.restarts = 0
        self._ids = itertools.count()

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        database_url, self._drop = self.databases.create()
        port = free_port()
        env = {
            **RELAY_ENV,
            "DATABASE_URL": database_url,
            "MOZREST_WEBHOOK_URL": self.mozrest.url,
            "RELAY_PORT": str(port),
        }
        base = f"http://127.0.0.1:{port}"
        self.process = self.launcher.start("run", env=env, wait_url=f"{base}/healthz")
        wait_for_log(self.process, '"worker.started"', timeout=30)
        url = sync_url(database_url)
        options: dict[str, Any] = (
            {"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {}
        )
        self.engine = create_engine(url, **options)
        self.api = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30
        )

    def stop(self) -> None:
        if self.api is not None:
            self.api.close()
        if self.process is not None:
            self.process.kill()
        if self.engine is not None:
            self.engine.dispose()
        if self._drop is not None:
            self._drop()
        self.process = self.engine = self.api = self._drop = None

    def begin_example(self) -> None:
        """Start an example on a relay nothing is known to be wrong with."""
        if self.suspect or not self.alive():
            self.stop()
            self.restarts += 1
            self.start()
        self.mozrest.turn_healthy()
        self.suspect = True

    def end_example(self) -> None:
        """The example passed: the next one may reuse this relay."""
        self.suspect = False

    def alive(self) -> bool:
        return self.process is not None and self.process.popen.poll() is None

    def assert_alive(self) -> None:
        assert self.process is not None
        assert self.process.popen.poll() is None, (
            f"the relay process exited ({self.process.popen.returncode}) on {self.backend}:\n"
            + self.tail()
        )

    def tail(self, lines: int = 25) -> str:
        """The end of the relay's log, for failure messages."""
        if self.process is None:
            return ""
        return "\n".join(line[:600] for line in self.process.output().splitlines()[-lines:])

    def new_id(self, prefix: str) -> str:
        """A booking id no earlier example used."""
        return f"{prefix}-{next(self._ids)}-{time.monotonic_ns() % 10**6}"

    # -- the RMS's side ---------------------------------------------------------------------

    def write(self, payload: dict[str, Any]) -> int:
        """One RMS transaction writing a valid state, through the shipped helper."""
        assert self.engine is not None
        with self.engine.begin() as conn:
            conn.execute(outbox_insert(payload))
            newest = select(outbox.c.id).order_by(outbox.c.id.desc()).limit(1)
            return int(conn.execute(newest).scalar_one())

    def write_raw(self, booking_id: str, venue_id: str, payload: str | bytes) -> int | None:
        """One row with exactly this payload (JSON text, or raw bytes on SQLite), as an RMS
        could write it by hand; None when the database refuses it (the RMS sees that error)."""
        assert self.engine is not None
        if isinstance(payload, bytes):
            assert self.backend == "sqlite", "raw bytes only go into SQLite's JSON column"
            value = ":payload"
        elif self.backend == "postgresql":
            value = "CAST(:payload AS jsonb)"
        else:
            value = ":payload"
        statement = text(
            "INSERT INTO mozrest_outbox (booking_id, venue_id, payload) "
            f"VALUES (:booking_id, :venue_id, {value}) RETURNING id"
        )
        try:
            with self.engine.begin() as conn:
                row_id = conn.execute(
                    statement, {"booking_id": booking_id, "venue_id": venue_id, "payload": payload}
                ).scalar_one()
        except (DBAPIError, ValueError, UnicodeError):  # ValueError: psycopg2 refuses NUL itself
            return None
        return int(row_id)

    def unprocessed(self, row_ids: Iterable[int]) -> list[int]:
        assert self.engine is not None
        wanted = list(row_ids)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(outbox.c.id).where(outbox.c.id.in_(wanted), outbox.c.processed_at.is_(None))
            ).all()
        return [r.id for r in rows]

    def active_deliveries(self, booking_ids: Iterable[str]) -> list[int]:
        """Ids of the bookings' deliveries still `pending` or `retrying`."""
        assert self.engine is not None
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(delivery.c.id).where(
                    delivery.c.booking_id.in_(list(booking_ids)),
                    delivery.c.status.in_(ACTIVE_STATUSES),
                )
            ).all()
        return [r.id for r in rows]

    # -- the operator's side (the admin API) --------------------------------------------------

    def get(self, path: str, **params: Any) -> Any:
        assert self.api is not None
        try:
            answer = self.api.get(path, params=params)
        except httpx.TransportError:
            # A dead relay is the finding, not the refused connection: give it time to exit.
            assert self.process is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.popen.wait(10)
            self.assert_alive()
            raise
        assert answer.status_code == 200, f"GET {path} {params}: {answer.status_code} {answer.text}"
        return answer.json()

    def deliveries(self, booking_id: str) -> list[dict[str, Any]]:
        """The booking's deliveries with their attempts, oldest first."""
        found = []
        for item in self.get("/api/deliveries", booking_id=booking_id, limit=500)["items"]:
            found.append(self.get(f"/api/deliveries/{item['id']}"))
        return sorted(found, key=lambda d: d["id"])

    def outbox_rows(self, first_id: int) -> dict[int, dict[str, Any]]:
        """Every outbox row from `first_id` on, as the API lists them."""
        rows: dict[int, dict[str, Any]] = {}
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 500}
            if cursor:
                params["cursor"] = cursor
            page = self.get("/api/outbox", **params)
            for item in page["items"]:
                if item["id"] >= first_id:
                    rows[item["id"]] = item
            cursor = page["next_cursor"]
            if not cursor or not page["items"] or page["items"][-1]["id"] < first_id:
                return rows


def storable(value: str | None) -> str | None:
    """What is wrong with a text the relay stored and shows (None when nothing is)."""
    if value is None:
        return None
    if "\x00" in value:
        return "contains NUL"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8 (a lone surrogate)"
    return None


def wait_for(check: Callable[[], Any], *, timeout: float, relay: Relay) -> Any:
    """Poll `check` until it returns something truthy or `timeout` passes (then return its last
    value, for the caller to judge); fail at once if the relay died."""
    deadline = time.monotonic() + timeout
    while True:
        relay.assert_alive()
        last = check()
        if last or time.monotonic() >= deadline:
            return last
        time.sleep(0.05)


def wait_until(
    check: Callable[[], Any], *, timeout: float, relay: Relay, what: str, interval: float = 0.05
) -> Any:
    """Poll `check` until it returns something truthy; fail at once if the relay died."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        relay.assert_alive()
        last = check()
        if last:
            return last
        time.sleep(interval)
    relay.assert_alive()
    raise AssertionError(
        f"timed out after {timeout:g}s waiting for {what} on {relay.backend} "
        f"(last: {str(last)[:1500]})\nrelay log:\n{relay.tail()}"
    )
