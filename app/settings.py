"""The relay's configuration: every environment variable it reads, validated in one place."""

from __future__ import annotations

import ipaddress
import re
from functools import cached_property
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BeforeValidator,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from app.access import ADMIN_NAME, ApiToken, parse_api_tokens
from app.secret_files import SecretFileError, SecretFilesSource, recording_files_read

SANDBOX_WEBHOOK_URL = "https://webhooks.pos.sandbox.mozrest.com/rms"
PRODUCTION_WEBHOOK_URL = "https://webhooks.pos.mozrest.com/rms"
SANDBOX_API_URL = "https://api-sandbox.mozrest.com"
PRODUCTION_API_URL = "https://api.mozrest.com"

#: The lease that guards a claimed booking must outlive the request it covers by this much: time
#: to record the outcome after the request ends. Keep in step with the README's configuration notes.
LEASE_MARGIN_SECONDS = 1.0

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class ConfigError(Exception):
    """A configuration value is wrong; the message is one line naming the variable."""


def parse_duration(value: object) -> float:
    """Return seconds for `250ms`, `30s`, `5m`, `12h`, `7d` or plain seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 30s, 5m, 12h, 7d or plain seconds")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if not match:
            raise ValueError("expected a duration such as 250ms, 30s, 5m, 12h, 7d or plain seconds")
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def _parse_bool(value: object) -> object:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise ValueError("expected true or false")
    return value


def _parse_statuses(value: object) -> object:
    if isinstance(value, str):
        statuses = [part.strip() for part in value.split(",") if part.strip()]
        if not statuses:
            raise ValueError("expected a comma-separated list of statuses, such as seated")
        return frozenset(statuses)
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Flag = Annotated[bool, BeforeValidator(_parse_bool)]
StatusSet = Annotated[frozenset[str], NoDecode, BeforeValidator(_parse_statuses)]
ApiTokens = Annotated[tuple[ApiToken, ...], NoDecode, BeforeValidator(parse_api_tokens)]


def normalise_database_url(url: str) -> str:
    """Give a plain database URL the async driver the relay uses for it."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("expected a SQLAlchemy URL such as postgresql://user@host/db")
    scheme = scheme.lower()
    if scheme in {"postgres", "postgresql", "postgresql+psycopg2", "postgresql+psycopg"}:
        return f"postgresql+asyncpg://{rest}"
    if scheme == "sqlite":
        return f"sqlite+aiosqlite://{rest}"
    if scheme in {"mysql", "mariadb", "mysql+pymysql", "mariadb+pymysql"}:
        return f"mysql+asyncmy://{rest}"
    if scheme in {"postgresql+asyncpg", "sqlite+aiosqlite", "mysql+asyncmy", "mysql+aiomysql"}:
        return f"{scheme}://{rest}"
    raise ValueError(
        f"unsupported database scheme {scheme!r}: use postgresql://, sqlite:/// or mysql://"
    )


