"""What the admin API's routes depend on: the process's context, the token check, the schema
check. FastAPI dependencies in one module, so the app (`app.api`) and its routes (`app.routes`)
both import from here and never from each other."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.routing import APIRoute

from app.access import READ_METHODS, Principal, identify
from app.logs import get_logger, log_event
from app.migrate import schema_problem
from app.partner_api import PartnerApi, PosTablesCache
from app.settings import Settings
from app.states import AuditResult
from app.store import AuditEntry, Store, StoreError
from app.worker import Worker

log = get_logger("api")


@dataclass
class AppContext:
    """What the routes share: settings, the store, the Partner API, and the worker if any."""

    settings: Settings
    store: Store
    partner_api: PartnerApi
    pos_tables: PosTablesCache
    """Mozrest's POS tables per venue for RELAY_POS_TABLES_CACHE seconds."""
    worker: Worker | None = None
    #: Until when (monotonic) the schema is taken to be at head without asking again.
    schema_ok_until: float = 0.0


def get_context(request: Request) -> AppContext:
    context: AppContext = request.app.state.context
    return context


ContextDep = Annotated[AppContext, Depends(get_context)]


def require_admin(request: Request, context: ContextDep) -> None:
    """`/api/*` needs `Authorization: Bearer <token>`: `RELAY_ADMIN_TOKEN` (the operator
    `admin`) or one of `RELAY_API_TOKENS`; with neither set, it is shut. The caller
    is kept on the request for `get_caller`."""
    settings = context.settings
    if settings.relay_admin_token is None and not settings.relay_api_tokens:
        raise HTTPException(503, "RELAY_ADMIN_TOKEN is not set")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    principal = None
    if scheme.lower() == "bearer":
        principal = identify(
            given.strip(),
            tokens=settings.relay_api_tokens,
            admin_token=settings.relay_admin_token,
        )
    if principal is None:
        raise HTTPException(
            401, "missing or wrong admin token", headers={"WWW-Authenticate": "Bearer"}
        )
    request.state.principal = principal


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls a route: the token's name and role, and the remote address."""

    name: str
    role: str
    client: str | None

    def audit(self, action: str, target: str) -> AuditEntry:
        """The audit entry of this caller doing `action` to `target`."""
        return AuditEntry(actor=self.name, action=action, target=target, client=self.client)


def get_caller(request: Request) -> Caller:
    """The caller `require_admin` identified (for a route's audit rows and log lines)."""
    principal: Principal = request.state.principal
    client = request.client.host if request.client is not None else None
    return Caller(name=principal.name, role=principal.role, client=client)


CallerDep = Annotated[Caller, Depends(get_caller)]

#: A route's OpenAPI extra naming the action its audit rows carry: `audit_as("venue.pause")`.
AUDIT_ACTION_KEY = "x-audit-action"


def audit_as(action: str) -> dict[str, Any]:
    """`openapi_extra` for a state-changing route: names its audited action, so a viewer's
    refused call is audited under it (`require_role`)."""
    return {AUDIT_ACTION_KEY: action}


async def require_role(request: Request, context: ContextDep, caller: CallerDep) -> None:
    """A viewer may only read: any other method is a 403 naming the role it needs, written
    to the audit trail as refused under the route's action (`audit_as`)."""
    if request.method in READ_METHODS or caller.role == "operator":
        return
    route = request.scope.get("route")
    extra = route.openapi_extra if isinstance(route, APIRoute) else None
    action = (extra or {}).get(AUDIT_ACTION_KEY) or f"{request.method} {request.url.path}"
    target = await _target_of(request)
    detail = f"{action} needs the operator role; the token {caller.name!r} is a {caller.role}"
    await context.store.audit.record_alone(
        caller.audit(action, target),
        result=AuditResult.REFUSED,
        detail={"status": 403, "reason": "needs the operator role", "role": caller.role},
    )
    log_event(log, logging.WARNING, "api.refused", actor=caller.name, action=action, target=target)
    raise HTTPException(403, detail)


#: Body fields that name what a bulk call acts on (its audit target); nothing else is kept.
_FILTER_FIELDS = ("status", "venue_id", "since", "until")


async def _target_of(request: Request) -> str:
    """What a call acts on: the id in its path, or a bulk call's filter as JSON."""
    for name in ("delivery_id", "booking_id", "venue_id"):
        if name in request.path_params:
            return str(request.path_params[name])
    try:
        body = json.loads(await request.body() or b"{}")
    except ValueError:
        body = {}
    shown = {k: body[k] for k in _FILTER_FIELDS if isinstance(body, dict) and k in body}
    return json.dumps(shown, sort_keys=True, default=str)


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
