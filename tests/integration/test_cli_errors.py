"""Every command answers a set-up it cannot work with in one `error:` line naming the setting or
the file, with a non-zero status: never a traceback, never SQL or a guest's data.

Each test runs the real `mozrest-relay` command in a subprocess, as a person at a terminal would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy import text

from tests.conftest import PYTHON, ROOT, Launcher, PostgresDatabases, free_port

EXAMPLE = ROOT / "examples" / "seated.json"
GUEST_DATA = ("john.doe@mail.com", "Doe", "peanuts", "34646223399")


def relay(
    *args: str, cwd: Path, timeout: float = 30, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `mozrest-relay ARGS` with only `env` as its settings."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RELAY_", "MOZREST_", "DATABASE_URL"))
    }
    return subprocess.run(
        [PYTHON, "-m", "app", *args],
        cwd=cwd,
        env={**clean, **env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str], *named: str) -> str:
    """The command failed with exactly one `error:` line (naming each of `named`) and nothing
    else: no traceback, no SQL, no guest data."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("error: "), output
    for name in named:
        assert name in lines[0], (name, lines[0])
    for forbidden in ("INSERT", "SELECT", "[SQL", "parameters", *GUEST_DATA):
        assert forbidden not in output, (forbidden, output)
    return lines[0]


@pytest.fixture
def unmigrated_postgres(postgres: PostgresDatabases | None) -> Iterator[str]:
    """A PostgreSQL database the relay has never migrated."""
    if postgres is None:
        pytest.skip("PostgreSQL is not available")
    name = postgres.create(migrated=False)
    try:
        yield postgres.url(name)
    finally:
        postgres.drop(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def unmigrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/never-migrated.db"
    return str(request.getfixturevalue("unmigrated_postgres"))


def closed_port_url() -> str:
    return f"postgresql://relay@127.0.0.1:{free_port()}/relay"


# -- files ------------------------------------------------------------------------------------


def test_enqueue_names_a_file_it_cannot_use(tmp_path: Path) -> None:
    """A missing file, a directory and a non-UTF-8 file are one line naming the file, exit 2."""
    database = f"sqlite:///{tmp_path}/relay.db"
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"notes": "caf\xe9"}')
    for argument, words in [
        ("missing.json", "no such file"),
        (str(tmp_path), "is a directory"),
        (str(latin1), "not UTF-8"),
    ]:
        result = relay("enqueue", argument, cwd=tmp_path, DATABASE_URL=database)
        line = one_error_line(result, argument, words)
        assert result.returncode == 2, line
    assert not (tmp_path / "relay.db").exists(), "nothing is written for a file never read"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_enqueue_names_an_unreadable_file(tmp_path: Path) -> None:
    """A file without read permission is one line naming it."""
    path = tmp_path / "secret.json"
    path.write_text(EXAMPLE.read_text())
    path.chmod(0)
    one_error_line(relay("enqueue", str(path), cwd=tmp_path), str(path), "permission denied")


def test_enqueue_refuses_a_payload_over_the_size_limit(tmp_path: Path) -> None:
    """A payload the relay would mark invalid for its size is refused before it is written,
    naming RELAY_MAX_PAYLOAD_BYTES."""
    database = f"sqlite:///{tmp_path}/relay.db"
    assert relay("migrate", cwd=tmp_path, DATABASE_URL=database).returncode == 0
    big = json.loads(EXAMPLE.read_text()) | {"notes": "x" * 70_000}
    (tmp_path / "big.json").write_text(json.dumps(big))
    result = relay("enqueue", "big.json", cwd=tmp_path, DATABASE_URL=database)
    assert result.returncode == 2
    one_error_line(result, "big.json", "RELAY_MAX_PAYLOAD_BYTES")
    smaller = relay(
        "enqueue", "big.json", cwd=tmp_path, DATABASE_URL=database, RELAY_MAX_PAYLOAD_BYTES="80000"
    )
    assert smaller.returncode == 0, smaller.stderr


