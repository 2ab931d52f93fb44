"""Database plumbing: the async engine per dialect, UTC timestamps, the naming convention."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar

from sqlalchemy import JSON, BigInteger, DateTime, Integer, MetaData, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import mysql, postgresql
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.pool import NullPool
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator

from app.contract import json_text

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Execution option marking a connection as a reader (SQLite begins it DEFERRED, not IMMEDIATE).
READ_ONLY = "mozrest_read_only"

metadata = MetaData(naming_convention=NAMING_CONVENTION)

#: MySQL/MariaDB table options: InnoDB for row locks, utf8mb4 for every script and emoji, and a
#: binary collation so ids compare exactly ("AB12" is not "ab12").
MYSQL_TABLE_OPTIONS: dict[str, Any] = {
    "mysql_engine": "InnoDB",
    "mysql_charset": "utf8mb4",
    "mysql_collate": "utf8mb4_bin",
}

#: Big integer ids that still auto-increment on SQLite (only INTEGER PRIMARY KEY does there).
BigId = BigInteger().with_variant(Integer(), "sqlite")
#: JSON documents: `jsonb` on PostgreSQL, as the outbox contract fixes.
JsonDocument = JSON().with_variant(postgresql.JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, whatever the backend stores."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> Any:
        if dialect.name == "mysql":
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value if dialect.name == "postgresql" else value.replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # raw SQLite text, e.g. from a server default
            value = datetime.fromisoformat(value)
        moment: datetime = value
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)


class utcnow(FunctionElement[datetime]):
    """The database's current UTC time with sub-second precision, on every backend."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(utcnow, "postgresql")
def _utcnow_postgresql(element: utcnow, compiler: Any, **kw: Any) -> str:
    return "now()"


@compiles(utcnow, "sqlite")
def _utcnow_sqlite(element: utcnow, compiler: Any, **kw: Any) -> str:
    # Six fractional digits, the format SQLAlchemy itself writes, so text comparisons order right.
    return "(strftime('%Y-%m-%d %H:%M:%f000', 'now'))"


@compiles(utcnow, "mysql")
def _utcnow_mysql(element: utcnow, compiler: Any, **kw: Any) -> str:
    # An expression default needs parentheses in MySQL 8 and MariaDB.
    return "(UTC_TIMESTAMP(6))"


class clock_now(FunctionElement[datetime]):
    """The database's wall clock now (not the transaction's start), for leases and due times."""

    type = UTCDateTime()
    inherit_cache = True


@compiles(clock_now, "postgresql")
def _clock_now_postgresql(element: clock_now, compiler: Any, **kw: Any) -> str:
    return "clock_timestamp()"


@compiles(clock_now, "sqlite")
def _clock_now_sqlite(element: clock_now, compiler: Any, **kw: Any) -> str:
    return "(strftime('%Y-%m-%d %H:%M:%f000', 'now'))"


@compiles(clock_now, "mysql")
def _clock_now_mysql(element: clock_now, compiler: Any, **kw: Any) -> str:
    return "UTC_TIMESTAMP(6)"


#: The default of `create_engine`'s `lock_limit_seconds`: RELAY_LEASE_SECONDS's default.
DEFAULT_LOCK_LIMIT_SECONDS = 30.0


def application_name() -> str:
    """How this process's sessions are named on the server (`pg_stat_activity`,
    `SHOW PROCESSLIST`): an operator can tell which replica holds what, and the fault suite
    finds a replica's sessions to freeze it inside one."""
    return f"mozrest-relay/{os.getpid()}"


