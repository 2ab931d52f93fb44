"""Secrets given as files, at the command line: a file that cannot be used, or both forms, stop a
command with one `error:` line naming the variable and the exit status of every bad setting; a
usable file works like the plain form."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli import EXIT_CONFIG
from tests.integration.test_cli_errors import one_error_line, relay

SECRET = "whk-cli-7f3a9c1e5b2d-SECRET"


@pytest.mark.parametrize("command", [["worker"], ["run"], ["migrate"], ["api"]])
def test_a_missing_secret_file_is_one_line_naming_the_variable(
    tmp_path: Path, command: list[str]
) -> None:
    """MOZREST_WEBHOOK_TOKEN_FILE naming a missing file: one line, exit status 2, no traceback."""
    missing = tmp_path / "run" / "secrets" / "webhook-token"
    result = relay(*command, cwd=tmp_path, MOZREST_WEBHOOK_TOKEN_FILE=str(missing))
    line = one_error_line(result, "MOZREST_WEBHOOK_TOKEN_FILE", str(missing))
    assert "no such file" in line
    assert result.returncode == EXIT_CONFIG


def test_doctor_names_the_secret_file_in_its_settings_line(tmp_path: Path) -> None:
    """`doctor` fails its settings check with the same words, and skips the rest."""
    missing = tmp_path / "api-key"
    result = relay("doctor", cwd=tmp_path, MOZREST_API_KEY_FILE=str(missing))
    assert result.returncode != 0
    first = result.stdout.splitlines()[0]
    assert first.startswith("fail  settings"), result.stdout
    assert f"MOZREST_API_KEY_FILE ({missing}): no such file" in first
    assert "Traceback" not in result.stdout + result.stderr


def test_both_forms_set_is_one_line_without_either_value(tmp_path: Path) -> None:
    """DATABASE_URL and DATABASE_URL_FILE together: one line naming both, quoting neither."""
    url_file = tmp_path / "database-url"
    url_file.write_text(f"postgresql://relay:{SECRET}@db/rms\n")
    result = relay(
        "worker",
        cwd=tmp_path,
        DATABASE_URL="postgresql://relay:PLAIN-PASSWORD@db/rms",
        DATABASE_URL_FILE=str(url_file),
    )
    line = one_error_line(result, "DATABASE_URL", "DATABASE_URL_FILE")
    assert result.returncode == EXIT_CONFIG
    assert SECRET not in result.stderr + result.stdout
    assert "PLAIN-PASSWORD" not in result.stderr + result.stdout, line


def test_a_secret_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    """A binary file given as a secret is named, and none of its bytes are shown."""
    binary = tmp_path / "api-key"
    binary.write_bytes(b"\xff\xfe" + SECRET.encode())
    result = relay("pos-tables", "venue-1", cwd=tmp_path, MOZREST_API_KEY_FILE=str(binary))
    one_error_line(result, "MOZREST_API_KEY_FILE", "not UTF-8")
    assert result.returncode == EXIT_CONFIG
    assert SECRET not in result.stderr + result.stdout


def test_a_secret_file_in_dot_env_is_read(tmp_path: Path) -> None:
    """DATABASE_URL_FILE in the .env file reaches the command: `migrate` creates the schema in
    the database the file names."""
    database = tmp_path / "from-file.db"
    url_file = tmp_path / "database-url"
    url_file.write_text(f"sqlite:///{database}\n")
    (tmp_path / ".env").write_text(f"DATABASE_URL_FILE={url_file}\n")
    result = relay("migrate", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert database.exists()
    assert not (tmp_path / "mozrest-relay.db").exists()
