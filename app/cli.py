"""The `mozrest-relay` command line.

Every command answers a set-up it cannot work with (a bad setting, a file it cannot read, a
database it cannot reach or that is not migrated, a port already taken) with one `error: ...` line
naming the setting or the file, and a non-zero status: never a traceback, and never a SQL
statement or its parameters (they may hold guest data).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from app import __version__
from app.policy import KNOWN_STATUSES
from app.settings import ConfigError, Settings, load_settings

EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3

README_POINTER = (
    "Settings come from the environment or a .env file in the current folder; the README's "
    '"For platform teams" section lists every one with its default.'
)
DATABASE_SETTINGS = ["DATABASE_URL"]
LOG_SETTINGS = ["RELAY_LOG_LEVEL", "RELAY_LOG_FORMAT"]
WORKER_SETTINGS = [
    "MOZREST_ENV",
    "MOZREST_WEBHOOK_URL",
    "MOZREST_WEBHOOK_TOKEN",
    "RELAY_SEND_STATUSES",
    "RELAY_SEND_ITEMS",
    "RELAY_MAX_PAYLOAD_BYTES",
    "RELAY_RETRY_MAX_AGE",
    "RELAY_RETRY_BASE_DELAY",
    "RELAY_RETRY_MAX_DELAY",
    "RELAY_LEASE_SECONDS",
    "RELAY_HTTP_TIMEOUT",
    "RELAY_HTTP_TRANSPORT",
    "RELAY_CONCURRENCY",
    "RELAY_BATCH_SIZE",
    "RELAY_POLL_INTERVAL",
    "RELAY_NOTIFY",
    "RELAY_CIRCUIT_THRESHOLD",
    "RELAY_CIRCUIT_COOLDOWN",
    "RELAY_HEARTBEAT_INTERVAL",
    "RELAY_RETENTION",
    "RELAY_SHUTDOWN_GRACE",
]
API_SETTINGS = [
    "RELAY_HOST",
    "RELAY_PORT",
    "RELAY_ADMIN_TOKEN",
    "MOZREST_ENV",
    "MOZREST_API_URL",
    "MOZREST_API_KEY",
    "RELAY_POS_TABLES_CACHE",
    "RELAY_HEARTBEAT_INTERVAL",
]


def _settings() -> Settings:
    return load_settings()


def _fail(message: str, exit_status: int) -> NoReturn:
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
        _fail(f"DATABASE_URL ({url}): cannot migrate: {first_line}", EXIT_FAILED)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        _fail(
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
        _fail(f"{name}: no such file", EXIT_BAD_INPUT)
    except IsADirectoryError:
        _fail(f"{name}: is a directory, not a JSON file", EXIT_BAD_INPUT)
    except PermissionError:
        _fail(f"{name}: cannot read it: permission denied", EXIT_BAD_INPUT)
    except OSError as exc:
        _fail(f"{name}: cannot read it: {exc.strerror or type(exc).__name__}", EXIT_BAD_INPUT)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        shown = "stdin" if name == "-" else name
        _fail(
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
        _fail(f"{shown}: not valid JSON ({exc})", EXIT_BAD_INPUT)
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
        _fail(f"{shown}: {exc}{limit}", EXIT_BAD_INPUT)
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
        _fail(
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
    from app.publisher import PartnerApi, PartnerApiError
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
        _fail(f"{exc} ({settings.api_url})", EXIT_UNAVAILABLE)
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
        _fail("NAME: must be 1 to 64 of A-Z a-z 0-9 . _ -", EXIT_BAD_INPUT)
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
        _fail("BOOKING_ID: must be 1 to 64 characters", EXIT_BAD_INPUT)
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
        _fail(str(exc), EXIT_FAILED)
    except ConflictError as exc:
        _fail(str(exc), EXIT_FAILED)
    print(json.dumps({"booking_id": args.booking_id, "erased": erased}))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the set-up, one line per check; exit 0 only when the relay can deliver."""
    from app.doctor import run_doctor

    return run_doctor(venue_id=args.venue)


