"""Alembic environment: async engine, the relay's own version table, only `mozrest_*` tables."""

from __future__ import annotations

import asyncio
import logging
import warnings

from alembic import context
from sqlalchemy.engine import Connection

from app import models  # noqa: F401 - registers the tables on `metadata`
from app.db import create_engine, metadata
from app.migrate import include_object_for

#: The relay's history lives apart from any Alembic history the RMS keeps in the same database.
VERSION_TABLE = "mozrest_alembic_version"


def _configure(connection: Connection) -> None:
    # MySQL notes that primary keys cannot be named; the naming convention names them elsewhere.
    warnings.filterwarnings("ignore", message=".*ignored for PRIMARY key")
    logging.getLogger("asyncmy").addFilter(
        lambda record: "ignored for PRIMARY key" not in record.getMessage()
    )
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        include_object=include_object_for(connection.dialect.name),
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
