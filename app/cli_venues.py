"""`mozrest-relay venue list|pause|resume VENUE`: venue control from a terminal.

The same store calls as `/api/venues`, straight on the database (`DATABASE_URL`), under the
operator's name (`--by`, default the user running the command).
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from app.settings import Settings, load_settings
from app.states import DeliveryStatus
from app.store.audit import AuditEntry

#: The widest venue id column `venue list` prints before it stops aligning.
ID_COLUMN_MAX = 40


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="the venues the relay has seen, paused ones marked")
    pause = actions.add_parser("pause", help="pause a venue: its states wait, nothing is sent")
    pause.add_argument("venue_id", metavar="VENUE")
    pause.add_argument("--reason", default=None, help="why (shown to other operators)")
    pause.add_argument("--by", default=None, help="the operator's name (default: your user)")
    resume = actions.add_parser(
        "resume", help="resume a venue: each booking's newest waiting state is sent once"
    )
    resume.add_argument("venue_id", metavar="VENUE")
    resume.add_argument("--by", default=None, help="the operator's name (default: your user)")
    resync = actions.add_parser(
        "resync",
        help="send again the newest state of each booking Mozrest was sent (a replaced POS)",
    )
    resync.add_argument("venue_id", metavar="VENUE")
    resync.add_argument(
        "--since",
        default="24h",
        help="bookings whose newest state was written within this long (default: %(default)s)",
    )
    resync.add_argument("--by", default=None, help="the operator's name (default: your user)")


def cmd_venue(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.action == "list":
        venues = _run(settings, lambda store: _all_venues(store))
        _print_venues(venues)
        return 0
    by = (args.by or getpass.getuser())[:64]
    # Audited like the API's calls, under the operator's name, from the command line.
    audit = AuditEntry(actor=by, action=f"venue.{args.action}", target=args.venue_id, client="cli")
    if args.action == "resync":
        since = datetime.now(UTC) - timedelta(seconds=_duration(args.since))
        queued = _run(
            settings, lambda store: store.resync_venue(args.venue_id, since=since, audit=audit)
        )
        print(f"queued {queued} booking states of venue {args.venue_id} again")
        return 0
    if args.action == "pause":
        if args.reason is not None and len(args.reason) > 500:
            from app.runtime import CommandError

            raise CommandError("--reason: at most 500 characters", exit_status=2)
        venue = _run(
            settings,
            lambda store: store.pause_venue(args.venue_id, by=by, reason=args.reason, audit=audit),
        )
    else:
        venue = _run(settings, lambda store: store.resume_venue(args.venue_id, audit=audit))
    _print_venues([venue])
    return 0


async def _all_venues(store: Any) -> list[dict[str, Any]]:
    venues: list[dict[str, Any]] = []
    after = None
    while True:
        page = await store.list_venues(after_id=after, limit=500)
        venues += page
        if len(page) < 500:
            return venues
        after = page[-1]["venue_id"]


def _duration(text: str) -> float:
    from app.runtime import CommandError
    from app.settings import parse_duration

    try:
        return parse_duration(text)
    except ValueError:
        raise CommandError(
            f"--since: {text!r} is not a duration (e.g. 30m, 24h, 7d)", exit_status=2
        ) from None


def _run(settings: Settings, call: Callable[[Any], Awaitable[Any]]) -> Any:
    from app.runtime import build_engine, build_store, check_database

    async def main() -> Any:
        await check_database(settings, require_schema=True)
        engine = build_engine(settings)
        try:
            return await call(build_store(settings, engine))
        finally:
            await engine.dispose()

    return asyncio.run(main())


def _print_venues(venues: list[dict[str, Any]]) -> None:
    if not venues:
        print("no venues yet: the relay adds each venue it meets in the outbox")
        return
    width = min(ID_COLUMN_MAX, max(len("VENUE"), *(len(v["venue_id"]) for v in venues)))
    print(f"{'VENUE':<{width}}  STATE   ITEMS    PENDING RETRYING DEAD DEAD-1H  PAUSED BY / REASON")
    for venue in venues:
        state = "paused" if venue["paused"] else "active"
        items = {None: "default", True: "on", False: "off"}[venue["send_items"]]
        counts = venue["deliveries"]
        pending, retrying, dead = (
            counts[status]
            for status in (DeliveryStatus.PENDING, DeliveryStatus.RETRYING, DeliveryStatus.DEAD)
        )
        why = ""
        if venue["paused"]:
            why = f"{venue['paused_by'] or '?'}: {venue['pause_reason'] or '(no reason given)'}"
        print(
            f"{venue['venue_id']:<{width}}  {state:<6}  {items:<7}  {pending:>7} "
            f"{retrying:>8} {dead:>4} {venue['dead_last_hour']:>7}  {why}"
        )
