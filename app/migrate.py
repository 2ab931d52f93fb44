"""Schema migrations: upgrade to head, and tell whether a database is at head."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection

import app.migrations

VERSION_TABLE = "mozrest_alembic_version"


def include_object_for(dialect_name: str) -> Callable[..., bool]:
    """Alembic's filter: only the relay's tables, and only indexes built on this dialect."""

    def include_object(
        obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
    ) -> bool:
        if type_ == "table":
            return bool(name and name.startswith("mozrest_"))
        ddl_if = getattr(obj, "_ddl_if", None) if not reflected else None
        if ddl_if is not None and ddl_if.dialect is not None:
            dialects = (ddl_if.dialect,) if isinstance(ddl_if.dialect, str) else ddl_if.dialect
            return dialect_name in dialects
        return True

    return include_object


def alembic_config(database_url: str | None = None) -> Config:
    """An Alembic configuration pointing at the packaged migrations."""
    config = Config()
    config.set_main_option("script_location", str(Path(app.migrations.__file__).parent))
    if database_url:
        # configparser interpolates `%`; URL-encoded passwords contain it.
        config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Upgrade the database to `revision` (blocking; runs its own event loop)."""
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str = "base") -> None:
    """Downgrade the database to `revision` (blocking; runs its own event loop)."""
    command.downgrade(alembic_config(database_url), revision)


def head_revision() -> str:
    """The newest revision this build of the relay knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision a database is at, or None when the relay's schema is absent."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def schema_problem(revision: str | None) -> str | None:
    """What is wrong with a database at `revision`, in one short line naming the fix; None at
    head. `/readyz`, `/api/*`, `run`, `worker` and `doctor` all say it in these words."""
    head = head_revision()
    if revision == head:
        return None
    if revision is None:
        return "not migrated: run mozrest-relay migrate"
    script = ScriptDirectory.from_config(alembic_config())
    if revision in {rev.revision for rev in script.walk_revisions()}:
        return f"at revision {revision}, older than this relay's {head}: run mozrest-relay migrate"
    return (
        f"at revision {revision}, unknown to this relay (newest {head}): a newer "
        "mozrest-relay migrate ran on it; run that newer version"
    )
