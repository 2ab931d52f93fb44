"""Shared fixtures: a fresh, migrated database per test on each backend, and process helpers.

Backends: SQLite always; PostgreSQL when `TEST_DATABASE_URL` is set or a local server answers on
127.0.0.1:5432. With `REQUIRE_POSTGRES=1` (CI) a missing PostgreSQL fails the run instead of
skipping its tests.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import pytest
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy import text
from sqlalchemy.engine import make_url

from app.db import create_engine
from app.migrate import upgrade

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

_DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/postgres"


def _postgres_admin_url() -> str | None:
    """A URL to a PostgreSQL database we may create databases from, or None."""
    url = os.environ.get("TEST_DATABASE_URL") or _DEFAULT_PG
    parsed = make_url(url)
    try:
        with socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 5432), 1):
            pass
    except OSError:
        if os.environ.get("REQUIRE_POSTGRES") == "1":
            pytest.exit(f"REQUIRE_POSTGRES=1 but PostgreSQL does not answer at {url}", 3)
        return None
    return url


def _sync_url(url: str, database: str | None = None) -> str:
    parsed = make_url(url).set(drivername="postgresql+psycopg2")
    if database is not None:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def _async_url(url: str, database: str) -> str:
    parsed = make_url(url).set(drivername="postgresql+asyncpg", database=database)
    return parsed.render_as_string(hide_password=False)


class PostgresDatabases:
    """Creates databases from one migrated template: a fresh one per test costs ~50 ms."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.template = f"mozrest_test_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.engine = create_sync_engine(
            _sync_url(admin_url), isolation_level="AUTOCOMMIT", pool_size=1
        )
        with self.engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.template}"'))
        upgrade(_async_url(admin_url, self.template))

    def create(self, *, migrated: bool = True) -> str:
        name = f"mozrest_test_{uuid.uuid4().hex[:12]}"
        template = f' TEMPLATE "{self.template}"' if migrated else ""
        with self.engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"{template}'))
        return name

    def url(self, name: str) -> str:
        return _async_url(self.admin_url, name)

    def drop(self, name: str) -> None:
        with self.engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def close(self) -> None:
        self.drop(self.template)
        self.engine.dispose()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresDatabases | None]:
    admin_url = _postgres_admin_url()
    if admin_url is None:
        yield None
        return
    databases = PostgresDatabases(admin_url)
    try:
        yield databases
    finally:
        databases.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "template.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


class MysqlDatabases:
    """Creates databases by copying the tables of one migrated template (MySQL has no
    `CREATE DATABASE ... TEMPLATE`)."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.template = f"mozrest_test_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        parsed = make_url(admin_url).set(drivername="mysql+pymysql", database=None)
        self.engine = create_sync_engine(
            parsed.render_as_string(hide_password=False), isolation_level="AUTOCOMMIT"
        )
        with self.engine.connect() as conn:
            conn.execute(text(f"CREATE DATABASE `{self.template}` CHARACTER SET utf8mb4"))
        upgrade(self.url(self.template))
        with self.engine.connect() as conn:
            self.tables = [
                row[0]
                for row in conn.execute(
                    text(
                        "SELECT table_name FROM information_schema.tables WHERE table_schema = :s"
                    ),
                    {"s": self.template},
                )
            ]

    def create(self, *, migrated: bool = True) -> str:
        name = f"mozrest_test_{uuid.uuid4().hex[:12]}"
        with self.engine.connect() as conn:
            conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4"))
            if migrated:
                for table in self.tables:
                    conn.execute(
                        text(f"CREATE TABLE `{name}`.`{table}` LIKE `{self.template}`.`{table}`")
                    )
                    source = f"`{self.template}`.`{table}`"
                    conn.execute(text(f"INSERT INTO `{name}`.`{table}` SELECT * FROM {source}"))
        return name

    def url(self, name: str) -> str:
        parsed = make_url(self.admin_url).set(drivername="mysql+asyncmy", database=name)
        return parsed.render_as_string(hide_password=False)

    def drop(self, name: str) -> None:
        with self.engine.connect() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))

    def close(self) -> None:
        self.drop(self.template)
        self.engine.dispose()


def _mysql_admin_url() -> str | None:
    """A URL to a MariaDB/MySQL server, when the MySQL tests are on (TEST_MYSQL=1)."""
    if os.environ.get("TEST_MYSQL") != "1":
        return None
    url = os.environ.get("TEST_MYSQL_URL") or "mysql://root@127.0.0.1:3306/"
    parsed = make_url(url)
    try:
        with socket.create_connection((parsed.host or "127.0.0.1", parsed.port or 3306), 1):
            pass
    except OSError:
        pytest.exit(f"TEST_MYSQL=1 but MariaDB/MySQL does not answer at {url}", 3)
    return url


@pytest.fixture(scope="session")
def mysql() -> Iterator[MysqlDatabases | None]:
    admin_url = _mysql_admin_url()
    if admin_url is None:
        yield None
        return
    databases = MysqlDatabases(admin_url)
    try:
        yield databases
    finally:
        databases.close()


class SqliteDatabases:
    """Creates database files, migrated ones as copies of one migrated template."""

    def __init__(self, template: Path, folder: Path) -> None:
        self.template = template
        self.folder = folder

    def create(self, *, migrated: bool = True) -> str:
        path = self.folder / f"relay-{uuid.uuid4().hex[:8]}.db"
        if migrated:
            path.write_bytes(self.template.read_bytes())
        return str(path)

    def url(self, name: str) -> str:
        return f"sqlite+aiosqlite:///{name}"

    def drop(self, name: str) -> None:
        Path(name).unlink(missing_ok=True)


class Databases(Protocol):
    """What each backend's fixture object does: fresh databases, their URLs, their removal."""

    def create(self, *, migrated: bool = True) -> str: ...
    def url(self, name: str) -> str: ...
    def drop(self, name: str) -> None: ...


