"""The operators' `/api/*` routes (SPEC section 6)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
