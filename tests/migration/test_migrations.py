"""The Alembic history against the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from app.db import metadata
from app.migrate import VERSION_TABLE, downgrade, head_revision, include_object_for, upgrade
from tests.conftest import Databases


@pytest.fixture
def empty_database_url(databases: Databases) -> Iterator[str]:
    """A database with no tables, on each backend (MariaDB's too: `[mysql]` tests once ran on
    PostgreSQL, so MariaDB's schema was never compared nor migrated down)."""
    name = databases.create(migrated=False)
    try:
        yield databases.url(name)
    finally:
        databases.drop(name)


async def _schema_diff(url: str) -> list[object]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:

            def diff(sync_conn: object) -> list[object]:
                context = MigrationContext.configure(
                    sync_conn,  # type: ignore[arg-type]
                    opts={
                        "compare_type": True,
                        "include_object": include_object_for(sync_conn.dialect.name),  # type: ignore[attr-defined]
                        "version_table": VERSION_TABLE,
                    },
                )
                return list(compare_metadata(context, metadata))

            return await conn.run_sync(diff)
    finally:
        await engine.dispose()


async def _tables(url: str) -> set[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await engine.dispose()


def test_upgrade_to_head_gives_the_models_schema(empty_database_url: str) -> None:
    """Upgrading an empty database yields exactly the models' tables, columns and indexes."""
    upgrade(empty_database_url)
    import asyncio

    assert asyncio.run(_schema_diff(empty_database_url)) == []


def test_downgrade_to_base_and_upgrade_again(empty_database_url: str) -> None:
    """The history downgrades to nothing and upgrades back to the same schema."""
    import asyncio

    upgrade(empty_database_url)
    downgrade(empty_database_url, "base")
    assert {t for t in asyncio.run(_tables(empty_database_url)) if t != VERSION_TABLE} == set()
    upgrade(empty_database_url)
    assert asyncio.run(_schema_diff(empty_database_url)) == []


def test_migrations_leave_other_tables_and_histories_alone(empty_database_url: str) -> None:
    """An RMS's own tables and its own `alembic_version` survive our upgrade and downgrade."""
    import asyncio

    async def setup() -> None:
        engine = create_async_engine(empty_database_url)
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE reservation (id INTEGER PRIMARY KEY)"))
            await conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32))"))
            await conn.execute(text("INSERT INTO alembic_version VALUES ('rms_0042')"))
        await engine.dispose()

    async def rms_version() -> str:
        engine = create_async_engine(empty_database_url)
        async with engine.connect() as conn:
            value = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
        await engine.dispose()
        return str(value)

    asyncio.run(setup())
    upgrade(empty_database_url)
    assert asyncio.run(rms_version()) == "rms_0042"
    assert {"reservation", "mozrest_outbox", VERSION_TABLE} <= asyncio.run(
        _tables(empty_database_url)
    )
    downgrade(empty_database_url, "base")
    assert "reservation" in asyncio.run(_tables(empty_database_url))
    assert asyncio.run(rms_version()) == "rms_0042"
    assert head_revision() == "0005"
