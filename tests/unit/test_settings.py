"""Unit tests for `app.settings`: the environment variables of SPEC section 4."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from app.settings import (
    LEASE_MARGIN_SECONDS,
    ConfigError,
    Settings,
    load_settings,
    parse_duration,
    variable,
)

SANDBOX_WEBHOOK = "https://webhooks.pos.sandbox.mozrest.com/rms"
PRODUCTION_WEBHOOK = "https://webhooks.pos.mozrest.com/rms"
SANDBOX_API = "https://api-sandbox.mozrest.com"
PRODUCTION_API = "https://api.mozrest.com"

WEBHOOK_TOKEN = "whk-7f3a9c1e5b2d-SECRET"
API_KEY = "pk-0d9e8f7a6b5c-SECRET"
ADMIN_TOKEN = "adm-1a2b3c4d5e6f-SECRET"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Drop the surrounding shell's relay variables and run from an empty directory."""
    for name in list(os.environ):
        upper = name.upper()
        if upper.startswith(("RELAY_", "MOZREST_")) or upper.startswith("DATABASE_URL"):
            monkeypatch.delenv(name)
    # Belt and braces: even a test that forgot `_env_file=None` finds no .env here.
    monkeypatch.chdir(tmp_path)


def load(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    """Set environment variables and load the settings without any .env file."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return load_settings(_env_file=None)


def config_error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    """Set environment variables and return the ConfigError message loading them raises."""
    with pytest.raises(ConfigError) as caught:
        load(monkeypatch, **env)
    return str(caught.value)


# --------------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------------


def test_defaults_match_spec_section_4(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no variables set, every default is the one SPEC section 4 documents."""
    settings = load(monkeypatch)
    assert settings.database_url == "sqlite+aiosqlite:///./mozrest-relay.db"
    assert settings.mozrest_env == "sandbox"
    assert settings.webhook_url == SANDBOX_WEBHOOK
    assert settings.api_url == SANDBOX_API
    assert settings.mozrest_webhook_token is None
    assert settings.mozrest_api_key is None
    assert settings.relay_admin_token is None
    assert settings.relay_send_statuses == frozenset({"seated"})
    assert settings.relay_retry_max_age_seconds == 12 * 3600
    assert settings.relay_send_items is True
    assert settings.relay_retention_seconds == 7 * 86400
    assert settings.relay_host == "127.0.0.1"
    assert settings.relay_port == 8000
    assert settings.relay_log_level == "info"
    assert settings.relay_log_format == "json"


def test_defaults_satisfy_the_lease_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default lease outlives the default HTTP timeout by at least the documented margin."""
    settings = load(monkeypatch)
    assert (
        settings.relay_http_timeout_seconds + LEASE_MARGIN_SECONDS <= settings.relay_lease_seconds
    )


def test_production_picks_production_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    """MOZREST_ENV=production picks Mozrest's production webhook and API URLs."""
    settings = load(monkeypatch, MOZREST_ENV="production")
    assert settings.mozrest_env == "production"
    assert settings.webhook_url == PRODUCTION_WEBHOOK
    assert settings.api_url == PRODUCTION_API


def test_explicit_sandbox_picks_sandbox_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    """MOZREST_ENV=sandbox picks Mozrest's sandbox webhook and API URLs."""
    settings = load(monkeypatch, MOZREST_ENV="sandbox")
    assert settings.webhook_url == SANDBOX_WEBHOOK
    assert settings.api_url == SANDBOX_API


@pytest.mark.parametrize("environment", ["sandbox", "production"])
def test_url_overrides_win_over_the_environment(
    monkeypatch: pytest.MonkeyPatch, environment: str
) -> None:
    """MOZREST_WEBHOOK_URL and MOZREST_API_URL override the URLs picked by MOZREST_ENV."""
    settings = load(
        monkeypatch,
        MOZREST_ENV=environment,
        MOZREST_WEBHOOK_URL="http://127.0.0.1:8090/rms",
        MOZREST_API_URL="http://127.0.0.1:8090",
    )
    assert settings.webhook_url == "http://127.0.0.1:8090/rms"
    assert settings.api_url == "http://127.0.0.1:8090"


def test_env_file_none_ignores_a_dot_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`load_settings(_env_file=None)` ignores a .env file that would otherwise be read."""
    (tmp_path / ".env").write_text("RELAY_PORT=9999\nMOZREST_ENV=production\n", encoding="utf-8")
    isolated = load_settings(_env_file=None)
    assert isolated.relay_port == 8000
    assert isolated.mozrest_env == "sandbox"
    # The guard is meaningful: without it the file in the working directory is read.
    assert load_settings().relay_port == 9999


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each documented variable set in the environment reaches its setting."""
    settings = load(
        monkeypatch,
        MOZREST_WEBHOOK_TOKEN=WEBHOOK_TOKEN,
        MOZREST_API_KEY=API_KEY,
        RELAY_ADMIN_TOKEN=ADMIN_TOKEN,
        RELAY_SEND_STATUSES="seated, finished ,arrived",
        RELAY_SEND_ITEMS="false",
        RELAY_HOST="0.0.0.0",
        RELAY_PORT="9100",
        RELAY_LOG_LEVEL="debug",
        RELAY_LOG_FORMAT="text",
    )
    assert settings.mozrest_webhook_token == WEBHOOK_TOKEN
    assert settings.mozrest_api_key == API_KEY
    assert settings.relay_admin_token == ADMIN_TOKEN
    assert settings.relay_send_statuses == frozenset({"seated", "finished", "arrived"})
    assert settings.relay_send_items is False
    assert settings.relay_host == "0.0.0.0"
    assert settings.relay_port == 9100
    assert settings.relay_log_level == "debug"
    assert settings.relay_log_format == "text"


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), ("false", False), ("1", True), ("0", False), ("TRUE", True)],
)
def test_send_items_flag(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    """RELAY_SEND_ITEMS accepts the usual spellings of true and false."""
    assert load(monkeypatch, RELAY_SEND_ITEMS=value).relay_send_items is expected


# --------------------------------------------------------------------------------------------
# Durations
# --------------------------------------------------------------------------------------------

DURATIONS = [
    ("250ms", 0.25),
    ("30s", 30.0),
    ("5m", 300.0),
    ("12h", 43200.0),
    ("7d", 604800.0),
    ("90", 90.0),
    ("1.5s", 1.5),
]


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
def test_parse_duration_to_seconds(text: str, seconds: float) -> None:
    """parse_duration turns `250ms`, `30s`, `5m`, `12h`, `7d` and plain numbers into seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "seconds"), DURATIONS)
@pytest.mark.parametrize("variable", ["RELAY_RETRY_MAX_AGE", "RELAY_RETENTION"])
def test_duration_variables_are_seconds(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str, seconds: float
) -> None:
    """Duration variables in the environment are read in any documented form as seconds."""
    settings = load(monkeypatch, **{variable: text})
    assert getattr(settings, f"{variable.lower()}_seconds") == pytest.approx(seconds)


def test_every_duration_field_says_seconds_and_reads_its_documented_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A duration's field name ends in `_seconds`; the variable it reads keeps the documented
    name (`relay_http_timeout_seconds` from `RELAY_HTTP_TIMEOUT`), and only that name."""
    durations = [
        name for name, field in Settings.model_fields.items() if "parse_duration" in repr(field)
    ]
    assert "relay_http_timeout_seconds" in durations
    for name in durations:
        assert name.endswith("_seconds"), name
    assert variable("relay_http_timeout_seconds") == "RELAY_HTTP_TIMEOUT"
    assert variable("relay_lease_seconds") == "RELAY_LEASE_SECONDS"
    settings = load(monkeypatch, RELAY_POLL_INTERVAL="250ms", RELAY_HTTP_TIMEOUT_SECONDS="2s")
    assert settings.relay_poll_interval_seconds == pytest.approx(0.25)
    assert settings.relay_http_timeout_seconds == 10.0  # an undocumented name is not read


def test_a_duration_is_given_by_field_or_variable_name() -> None:
    """In code, a setting is given by its field name or by its variable's name alike."""
    by_field = load_settings(_env_file=None, relay_shutdown_grace_seconds=3.0)
    by_variable = load_settings(_env_file=None, relay_shutdown_grace=3.0)
    assert by_field.relay_shutdown_grace_seconds == by_variable.relay_shutdown_grace_seconds == 3.0


def test_an_invalid_duration_names_its_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one-line error names the documented variable, not the field."""
    assert config_error(monkeypatch, RELAY_POLL_INTERVAL="soon").startswith("RELAY_POLL_INTERVAL:")


def test_written_defaults_equal_the_built_in_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing the documented defaults (`12h`, `7d`) explicitly changes nothing."""
    explicit = load(monkeypatch, RELAY_RETRY_MAX_AGE="12h", RELAY_RETENTION="7d")
    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)
    implicit = load_settings(_env_file=None)
    assert explicit.relay_retry_max_age_seconds == implicit.relay_retry_max_age_seconds
    assert explicit.relay_retention_seconds == implicit.relay_retention_seconds