def is_loopback_url(url: str) -> bool:
    """True when the URL's host is a loopback address (the local emulator)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Settings(BaseSettings):
    """Every setting of the relay. Field names map one to one to environment variables."""

    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", case_sensitive=False, extra="ignore"
    )
    #: Secrets given as `NAME_FILE`: variable name to the file read (`secret_file`).
    _secret_files: dict[str, str] = PrivateAttr(default_factory=dict)

    def __init__(self, **values: Any) -> None:
        try:
            with recording_files_read() as files_read:
                super().__init__(**values)
        except SecretFileError as exc:
            raise ConfigError(str(exc)) from None
        self._secret_files = files_read

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # `NAME_FILE` (app.secret_files) for the secrets, from the environment and the .env file.
        secret_files = SecretFilesSource(
            settings_cls, env_settings=env_settings, dotenv_settings=dotenv_settings
        )
        return init_settings, secret_files, env_settings, dotenv_settings, file_secret_settings

    database_url: str = Field(
        "sqlite+aiosqlite:///./mozrest-relay.db",
        description="SQLAlchemy URL of the RMS database; postgresql:// gets the async driver.",
    )
    mozrest_env: Literal["sandbox", "production"] = Field(
        "sandbox", description="Picks Mozrest's documented default URLs."
    )
    mozrest_webhook_url: str | None = Field(
        None, description="Webhook URL; defaults by MOZREST_ENV. Point it at the emulator locally."
    )
    mozrest_api_url: str | None = Field(
        None, description="Partner API base URL; defaults by MOZREST_ENV."
    )
    mozrest_webhook_token: str | None = Field(
        None, repr=False, description="Bearer token for webhooks."
    )
    mozrest_api_key: str | None = Field(
        None, repr=False, description="Partner API key for POS tables."
    )
    relay_admin_token: str | None = Field(
        None, repr=False, description="Bearer token for /api/*: the operator named `admin`."
    )
    relay_api_tokens: ApiTokens = Field(
        (),
        repr=False,
        description="Named tokens for /api/*: comma-separated `name:role:sha256hex` entries, "
        "roles viewer or operator (`mozrest-relay token new` makes one).",
    )
    relay_send_statuses: StatusSet = Field(
        frozenset({"seated"}), description="Comma-separated statuses that start sending a booking."
    )
    relay_retry_max_age: Duration = Field(
        12 * 3600.0, description="After this long without success a delivery is dead."
    )
    relay_send_items: Flag = Field(True, description="false strips pre-ordered items (a beta).")
    relay_retention: Duration = Field(
        7 * 86400.0, description="How long terminal rows and idle snapshots are kept."
    )
    relay_audit_retention: Duration = Field(
        365 * 86400.0, description="How long audit rows are kept, whatever RELAY_RETENTION says."
    )
    relay_payload_retention: Duration = Field(
        3 * 86400.0,
        description="Guests' personal fields are erased this long after their booking's "
        "deliveries ended (and outbox rows were processed); the rest stays for RELAY_RETENTION.",
    )
    relay_lease_seconds: Duration = Field(
        30.0,
        description="How long a claim guards a booking; must exceed RELAY_HTTP_TIMEOUT by 1s.",
    )
    relay_shutdown_grace: Duration = Field(
        15.0, description="On SIGTERM, how long in-flight requests may finish before release."
    )
    relay_concurrency: int = Field(64, ge=1, le=1024, description="Requests in flight per process.")
    relay_rate_limit: float = Field(
        0.0,
        ge=0.0,
        allow_inf_nan=False,
        description="Webhook requests per second for the whole relay, every replica together; "
        "0: no limit.",
    )
    relay_batch_size: int = Field(200, ge=1, le=5000, description="Rows claimed per statement.")
    relay_poll_interval: Duration = Field(
        0.05, description="How often an idle worker looks for new rows."
    )
    relay_http_timeout: Duration = Field(
        10.0, description="Deadline for one webhook request, connect to last byte."
    )
    relay_retry_base_delay: Duration = Field(
        1.0, description="First retry delay; doubles each attempt, with equal jitter."
    )
    relay_retry_max_delay: Duration = Field(300.0, description="Longest delay between retries.")
    relay_circuit_threshold: int = Field(
        5, ge=1, description="Retryable failures in a row that open the circuit."
    )
    relay_circuit_cooldown: Duration = Field(
        10.0, description="Between probes while the circuit is open or credentials are rejected."
    )
    relay_heartbeat_interval: Duration = Field(5.0, description="How often a process checks in.")
    relay_max_payload_bytes: int = Field(
        65536, ge=1024, description="Payloads larger than this (serialised) are invalid."
    )
    relay_notify: Flag = Field(
        False, description="PostgreSQL LISTEN/NOTIFY wake-up (costs the RMS's inserts a lock)."
    )
    relay_http_transport: Literal["aiohttp", "httpx"] = Field(
        "aiohttp",
        description="Webhook HTTP client: aiohttp (default, fastest) or httpx (an escape hatch).",
    )
    relay_pos_tables_cache: Duration = Field(30.0, description="How long POS tables are cached.")
    relay_console_session: Duration = Field(
        12 * 3600.0, description="How long an operator console session lasts after sign-in."
    )
    relay_host: str = Field("127.0.0.1", description="Admin API bind address.")
    relay_port: int = Field(8000, ge=0, le=65535, description="Admin API port.")
    relay_log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )
    relay_log_format: Literal["json", "text"] = Field("json", description="Log format.")
    # OpenTelemetry's own variables (docs/platform.md, "Tracing"); the SDK reads the rest.
    otel_traces_exporter: Literal["otlp", "console", "none"] | None = Field(
        None, description="`otlp` or `console` turns tracing on; unset, an OTLP endpoint does."
    )
    otel_exporter_otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector, e.g. `http://collector:4318` (traces go to /v1/traces).",
    )
    otel_exporter_otlp_traces_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces URL, used as given (wins over the one above)."
    )
    otel_service_name: str = Field("mozrest-relay", description="The traces' `service.name`.")
    otel_sdk_disabled: Flag = Field(
        False, description="`true` turns tracing off whatever else says."
    )

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return normalise_database_url(value)

    @field_validator(
        "mozrest_env",
        "relay_log_level",
        "relay_log_format",
        "relay_http_transport",
        "otel_traces_exporter",
        mode="before",
    )
    @classmethod
    def _lowercase(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("mozrest_webhook_url", "mozrest_api_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError("expected an http:// or https:// URL")
        return value

    @field_validator("otel_exporter_otlp_endpoint", "otel_exporter_otlp_traces_endpoint")
    @classmethod
    def _otlp_url(cls, value: str | None) -> str | None:
        return cls._http_url(value)

    @field_validator("mozrest_webhook_token", "mozrest_api_key", "relay_admin_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator(
        "relay_lease_seconds",
        "relay_http_timeout",
        "relay_poll_interval",
        "relay_heartbeat_interval",
        "relay_circuit_cooldown",
        "relay_retry_max_age",
    )
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be greater than zero")
        return value

    @model_validator(mode="after")
    def _admin_name_is_taken(self) -> Settings:
        if self.relay_admin_token is not None and any(
            token.name == ADMIN_NAME for token in self.relay_api_tokens
        ):
            raise ValueError(
                f"RELAY_API_TOKENS: the name {ADMIN_NAME} is RELAY_ADMIN_TOKEN's; choose another"
            )
        return self

    @model_validator(mode="after")
    def _lease_outlives_request(self) -> Settings:
        if self.relay_http_timeout + LEASE_MARGIN_SECONDS > self.relay_lease_seconds:
            raise ValueError(
                f"RELAY_HTTP_TIMEOUT ({self.relay_http_timeout:g}s) must be at least "
                f"{LEASE_MARGIN_SECONDS:g}s shorter than RELAY_LEASE_SECONDS "
                f"({self.relay_lease_seconds:g}s), so a claim always outlives its request"
            )
        return self

    @cached_property
    def webhook_url(self) -> str:
        if self.mozrest_webhook_url:
            return self.mozrest_webhook_url
        return PRODUCTION_WEBHOOK_URL if self.mozrest_env == "production" else SANDBOX_WEBHOOK_URL

    @cached_property
    def api_url(self) -> str:
        if self.mozrest_api_url:
            return self.mozrest_api_url.rstrip("/")
        return PRODUCTION_API_URL if self.mozrest_env == "production" else SANDBOX_API_URL

    def secret_file(self, variable: str) -> str | None:
        """The file secret `variable` (e.g. `MOZREST_WEBHOOK_TOKEN`) was read from, when it was
        given as `MOZREST_WEBHOOK_TOKEN_FILE`: it can be read again after a rotation."""
        return self._secret_files.get(variable)

    @property
    def dialect(self) -> str:
        """`postgresql`, `sqlite` or `mysql`."""
        return self.database_url.split("+", 1)[0].split(":", 1)[0]

    def check_can_send(self) -> None:
        """Refuse to run a worker that would send without credentials to a real Mozrest."""
        if self.mozrest_webhook_token is None and not is_loopback_url(self.webhook_url):
            raise ConfigError(
                f"MOZREST_WEBHOOK_TOKEN is not set: refusing to send to {self.webhook_url} "
                "without credentials (only a loopback MOZREST_WEBHOOK_URL, such as the local "
                "emulator, may run without a token)"
            )


def _describe(error: dict[str, Any]) -> str:
    location = [str(part) for part in error.get("loc", ()) if part != "__root__"]
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    if not location:
        return message
    variable = location[0].upper()
    value = error.get("input")
    secret = variable.endswith(("TOKEN", "TOKENS", "KEY", "URL"))
    shown = "" if secret else f" (got {value!r})"
    return f"{variable}: {message}{shown}"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning a validation failure into one `ConfigError` line."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(dict(e)) for e in exc.errors())) from None


def _default_text(name: str, field: Any) -> str:
    if name in {"mozrest_webhook_url", "mozrest_api_url"}:
        return "by `MOZREST_ENV`"
    default = field.default
    if default is None or default == ():
        return "none"
    if isinstance(default, frozenset):
        return f"`{','.join(sorted(default))}`"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if name == "relay_rate_limit":  # requests a second, not a duration
        return f"`{default:g}`"
    if isinstance(default, float) and name not in {"relay_max_payload_bytes"}:
        return f"`{_format_seconds(default)}`"
    return f"`{default}`"


def _format_seconds(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms"


def configuration_markdown() -> str:
    """The configuration reference table, generated from `Settings` so it cannot drift."""
    lines = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        lines.append(f"| `{name.upper()}` | {_default_text(name, field)} | {field.description} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(configuration_markdown(), end="")