BACKENDS = ["sqlite", "postgresql"] + (["mysql"] if os.environ.get("TEST_MYSQL") == "1" else [])
#: Why a backend's tests are skipped when its server is not there.
_SKIP_REASONS = {
    "postgresql": "PostgreSQL is not available (set TEST_DATABASE_URL)",
    "mysql": "MariaDB tests are off (set TEST_MYSQL=1)",
}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def databases(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Databases:
    """The backend's database maker (skips the test when its server is not there)."""
    if backend == "sqlite":
        return SqliteDatabases(request.getfixturevalue("sqlite_template"), tmp_path)
    found: Databases | None = request.getfixturevalue(
        "postgres" if backend == "postgresql" else "mysql"
    )
    if found is None:
        pytest.skip(_SKIP_REASONS[backend])
    return found


@pytest.fixture
def database_url(databases: Databases) -> Iterator[str]:
    """A fresh database at the newest schema, on each backend."""
    name = databases.create()
    try:
        yield databases.url(name)
    finally:
        databases.drop(name)


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[Any]:
    engine = create_engine(database_url)
    try:
        yield engine
    finally:
        await engine.dispose()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    """A relay or emulator subprocess with its output kept in a file."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str | None = None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.terminate()
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(5)

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(5)


def wait_http(url: str, *, timeout: float = 20.0, process: Process | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.popen.poll() is not None:
            raise RuntimeError(f"process exited early:\n{process.output()}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class Launcher:
    """Starts `mozrest-relay` subprocesses and stops them after the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.processes: list[Process] = []

    def start(
        self, *args: str, env: dict[str, str] | None = None, wait_url: str | None = None
    ) -> Process:
        log_path = self.tmp_path / f"{args[0]}-{len(self.processes)}.log"
        clean = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("RELAY_", "MOZREST_", "DATABASE_URL"))
        }
        full_env = {**clean, "RELAY_LOG_FORMAT": "json", **(env or {})}
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                [PYTHON, "-m", "app", *args],
                cwd=self.tmp_path,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        process = Process(popen, log_path, wait_url)
        self.processes.append(process)
        if wait_url is not None:
            wait_http(wait_url, process=process)
        return process

    def emulator(self, *, token: str = "test-token", api_key: str = "test-key") -> Process:
        port = free_port()
        process = self.start(
            "emulator",
            "--port",
            str(port),
            "--token",
            token,
            "--api-key",
            api_key,
            wait_url=f"http://127.0.0.1:{port}/_emulator/stats",
        )
        process.url = f"http://127.0.0.1:{port}"
        return process

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            process.kill()


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    try:
        yield launcher
    finally:
        launcher.stop_all()


async def eventually(
    check: Any, *, timeout: float = 15.0, interval: float = 0.05, message: str = ""
) -> Any:
    """Poll `check` (sync or async) until it returns a truthy value; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {message or check} (last: {last!r})")