# --------------------------------------------------------------------------------------------
# Bad values: one line, starting with the variable's name
# --------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("DATABASE_URL", "not a url"),
    ("DATABASE_URL", "oracle://relay@db/rms"),
    ("MOZREST_ENV", "staging"),
    ("MOZREST_WEBHOOK_URL", "ftp://webhooks.example.com/rms"),
    ("MOZREST_WEBHOOK_URL", "webhooks.pos.mozrest.com/rms"),
    ("MOZREST_API_URL", "not-a-url"),
    ("RELAY_SEND_STATUSES", ","),
    ("RELAY_SEND_STATUSES", ""),
    ("RELAY_RETRY_MAX_AGE", "forever"),
    ("RELAY_RETRY_MAX_AGE", "-5s"),
    ("RELAY_RETRY_MAX_AGE", "12 hours"),
    ("RELAY_SEND_ITEMS", "maybe"),
    ("RELAY_SEND_ITEMS", ""),
    ("RELAY_RETENTION", "a week"),
    ("RELAY_RETENTION", "7w"),
    ("RELAY_LEASE_SECONDS", "0"),
    ("RELAY_LEASE_SECONDS", "soon"),
    ("RELAY_SHUTDOWN_GRACE", "-1"),
    ("RELAY_CONCURRENCY", "0"),
    ("RELAY_CONCURRENCY", "many"),
    ("RELAY_BATCH_SIZE", "-1"),
    ("RELAY_BATCH_SIZE", "1.5"),
    ("RELAY_POLL_INTERVAL", "0"),
    ("RELAY_POLL_INTERVAL", "fast"),
    ("RELAY_HTTP_TIMEOUT", "0"),
    ("RELAY_HTTP_TIMEOUT", "10 s please"),
    ("RELAY_RETRY_BASE_DELAY", "x"),
    ("RELAY_RETRY_MAX_DELAY", "5y"),
    ("RELAY_CIRCUIT_THRESHOLD", "0"),
    ("RELAY_CIRCUIT_COOLDOWN", "1 minute"),
    ("RELAY_HEARTBEAT_INTERVAL", "-2s"),
    ("RELAY_MAX_PAYLOAD_BYTES", "100"),
    ("RELAY_MAX_PAYLOAD_BYTES", "64KiB"),
    ("RELAY_NOTIFY", "2"),
    ("RELAY_POS_TABLES_CACHE", "30x"),
    ("RELAY_PORT", "http"),
    ("RELAY_PORT", "70000"),
    ("RELAY_PORT", "-1"),
    ("RELAY_LOG_LEVEL", "verbose"),
    ("RELAY_LOG_FORMAT", "xml"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_bad_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """A bad value raises ConfigError: a single line that starts with the variable's name."""
    message = config_error(monkeypatch, **{variable: value})
    assert re.match(rf"{variable}\b", message), message
    assert "\n" not in message and "\r" not in message
    assert len(message) > len(variable) + 5  # says why, not just which


def test_several_bad_values_stay_on_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """Several bad values are reported together, still on one line, each variable named."""
    message = config_error(monkeypatch, RELAY_PORT="http", RELAY_RETENTION="a week")
    assert "\n" not in message
    assert "RELAY_PORT" in message
    assert "RELAY_RETENTION" in message


def test_config_error_is_not_a_validation_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad value surfaces as ConfigError, not pydantic's multi-line ValidationError."""
    with pytest.raises(ConfigError) as caught:
        load(monkeypatch, RELAY_PORT="http")
    assert caught.value.__cause__ is None
    assert "pydantic" not in str(caught.value).lower()


# --------------------------------------------------------------------------------------------
# Database URL
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://relay:pw@db:5432/rms", "postgresql+asyncpg://relay:pw@db:5432/rms"),
        ("postgres://relay:pw@db:5432/rms", "postgresql+asyncpg://relay:pw@db:5432/rms"),
        (
            "postgresql://db/rms?application_name=x",
            "postgresql+asyncpg://db/rms?application_name=x",
        ),
        ("postgresql+asyncpg://db/rms", "postgresql+asyncpg://db/rms"),
        ("sqlite+aiosqlite:///./other.db", "sqlite+aiosqlite:///./other.db"),
    ],
)
def test_database_url_gets_the_async_driver(
    monkeypatch: pytest.MonkeyPatch, given: str, expected: str
) -> None:
    """A plain postgresql:// or postgres:// URL becomes postgresql+asyncpg://, the rest intact."""
    settings = load(monkeypatch, DATABASE_URL=given)
    assert settings.database_url == expected


