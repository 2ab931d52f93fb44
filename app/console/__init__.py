"""The operator console (README, "Operator console"): server-rendered pages over the store,
for people in a browser.

| module | concern |
| --- | --- |
| `sessions` | sign-in, the session cookie, CSRF tokens, who may change what |
| `forms` | the query parameters and form fields pages take, read and checked |
| `views` | templates, time and JSON formatting, the field-by-field diff |
| `pages` | the pages (GET) |
| `actions` | the buttons (POST): each audited exactly as through `/api/` |
"""

from __future__ import annotations

from fastapi import APIRouter

from app.console.actions import router as actions_router
from app.console.pages import router as pages_router
from app.console.sessions import router as sessions_router

router = APIRouter(include_in_schema=False)
router.include_router(sessions_router)
router.include_router(actions_router)
router.include_router(pages_router)

__all__ = ["router"]