def test_enqueue_warns_about_a_status_the_relay_does_not_know(tmp_path: Path) -> None:
    """`"Seated"` is enqueued (the RMS may mean it) but a warning says statuses are exact."""
    database = f"sqlite:///{tmp_path}/relay.db"
    assert relay("migrate", cwd=tmp_path, DATABASE_URL=database).returncode == 0
    payload = json.loads(EXAMPLE.read_text()) | {"status": "Seated"}
    result = relay("enqueue", "-", cwd=tmp_path, stdin=json.dumps(payload), DATABASE_URL=database)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("warning: status 'Seated'")
    assert "RELAY_SEND_STATUSES" in result.stderr and "case-sensitive" in result.stderr


# -- databases --------------------------------------------------------------------------------


def test_a_closed_port_is_one_line_for_every_command(tmp_path: Path) -> None:
    """migrate, enqueue, run, worker and api against a port nobody listens on: one line naming
    DATABASE_URL, exit 3."""
    url = closed_port_url()
    loopback = "http://127.0.0.1:9/rms"
    for args in (["migrate"], ["enqueue", str(EXAMPLE)], ["run"], ["worker"], ["api"]):
        result = relay(*args, cwd=tmp_path, DATABASE_URL=url, MOZREST_WEBHOOK_URL=loopback)
        line = one_error_line(result, "DATABASE_URL", "Connection refused")
        assert result.returncode == 3, (args, line)


def test_an_unknown_host_is_one_line(tmp_path: Path) -> None:
    """A host name that does not resolve says so, naming DATABASE_URL."""
    url = "postgresql://relay@no-such-host.invalid/relay"
    one_error_line(relay("migrate", cwd=tmp_path, DATABASE_URL=url), "DATABASE_URL", "resolve")


def test_a_missing_postgres_database_is_one_line(
    tmp_path: Path, postgres: PostgresDatabases | None
) -> None:
    """A database that does not exist on a server that answers: the server's words, one line."""
    if postgres is None:
        pytest.skip("PostgreSQL is not available")
    url = postgres.url("mozrest_no_such_database")
    for args in (["migrate"], ["enqueue", str(EXAMPLE)]):
        one_error_line(
            relay(*args, cwd=tmp_path, DATABASE_URL=url), "DATABASE_URL", "does not exist"
        )


def test_a_missing_mariadb_database_is_one_line(tmp_path: Path) -> None:
    """Likewise on MariaDB, when a server answers on 127.0.0.1:3306."""
    try:
        socket.create_connection(("127.0.0.1", 3306), 1).close()
    except OSError:
        pytest.skip("MariaDB is not available")
    url = "mysql://root@127.0.0.1:3306/mozrest_no_such_database"
    for args in (["migrate"], ["enqueue", str(EXAMPLE)]):
        one_error_line(
            relay(*args, cwd=tmp_path, DATABASE_URL=url), "DATABASE_URL", "Unknown database"
        )


def test_a_sqlite_file_in_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    """SQLite cannot create a file in a folder that does not exist: one line naming the URL."""
    url = f"sqlite:///{tmp_path}/no/such/folder/relay.db"
    one_error_line(relay("migrate", cwd=tmp_path, DATABASE_URL=url), "DATABASE_URL", "open")


# -- schema -----------------------------------------------------------------------------------


def test_run_and_worker_refuse_an_unmigrated_database(tmp_path: Path, unmigrated_url: str) -> None:
    """`run` and `worker` exit 2 with one line naming `mozrest-relay migrate`, at once."""
    for command in ("run", "worker"):
        result = relay(
            command,
            cwd=tmp_path,
            DATABASE_URL=unmigrated_url,
            MOZREST_WEBHOOK_URL="http://127.0.0.1:9/rms",
        )
        assert result.returncode == 2, result.stderr
        one_error_line(result, "mozrest-relay migrate", "not migrated")


def test_enqueue_on_an_unmigrated_database_never_shows_the_payload(
    tmp_path: Path, unmigrated_url: str
) -> None:
    """The INSERT is never tried: one line naming migrate, and no guest data."""
    result = relay("enqueue", str(EXAMPLE), cwd=tmp_path, DATABASE_URL=unmigrated_url)
    one_error_line(result, "mozrest-relay migrate")


