"""`/api/venues/{venue_id}/pos-tables` and `/table-matching`: Mozrest's POS tables of a venue,
cached briefly, and the RMS's table ids beside them. `routes.router` includes these routes."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Request

from app.deps import AppContext, ContextDep
from app.partner_api import PartnerApiError
from app.routes_common import MOZREST_FAILED, VenueKey
from app.schemas import PosTable, PosTables, TableMatch, TableMatching

router = APIRouter()


async def pos_tables_of(request: Request, context: AppContext, venue_id: str) -> PosTables:
    cache = context.pos_tables
    answer = cache.get(venue_id)
    if answer is None:
        try:
            answer = await context.partner_api.pos_tables(venue_id)
        except PartnerApiError as exc:
            raise HTTPException(
                502, f"Mozrest's POS tables for venue {venue_id!r}: {exc}"
            ) from None
        cache.put(venue_id, answer)
    return PosTables.model_validate(answer)


@router.get(
    "/venues/{venue_id}/pos-tables",
    tags=["venues"],
    summary="The venue's POS tables, from Mozrest (cached briefly)",
    responses=MOZREST_FAILED,
)
async def get_pos_tables(venue_id: VenueKey, request: Request, context: ContextDep) -> PosTables:
    return await pos_tables_of(request, context, venue_id)


def _normalised(name: str) -> str:
    return "".join(ch for ch in name.casefold() if ch.isalnum())


def match_tables(
    venue_id: str, rms_table_ids: list[str], pos_tables: list[PosTable]
) -> TableMatching:
    """Pair RMS table ids with POS tables: equal ids first, then equal normalised id or name."""
    by_id = {table.id: table for table in pos_tables}
    by_normalised: dict[str, PosTable] = {}
    for table in pos_tables:
        for name in (table.id, table.name):
            by_normalised.setdefault(_normalised(name), table)
    by_normalised.pop("", None)
    matched: list[TableMatch] = []
    unmatched: list[str] = []
    for rms_id in rms_table_ids:
        if rms_id in by_id:
            matched.append(TableMatch(rms_table_id=rms_id, pos_table=by_id[rms_id], match="id"))
        elif (hint := by_normalised.get(_normalised(rms_id))) is not None:
            matched.append(TableMatch(rms_table_id=rms_id, pos_table=hint, match="normalised"))
        else:
            unmatched.append(rms_id)
    used = {m.pos_table.id for m in matched}
    return TableMatching(
        venue_id=venue_id,
        pos_tables=pos_tables,
        matched=matched,
        unmatched_rms_table_ids=unmatched,
        unused_pos_tables=[t for t in pos_tables if t.id not in used],
    )


@router.get(
    "/venues/{venue_id}/table-matching",
    tags=["venues"],
    summary="RMS table ids in recent states beside the venue's POS tables",
    description="Webhook states carry RMS table ids only, so ids are matched by equality; a "
    "`normalised` match (case, spaces and punctuation ignored, against a POS id or name) is a "
    "hint to check. Reads the venue's newest 1000 queued states.",
    responses=MOZREST_FAILED,
)
async def get_table_matching(
    venue_id: VenueKey, request: Request, context: ContextDep
) -> TableMatching:
    pos = await pos_tables_of(request, context, venue_id)
    rms_table_ids = await context.store.recent_table_ids(venue_id)
    return match_tables(venue_id, rms_table_ids, pos.tables)
