"""Alembic environment: async engine, the relay's own version table, only `mozrest_*` tables."""

from __future__ import annotations

import asyncio
from typing import Any

from alembic import context
from sqlalchemy.engine import Connection

from app import models  # noqa: F401 - registers the tables on `metadata`
from app.db import create_engine, metadata

#: The relay's history lives apart from any Alembic history the RMS keeps in the same database.
VERSION_TABLE = "mozrest_alembic_version"


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Look only at the relay's own tables: the RMS's tables share the database."""
    if type_ == "table":
        return bool(name and name.startswith("mozrest_"))
    return True


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_object=include_object,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_online(url: str) -> None:
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_configure)
            await connection.commit()
    finally:
        await engine.dispose()


def _run() -> None:
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        from app.settings import load_settings

        url = load_settings().database_url
    asyncio.run(_run_online(url))


_run()
