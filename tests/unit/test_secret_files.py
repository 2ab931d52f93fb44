"""Unit tests for secrets given as files (`NAME_FILE`) and for `SecretSource`, with real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.secret_files import SECRET_VARIABLES, SecretSource
from app.settings import ConfigError, Settings, load_settings

TOKEN = "whk-file-7f3a9c1e5b2d-SECRET"
TOKEN_VARIABLES = ["MOZREST_WEBHOOK_TOKEN", "MOZREST_API_KEY", "RELAY_ADMIN_TOKEN"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Drop the surrounding shell's relay variables and run from an empty directory."""
    for name in list(os.environ):
        if name.upper().startswith(("RELAY_", "MOZREST_", "DATABASE_URL")):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def secret(tmp_path: Path, content: bytes | str, name: str = "secret") -> str:
    path = tmp_path / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return str(path)


def load(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(_env_file=None)


def config_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(monkeypatch, **env)
    assert caught.value.__cause__ is None
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def value_of(settings: Settings, variable: str) -> object:
    return getattr(settings, variable.lower())


@pytest.mark.parametrize("variable", TOKEN_VARIABLES)
def test_a_token_is_read_from_its_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str
) -> None:
    """`NAME_FILE` gives NAME the file's text, its one trailing newline dropped, and the settings
    remember the file so the value can be read again."""
    path = secret(tmp_path, TOKEN + "\n")
    settings = load(monkeypatch, **{f"{variable}_FILE": path})
    assert value_of(settings, variable) == TOKEN
    assert settings.secret_file(variable) == path


def test_the_database_url_is_read_from_its_file_and_gets_its_driver(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """DATABASE_URL_FILE is validated like DATABASE_URL: a plain postgresql:// gets asyncpg."""
    path = secret(tmp_path, "postgresql://relay:pw@db:5432/rms\n")
    settings = load(monkeypatch, DATABASE_URL_FILE=path)
    assert settings.database_url == "postgresql+asyncpg://relay:pw@db:5432/rms"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (f"{TOKEN}", TOKEN),
        (f"{TOKEN}\n", TOKEN),
        (f"{TOKEN}\r\n", TOKEN),
        (f"{TOKEN}\n\n", f"{TOKEN}\n"),
        (f" {TOKEN} ", f" {TOKEN} "),
    ],
    ids=["no-newline", "newline", "crlf", "two-newlines", "spaces-kept"],
)
def test_only_one_trailing_newline_is_dropped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str, expected: str
) -> None:
    """Exactly one trailing newline is ignored; everything else is the value, as written."""
    settings = load(monkeypatch, MOZREST_API_KEY_FILE=secret(tmp_path, content))
    assert settings.mozrest_api_key == expected


def test_a_plain_value_has_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret given in the plain form has no file to read again."""
    settings = load(monkeypatch, MOZREST_WEBHOOK_TOKEN=TOKEN)
    assert settings.mozrest_webhook_token == TOKEN
    assert settings.secret_file("MOZREST_WEBHOOK_TOKEN") is None


@pytest.mark.parametrize("variable", SECRET_VARIABLES)
def test_both_forms_set_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str
) -> None:
    """NAME and NAME_FILE both set stops start-up with one line naming both, and neither value."""
    plain = "PLAIN-SECRET"
    if variable == "DATABASE_URL":
        plain = "postgresql://relay:PLAIN-SECRET@db/rms"
    message = config_error(
        monkeypatch, **{variable: plain, f"{variable}_FILE": secret(tmp_path, TOKEN)}
    )
    assert message.startswith(f"{variable} and {variable}_FILE are both set"), message
    assert "PLAIN-SECRET" not in message and TOKEN not in message


def test_a_blank_plain_value_beside_a_file_is_not_a_conflict(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An empty NAME (a compose file's `${NAME:-}`) is unset: NAME_FILE alone gives the value."""
    settings = load(
        monkeypatch, MOZREST_WEBHOOK_TOKEN="", MOZREST_WEBHOOK_TOKEN_FILE=secret(tmp_path, TOKEN)
    )
    assert settings.mozrest_webhook_token == TOKEN


def unreadable_cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Path given and the words the error must contain, per kind of unusable file."""
    directory = tmp_path / "a-folder"
    directory.mkdir()
    return {
        "missing": (str(tmp_path / "nope"), "no such file"),
        "directory": (str(directory), "is a directory"),
        "not-utf8": (secret(tmp_path, b"\xff\xfe" + TOKEN.encode(), "latin"), "not UTF-8"),
        "empty": (secret(tmp_path, "\n", "empty"), "empty"),
        "too-large": (secret(tmp_path, "x" * 70_000, "large"), "larger than"),
    }


@pytest.mark.parametrize("case", ["missing", "directory", "not-utf8", "empty", "too-large"])
@pytest.mark.parametrize("variable", SECRET_VARIABLES)
def test_an_unusable_file_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, variable: str, case: str
) -> None:
    """A missing, unreadable, non-UTF-8, empty or oversized file stops start-up: one line that
    starts with `NAME_FILE`, names the file and says why."""
    path, words = unreadable_cases(tmp_path)[case]
    message = config_error(monkeypatch, **{f"{variable}_FILE": path})
    assert message.startswith(f"{variable}_FILE ({path}): "), message
    assert words in message
    assert TOKEN not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_a_file_without_read_permission_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A file the relay's user may not read says so."""
    path = secret(tmp_path, TOKEN)
    os.chmod(path, 0)
    message = config_error(monkeypatch, MOZREST_API_KEY_FILE=path)
    assert message == f"MOZREST_API_KEY_FILE ({path}): cannot read it: permission denied"


