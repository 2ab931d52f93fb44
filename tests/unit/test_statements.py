"""Every statement the relay's store can send is named, and compiles on every backend."""

from __future__ import annotations

import pytest
from sqlalchemy.ext.asyncio import create_async_engine

import app.store  # noqa: F401 - registers every concern's statements
from app.store.toolkit import Toolkit, statement_names

URLS = {
    "postgresql": "postgresql+asyncpg://relay@127.0.0.1:1/rms",
    "mysql": "mysql+asyncmy://relay@127.0.0.1:1/rms",
    "sqlite": "sqlite+aiosqlite:///:memory:",
}


@pytest.mark.parametrize("dialect", sorted(URLS))
def test_every_named_statement_compiles_and_is_listed(
    dialect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The list `bench/plans.py` and a reader start from: each statement by name, as SQL."""
    engine = create_async_engine(URLS[dialect])
    tools = Toolkit(engine)
    names = statement_names()
    assert {"ingest.unprocessed", "dispatch.due_bookings", "outcomes.settle_alike"} <= set(names)
    for name in names:
        sql = str(tools.statement(name).compile(dialect=engine.dialect))
        assert sql.strip(), name
        print(f"-- {name} ({dialect})\n{sql}\n")
    assert f"-- {names[0]} ({dialect})" in capsys.readouterr().out
