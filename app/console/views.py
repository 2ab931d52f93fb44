"""How the console renders: one Jinja2 environment (autoescaped), its filters, and the pieces of
pages that are computed rather than stored (the diff against the state Mozrest held)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape

from app.contract import FIELDS

PACKAGE = Path(__file__).resolve().parent.parent
TEMPLATES = PACKAGE / "templates" / "console"
STATIC = PACKAGE / "static" / "console"

#: Headers on every console answer: nothing from elsewhere runs or loads, nothing is cached
#: (pages may show guest data), and no other site may frame the console.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}


def ago(moment: datetime | None, now: datetime | None = None) -> str:
    """`3 min ago`, `in 20 s`: a time relative to now, for people."""
    if moment is None:
        return ""
    seconds = ((now or datetime.now(UTC)) - moment).total_seconds()
    future, seconds = seconds < 0, abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            amount = f"{int(seconds // size)} {unit}"
            break
    else:
        amount = f"{int(seconds)} s"
    return f"in {amount}" if future else f"{amount} ago"


def utc(moment: datetime | None) -> str:
    return "" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def when(moment: datetime | None) -> Markup:
    """Both: relative, and absolute in UTC (in the element's `datetime` too)."""
    if moment is None:
        return Markup("—")
    iso = moment.astimezone(UTC).isoformat()
    return Markup('<time datetime="{}" title="{}">{}</time> <small>{}</small>').format(
        iso, utc(moment), ago(moment), utc(moment)
    )


def as_json(value: Any, indent: int | None = 2) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=False, sort_keys=False, default=str)


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


def query(params: dict[str, Any], **changes: Any) -> str:
    """A query string of the non-empty values, with `changes` applied."""
    merged = {**params, **changes}
    return urlencode({k: v for k, v in merged.items() if v not in (None, "")})


def _nl(value: Any) -> Markup:
    return Markup("<br>").join(escape(str(value)).splitlines())


environment = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
environment.filters.update(
    ago=ago,
    utc=utc,
    when=when,
    as_json=as_json,
    duration=duration,
    nl=_nl,
    segment=lambda value: quote(str(value), safe=""),
)
environment.globals.update(query=query)


def render(request: Request, template: str, status_code: int = 200, **values: Any) -> HTMLResponse:
    """A page from `templates/console/`; `values` and the request's session reach the template."""
    session = getattr(request.state, "console_session", None)
    html = environment.get_template(template).render(
        request=request, session=session, path=request.url.path, **values
    )
    return HTMLResponse(html, status_code=status_code, headers=SECURITY_HEADERS)


def message(
    request: Request, status_code: int, title: str, text: str, **values: Any
) -> HTMLResponse:
    """A page that says one thing: a refusal, a conflict, something not found."""
    return render(request, "message.html", status_code, title=title, text=text, **values)


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One field of a state beside its value in the state Mozrest held before."""

    field: str
    before: str
    after: str
    changed: bool


def _shown(state: dict[str, Any] | None, name: str) -> str:
    if state is None or name not in state:
        return "—"
    value = state[name]
    return value if isinstance(value, str) else as_json(value, indent=None)


def field_changes(before: dict[str, Any] | None, after: dict[str, Any]) -> list[FieldChange]:
    """Every field of the state, in the documented order, each beside its previous value."""
    names = [n for n in FIELDS if n in after or (before is not None and n in before)]
    names += sorted({*after, *(before or {})} - set(names))
    return [
        FieldChange(
            field=name,
            before=_shown(before, name),
            after=_shown(after, name),
            changed=(before or {}).get(name) != after.get(name),
        )
        for name in names
    ]