def create_engine(
    database_url: str,
    *,
    pool_size: int = 5,
    echo: bool = False,
    lock_limit_seconds: float = DEFAULT_LOCK_LIMIT_SECONDS,
) -> AsyncEngine:
    """Create the async engine, with the per-dialect settings the relay's queries rely on.

    `lock_limit_seconds` (RELAY_LEASE_SECONDS) bounds how long a session waits for a lock and how
    long a transaction may sit idle: a replica frozen inside a transaction (SIGSTOP, a VM pause)
    has its session ended by the server after that long, which releases its locks, so it stalls
    the others for at most a lease.
    """
    limit_ms = max(1, math.ceil(lock_limit_seconds * 1000))
    if database_url.startswith("sqlite"):
        # SQLite cannot end another process's transaction: a frozen writer holds the file's
        # write lock until it thaws. The busy timeout bounds each wait; docs/reliability.md says
        # why SQLite is for one process.
        engine = create_async_engine(
            database_url,
            echo=echo,
            json_serializer=json_text,
            connect_args={"timeout": limit_ms / 1000},
            # Each connection is a file handle; pooling them gains little and NullPool keeps
            # a process from holding the write lock between transactions.
            poolclass=NullPool if ":memory:" not in database_url else None,
        )
        _configure_sqlite(engine, busy_timeout_ms=limit_ms)
        return engine
    # No pre-ping: it costs a round trip per transaction. A dropped connection fails one
    # statement, SQLAlchemy then recycles the whole pool, and the store's caller retries.
    kwargs: dict[str, Any] = {
        "echo": echo,
        # A parsed state's JSON is its wire body, encoded once (`contract.WireState`).
        "json_serializer": json_text,
        "pool_size": pool_size,
        "max_overflow": pool_size,
        "pool_recycle": 1800,
    }
    if database_url.startswith("mysql"):
        # Each statement sees the latest committed rows, as on PostgreSQL: the store's
        # decisions read rows right after locking their booking.
        kwargs["isolation_level"] = "READ COMMITTED"
        kwargs["connect_args"] = {"charset": "utf8mb4"}
    if database_url.startswith("postgresql"):
        # Statements are generated per batch size, so the prepared-statement cache stays small.
        kwargs["connect_args"] = {
            "server_settings": {
                "application_name": application_name(),
                # A frozen replica's locks last at most a lease (see the docstring).
                "lock_timeout": str(limit_ms),
                "idle_in_transaction_session_timeout": str(limit_ms),
                # Every relay query is a key lookup or an ordered index scan with a LIMIT. On a
                # queue table whose statistics lag (a fresh drain, a burst, autovacuum behind),
                # the planner picks a bitmap scan plus a sort and reads every due row instead of
                # the first few, or scans a whole table for a list of keys. A query with no
                # usable index still runs: these only steer the planner's choice.
                "enable_bitmapscan": "off",
                "enable_seqscan": "off",
                # With those off, a scan with no index to use (a table of a few rows, such as the
                # venues) is costed at 10^10, far over the JIT thresholds: PostgreSQL then spent
                # about 180 ms compiling a query that reads one row, every time it ran, the whole
                # tail of delivery latency at every rate. The relay's queries are all short; JIT
                # never pays for them.
                "jit": "off",
            },
            "command_timeout": 60,
        }
    engine = create_async_engine(database_url, **kwargs)
    if database_url.startswith("mysql"):
        _configure_mysql(engine, limit_seconds=max(1, math.ceil(lock_limit_seconds)))
    return engine


def _configure_mysql(engine: AsyncEngine, *, limit_seconds: int) -> None:
    """MariaDB: the same bounds as PostgreSQL's, in whole seconds (`idle_transaction_timeout`
    ends a transaction left idle; `net_read_timeout` and `net_write_timeout` a statement half
    sent by, or a result half read by, a frozen client). MySQL has no idle-transaction setting:
    there only the lock and network waits are bounded (docs/reliability.md)."""
    statements = [
        f"SET SESSION innodb_lock_wait_timeout = {limit_seconds}",
        f"SET SESSION lock_wait_timeout = {limit_seconds}",
        f"SET SESSION net_read_timeout = {limit_seconds}",
        f"SET SESSION net_write_timeout = {limit_seconds}",
    ]

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        cursor = dbapi_connection.cursor()
        for statement in statements:
            cursor.execute(statement)
        cursor.execute("SELECT VERSION()")
        if "mariadb" in str(cursor.fetchone()[0]).lower():
            cursor.execute(f"SET SESSION idle_transaction_timeout = {limit_seconds}")
        cursor.close()


def _decode_text(value: bytes) -> str:
    return value.decode("utf-8", "replace")


