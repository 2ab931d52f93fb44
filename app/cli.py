"""The `mozrest-relay` command line.

Every command answers a set-up it cannot work with (a bad setting, a file it cannot read, a
database it cannot reach or that is not migrated, a port already taken) with one `error: ...` line
naming the setting or the file, and a non-zero status: never a traceback, and never a SQL
statement or its parameters (they may hold guest data).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from app import __version__
from app.cli_commands import (
    EXIT_BAD_INPUT,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_UNAVAILABLE,
    cmd_api,
    cmd_doctor,
    cmd_emulator,
    cmd_enqueue,
    cmd_erase,
    cmd_migrate,
    cmd_pos_tables,
    cmd_run,
    cmd_token_new,
    cmd_worker,
)
from app.settings import ConfigError

# The exit statuses are the commands'; callers import them from here too.
__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CONFIG",
    "EXIT_FAILED",
    "EXIT_UNAVAILABLE",
    "build_parser",
    "main",
]

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
