"""The SQL plumbing every part of the store shares: transactions, the clock, named locks, id
lists, and the relay's statements, each named and built once per engine.

Statements are registered by name with `@statement("concern.what")` in the module of their
concern; `statement_names()` lists every one the relay can send (a test prints them all, and
`bench/plans.py` explains their plans). Their variable parts are bound parameters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import ARRAY, BigInteger, ColumnElement, String, any_, bindparam, select, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.db import READ_ONLY, clock_now
from app.models import ACTIVE_PREDICATE, lock

#: `status IN ('pending', 'retrying')` as literal SQL, the very predicate of the partial index
#: `ix_mozrest_delivery_due`: with bound parameters a prepared statement's generic plan could not
#: prove the index applies.
ACTIVE = text(ACTIVE_PREDICATE)

Builder = Callable[["Toolkit"], Any]


class RowsRefused(Exception):
    """The database refused work on these rows or answers for a reason of theirs, not an outage
    (`app.db.is_outage`); the cause is chained. Ingest and record then go one item at a time."""

    def __init__(self, ids: list[int]) -> None:
        super().__init__(f"{len(ids)} refused")
        self.ids = ids


_STATEMENTS: dict[str, Builder] = {}


def statement(name: str) -> Callable[[Builder], Builder]:
    """Register a statement builder under `name` (`concern.what`)."""

    def register(build: Builder) -> Builder:
        if name in _STATEMENTS:
            raise ValueError(f"statement {name!r} is registered twice")
        _STATEMENTS[name] = build
        return build

    return register


def statement_names() -> list[str]:
    """Every statement the relay's store can send, by name."""
    return sorted(_STATEMENTS)


class Toolkit:
    """One engine's transactions, clock, locks and built statements."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._reader = engine.execution_options(**{READ_ONLY: True})
        self._built: dict[str, Any] = {}

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self._reader.connect() as conn:
            yield conn

    def statement(self, name: str) -> Any:
        """The statement registered as `name`, built once: building one (and its cache key)
        cost SQLAlchemy more than executing it from its compiled cache."""
        built = self._built.get(name)
        if built is None:
            built = self._built[name] = _STATEMENTS[name](self)
        return built

    async def now(self, conn: AsyncConnection) -> datetime:
        value: datetime = (await conn.execute(self.statement("clock.now"))).scalar_one()
        return value

    async def take_lock(self, conn: AsyncConnection, name: str, *, wait: bool = False) -> bool:
        """Hold the named process-wide mutex for this transaction; False if another has it,
        unless `wait`, which waits for it (bounded by the session's lock timeout)."""
        query = self.statement("lock.wait" if wait else "lock.take")
        row = (await conn.execute(query, {"name": name})).first()
        return row is not None

    def in_(self, column: Any, values: Iterable[Any]) -> ColumnElement[bool]:
        """`column IN (values)`; on PostgreSQL `column = ANY(:array)`, one parameter however
        many values, so one cached statement (and one server-side prepared statement) serves
        every batch size, and binding costs the driver one array rather than a placeholder each.
        """
        return self.in_param(column, None, list(values))

    def in_param(
        self, column: Any, name: str | None, values: list[Any] | None = None
    ) -> ColumnElement[bool]:
        """`in_` for a registered statement: the list is the bound parameter `name`."""
        if self.dialect != "postgresql":
            expanding: ColumnElement[bool] = column.in_(bindparam(name, values, expanding=True))
            return expanding
        item = BigInteger() if isinstance(column.type, BigInteger) else String()
        array: ColumnElement[bool] = column == any_(bindparam(name, values, type_=ARRAY(item)))
        return array


@statement("clock.now")
def _clock(tools: Toolkit) -> Any:
    return select(clock_now())


@statement("lock.wait")
def _lock_wait(tools: Toolkit) -> Any:
    return select(lock.c.name).where(lock.c.name == bindparam("name")).with_for_update()


@statement("lock.take")
def _lock(tools: Toolkit) -> Any:
    return (
        select(lock.c.name)
        .where(lock.c.name == bindparam("name"))
        .with_for_update(skip_locked=True)
    )