def _configure_sqlite(engine: AsyncEngine, *, busy_timeout_ms: int) -> None:
    """One writer at a time: every transaction begins IMMEDIATE, readers use WAL."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, connection_record: Any) -> None:
        # Let SQLAlchemy, not the driver, decide when a transaction begins.
        dbapi_connection.isolation_level = None
        # SQLite stores whatever bytes an RMS wrote into a TEXT column; the driver's default
        # refuses to read a row whose text is not UTF-8, which would fail every query that
        # touches it. Such text reads with U+FFFD instead; ingest reads payloads as bytes and
        # makes their rows invalid (`Store._ingest_batch`).
        dbapi_connection.driver_connection.text_factory = _decode_text
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Writers take the lock up front, so a read-then-write transaction cannot fail to
        # upgrade; readers (see `READ_ONLY`) begin deferred and never wait for a writer.
        read_only = connection.get_execution_options().get(READ_ONLY, False)
        connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")


P = ParamSpec("P")
T = TypeVar("T")


class StoreError(Exception):
    """The database could not be used right now (unreachable, restarting, timed out)."""


#: SQLSTATE classes that say the database cannot serve now, whatever was asked: a lost
#: connection (08), refused credentials (28), no such database (3D), a rolled-back transaction
#: (40: deadlock, serialisation), no resources (53), an operator's intervention (57: shutdown, a
#: cancelled statement), a system error (58).
_OUTAGE_SQLSTATE_CLASSES = frozenset({"08", "28", "3D", "40", "53", "57", "58"})
#: And single SQLSTATEs: lock_not_available (55P03, `lock_timeout`), and
#: idle_in_transaction_session_timeout (25P03). A session another replica ended because its
#: process was frozen (`Store.end_stalled_sessions`) is class 57 (admin_shutdown).
_OUTAGE_SQLSTATES = frozenset({"55P03", "25P03"})
#: MySQL/MariaDB error numbers of the same kind: access denied, no such database, lock wait
#: timeout, deadlock, the connection gone or killed (including by `idle_transaction_timeout`),
#: too many connections, read-only.
_OUTAGE_MYSQL_ERRORS = frozenset(
    {1040, 1044, 1045, 1049, 1053, 1205, 1213, 1290, 1317, 1927, 2002, 2003, 2006, 2013, 2055, 4031}
)


def is_outage(exc: BaseException) -> bool:
    """Whether `exc` means the database cannot serve right now (retry the same work later), as
    opposed to a fault of what was asked: a row or a value it refused, which retrying can never
    mend. The one place that draws this line; `translate_errors` applies it."""
    if isinstance(exc, sa_exc.TimeoutError | OSError | ConnectionError | TimeoutError):
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(sqlstate, str) and len(sqlstate) == 5:
        return sqlstate[:2] in _OUTAGE_SQLSTATE_CLASSES or sqlstate in _OUTAGE_SQLSTATES
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int):
        return args[0] in _OUTAGE_MYSQL_ERRORS
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        # SQLite: "database is locked", "disk I/O error", a vanished file: the database. But a
        # value it cannot decode is the row's fault.
        return "decode" not in str(orig).lower()
    return False


def is_row_fault(exc: BaseException) -> bool:
    """Whether `exc`, raised while the store worked on some rows or answers (and not an
    outage), can be the fault of what they hold: a value or a constraint the database refused,
    text it could not encode. A mistake of ours (a statement that does not compile, a wrong
    argument) is not: setting rows aside for it would mark good rows invalid."""
    if isinstance(exc, sa_exc.DBAPIError):
        return True
    if isinstance(exc, sa_exc.StatementError):  # a parameter that could not be bound
        return isinstance(exc.orig, UnicodeError | ValueError | OverflowError | TypeError)
    return isinstance(exc, UnicodeError | ValueError | OverflowError | RecursionError)


def translate_errors(method: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn database outages into `StoreError` at the store's boundary (`is_outage`). Anything
    else (a constraint, a value the database refuses, a bug) passes through as it is: retrying
    the same work would fail the same way."""

    @functools.wraps(method)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except StoreError:
            raise
        except Exception as exc:
            if is_outage(exc):
                raise StoreError(f"{type(exc).__name__}: {_first_line(exc)}") from exc
            raise

    return wrapper


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
