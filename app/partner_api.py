"""Mozrest's Partner API: a venue's POS tables, read with the API key, checked against the
documented shape, and kept for a while per venue (`PosTablesCache`, one per process)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from typing import Any
from urllib.parse import quote

import httpx

from app import __version__
from app.secret_files import SecretSource, as_secret_source, bearer
from app.text import shown, storable


def _client(*, base_url: str) -> httpx.AsyncClient:
    """A plain httpx client for the Partner API's occasional reads (its key is set per request,
    so that a rotated key is used at once)."""
    headers = {"User-Agent": f"mozrest-relay/{__version__}", "Accept": "application/json"}
    # `PartnerApi.pos_tables` bounds each call with one overall asyncio deadline.
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=None)  # noqa: S113


class PartnerApiError(Exception):
    """Mozrest's Partner API failed; the message says how, without secrets."""


#: A venue's POS tables answer larger than this is refused (a few thousand tables fit).
POS_TABLES_BODY_LIMIT = 1024 * 1024
#: Venues whose POS tables are kept at once.
POS_TABLES_CACHE_VENUES = 256


def parse_pos_tables(content: bytes, *, venue_id: str) -> dict[str, Any]:
    """Mozrest's POS tables answer checked against its documented shape (`venueId` a string,
    `tables` an array of `{id: string, name: string, area: string | null}`); anything else is a
    `PartnerApiError` naming what is wrong, never a crash further on."""

    def wrong(what: str) -> PartnerApiError:
        return PartnerApiError(
            f"Mozrest's POS tables answer does not match its documentation: {what}"
        )

    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        raise wrong("not JSON") from None
    if not isinstance(data, dict):
        raise wrong("not a JSON object")
    tables = data.get("tables")
    if not isinstance(tables, list):
        raise wrong("`tables` is not an array")
    answered_venue = data.get("venueId", venue_id)
    if not isinstance(answered_venue, str):
        raise wrong("`venueId` is not a string")
    checked = []
    for index, table in enumerate(tables):
        if not isinstance(table, dict):
            raise wrong(f"tables[{index}] is not an object")
        for key in ("id", "name"):
            if not isinstance(table.get(key), str):
                raise wrong(f"tables[{index}].{key} is not a string")
        area = table.get("area")
        if area is not None and not isinstance(area, str):
            raise wrong(f"tables[{index}].area is neither a string nor null")
        checked.append(
            {
                "id": storable(table["id"]),
                "name": storable(table["name"]),
                "area": storable(area),
            }
        )
    return {"venueId": storable(answered_venue), "tables": checked, "count": len(checked)}


class PartnerApi:
    """Reads from Mozrest's Partner API (Bearer API key). Given as a `SecretSource` read from
    `MOZREST_API_KEY_FILE`, the key is read again on a 401 and the call retried once with it."""

    def __init__(
        self, *, base_url: str, api_key: str | SecretSource | None, timeout_seconds: float
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_seconds = timeout_seconds
        self.api_key = as_secret_source(api_key, variable="MOZREST_API_KEY")
        self._client = _client(base_url=self.base_url)

    async def pos_tables(self, venue_id: str) -> dict[str, Any]:
        """`GET /venues/{venueId}/pos-tables`, validated to the documented shape. On a 401 the
        key is read again from its file and, when that changed it, the call is made once more."""
        if self.api_key.current() is None:
            raise PartnerApiError("MOZREST_API_KEY is not set")
        path = f"/venues/{quote(venue_id, safe='')}/pos-tables"
        response, content = await self._get(path)
        if response.status_code == 401 and self.api_key.reload():
            response, content = await self._get(path)
        if response.status_code in (401, 403):
            raise PartnerApiError(
                f"Mozrest refused the API key (HTTP {response.status_code}): check MOZREST_API_KEY"
            )
        if response.status_code == 404:
            raise PartnerApiError(f"Mozrest does not know venue {shown(venue_id)!r} (HTTP 404)")
        if not response.is_success:
            raise PartnerApiError(f"Mozrest answered HTTP {response.status_code}")
        if len(content) > POS_TABLES_BODY_LIMIT:
            raise PartnerApiError(
                f"Mozrest's answer is larger than {POS_TABLES_BODY_LIMIT // 1024} KiB"
            )
        return parse_pos_tables(content, venue_id=venue_id)

    async def _get(self, path: str) -> tuple[httpx.Response, bytes]:
        """One GET with the key's current value, read up to just over the size limit."""
        try:
            async with asyncio.timeout(self.timeout_seconds):
                async with self._client.stream(
                    "GET", path, headers=bearer(self.api_key)
                ) as response:
                    content = await aread_at_most(response, POS_TABLES_BODY_LIMIT + 1)
        except TimeoutError:
            raise PartnerApiError(
                f"Mozrest did not answer within {self.timeout_seconds:g}s"
            ) from None
        except httpx.HTTPError as exc:
            raise PartnerApiError(f"could not reach Mozrest: {type(exc).__name__}") from None
        return response, content

    async def aclose(self) -> None:
        await self._client.aclose()


async def aread_at_most(response: httpx.Response, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_raw():
        chunks.append(chunk)
        size += len(chunk)
        if size >= limit:
            break
    return b"".join(chunks)[:limit]


class PosTablesCache:
    """Mozrest's POS tables per venue for `ttl_seconds`, for at most `max_venues` venues."""

    def __init__(self, *, ttl_seconds: float, max_venues: int = POS_TABLES_CACHE_VENUES) -> None:
        self.ttl_seconds = ttl_seconds
        self.max_venues = max_venues
        self._answers: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()

    def get(self, venue_id: str) -> dict[str, Any] | None:
        entry = self._answers.get(venue_id)
        if entry is None or entry[0] <= time.monotonic():
            self._answers.pop(venue_id, None)
            return None
        return entry[1]

    def put(self, venue_id: str, answer: dict[str, Any]) -> None:
        if self.ttl_seconds <= 0:
            return
        self._answers.pop(venue_id, None)
        self._answers[venue_id] = (time.monotonic() + self.ttl_seconds, answer)
        while len(self._answers) > self.max_venues:
            self._answers.popitem(last=False)
