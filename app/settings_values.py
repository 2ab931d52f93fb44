"""The shapes of setting values: durations, flags, status lists, database URLs.

Pure parsers that `app.settings` applies to the environment's text; nothing here reads it.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import BeforeValidator
from pydantic_settings import NoDecode

from app.access import ApiToken, parse_api_tokens

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


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


def format_duration(seconds: float) -> str:
    """The shortest written form of `seconds` that `parse_duration` reads back: `30s`, `12h`."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds * 1000)}ms"


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
