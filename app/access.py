"""Who may call the admin API, and as whom: named tokens with roles.

`RELAY_API_TOKENS` names each token and its role and holds only the token's SHA-256, so the
settings never hold a token that could be used; `RELAY_ADMIN_TOKEN` is the operator `admin`. A
caller is identified by comparing the digest of what it presented with every configured digest,
each in constant time, so neither a token nor which entry matched leaks through timing.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Literal

Role = Literal["viewer", "operator"]
ROLES: tuple[Role, ...] = ("viewer", "operator")
#: What each role may do: a viewer reads, an operator also changes state.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The name `RELAY_ADMIN_TOKEN` signs in as.
ADMIN_NAME = "admin"
#: Random bytes in a token made by `mozrest-relay token new`.
TOKEN_BYTES = 32

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, slots=True)
class ApiToken:
    """One entry of `RELAY_API_TOKENS`: a name, its role, and the SHA-256 of its token."""

    name: str
    role: Role
    digest: bytes

    def __repr__(self) -> str:  # never the digest
        return f"ApiToken({self.name!r}, {self.role})"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who called: the token's name and its role."""

    name: str
    role: Role

    @property
    def may_change(self) -> bool:
        return self.role == "operator"


def parse_api_tokens(value: object) -> tuple[ApiToken, ...]:
    """`name:role:sha256hex` entries, comma-separated; a ValueError naming the entry by its
    position (never its text: it holds a digest) when one is malformed."""
    if isinstance(value, tuple):
        return value
    if value is None:
        return ()
    if not isinstance(value, str):
        raise ValueError("expected comma-separated name:role:sha256hex entries")
    parts = [part.strip() for part in value.split(",")]
    if all(not part for part in parts):
        return ()
    tokens: list[ApiToken] = []
    for position, part in enumerate(parts, start=1):
        where = f"entry {position} of {len(parts)}"
        fields = part.split(":")
        if len(fields) != 3:
            raise ValueError(f"{where}: expected name:role:sha256hex")
        name, role, digest = (field.strip() for field in fields)
        if not _NAME.match(name):
            raise ValueError(f"{where}: the name must be 1 to 64 of A-Z a-z 0-9 . _ -")
        if role not in ROLES:
            raise ValueError(f"{where} ({name}): the role must be viewer or operator")
        if not _DIGEST.match(digest):
            raise ValueError(
                f"{where} ({name}): expected the token's SHA-256 as 64 lowercase hex digits "
                "(mozrest-relay token new prints the entry)"
            )
        tokens.append(ApiToken(name=name, role=role, digest=bytes.fromhex(digest)))
    names = [token.name for token in tokens]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"the name {name} is given twice")
    digests = [token.digest for token in tokens]
    if len(set(digests)) != len(digests):
        raise ValueError("two entries have the same token")
    return tuple(tokens)


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def identify(
    presented: str, *, tokens: tuple[ApiToken, ...], admin_token: str | None
) -> Principal | None:
    """The principal whose token was presented, or None. Every entry is compared, each in
    constant time, whichever matches."""
    digest = token_digest(presented)
    found: Principal | None = None
    if admin_token is not None and hmac.compare_digest(digest, token_digest(admin_token)):
        found = Principal(ADMIN_NAME, "operator")
    for entry in tokens:
        if hmac.compare_digest(digest, entry.digest) and found is None:
            found = Principal(entry.name, entry.role)
    return found


def new_token() -> str:
    """A new random token: `TOKEN_BYTES` random bytes, URL-safe base64."""
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_entry(name: str, role: Role, token: str) -> str:
    """The `RELAY_API_TOKENS` entry for `token`."""
    return f"{name}:{role}:{hashlib.sha256(token.encode()).hexdigest()}"


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))
