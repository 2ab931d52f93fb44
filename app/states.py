"""The relay's states by name: a delivery's status, an outbox row's outcome, the circuit's and
the credentials' state, why a delivery exists, how an audited action ended.

Each is a `StrEnum`: a member equals the very string the database stores and the API answers
(`DeliveryStatus.DEAD == "dead"`, `json.dumps` writes `"dead"`), so code says the name while
the stored and documented values stay as they are. The API's models keep their `Literal`s (the
OpenAPI schema lists the values inline); `tests/unit/test_states.py` keeps them in step.
"""

from __future__ import annotations

import enum


def stored_values(kind: type[enum.StrEnum]) -> tuple[str, ...]:
    """Every value of `kind` as the plain strings the database stores, in declaration order."""
    return tuple(str(member) for member in kind)


class DeliveryStatus(enum.StrEnum):
    """Where a delivery is (README, "For operators")."""

    PENDING = "pending"
    """Queued, waiting for its turn (or for the request of an older state to finish)."""
    RETRYING = "retrying"
    """Mozrest failed or timed out; `next_attempt_at` says when it goes again."""
    DELIVERED = "delivered"
    """Mozrest accepted it (2xx)."""
    DEAD = "dead"
    """Mozrest refused it, or it kept failing for RELAY_RETRY_MAX_AGE."""
    SUPERSEDED = "superseded"
    """A newer state of the booking replaced it before it landed."""
    CANCELLED = "cancelled"
    """An operator cancelled it."""


class Outcome(enum.StrEnum):
    """The outcome of an outbox row (README, "the outbox contract")."""

    QUEUED = "queued"
    UNCHANGED = "unchanged"
    HELD = "held"
    SUPERSEDED = "superseded"
    INVALID = "invalid"


class CircuitState(enum.StrEnum):
    """A circuit breaker's state: closed lets requests go, open stops them, half-open lets one
    probe through."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CredentialsState(enum.StrEnum):
    """Whether Mozrest accepts the relay's webhook token: `rejected` after a 401, until a probe
    is accepted."""

    OK = "ok"
    REJECTED = "rejected"


class DeliveryReason(enum.StrEnum):
    """Why a delivery exists: a new state, an operator's retry, or a venue's resync."""

    CHANGE = "change"
    REPLAY = "replay"
    RESYNC = "resync"


class AuditResult(enum.StrEnum):
    """How an audited action ended: done, or refused (403, 404, 409)."""

    OK = "ok"
    REFUSED = "refused"