# --------------------------------------------------------------------------------------------
# The lease / timeout rule (SPEC 3.3)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timeout", "lease"),
    [
        ("30", "30"),
        ("45", "30"),
        ("29.5", "30"),
        ("30s", "30500ms"),
        ("5s", "2s"),
        ("2m", "1m"),
        (f"{30 - LEASE_MARGIN_SECONDS + 0.01}", "30"),
    ],
)
def test_http_timeout_too_close_to_lease_is_refused(
    monkeypatch: pytest.MonkeyPatch, timeout: str, lease: str
) -> None:
    """RELAY_HTTP_TIMEOUT within the margin of RELAY_LEASE_SECONDS is refused, naming both."""
    message = config_error(monkeypatch, RELAY_HTTP_TIMEOUT=timeout, RELAY_LEASE_SECONDS=lease)
    assert "RELAY_HTTP_TIMEOUT" in message
    assert "RELAY_LEASE_SECONDS" in message
    assert message.startswith(("RELAY_HTTP_TIMEOUT", "RELAY_LEASE_SECONDS"))
    assert "\n" not in message


def test_lease_below_default_timeout_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lowering only RELAY_LEASE_SECONDS below the default timeout is refused, naming both."""
    message = config_error(monkeypatch, RELAY_LEASE_SECONDS="5s")
    assert "RELAY_HTTP_TIMEOUT" in message
    assert "RELAY_LEASE_SECONDS" in message


@pytest.mark.parametrize(
    ("timeout", "lease"),
    [
        ("10", "30"),
        (f"{30 - LEASE_MARGIN_SECONDS:g}", "30"),
        ("250ms", "2s"),
        ("1m", "5m"),
    ],
)
def test_http_timeout_with_margin_is_accepted(
    monkeypatch: pytest.MonkeyPatch, timeout: str, lease: str
) -> None:
    """A timeout at least the documented margin shorter than the lease is accepted."""
    settings = load(monkeypatch, RELAY_HTTP_TIMEOUT=timeout, RELAY_LEASE_SECONDS=lease)
    assert (
        settings.relay_http_timeout_seconds + LEASE_MARGIN_SECONDS <= settings.relay_lease_seconds
    )


# --------------------------------------------------------------------------------------------
# check_can_send: no token only towards a loopback URL
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"MOZREST_ENV": "production"},
        {"MOZREST_WEBHOOK_URL": "https://relay-target.example.com/rms"},
        {"MOZREST_WEBHOOK_URL": "http://127.0.0.1.example.com/rms"},
        {"MOZREST_WEBHOOK_URL": "http://localhost.example.com/rms"},
        {"MOZREST_WEBHOOK_URL": "http://0.0.0.0:8090/rms"},
        {"MOZREST_WEBHOOK_URL": "http://10.0.0.5:8090/rms"},
        {"MOZREST_WEBHOOK_TOKEN": "   "},
    ],
    ids=[
        "sandbox-default",
        "production-default",
        "remote",
        "loopback-lookalike-ip",
        "loopback-lookalike-name",
        "any-address",
        "private-address",
        "blank-token",
    ],
)
def test_check_can_send_refuses_missing_token(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str]
) -> None:
    """Without MOZREST_WEBHOOK_TOKEN a non-loopback webhook URL is refused, naming the token."""
    settings = load(monkeypatch, **env)
    with pytest.raises(ConfigError) as caught:
        settings.check_can_send()
    message = str(caught.value)
    assert message.startswith("MOZREST_WEBHOOK_TOKEN")
    assert "\n" not in message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8090/rms",
        "http://localhost/rms",
        "http://localhost:8090/rms",
        "http://[::1]:8090/rms",
    ],
)
def test_check_can_send_allows_loopback_without_token(
    monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    """A loopback webhook URL (the local emulator) may run without a token."""
    settings = load(monkeypatch, MOZREST_WEBHOOK_URL=url)
    assert settings.mozrest_webhook_token is None
    settings.check_can_send()
    assert settings.webhook_url == url


@pytest.mark.parametrize("environment", ["sandbox", "production"])
def test_check_can_send_allows_a_token(monkeypatch: pytest.MonkeyPatch, environment: str) -> None:
    """With MOZREST_WEBHOOK_TOKEN set, a real Mozrest URL may be used."""
    settings = load(monkeypatch, MOZREST_ENV=environment, MOZREST_WEBHOOK_TOKEN=WEBHOOK_TOKEN)
    settings.check_can_send()


# --------------------------------------------------------------------------------------------
# Secrets never appear in a ConfigError
# --------------------------------------------------------------------------------------------

SECRETS = (WEBHOOK_TOKEN, API_KEY, ADMIN_TOKEN)
SECRET_ENV = {
    "MOZREST_WEBHOOK_TOKEN": WEBHOOK_TOKEN,
    "MOZREST_API_KEY": API_KEY,
    "RELAY_ADMIN_TOKEN": ADMIN_TOKEN,
}


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RELAY_PORT", "http"),
        ("MOZREST_ENV", "staging"),
        ("RELAY_HTTP_TIMEOUT", "60s"),
        ("MOZREST_WEBHOOK_URL", f"ftp://user:{WEBHOOK_TOKEN}@webhooks.example.com/rms"),
        ("MOZREST_WEBHOOK_URL", f"webhooks.example.com/rms?token={WEBHOOK_TOKEN}"),
        ("MOZREST_API_URL", f"ftp://api.example.com/?key={API_KEY}"),
        ("DATABASE_URL", f"oracle://relay:{ADMIN_TOKEN}@db/rms"),
        ("DATABASE_URL", f"relay:{ADMIN_TOKEN}@db/rms"),
    ],
)
def test_config_error_never_contains_a_secret(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """With tokens set, a ConfigError about any variable never quotes a secret value."""
    message = config_error(monkeypatch, **SECRET_ENV, **{variable: value})
    assert message.startswith(variable)
    for secret in SECRETS:
        assert secret not in message


@pytest.mark.parametrize(
    "variable", ["mozrest_webhook_token", "mozrest_api_key", "relay_admin_token"]
)
def test_config_error_about_a_secret_does_not_quote_it(variable: str) -> None:
    """Even a ConfigError about a secret variable itself names it without quoting its value."""
    with pytest.raises(ConfigError) as caught:
        load_settings(_env_file=None, **{variable: ["SECRET-IN-A-LIST-7f3a9c"]})
    message = str(caught.value)
    assert message.startswith(variable.upper())
    assert "SECRET-IN-A-LIST-7f3a9c" not in message


def test_check_can_send_error_contains_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    """The missing-token refusal quotes none of the other secrets that are set."""
    settings = load(monkeypatch, MOZREST_API_KEY=API_KEY, RELAY_ADMIN_TOKEN=ADMIN_TOKEN)
    with pytest.raises(ConfigError) as caught:
        settings.check_can_send()
    for secret in SECRETS:
        assert secret not in str(caught.value)