def _settings_epilog(*groups: list[str]) -> str:
    names = ", ".join(dict.fromkeys(name for group in groups for name in group))
    reads = textwrap.fill(f"reads: {names}", width=78, subsequent_indent="  ")
    return f"{reads}\n\n{textwrap.fill(README_POINTER, width=78)}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mozrest-relay",
        description="Relays reservation states from the RMS outbox table to Mozrest's webhooks.",
        epilog="`mozrest-relay doctor` checks a set-up end to end. " + README_POINTER,
    )
    parser.add_argument("--version", action="version", version=f"mozrest-relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Any, help_text: str, *settings: list[str]) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=_settings_epilog(*settings) if settings else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(func=func)
        return sub

    add(
        "migrate",
        cmd_migrate,
        "upgrade the database to the newest schema (Alembic); run it once per release",
        DATABASE_SETTINGS,
        ["RELAY_NOTIFY"],
        LOG_SETTINGS,
    )
    add(
        "run",
        cmd_run,
        "serve the admin API and run the worker in one process (the container's default)",
        DATABASE_SETTINGS,
        WORKER_SETTINGS,
        API_SETTINGS,
        LOG_SETTINGS,
    )
    add(
        "worker",
        cmd_worker,
        "run the worker alone: send the outbox's states to Mozrest",
        DATABASE_SETTINGS,
        WORKER_SETTINGS,
        LOG_SETTINGS,
    )
    add(
        "api",
        cmd_api,
        "serve the admin API alone (/healthz, /readyz, /metrics, /api/*)",
        DATABASE_SETTINGS,
        API_SETTINGS,
        LOG_SETTINGS,
    )
    enqueue = add(
        "enqueue",
        cmd_enqueue,
        "insert a payload into the outbox, as the RMS would; refuse one the relay would find "
        "invalid",
        DATABASE_SETTINGS,
        ["RELAY_MAX_PAYLOAD_BYTES", "RELAY_SEND_ITEMS", "RELAY_SEND_STATUSES"],
    )
    enqueue.add_argument("file", metavar="FILE", help="a JSON file, or - for stdin")
    emulator = add(
        "emulator",
        cmd_emulator,
        "serve a local Mozrest stand-in: POST /rms, GET /venues/{venueId}/pos-tables, and "
        "/_emulator/* to see what it received (`make run` starts it)",
    )
    emulator.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    emulator.add_argument(
        "--port", type=int, default=8090, help="port to listen on (default: %(default)s)"
    )
    emulator.add_argument(
        "--token",
        default=None,
        help="the webhook Bearer token to require; without it, any request is accepted",
    )
    emulator.add_argument(
        "--api-key",
        default=None,
        help="the Partner API key to require; without it, any request is accepted",
    )
    pos = add(
        "pos-tables",
        cmd_pos_tables,
        "print a venue's POS tables from Mozrest's Partner API",
        ["MOZREST_ENV", "MOZREST_API_URL", "MOZREST_API_KEY", "RELAY_HTTP_TIMEOUT"],
    )
    pos.add_argument("venue_id", metavar="VENUE_ID")
    pos.add_argument("--json", action="store_true", help="print Mozrest's JSON answer")
    token = add("token", None, "make API tokens for RELAY_API_TOKENS")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="COMMAND")
    token_new = token_commands.add_parser(
        "new",
        help="print a new random token and the RELAY_API_TOKENS entry to add",
        description="print a new random token and the RELAY_API_TOKENS entry to add",
    )
    token_new.set_defaults(func=cmd_token_new)
    token_new.add_argument(
        "name", metavar="NAME", help="who the token is for: 1-64 of A-Za-z0-9._-"
    )
    token_new.add_argument("--role", choices=("viewer", "operator"), required=True)
    erase = add(
        "erase",
        cmd_erase,
        "erase a booking's guest personal data (contact, notes, items' notes) from every table "
        "of the relay; audited as booking.erase",
        DATABASE_SETTINGS,
    )
    erase.add_argument("booking_id", metavar="BOOKING_ID")
    erase.add_argument(
        "--actor",
        default="cli",
        help="the name the audit trail records (default: %(default)s)",
    )
    doctor = add(
        "doctor",
        cmd_doctor,
        "check the set-up in order (settings, database, schema, clocks, webhook, Partner API, "
        "workers, backlog), one line each with a verdict and what to do; exit 0 only when the "
        "relay can deliver",
    )
    doctor.epilog = textwrap.fill(README_POINTER, width=78)
    from app.cli_venues import cmd_venue, configure

    configure(
        add(
            "venue",
            cmd_venue,
            "list venues, or pause or resume one (the same as /api/venues)",
            DATABASE_SETTINGS,
        )
    )
    doctor.add_argument(
        "--venue",
        metavar="VENUE_ID",
        help="also check MOZREST_API_KEY by reading this venue's POS tables",
    )
    return parser


def _error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        return _report(exc, args.command)


def _report(error: Exception, command: str) -> int:
    """One `error:` line for what a command could not do; never a traceback."""
    from sqlalchemy.exc import SQLAlchemyError

    from app.runtime import CommandError, describe_database_error
    from app.store import ConflictError, NotFoundError

    if isinstance(error, CommandError):
        _error(str(error))
        return error.exit_status
    if isinstance(error, NotFoundError | ConflictError):
        _error(str(error))
        return EXIT_FAILED
    if isinstance(error, SQLAlchemyError):
        # Its text carries the statement and parameters: only the driver's words are shown.
        _error(f"DATABASE_URL: the database failed: {describe_database_error(error)}")
        return EXIT_UNAVAILABLE
    _error(
        f"unexpected {type(error).__name__} in `{command}`: {str(error)[:200]} (a bug: report it)"
    )
    return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
