"""What each `mozrest-relay` command does; `app.cli` parses the command line and reports
failures. A command that cannot work with its set-up raises `CommandError` (via `fail`) with one
line naming the setting or the file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from app.policy import KNOWN_STATUSES
from app.settings import Settings, load_settings

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3


def _settings() -> Settings:
    return load_settings()


def fail(message: str, exit_status: int) -> NoReturn:
    from app.runtime import CommandError

    raise CommandError(message, exit_status=exit_status)


def cmd_migrate(args: argparse.Namespace) -> int:
    """Upgrade the database to the newest schema."""
    from alembic.util.exc import CommandError as AlembicError
    from sqlalchemy.exc import SQLAlchemyError

    from app import migrate
    from app.logs import configure_logging
    from app.runtime import describe_database_error, safe_database_url

    settings = _settings()
    configure_logging(level=settings.relay_log_level, fmt=settings.relay_log_format)
    url = safe_database_url(settings.database_url)
    try:
        migrate.upgrade(settings.database_url)
        if settings.dialect == "postgresql":
            from app.notify import set_trigger

            asyncio.run(set_trigger(settings.database_url, enabled=settings.relay_notify))
    except AlembicError as exc:
        # e.g. a revision this relay does not know: a newer mozrest-relay migrated it.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else "failed"
        fail(f"DATABASE_URL ({url}): cannot migrate: {first_line}", EXIT_FAILED)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        fail(
            f"DATABASE_URL ({url}): cannot use the database: {describe_database_error(exc)}",
            EXIT_UNAVAILABLE,
        )
    print(f"database is at schema revision {migrate.head_revision()}")
    return 0


def _check_database(settings: Settings, *, require_schema: bool) -> None:
    from app.runtime import check_database

    asyncio.run(check_database(settings, require_schema=require_schema))


def cmd_run(args: argparse.Namespace) -> int:
    """Serve the admin API and run the worker in one process."""
    from app.api import serve

    settings = _settings()
    settings.check_can_send()
    _check_database(settings, require_schema=True)
    serve(settings, with_worker=True)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    """Serve the admin API alone."""
    from app.api import serve

    settings = _settings()
    # A schema that is not at head is served, not refused: `/readyz` and `/api/*` say so.
    _check_database(settings, require_schema=False)
    serve(settings, with_worker=False)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the worker alone."""
    from app.logs import configure_logging
    from app.runtime import event_loop_factory, run_worker

    settings = _settings()
    settings.check_can_send()
    _check_database(settings, require_schema=True)
    configure_logging(level=settings.relay_log_level, fmt=settings.relay_log_format)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(run_worker(settings))
    return 0


def read_text_file(name: str) -> str:
    """The UTF-8 text of file `name` (`-`: stdin), or `CommandFailed` naming the file."""
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except FileNotFoundError:
        fail(f"{name}: no such file", EXIT_BAD_INPUT)
    except IsADirectoryError:
        fail(f"{name}: is a directory, not a JSON file", EXIT_BAD_INPUT)
    except PermissionError:
        fail(f"{name}: cannot read it: permission denied", EXIT_BAD_INPUT)
    except OSError as exc:
        fail(f"{name}: cannot read it: {exc.strerror or type(exc).__name__}", EXIT_BAD_INPUT)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        shown = "stdin" if name == "-" else name
        fail(
            f"{shown}: is not UTF-8 text (byte {exc.start} is not valid UTF-8): save it as UTF-8",
            EXIT_BAD_INPUT,
        )


def cmd_enqueue(args: argparse.Namespace) -> int:
    """Insert a payload into the outbox as the RMS would; refuse one the relay would mark
    invalid."""
    from app.contract import ContractError, parse_row

    shown = "stdin" if args.file == "-" else args.file
    text = read_text_file(args.file)
    try:
        payload = json.loads(text)
    except ValueError as exc:
        fail(f"{shown}: not valid JSON ({exc})", EXIT_BAD_INPUT)
    settings = _settings()
    try:
        if not isinstance(payload, dict):
            raise ContractError("payload", "must be a JSON object")
        # The same check the relay makes of an outbox row, with its size limit and items switch.
        state = parse_row(
            text,
            booking_id=str(payload.get("bookingId")),
            venue_id=str(payload.get("venueId")),
            send_items=settings.relay_send_items,
            max_payload_bytes=settings.relay_max_payload_bytes,
        )
    except ContractError as exc:
        limit = " (RELAY_MAX_PAYLOAD_BYTES)" if "byte limit" in str(exc) else ""
        fail(f"{shown}: {exc}{limit}", EXIT_BAD_INPUT)
    status = state["status"]
    if status not in KNOWN_STATUSES | settings.relay_send_statuses:
        print(
            f"warning: status {status!r} is none the relay knows "
            f"({', '.join(sorted(KNOWN_STATUSES | settings.relay_send_statuses))}; they are "
            "case-sensitive): it is passed on as is, but only a status in RELAY_SEND_STATUSES "
            f"({','.join(sorted(settings.relay_send_statuses))}) starts sending a booking",
            file=sys.stderr,
        )
    outbox_id = asyncio.run(_insert(settings, payload))
    print(f"enqueued outbox row {outbox_id} for booking {payload['bookingId']}")
    return 0


