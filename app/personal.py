"""Guests' personal data in a state: which fields they are, and how they are removed.

The personal fields are `contact` (all of it), `notes` and every `items[].notes`. Erasure and
payload retention (`app.store.privacy`) strip them from every stored state, and blank any text
the relay stored from elsewhere (Mozrest's answers, errors) that still quotes one of their
values. Pure functions: no database here.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

#: Top-level personal fields, and the personal field of each pre-ordered item.
PERSONAL_FIELDS = ("contact", "notes")
ITEM_PERSONAL_FIELDS = ("notes",)
#: What replaces a stored text that quoted a personal value.
ERASED_TEXT = "[erased: it quoted the guest's personal data]"
#: Values shorter than this are not searched for in free text (a locale such as "en" would
#: match everywhere); they are still removed from every state.
MIN_SEARCHED_LENGTH = 3


def strip_personal(payload: Any) -> tuple[Any, bool]:
    """The payload without its personal fields, and whether it had any. A payload that is not
    a JSON object (an invalid outbox row) cannot be told apart: it is reduced to its ids."""
    if not isinstance(payload, dict):
        return {}, True
    stripped = {key: value for key, value in payload.items() if key not in PERSONAL_FIELDS}
    changed = len(stripped) != len(payload)
    items = stripped.get("items")
    if isinstance(items, list):
        kept = []
        for item in items:
            if isinstance(item, dict):
                clean = {k: v for k, v in item.items() if k not in ITEM_PERSONAL_FIELDS}
                changed = changed or len(clean) != len(item)
                kept.append(clean)
            else:
                kept.append(item)
        stripped["items"] = kept
    return stripped, changed


def personal_values(payload: Any) -> set[str]:
    """Every text value of the payload's personal fields (to find them quoted elsewhere)."""
    if not isinstance(payload, dict):
        return set()
    found: set[str] = set()
    for key in PERSONAL_FIELDS:
        found |= set(_texts(payload.get(key)))
    items = payload.get("items")
    if isinstance(items, list):
        for item in items:
            if isinstance(item, dict):
                for key in ITEM_PERSONAL_FIELDS:
                    found |= set(_texts(item.get(key)))
    return {value for value in found if len(value.strip()) >= MIN_SEARCHED_LENGTH}


def _texts(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for inner in value.values():
            yield from _texts(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _texts(inner)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        yield str(value)


def _spellings(value: str) -> set[str]:
    """How a value may appear in stored text: as is, or escaped inside a JSON string."""
    return {
        value,
        json.dumps(value)[1:-1],
        json.dumps(value, ensure_ascii=False)[1:-1],
    }


def redact_text(text: str | None, values: set[str]) -> tuple[str | None, bool]:
    """`text`, or `ERASED_TEXT` when it quotes one of `values`; and whether it changed."""
    if text is None or not values:
        return text, False
    for value in values:
        if any(spelling and spelling in text for spelling in _spellings(value)):
            return ERASED_TEXT, True
    return text, False
