"""Valid booking states for every test tier, and Mozrest's own documented examples.

`state()` is the one valid-state builder; a test changes what it is about with keyword
arguments (`state("bk-1", status="finished", partySize=4)`).
"""

from __future__ import annotations

from typing import Any

#: The example of Mozrest's webhook documentation, as written there.
DOCUMENTED_EXAMPLE: dict[str, Any] = {
    "bookingId": "60e890aca5f07b6ee5b950b1",
    "venueId": "60e890aca5f07b6ee5b950b1",
    "partySize": 4,
    "status": "seated",
    "tables": ["28c3ce8b-8c10-4a64-8099-f0dffcc549a8"],
    "date": 1639578600,
    "prepayment": 50.00,
    "contact": {
        "firstname": "John",
        "lastname": "Doe",
        "email": "john.doe@mail.com",
        "telephone": "34646223399",
        "locale": "en",
    },
    "notes": "I am allergic to peanuts",
}
#: The pre-ordered items of the documentation's beta example.
DOCUMENTED_ITEMS: list[dict[str, Any]] = [
    {"sku": "PIZZA-001", "quantity": 2},
    {"sku": "WINE-012", "quantity": 1, "notes": "no ice"},
]


def state(booking_id: str = "bk-1", *, venue_id: str = "venue-1", **changes: Any) -> dict[str, Any]:
    """A valid seated booking state in the webhook's shape, with `changes` applied."""
    return {
        "bookingId": booking_id,
        "venueId": venue_id,
        "partySize": 2,
        "status": "seated",
        "tables": ["T1"],
        "date": 1639578600,
        **changes,
    }


def documented(**changes: Any) -> dict[str, Any]:
    """Mozrest's documented example, with `changes` applied."""
    return {**DOCUMENTED_EXAMPLE, **changes}
