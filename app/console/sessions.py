"""Sign-in, the session cookie, CSRF tokens, and who may change what.

A session is a random id in an `HttpOnly`, `SameSite=Strict` cookie (`Secure` over HTTPS);
the database keeps only its SHA-256 (`app/store/sessions.py`), so every replica knows every
session and `Sign out` ends it on all of them. A session is also ended, in effect, when its token
is no longer configured. Each state-changing form carries a CSRF token derived from the session
id (an HMAC of it), which a page of another site cannot read; sign-in, before any session, uses
a double-submit cookie instead. The token typed in is compared, then forgotten: it never reaches
a URL, a page, the database or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from app.access import ADMIN_NAME, READ_METHODS, identify
from app.console.views import SECURITY_HEADERS, message, render
from app.deps import ContextDep, require_schema
from app.logs import get_logger, log_event
from app.settings import Settings
from app.states import AuditResult
from app.store import AuditEntry

log = get_logger("console")

SESSION_COOKIE = "mozrest_console_session"
SIGN_IN_COOKIE = "mozrest_console_sign_in"
COOKIE_PATH = "/console"
SIGN_IN_PATH = "/console/sign-in"


@dataclass(frozen=True, slots=True)
class ConsoleSession:
    """A signed-in browser: the token's name and role, and the CSRF token its forms carry."""

    session_id: str
    name: str
    role: str
    csrf: str

    @property
    def may_change(self) -> bool:
        return self.role == "operator"

    def audit(self, action: str, target: str, client: str | None) -> AuditEntry:
        return AuditEntry(actor=self.name, action=action, target=target, client=client)


def csrf_token(session_id: str) -> str:
    return hmac.new(session_id.encode(), b"mozrest-console-csrf", hashlib.sha256).hexdigest()


def require_configured(context: ContextDep) -> None:
    """With no token configured the console is shut, like `/api/`."""
    settings = context.settings
    if settings.relay_admin_token is None and not settings.relay_api_tokens:
        raise HTTPException(503, "RELAY_ADMIN_TOKEN is not set")


def still_configured(settings: Settings, name: str, role: str) -> bool:
    """Whether the session's token is still configured with its role."""
    if name == ADMIN_NAME and role == "operator" and settings.relay_admin_token is not None:
        return True
    return any(t.name == name and t.role == role for t in settings.relay_api_tokens)


def is_https(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def _set_cookie(request: Request, response: Response, name: str, value: str, age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=age,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=is_https(request),
    )


async def current_session(request: Request, context: ContextDep) -> ConsoleSession:
    """The request's live session; without one, a page sends the browser to sign in and a
    write is refused (403)."""
    require_configured(context)
    await require_schema(context)
    session_id = request.cookies.get(SESSION_COOKIE, "")
    record = await context.store.sessions.find(session_id) if session_id else None
    if record is None or not still_configured(context.settings, record.token_name, record.role):
        if request.method in READ_METHODS:
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            location = f"{SIGN_IN_PATH}?next={quote(target, safe='')}"
            raise HTTPException(303, "sign in first", headers={"Location": location})
        raise HTTPException(403, "sign in first: this session has ended")
    session = ConsoleSession(
        session_id=session_id,
        name=record.token_name,
        role=record.role,
        csrf=csrf_token(session_id),
    )
    request.state.console_session = session
    return session


SessionDep = Annotated[ConsoleSession, Depends(current_session)]


async def refuse_write(
    request: Request,
    context: ContextDep,
    session: ConsoleSession,
    *,
    csrf: str,
    action: str,
    target: str,
) -> Response | None:
    """A 403 page when a write may not go: a missing or wrong CSRF token, or a viewer (whose
    refusal is audited under the action, as `/api/` does); None when it may."""
    if not hmac.compare_digest(csrf.encode(), session.csrf.encode()):
        log_event(log, logging.WARNING, "console.csrf_refused", actor=session.name, action=action)
        return message(
            request,
            403,
            "Refused",
            "This form did not come from this console session (its CSRF token is missing or "
            "wrong). Reload the page and try again.",
        )
    if session.may_change:
        return None
    client = request.client.host if request.client is not None else None
    await context.store.audit.record_alone(
        session.audit(action, target, client),
        result=AuditResult.REFUSED,
        detail={"status": 403, "reason": "needs the operator role", "role": session.role},
    )
    log_event(log, logging.WARNING, "console.refused", actor=session.name, action=action)
    return message(
        request,
        403,
        "Refused",
        f"{action} needs the operator role; the token {session.name!r} is a {session.role}.",
    )


def safe_next(value: str | None) -> str:
    """Only a console page: never another site after sign-in."""
    if value and value.startswith("/console") and not value.startswith("//"):
        return value
    return "/console"


router = APIRouter(dependencies=[Depends(require_configured)])


@router.get("/console/sign-in")
async def sign_in_page(request: Request, next: str | None = None) -> Response:
    nonce = secrets.token_urlsafe(32)
    response = render(request, "sign_in.html", csrf=nonce, next=safe_next(next), error=None)
    _set_cookie(request, response, SIGN_IN_COOKIE, nonce, 3600)
    return response


@router.post("/console/sign-in")
async def sign_in(
    request: Request,
    context: ContextDep,
    token: Annotated[str, Form(max_length=1000)] = "",
    csrf: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/console",
) -> Response:
    await require_schema(context)
    nonce = request.cookies.get(SIGN_IN_COOKIE, "")
    if not nonce or not hmac.compare_digest(nonce.encode(), csrf.encode()):
        return message(
            request,
            403,
            "Refused",
            "The sign-in form expired or came from elsewhere. Open the sign-in page again.",
            sign_in=True,
        )
    settings = context.settings
    principal = identify(
        token.strip(), tokens=settings.relay_api_tokens, admin_token=settings.relay_admin_token
    )
    if principal is None:
        log_event(log, logging.WARNING, "console.sign_in_refused", client=_client(request))
        fresh = secrets.token_urlsafe(32)
        response = render(
            request,
            "sign_in.html",
            401,
            csrf=fresh,
            next=safe_next(next),
            error="That token is not valid.",
        )
        _set_cookie(request, response, SIGN_IN_COOKIE, fresh, 3600)
        return response
    session_id = secrets.token_urlsafe(32)
    lifetime = settings.relay_console_session_seconds
    await context.store.sessions.open(
        session_id, token_name=principal.name, role=principal.role, lifetime_seconds=lifetime
    )
    log_event(log, logging.INFO, "console.signed_in", actor=principal.name, role=principal.role)
    redirect = RedirectResponse(safe_next(next), status_code=303, headers=SECURITY_HEADERS)
    _set_cookie(request, redirect, SESSION_COOKIE, session_id, int(lifetime))
    redirect.delete_cookie(SIGN_IN_COOKIE, path=COOKIE_PATH)
    return redirect


@router.post("/console/sign-out")
async def sign_out(
    request: Request,
    context: ContextDep,
    session: SessionDep,
    csrf: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    if not hmac.compare_digest(csrf.encode(), session.csrf.encode()):
        return message(request, 403, "Refused", "Reload the page and sign out again.")
    await context.store.sessions.end(session.session_id)
    log_event(log, logging.INFO, "console.signed_out", actor=session.name)
    redirect = RedirectResponse(SIGN_IN_PATH, status_code=303, headers=SECURITY_HEADERS)
    redirect.delete_cookie(SESSION_COOKIE, path=COOKIE_PATH)
    return redirect


def _client(request: Request) -> str | None:
    return request.client.host if request.client is not None else None
