"""The `mozrest-relay` command line (SPEC section 5)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from app import __version__
from app.settings import ConfigError, Settings, load_settings

EXIT_CONFIG = 2
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3


def _settings() -> Settings:
    return load_settings()


def cmd_migrate(args: argparse.Namespace) -> int:
    """Upgrade the database to the newest schema."""
    from app import migrate
    from app.logs import configure_logging

    settings = _settings()
    configure_logging(level=settings.relay_log_level, fmt=settings.relay_log_format)
    migrate.upgrade(settings.database_url)
    if settings.dialect == "postgresql":
        from app.notify import set_trigger

        asyncio.run(set_trigger(settings.database_url, enabled=settings.relay_notify))
    print(f"database is at schema revision {migrate.head_revision()}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """Serve the admin API and run the worker in one process."""
    from app.api import serve

    settings = _settings()
    settings.check_can_send()
    serve(settings, with_worker=True)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    """Serve the admin API alone."""
    from app.api import serve

    serve(_settings(), with_worker=False)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the worker alone."""
    from app.logs import configure_logging
    from app.runtime import event_loop_factory, run_worker

    settings = _settings()
    settings.check_can_send()
    configure_logging(level=settings.relay_log_level, fmt=settings.relay_log_format)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(run_worker(settings))
    return 0


def cmd_enqueue(args: argparse.Namespace) -> int:
    """Insert a payload into the outbox as the RMS would; refuse an invalid one."""
    from app.contract import ContractError, parse_state

    source = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
    with source:
        text = source.read()
    try:
        payload = json.loads(text)
    except ValueError as exc:
        print(f"error: {args.file}: not valid JSON ({exc})", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        parse_state(payload)
    except ContractError as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    settings = _settings()
    outbox_id = asyncio.run(_insert(settings.database_url, payload))
    print(f"enqueued outbox row {outbox_id} for booking {payload['bookingId']}")
    return 0


async def _insert(database_url: str, payload: dict[str, Any]) -> int:
    from app.db import create_engine
    from app.models import outbox

    engine = create_engine(database_url)
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

    settings = _settings()

    async def fetch() -> dict[str, Any]:
        api = PartnerApi(
            base_url=settings.api_url,
            api_key=settings.mozrest_api_key,
            timeout_seconds=settings.relay_http_timeout,
        )
        try:
            return await api.pos_tables(args.venue_id)
        finally:
            await api.aclose()

    try:
        result = asyncio.run(fetch())
    except PartnerApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    print(f"venue {result['venueId']}: {result['count']} POS tables")
    for table in result["tables"]:
        area = table["area"] if table["area"] is not None else "-"
        print(f"  {table['id']:<20} {table['name']:<30} {area}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mozrest-relay",
        description="Relays reservation states from the RMS outbox table to Mozrest's webhooks.",
    )
    parser.add_argument("--version", action="version", version=f"mozrest-relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(func=func)
        return sub

    add("migrate", cmd_migrate, "upgrade the database to the newest schema (Alembic)")
    add("run", cmd_run, "serve the admin API and run the worker in one process")
    add("worker", cmd_worker, "run the worker alone")
    add("api", cmd_api, "serve the admin API alone")
    enqueue = add("enqueue", cmd_enqueue, "insert a payload into the outbox, as the RMS would")
    enqueue.add_argument("file", metavar="FILE", help="a JSON file, or - for stdin")
    emulator = add("emulator", cmd_emulator, "serve a local Mozrest stand-in on loopback")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8090)
    emulator.add_argument("--token", default=None, help="the webhook Bearer token to require")
    emulator.add_argument("--api-key", default=None, help="the Partner API key to require")
    pos = add("pos-tables", cmd_pos_tables, "print a venue's POS tables from Mozrest")
    pos.add_argument("venue_id", metavar="VENUE_ID")
    pos.add_argument("--json", action="store_true", help="print Mozrest's JSON answer")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
