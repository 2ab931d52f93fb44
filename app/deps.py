"""What the admin API's routes depend on: the process's context, the token check, the schema
check. FastAPI dependencies in one module, so the app (`app.api`) and its routes (`app.routes`)
both import from here and never from each other."""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from app.migrate import schema_problem
from app.publisher import PartnerApi
from app.settings import Settings
from app.store import Store, StoreError
from app.worker import Worker


@dataclass
class AppContext:
    """What the routes share: settings, the store, the Partner API, and the worker if any."""

    settings: Settings
    store: Store
    partner_api: PartnerApi
    worker: Worker | None = None
    #: Until when (monotonic) the schema is taken to be at head without asking again.
    schema_ok_until: float = 0.0


def get_context(request: Request) -> AppContext:
    context: AppContext = request.app.state.context
    return context


ContextDep = Annotated[AppContext, Depends(get_context)]


def require_admin(request: Request, context: ContextDep) -> None:
    """`/api/*` needs `Authorization: Bearer $RELAY_ADMIN_TOKEN`; with no token set, it is shut."""
    expected = context.settings.relay_admin_token
    if expected is None:
        raise HTTPException(503, "RELAY_ADMIN_TOKEN is not set")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode(), expected.encode()
    ):
        raise HTTPException(
            401, "missing or wrong admin token", headers={"WWW-Authenticate": "Bearer"}
        )
    request.state.token_name = ADMIN_TOKEN_NAME


#: The name RELAY_ADMIN_TOKEN's holder goes by (in a venue's `paused_by`, the logs).
ADMIN_TOKEN_NAME = "admin"  # noqa: S105 - a name, not a secret


def caller_name(request: Request) -> str:
    """The name of the token the request came with."""
    name: str = getattr(request.state, "token_name", ADMIN_TOKEN_NAME)
    return name


#: Every reason `/readyz` gives ends by pointing here: it checks the whole set-up.
DOCTOR_HINT = " (mozrest-relay doctor checks the whole set-up)"
#: A schema found at head is trusted this long before `/api/*` reads the revision again.
SCHEMA_RECHECK_SECONDS = 10.0


async def schema_check(context: AppContext) -> str:
    """`"ok"` or what is wrong with the schema (`app.migrate.schema_problem`); raises
    `StoreError` or `TimeoutError` when the database does not answer."""
    revision = await asyncio.wait_for(context.store.schema_revision(), timeout=2)
    problem = schema_problem(revision)
    if problem is None:
        context.schema_ok_until = time.monotonic() + SCHEMA_RECHECK_SECONDS
        return "ok"
    context.schema_ok_until = 0.0
    return problem


async def require_schema(context: ContextDep) -> None:
    """`/api/*` answers 503 with `/readyz`'s schema reason while the schema is not at head."""
    if time.monotonic() < context.schema_ok_until:
        return
    try:
        check = await schema_check(context)
    except TimeoutError:
        raise StoreError("the database did not answer within 2s") from None
    if check != "ok":
        raise HTTPException(503, check + DOCTOR_HINT)  # word for word `/readyz`'s reason
