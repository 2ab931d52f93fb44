"""Secrets given as files: `NAME_FILE` names a file whose text is NAME's value, the convention of
Docker and Kubernetes secrets mounted as files; and a secret that can be read again after its file
was rotated, without a restart.

(Not `secrets.py`: run as a script from this folder, that name would hide the standard library's
`secrets`.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

#: The settings that may be given as `NAME_FILE`. Names, not fields: one that `Settings` does not
#: declare (yet) is still read, checked and then ignored like any unknown variable.
SECRET_VARIABLES = (
    "DATABASE_URL",
    "MOZREST_WEBHOOK_TOKEN",
    "MOZREST_API_KEY",
    "RELAY_ADMIN_TOKEN",
    "RELAY_API_TOKENS",
)

#: A secret file larger than this is refused: a mount of the wrong file, not a secret.
SECRET_FILE_LIMIT_BYTES = 64 * 1024


class SecretFileError(Exception):
    """A secret file cannot be used; the message is one line naming the variable, never the
    value."""


def read_secret_file(path: str, *, variable: str) -> str:
    """The text of the file at `path`, given as `variable` (e.g. `MOZREST_API_KEY_FILE`), with one
    trailing newline dropped (`\\n` or `\\r\\n`); `SecretFileError` naming the variable and the
    file when it is missing, unreadable, not UTF-8, too large or empty."""
    where = f"{variable} ({path})"
    try:
        with Path(path).open("rb") as file:
            data = file.read(SECRET_FILE_LIMIT_BYTES + 1)
    except FileNotFoundError:
        raise SecretFileError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise SecretFileError(f"{where}: is a directory, not a file") from None
    except PermissionError:
        raise SecretFileError(f"{where}: cannot read it: permission denied") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise SecretFileError(f"{where}: cannot read it: {reason}") from None
    if len(data) > SECRET_FILE_LIMIT_BYTES:
        raise SecretFileError(
            f"{where}: is larger than {SECRET_FILE_LIMIT_BYTES // 1024} KiB, not a secret"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SecretFileError(
            f"{where}: is not UTF-8 text (byte {exc.start} is not valid UTF-8)"
        ) from None
    text = text.removesuffix("\n").removesuffix("\r") if text.endswith("\n") else text
    if not text.strip():
        raise SecretFileError(f"{where}: the file is empty")
    return text


def _given(layers: tuple[Mapping[str, str | None], ...], key: str) -> str | None:
    """The first non-blank value of `key` in `layers` (highest priority first)."""
    for layer in layers:
        value = layer.get(key)
        if value is not None and value.strip():
            return value
    return None


def resolve_secret_files(
    *layers: Mapping[str, str | None],
) -> tuple[dict[str, str], dict[str, str]]:
    """Read every `NAME_FILE` given in `layers` (lower-case variable names, highest priority
    first: the environment, then the .env file). Answer the values by lower-case name and the
    files read by variable name; `SecretFileError` when a name is given in both forms (in any
    layers) or a file cannot be used."""
    values: dict[str, str] = {}
    paths: dict[str, str] = {}
    for variable in SECRET_VARIABLES:
        name = variable.lower()
        path = _given(layers, f"{name}_file")
        if path is None:
            continue
        if _given(layers, name) is not None:
            raise SecretFileError(f"{variable} and {variable}_FILE are both set: keep one of them")
        values[name] = read_secret_file(path, variable=f"{variable}_FILE")
        paths[variable] = path
    return values, paths


_files_read: ContextVar[dict[str, str] | None] = ContextVar("secret_files_read", default=None)


@contextlib.contextmanager
def recording_files_read() -> Iterator[dict[str, str]]:
    """Within the block, `SecretFilesSource` adds each secret file it reads (variable name to
    path) to the dictionary this yields: how `Settings` learns which secrets can be re-read."""
    found: dict[str, str] = {}
    token = _files_read.set(found)
    try:
        yield found
    finally:
        _files_read.reset(token)


class SecretFilesSource(PydanticBaseSettingsSource):
    """A settings source for the `NAME_FILE` forms, read from the same environment and .env file
    as the plain forms, ranked above both (a conflict between the forms is refused anyway)."""

    def __init__(
        self,
        settings_cls: type[BaseSettings],
        *,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
    ) -> None:
        super().__init__(settings_cls)
        self.env_settings = env_settings
        self.dotenv_settings = dotenv_settings

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        # Unused: `__call__` answers for every field at once.
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        layers = tuple(
            getattr(source, "env_vars", None) or {}
            for source in (self.env_settings, self.dotenv_settings)
        )
        values, paths = resolve_secret_files(*layers)
        recorder = _files_read.get()
        if recorder is not None:
            recorder.update(paths)
        return values


class SecretSource:
    """A secret's current value, which `reload` reads again from its file (the `NAME_FILE` form)
    so that a rotated secret takes effect without a restart. Given as a plain value, it never
    changes."""

    def __init__(self, *, value: str | None, path: str | None = None, variable: str) -> None:
        self.variable = variable
        self.path = path
        self._value = value
        #: When the file was last read successfully (None for a plain value).
        self.read_at: datetime | None = datetime.now(UTC) if path is not None else None
        #: Why the last `reload` could not read the file, if it could not.
        self.last_error: str | None = None

    @classmethod
    def from_settings(cls, settings: Any, variable: str) -> SecretSource:
        """The secret `variable` (e.g. `MOZREST_WEBHOOK_TOKEN`) as `settings` hold it, with its
        file when it was given as `NAME_FILE`."""
        return cls(
            value=getattr(settings, variable.lower()),
            path=settings.secret_file(variable),
            variable=variable,
        )

    @property
    def rereadable(self) -> bool:
        return self.path is not None

    def current(self) -> str | None:
        return self._value

    def reload(self) -> bool:
        """Read the file again; True when it now holds a different value. Without a file, or when
        the file cannot be used at this moment (a rotation half done), the value stays as it was,
        False is answered and `last_error` says why."""
        if self.path is None:
            return False
        try:
            value = read_secret_file(self.path, variable=f"{self.variable}_FILE")
        except SecretFileError as exc:
            self.last_error = str(exc)
            return False
        self.read_at = datetime.now(UTC)
        self.last_error = None
        changed = value != self._value
        self._value = value
        return changed

    def __repr__(self) -> str:  # never the value
        source = f"file {self.path}" if self.path else "a plain value"
        return f"SecretSource({self.variable} from {source})"


def as_secret_source(secret: str | SecretSource | None, *, variable: str) -> SecretSource:
    """A secret as a `SecretSource`: a plain value (or none) becomes one that never changes."""
    if isinstance(secret, SecretSource):
        return secret
    return SecretSource(value=secret, variable=variable)


def bearer(source: SecretSource) -> dict[str, str]:
    """The `Authorization` header for the secret's current value (none when it is unset)."""
    value = source.current()
    return {"Authorization": f"Bearer {value}"} if value else {}