async def _insert(settings: Settings, payload: dict[str, Any]) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from app.db import create_engine
    from app.models import outbox
    from app.runtime import check_database, describe_database_error, safe_database_url

    # Not migrated: say so, rather than let the INSERT fail with the payload in its message.
    await check_database(settings, require_schema=True)
    engine = create_engine(settings.database_url)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(
                outbox.insert()
                .values(
                    booking_id=payload["bookingId"], venue_id=payload["venueId"], payload=payload
                )
                .returning(outbox.c.id)
            )
            return int(result.scalar_one())
    except (SQLAlchemyError, OSError) as exc:
        fail(
            f"DATABASE_URL ({safe_database_url(settings.database_url)}): the insert failed: "
            f"{describe_database_error(exc)}",
            EXIT_UNAVAILABLE,
        )
    finally:
        await engine.dispose()


def cmd_emulator(args: argparse.Namespace) -> int:
    """Serve the local Mozrest stand-in."""
    from app.emulator import serve

    serve(host=args.host, port=args.port, token=args.token, api_key=args.api_key)
    return 0


def cmd_pos_tables(args: argparse.Namespace) -> int:
    """Print a venue's POS tables from Mozrest's Partner API."""
    from app.partner_api import PartnerApi, PartnerApiError
    from app.secret_files import SecretSource

    settings = _settings()

    async def fetch() -> dict[str, Any]:
        api = PartnerApi(
            base_url=settings.api_url,
            api_key=SecretSource.from_settings(settings, "MOZREST_API_KEY"),
            timeout_seconds=settings.relay_http_timeout_seconds,
        )
        try:
            return await api.pos_tables(args.venue_id)
        finally:
            await api.aclose()

    try:
        result = asyncio.run(fetch())
    except PartnerApiError as exc:
        fail(f"{exc} ({settings.api_url})", EXIT_UNAVAILABLE)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    print(f"venue {result['venueId']}: {result['count']} POS tables")
    rows = [("id", "name", "area")] + [
        (t["id"], t["name"], t["area"] if t["area"] is not None else "-") for t in result["tables"]
    ]
    id_width = max(len(row[0]) for row in rows)
    name_width = max(len(row[1]) for row in rows)
    for table_id, name, area in rows:
        print(f"  {table_id:<{id_width}}  {name:<{name_width}}  {area}".rstrip())
    return 0


def cmd_token_new(args: argparse.Namespace) -> int:
    """Print a new random API token and its `RELAY_API_TOKENS` entry."""
    from app.access import new_token, token_entry, valid_name

    if not valid_name(args.name):
        fail("NAME: must be 1 to 64 of A-Z a-z 0-9 . _ -", EXIT_BAD_INPUT)
    token = new_token()
    print(f"token (give it to {args.name}; it is shown once and never stored): {token}")
    print(f"add to RELAY_API_TOKENS: {token_entry(args.name, args.role, token)}")
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    """Erase a booking's guest personal data from every table of the relay."""
    from app.access import valid_name
    from app.store import AuditEntry, ConflictError, NotFoundError

    settings = _settings()
    if not args.booking_id or len(args.booking_id) > 64:
        fail("BOOKING_ID: must be 1 to 64 characters", EXIT_BAD_INPUT)
    actor = args.actor if valid_name(args.actor) else "cli"

    async def erase() -> dict[str, int]:
        from app.db import create_engine
        from app.runtime import check_database
        from app.store import Store

        await check_database(settings, require_schema=True)
        engine = create_engine(settings.database_url, pool_size=1)
        try:
            store = Store(engine)
            entry = AuditEntry(actor=actor, action="booking.erase", target=args.booking_id)
            return (await store.erase_booking(args.booking_id, audit=entry)).as_dict()
        finally:
            await engine.dispose()

    try:
        erased = asyncio.run(erase())
    except NotFoundError as exc:
        fail(str(exc), EXIT_FAILED)
    except ConflictError as exc:
        fail(str(exc), EXIT_FAILED)
    print(json.dumps({"booking_id": args.booking_id, "erased": erased}))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the set-up, one line per check; exit 0 only when the relay can deliver."""
    from app.doctor import run_doctor

    return run_doctor(venue_id=args.venue)