def test_a_bad_value_in_a_file_is_reported_without_the_value(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A file holding a value the setting refuses is reported as that setting, never quoted."""
    path = secret(tmp_path, "oracle://relay:FILE-SECRET@db/rms\n")
    message = config_error(monkeypatch, DATABASE_URL_FILE=path)
    assert message.startswith("DATABASE_URL"), message
    assert "FILE-SECRET" not in message


def test_the_file_forms_are_read_from_the_dot_env_file(tmp_path: Path) -> None:
    """`NAME_FILE` in .env works like the other variables there."""
    path = secret(tmp_path, TOKEN + "\n")
    (tmp_path / ".env").write_text(f"MOZREST_WEBHOOK_TOKEN_FILE={path}\n", encoding="utf-8")
    settings = load_settings()
    assert settings.mozrest_webhook_token == TOKEN
    assert settings.secret_file("MOZREST_WEBHOOK_TOKEN") == path


def test_a_conflict_between_the_environment_and_dot_env_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """NAME in .env and NAME_FILE in the environment (or the reverse) is still both forms."""
    (tmp_path / ".env").write_text("MOZREST_API_KEY=PLAIN-SECRET\n", encoding="utf-8")
    monkeypatch.setenv("MOZREST_API_KEY_FILE", secret(tmp_path, TOKEN))
    with pytest.raises(ConfigError, match=r"^MOZREST_API_KEY and MOZREST_API_KEY_FILE are both"):
        load_settings()


def test_the_environment_file_form_wins_over_the_dot_env_file_form(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As for every variable, the environment ranks above .env."""
    (tmp_path / ".env").write_text(
        f"RELAY_ADMIN_TOKEN_FILE={secret(tmp_path, 'from-dot-env', 'a')}\n", encoding="utf-8"
    )
    monkeypatch.setenv("RELAY_ADMIN_TOKEN_FILE", secret(tmp_path, "from-environment", "b"))
    assert load_settings().relay_admin_token == "from-environment"


def test_a_setting_not_declared_yet_is_still_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """RELAY_API_TOKENS_FILE is resolved like the others (its file must be usable) whether or not
    `Settings` declares RELAY_API_TOKENS yet."""
    config_error(monkeypatch, RELAY_API_TOKENS_FILE=str(tmp_path / "missing"))
    monkeypatch.setenv("RELAY_API_TOKENS_FILE", secret(tmp_path, "ops:operator:" + "a" * 64))
    settings = load_settings(_env_file=None)
    assert settings.secret_file("RELAY_API_TOKENS") is not None


def test_the_configuration_error_never_carries_the_file_value(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With tokens from files, an error about another variable does not quote them."""
    message = config_error(
        monkeypatch,
        MOZREST_WEBHOOK_TOKEN_FILE=secret(tmp_path, TOKEN),
        RELAY_PORT="http",
    )
    assert message.startswith("RELAY_PORT")
    assert TOKEN not in message


# --------------------------------------------------------------------------------------------
# SecretSource: read again after a rotation
# --------------------------------------------------------------------------------------------


def test_a_secret_source_reads_its_file_again(tmp_path: Path) -> None:
    """`reload` reads the rotated file: True and the new value when it changed, False when not."""
    path = secret(tmp_path, "old-token\n")
    source = SecretSource(value="old-token", path=path, variable="MOZREST_WEBHOOK_TOKEN")
    first_read = source.read_at
    assert source.current() == "old-token"
    assert source.reload() is False
    Path(path).write_text("new-token\n")
    assert source.reload() is True
    assert source.current() == "new-token"
    assert source.read_at is not None and first_read is not None and source.read_at >= first_read


def test_a_rotation_half_done_keeps_the_old_value(tmp_path: Path) -> None:
    """A file missing or empty for a moment (a secret being swapped) keeps the value it had and
    says why, naming the variable, never the value."""
    path = tmp_path / "token"
    path.write_text("old-token")
    source = SecretSource(value="old-token", path=str(path), variable="MOZREST_WEBHOOK_TOKEN")
    path.unlink()
    assert source.reload() is False
    assert source.current() == "old-token"
    assert source.last_error is not None
    assert source.last_error.startswith("MOZREST_WEBHOOK_TOKEN_FILE")
    assert "old-token" not in source.last_error
    path.write_text("")
    assert source.reload() is False and source.current() == "old-token"
    path.write_text("new-token")
    assert source.reload() is True and source.last_error is None


def test_a_plain_secret_never_changes() -> None:
    """Without a file there is nothing to read again."""
    source = SecretSource(value="key-SECRET", variable="MOZREST_API_KEY")
    assert source.reload() is False
    assert source.current() == "key-SECRET"
    assert source.read_at is None
    assert "key-SECRET" not in repr(source)


def test_a_secret_source_from_settings_knows_its_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Built from settings, a secret given as a file can be read again; one given plain cannot."""
    path = secret(tmp_path, TOKEN)
    settings = load(monkeypatch, MOZREST_WEBHOOK_TOKEN_FILE=path, MOZREST_API_KEY="plain-key")
    webhook = SecretSource.from_settings(settings, "MOZREST_WEBHOOK_TOKEN")
    api_key = SecretSource.from_settings(settings, "MOZREST_API_KEY")
    assert (webhook.current(), webhook.path, webhook.rereadable) == (TOKEN, path, True)
    assert (api_key.current(), api_key.path, api_key.rereadable) == ("plain-key", None, False)