def test_run_refuses_a_database_migrated_by_a_newer_relay(tmp_path: Path) -> None:
    """A schema revision this relay does not know (a newer one migrated it) is refused too."""
    path = tmp_path / "relay.db"
    assert relay("migrate", cwd=tmp_path, DATABASE_URL=f"sqlite:///{path}").returncode == 0
    engine = create_sync_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.execute(text("UPDATE mozrest_alembic_version SET version_num = 'f00dfeed'"))
    engine.dispose()
    for command in ("run", "worker"):
        result = relay(
            command,
            cwd=tmp_path,
            DATABASE_URL=f"sqlite:///{path}",
            MOZREST_WEBHOOK_URL="http://127.0.0.1:9/rms",
        )
        assert result.returncode == 2
        one_error_line(result, "f00dfeed", "newer", "mozrest-relay migrate")


# -- ports ------------------------------------------------------------------------------------


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port another process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_run_and_api_on_a_taken_port_name_relay_port(tmp_path: Path, taken_port: int) -> None:
    """One line naming RELAY_PORT, and no `api.started` logged before it."""
    database = f"sqlite:///{tmp_path}/relay.db"
    assert relay("migrate", cwd=tmp_path, DATABASE_URL=database).returncode == 0
    for command in ("run", "api"):
        result = relay(
            command,
            cwd=tmp_path,
            DATABASE_URL=database,
            RELAY_PORT=str(taken_port),
            MOZREST_WEBHOOK_URL="http://127.0.0.1:9/rms",
        )
        one_error_line(result, "RELAY_PORT", str(taken_port), "already in use")
        assert "api.started" not in result.stdout + result.stderr


def test_emulator_on_a_taken_port_names_the_option(tmp_path: Path, taken_port: int) -> None:
    """The emulator names its `--port` option."""
    result = relay("emulator", "--port", str(taken_port), cwd=tmp_path)
    one_error_line(result, "--port", "already in use")


# -- help -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "settings"),
    [
        ("run", ["DATABASE_URL", "MOZREST_WEBHOOK_TOKEN", "RELAY_PORT", "RELAY_ADMIN_TOKEN"]),
        ("worker", ["DATABASE_URL", "MOZREST_WEBHOOK_URL", "RELAY_SEND_STATUSES"]),
        ("api", ["DATABASE_URL", "RELAY_HOST", "RELAY_PORT", "MOZREST_API_KEY"]),
        ("migrate", ["DATABASE_URL", "RELAY_NOTIFY"]),
    ],
)
def test_help_names_the_settings_a_command_reads(
    tmp_path: Path, command: str, settings: list[str]
) -> None:
    """`--help` lists the settings each command reads and points at the README."""
    result = relay(command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    for name in settings:
        assert name in result.stdout, (command, name)
    assert "README" in result.stdout


def test_emulator_help_shows_its_defaults(tmp_path: Path) -> None:
    """`emulator --help` shows where it listens by default and what no token means."""
    result = relay("emulator", "--help", cwd=tmp_path)
    shown = " ".join(result.stdout.split())
    assert "(default: 127.0.0.1)" in shown and "(default: 8090)" in shown
    assert "without it, any request is accepted" in shown


def test_pos_tables_columns_hold_long_ids(tmp_path: Path, launcher: Launcher) -> None:
    """Ids longer than 20 characters keep the name and area columns aligned."""
    emulator = launcher.emulator(token="t", api_key="k")
    tables = [
        {"id": "28c3ce8b-8c10-4a64-8099-f0dffcc549a8", "name": "Window", "area": "Terrace"},
        {"id": "T2", "name": "Table 2", "area": None},
    ]
    httpx.put(f"{emulator.url}/_emulator/venues/v1/tables", json={"tables": tables})
    result = relay(
        "pos-tables", "v1", cwd=tmp_path, MOZREST_API_URL=str(emulator.url), MOZREST_API_KEY="k"
    )
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()[1:]
    assert len(rows) == 3
    names = ["name", "Window", "Table 2"]
    assert len({row.index(name) for row, name in zip(rows, names, strict=True)}) == 1
    assert rows[2].rstrip().endswith("-")
