"""PostgreSQL query plans of the relay's hot statements, exactly as the relay issues them.

    .venv/bin/python -m bench.plans [--old-rows N] [--fresh N] [--backlog N] [--changed-old N]
                                    [--cycles stale,analyzed] [--no-generic]
                                    [--json PATH] [--markdown PATH]

On a fresh database `mozrest_bench_plans_<pid>` (dropped at the end, whatever happens) it loads
`--old-rows` old processed rows into every relay table (`bench.scenarios.load_old_rows`, default
1,000,000: a minute or two) and runs VACUUM ANALYZE. Then, per cycle, it commits a batch of
`--fresh` outbox rows (new seated bookings, `--changed-old` of them new states of old bookings)
and `--backlog` rows behind them (one in ten a newer state of a booking of the batch), and drives
the relay's own `app.store.Store` through one cycle:

1. `ingest` of the batch, leasing half of it to the worker (both the leased and the pending path);
2. `claim_due` of every due delivery;
3. `record` of a DELIVERED answer for every claim;

and finally deletes the backlog, still unprocessed, so the next cycle reads its own batch. Cycle
`stale` plans with the statistics of the old rows only (a burst on a large table: autovacuum's
thresholds leave it unanalysed); cycle `analyzed` runs VACUUM ANALYZE after committing its rows.

The statements are the store's named ones (`app.store.toolkit.statement_names()`, the list
`tests/unit/test_statements.py` prints): each is reported under its name, and the named statements
a cycle never sent are listed. Each one the store sends is captured with its parameters
(SQLAlchemy's `before_cursor_execute` on the relay's engine, which names it by the very statement
object the store's toolkit built), since a plan needs real values. To plan it against real rows,
each store call is first rehearsed (the same method, its transaction rolled back instead of
committed); the captured transaction is then replayed statement by statement on a separate asyncpg
connection against the very state the call found, each distinct statement under `EXPLAIN (ANALYZE,
BUFFERS, FORMAT JSON)` and `EXPLAIN (ANALYZE, BUFFERS)` inside a savepoint, and the whole replay is
rolled back; then the call runs for real and commits, and the next call is rehearsed on its result.

Each replay runs with the relay's session settings (read back from the relay's own connection:
`enable_seqscan=off`, `enable_bitmapscan=off`, see `app/db.py`) and with PostgreSQL's defaults.
Those EXPLAINs plan with the parameter values (a custom plan, as a prepared statement's first five
executions get); unless `--no-generic`, each statement is also run as a prepared statement under
`plan_cache_mode = force_generic_plan` with `auto_explain` reporting its plan: the plan a
long-lived relay connection may settle on.

Flagged: a Seq Scan on one of the four growing tables, and a node that reads many more rows than it
returns (rows removed by a filter, or input rows, above `--filter-threshold`): the plans whose cost
would grow with a table. Output: a summary on stdout, everything in `--json` (default
`bench/results/plans.json`; a multi-row INSERT is kept with its first row of values and
parameters, and long array literals in plans with their length), and with `--markdown` a readable
section per statement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from app.db import create_engine
from app.policy import Verdict
from app.settings import Settings, normalise_database_url
from app.store import AttemptResult, Claim, LeaseRequest, Store
from app.store.toolkit import Toolkit, statement_names
from bench.common import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    ROOT,
    Workdir,
    change,
    copy_outbox,
    log,
    machine_summary,
    migrate,
    pg_connect,
    pg_database,
    pg_url,
    seated_payload,
)
from bench.scenarios import load_old_rows

#: The tables whose size grows with the relay's history: a plan must not scan them.
GROWING_TABLES = ("mozrest_outbox", "mozrest_delivery", "mozrest_attempt", "mozrest_booking")
#: Every table the relay owns (the other two hold a handful of rows).
RELAY_TABLES = (*GROWING_TABLES, "mozrest_lock", "mozrest_worker")
DEFAULT_JSON = ROOT / "bench" / "results" / "plans.json"
WORKER_ID = "plans-worker"
#: `seated_payload`'s tag for the fresh bookings: their ids cannot collide with the old rows'.
FRESH_TAG = 0x504C414E
BACKLOG_TAG = 0x4241434B
#: Keeps the explains' savepoint name out of the relay's way.
SAVEPOINT = "mozrest_plans"

T = TypeVar("T")


def source_digests() -> dict[str, str]:
    """The relay's code this process imported (others edit it meanwhile): a digest per file."""
    paths = [
        *(str(p.relative_to(ROOT)) for p in sorted((ROOT / "app" / "store").glob("*.py"))),
        "app/models.py",
        "app/db.py",
        *(
            str(p.relative_to(ROOT))
            for p in sorted((ROOT / "migrations" / "versions").glob("0*.py"))
        ),
    ]
    return {p: hashlib.sha256((ROOT / p).read_bytes()).hexdigest()[:16] for p in paths}


#: Taken right after the imports: later edits do not reach a running process.
SOURCES = source_digests()


# -- the variants ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Variant:
    """How a replay plans: with the relay's planner settings or PostgreSQL's defaults, and with
    the parameter values (EXPLAIN: a custom plan) or a generic plan (auto_explain)."""

    name: str
    relay_planner: bool
    generic: bool


VARIANTS = (
    Variant("relay", relay_planner=True, generic=False),
    Variant("defaults", relay_planner=False, generic=False),
    Variant("relay-generic", relay_planner=True, generic=True),
    Variant("defaults-generic", relay_planner=False, generic=True),
)


# -- the database ------------------------------------------------------------------------------


async def database_exists(name: str) -> bool:
    conn = await pg_connect()
    try:
        return bool(await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name))
    finally:
        await conn.close()


async def vacuum_analyze(database: str) -> float:
    conn = await pg_connect(database)
    try:
        started = time.monotonic()
        await conn.execute(f"VACUUM ANALYZE {', '.join(RELAY_TABLES)}")
        return round(time.monotonic() - started, 1)
    finally:
        await conn.close()


def fresh_payloads(
    fresh: int, changed_old: int, old_rows: int, *, offset: int = 0
) -> list[dict[str, Any]]:
    """`fresh` seated states: new bookings, and `changed_old` new states of old bookings (spread
    over the old ids, as `load_old_rows` names them), in a shuffled order; `offset` picks other
    bookings for another batch."""
    changed = min(changed_old, old_rows, fresh)
    payloads = [seated_payload(FRESH_TAG + offset, i) for i in range(fresh)]
    for k in range(changed):
        g = 1 + (k * old_rows // changed + offset) % old_rows
        payloads[k]["bookingId"] = f"old{g}"
        payloads[k]["venueId"] = f"v{g % 200}"
    random.Random(fresh).shuffle(payloads)
    return payloads


def backlog_payloads(
    batch: Sequence[dict[str, Any]], backlog: int, *, offset: int = 0
) -> list[dict[str, Any]]:
    """`backlog` rows committed after the batch and left unprocessed: one in ten a newer state of
    a booking of the batch (so ingest and the claim find undecided bookings), the rest new
    bookings."""
    rng = random.Random(backlog + offset)
    return [
        change(batch[(i // 10) % len(batch)], i, rng)
        if i % 10 == 0
        else seated_payload(BACKLOG_TAG + offset, i)
        for i in range(backlog)
    ]


async def pending_deliveries(database: str) -> int:
    conn = await pg_connect(database)
    try:
        return int(
            await conn.fetchval("SELECT count(*) FROM mozrest_delivery WHERE status = 'pending'")
        )
    finally:
        await conn.close()


async def drop_backlog(database: str) -> int:
    """Remove the outbox rows the cycle left unprocessed, so the next cycle reads its own."""
    conn = await pg_connect(database)
    try:
        status = await conn.execute("DELETE FROM mozrest_outbox WHERE processed_at IS NULL")
        return int(status.split()[-1])
    finally:
        await conn.close()


async def put_fresh_work(database: str, payloads: Sequence[dict[str, Any]]) -> None:
    conn = await pg_connect(database)
    try:
        async with conn.transaction():
            await copy_outbox(conn, payloads)
    finally:
        await conn.close()


async def table_facts(database: str) -> dict[str, dict[str, Any]]:
    """Exact row counts and sizes of the relay's tables, and their dead tuples."""
    conn = await pg_connect(database)
    try:
        facts: dict[str, dict[str, Any]] = {}
        for table in RELAY_TABLES:
            row = await conn.fetchrow(
                f"SELECT (SELECT count(*) FROM {table}) AS rows, "
                "pg_relation_size($1::regclass) AS heap_bytes, "
                "pg_indexes_size($1::regclass) AS index_bytes, "
                "(SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = $1::regclass) AS dead",
                table,
            )
            assert row is not None
            facts[table] = dict(row)
        return facts
    finally:
        await conn.close()


async def index_definitions(database: str) -> dict[str, str]:
    conn = await pg_connect(database)
    try:
        rows = await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY($1::text[]) "
            "ORDER BY tablename, indexname",
            list(RELAY_TABLES),
        )
        return {r["indexname"]: r["indexdef"] for r in rows}
    finally:
        await conn.close()


# -- capturing the relay's statements ------------------------------------------------------------


@dataclass(slots=True)
class Captured:
    """One statement as the relay's engine sent it to asyncpg."""

    call: str
    sql: str
    param_sets: list[tuple[Any, ...]]
    executemany: bool
    name: str | None
    """The store's name for it (`@statement`), None for one it sends without a name."""


@dataclass(slots=True)
class Capture:
    """`before_cursor_execute` on the relay's engine: every statement of the running store call."""

    call: str | None = None
    statements: list[Captured] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    """The store's named statements, by the identity of the object its toolkit built."""
    sent: set[str] = field(default_factory=set)
    """The names of the statements sent so far."""

    def name_statements(self, tools: Toolkit) -> None:
        """Know every named statement of `tools` (the relay's store's toolkit) by its object."""
        self.names = {id(tools.statement(name)): name for name in statement_names()}

    def listener(
        self,
        conn: Any,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        if self.call is None or statement.strip().upper() in {"BEGIN", "COMMIT", "ROLLBACK"}:
            return
        # SQLAlchemy's insertmanyvalues sends one multi-row INSERT per batch, flagged
        # executemany but with one flat parameter list: one execution.
        style = getattr(getattr(context, "execute_style", None), "name", "")
        if style == "INSERTMANYVALUES":
            executemany = False
        sets = list(parameters) if executemany else [parameters]
        if any(isinstance(p, dict) for p in sets):
            raise TypeError("expected positional parameters from the asyncpg dialect")
        compiled = getattr(context, "compiled", None)
        name = self.names.get(id(getattr(compiled, "statement", None)))
        if name is not None:
            self.sent.add(name)
        self.statements.append(
            Captured(self.call, statement, [tuple(p or ()) for p in sets], executemany, name)
        )

    @contextlib.contextmanager
    def running(self, call: str) -> Iterator[list[Captured]]:
        self.call = call
        self.statements = []
        try:
            yield self.statements
        finally:
            self.call = None


class RehearsalStore(Store):
    """The relay's store; while `rehearse` is set, a method's transaction is rolled back instead
    of committed. Nothing else differs: the same methods send the same SQL (every part of the
    store writes through the one `Toolkit.write`)."""

    rehearse = False

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine)
        committing = self.tools.write

        @contextlib.asynccontextmanager
        async def write() -> AsyncIterator[AsyncConnection]:
            if not self.rehearse:
                async with committing() as conn:
                    yield conn
                return
            async with self.engine.connect() as conn:
                transaction = await conn.begin()
                try:
                    yield conn
                finally:
                    await transaction.rollback()

        self.tools.write = write  # type: ignore[method-assign]


async def relay_session_settings(engine: AsyncEngine) -> dict[str, str]:
    """The settings the relay's connections set at start-up (source `client`), as they are."""
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        rows = await driver.fetch(
            "SELECT name, setting, category FROM pg_settings WHERE source = 'client' "
            "AND name NOT IN ('client_encoding', 'DateStyle', 'TimeZone')"
        )
    return {r["name"]: r["setting"] for r in rows} | {
        f"category:{r['name']}": r["category"] for r in rows
    }


# -- replaying and explaining ---------------------------------------------------------------------


def _jsonb_encoder(value: str) -> bytes:
    return b"\x01" + value.encode()


def _jsonb_decoder(value: bytes) -> Any:
    return json.loads(value[1:].decode())


def _json_decoder(value: bytes) -> Any:
    return json.loads(value.decode())


async def explain_connection(
    database: str, relay_settings: dict[str, str], variant: Variant
) -> asyncpg.Connection:
    """An asyncpg connection set up as the relay's (its JSON codecs, from SQLAlchemy's asyncpg
    dialect, since the captured JSON parameters are already serialised), with or without its
    planner settings."""
    settings = {
        name: value
        for name, value in relay_settings.items()
        if not name.startswith("category:")
        and (
            variant.relay_planner
            or "Planner Method" not in relay_settings.get(f"category:{name}", "")
        )
    }
    conn = await asyncpg.connect(
        host=PG_HOST,
        port=PG_PORT,
        user=PG_USER,
        database=database,
        server_settings={**settings, "application_name": f"mozrest-plans-{variant.name}"},
    )
    await conn.set_type_codec(
        "json", encoder=str.encode, decoder=_json_decoder, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "jsonb",
        encoder=_jsonb_encoder,
        decoder=_jsonb_decoder,
        schema="pg_catalog",
        format="binary",
    )
    return conn


async def _in_savepoint(conn: asyncpg.Connection, work: Callable[[], Awaitable[T]]) -> T:
    """Run `work`, then undo whatever it changed (and any error state)."""
    await conn.execute(f"SAVEPOINT {SAVEPOINT}")
    try:
        return await work()
    finally:
        await conn.execute(f"ROLLBACK TO SAVEPOINT {SAVEPOINT}")
        await conn.execute(f"RELEASE SAVEPOINT {SAVEPOINT}")


async def _explain_custom(
    conn: asyncpg.Connection, sql: str, params: tuple[Any, ...]
) -> dict[str, Any]:
    async def as_json() -> Any:
        return await conn.fetchval(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", *params)

    async def as_text() -> str:
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *params)
        return "\n".join(r[0] for r in rows)

    document = await _in_savepoint(conn, as_json)
    if isinstance(document, str):
        document = json.loads(document)
    top = document[0]
    text = await _in_savepoint(conn, as_text)
    return {
        "plan": top["Plan"],
        "planning_ms": top.get("Planning Time"),
        "execution_ms": top.get("Execution Time"),
        "planning_buffers": top.get("Planning"),
        "text": text,
    }


class AutoExplain:
    """auto_explain in this session, reporting at NOTICE level so the plans come back to us."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.notices: list[str] = []
        conn.add_log_listener(self._on_notice)

    def _on_notice(self, conn: Any, message: Any) -> None:
        self.notices.append(str(message.message))

    async def setup(self) -> None:
        await self.conn.execute("LOAD 'auto_explain'")
        for setting in (
            "auto_explain.log_min_duration = -1",
            "auto_explain.log_analyze = on",
            "auto_explain.log_buffers = on",
            "auto_explain.log_timing = on",
            "auto_explain.log_level = notice",
            "plan_cache_mode = force_generic_plan",
        ):
            await self.conn.execute(f"SET {setting}")

    async def _run(self, sql: str, params: tuple[Any, ...], fmt: str) -> tuple[float, str]:
        await self.conn.execute(f"SET auto_explain.log_format = {fmt}")
        await self.conn.execute("SET auto_explain.log_min_duration = 0")
        self.notices.clear()
        try:
            await _in_savepoint(self.conn, lambda: self.conn.fetch(sql, *params))
        finally:
            await self.conn.execute("SET auto_explain.log_min_duration = -1")
        for _ in range(5):  # asyncpg hands notices to listeners with call_soon
            await asyncio.sleep(0)
        for notice in self.notices:
            head, sep, body = notice.partition("plan:\n")
            if not sep:
                continue
            if fmt == "json" and json.loads(body).get("Query Text") != sql:
                continue
            if fmt == "text":
                prefix = f"Query Text: {sql}\n"
                if not body.startswith(prefix):
                    continue
                body = body[len(prefix) :]
            found = re.search(r"duration: ([\d.]+) ms", head)
            return (float(found.group(1)) if found else float("nan")), body
        raise RuntimeError(f"auto_explain reported no plan for: {shorten(sql)}")

    async def explain(self, sql: str, params: tuple[Any, ...]) -> dict[str, Any]:
        duration, body = await self._run(sql, params, "json")
        _, text = await self._run(sql, params, "text")
        return {
            "plan": json.loads(body)["Plan"],
            "planning_ms": None,
            "execution_ms": duration,
            "planning_buffers": None,
            "text": text.rstrip(),
        }


async def replay(
    database: str,
    statements: Sequence[Captured],
    variant: Variant,
    relay_settings: dict[str, str],
    threshold: int,
) -> dict[str, dict[str, Any]]:
    """Replay one store call's transaction in order, explaining each distinct statement (its first
    parameter set) before executing it as the relay did; roll everything back at the end."""
    conn = await explain_connection(database, relay_settings, variant)
    results: dict[str, dict[str, Any]] = {}
    try:
        auto = AutoExplain(conn) if variant.generic else None
        if auto is not None:
            await auto.setup()
        transaction = conn.transaction()
        await transaction.start()
        try:
            for statement in statements:
                params = statement.param_sets[0]
                if statement.sql not in results:
                    try:
                        if auto is not None:
                            explained = await auto.explain(statement.sql, params)
                        else:
                            explained = await _explain_custom(conn, statement.sql, params)
                        explained.update(summarise(explained["plan"], threshold))
                        explained["plan"] = cut_arrays(explained["plan"])
                        explained["text"] = cut_arrays(explained["text"])
                    except (asyncpg.PostgresError, asyncpg.InterfaceError, RuntimeError) as exc:
                        explained = {"error": f"{type(exc).__name__}: {exc}"}
                    results[statement.sql] = explained
                # Then as the relay ran it, so the next statements find the state it left.
                if statement.executemany:
                    await conn.executemany(statement.sql, statement.param_sets)
                else:
                    await conn.fetch(statement.sql, *params)
        finally:
            await transaction.rollback()
    finally:
        await conn.close()
    return results


# -- reading plans -------------------------------------------------------------------------------


def nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from nodes(child)


def shape(plan: dict[str, Any]) -> str:
    """A plan on one line: `Limit(Index Scan ix_name)`, `Update mozrest_delivery(...)`."""
    label = str(plan["Node Type"])
    if label == "ModifyTable":
        label = str(plan.get("Operation", label))
    if "Index Name" in plan:
        label += f" {plan['Index Name']}"
    elif "Relation Name" in plan:
        label += f" {plan['Relation Name']}"
    children = plan.get("Plans", [])
    if children:
        label += "(" + ", ".join(shape(child) for child in children) + ")"
    return label


def _rows(node: dict[str, Any]) -> float:
    return float(node.get("Actual Rows", 0)) * float(node.get("Actual Loops", 1) or 1)


def summarise(plan: dict[str, Any], threshold: int) -> dict[str, Any]:
    """Node types, indexes, rows, buffers, and the flags: what would grow with the table."""
    flags: list[str] = []
    notes: list[str] = []
    for node in nodes(plan):
        relation = node.get("Relation Name")
        if node["Node Type"] == "Seq Scan":
            if relation in GROWING_TABLES:
                flags.append(f"Seq Scan on {relation} ({_rows(node):,.0f} rows returned)")
            else:
                notes.append(f"Seq Scan on {relation} (a table of a few rows)")
        loops = float(node.get("Actual Loops", 1) or 1)
        for key in ("Rows Removed by Filter", "Rows Removed by Index Recheck"):
            removed = float(node.get(key, 0)) * loops  # EXPLAIN shows it per loop
            if removed > threshold:
                where = f" on {relation}" if relation else ""
                flags.append(
                    f"{node['Node Type']}{where}: {key} {removed:,.0f}, returned {_rows(node):,.0f}"
                )
        read = sum(_rows(child) for child in node.get("Plans", []))
        if read > threshold and read > 10 * max(_rows(node), 1):
            flags.append(
                f"{node['Node Type']} reads {read:,.0f} rows from its inputs to return "
                f"{_rows(node):,.0f}"
            )
    indexes = list(dict.fromkeys(n["Index Name"] for n in nodes(plan) if "Index Name" in n))
    relations = list(dict.fromkeys(n["Relation Name"] for n in nodes(plan) if "Relation Name" in n))
    return {
        "shape": shape(plan),
        "node_types": list(dict.fromkeys(str(n["Node Type"]) for n in nodes(plan))),
        "indexes": indexes,
        "relations": relations,
        "actual_rows": plan.get("Actual Rows"),
        "actual_loops": plan.get("Actual Loops"),
        "shared_hit": plan.get("Shared Hit Blocks", 0),
        "shared_read": plan.get("Shared Read Blocks", 0),
        "shared_dirtied": plan.get("Shared Dirtied Blocks", 0),
        "flags": flags,
        "notes": notes,
    }


_ARRAY_LITERAL = re.compile(r"'\{([^{}']{120,})\}'")


def cut_arrays(value: Any) -> Any:
    """Plans with long array literals (`= ANY('{...}')`, a batch of ids) cut to their length:
    the values are in the statement's parameters."""
    if isinstance(value, str):
        return _ARRAY_LITERAL.sub(
            lambda m: f"'{{… {m.group(1).count(',') + 1} elements …}}'", value
        )
    if isinstance(value, list):
        return [cut_arrays(v) for v in value]
    if isinstance(value, dict):
        return {k: cut_arrays(v) for k, v in value.items()}
    return value


def shorten(sql: str, width: int = 110) -> str:
    flat = re.sub(r"\s+", " ", display_sql(sql)).strip()
    return flat if len(flat) <= width else flat[: width - 1] + "…"


_TUPLE = r"\((?:[^()]|\([^()]*\))*\)"


def display_sql(sql: str) -> str:
    """The SQL with a multi-row VALUES list (SQLAlchemy's insertmanyvalues) cut to its first row."""

    def cut(match: re.Match[str]) -> str:
        rows = re.findall(_TUPLE, match.group(0))
        return f"VALUES {rows[0]}, … ({len(rows)} rows)"

    return re.sub(rf"VALUES {_TUPLE}(?:, {_TUPLE})+", cut, sql)


def label(call: str, sql: str) -> str:
    """What a statement the store sends without a name (`@statement`) is for, in its words."""
    s = re.sub(r"\s+", " ", sql)
    if "FROM mozrest_lock" in s:
        return "take the ingest lock (FOR UPDATE SKIP LOCKED)"
    if s.startswith("SELECT clock_timestamp()"):
        return "the database clock"
    if "FROM mozrest_outbox" in s and "processed_at IS NULL ORDER BY" in s:
        return "the oldest unprocessed outbox rows"
    if "FROM mozrest_booking" in s and "FOR UPDATE" in s:
        return "lock the batch's bookings"
    if s.startswith("SELECT DISTINCT mozrest_outbox.booking_id"):
        kind = "join on last_outbox_id" if "JOIN mozrest_booking" in s else "after the batch"
        return f"undecided check: newer unprocessed outbox rows ({kind})"
    if "FROM mozrest_delivery" in s and "ORDER BY mozrest_delivery.outbox_id" in s:
        return "active deliveries of the batch's bookings"
    if s.startswith("SELECT mozrest_outbox.booking_id, mozrest_outbox.processed_at"):
        return "undecided check: the batch's bookings' rows beyond the batch"
    if s.startswith("SELECT mozrest_outbox.booking_id, mozrest_outbox.id, mozrest_outbox.proc"):
        return "unread check (_unread_after): the bookings' outbox rows, by booking id alone"
    if s.startswith("SELECT mozrest_delivery.booking_id") and "next_attempt_at <=" in s:
        return "the due candidates"
    if s.startswith("INSERT INTO mozrest_booking"):
        return "new bookings"
    if s.startswith("INSERT INTO mozrest_delivery"):
        return "new deliveries"
    if s.startswith("INSERT INTO mozrest_attempt"):
        return "attempts"
    if s.startswith("UPDATE mozrest_outbox"):
        return "mark outbox rows processed" if "processed_at" in s else "outbox outcome"
    if s.startswith("UPDATE mozrest_booking"):
        if "accepted_payload" in s:
            if "FROM mozrest_delivery" in s:
                return "booking snapshots, copied from the accepted deliveries (UPDATE … FROM)"
            return "booking snapshots (accepted state)"
        if "last_outbox_id" in s:
            return "known bookings: last ingested row"
        if "sent_outbox_id" in s:
            return "bookings: sent watermark"
        return "bookings update"
    if s.startswith("UPDATE mozrest_delivery"):
        if "attempt_count" in s:
            if "= ANY" in s:
                return "settle deliveries that end alike (one UPDATE on their ids)"
            return "settle deliveries (outcome of the attempt)"
        if "lease_token" in s:
            return "lease the chosen deliveries"
        return "deliveries update"
    return f"{call}: other statement"


# -- the cycle -----------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, Decimal):
        return str(value)
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


@dataclass(slots=True)
class Cycle:
    """Drives the store's calls: rehearse, capture, explain, then run for real."""

    store: RehearsalStore
    capture: Capture
    database: str
    relay_settings: dict[str, str]
    variants: Sequence[Variant]
    threshold: int
    kind: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)

    async def step(self, call: str, run: Callable[[], Awaitable[T]]) -> T:
        facts = await table_facts(self.database)
        self.store.rehearse = True
        try:
            with self.capture.running(call) as rehearsed:
                await run()
        finally:
            self.store.rehearse = False
        explained = {
            v.name: await replay(self.database, rehearsed, v, self.relay_settings, self.threshold)
            for v in self.variants
        }
        with self.capture.running(call) as committed:
            result = await run()
        same = [s.sql for s in rehearsed] == [s.sql for s in committed]
        self.calls.append(self._section(call, facts, rehearsed, explained, same))
        return result

    def _section(
        self,
        call: str,
        facts: dict[str, dict[str, Any]],
        statements: Sequence[Captured],
        explained: dict[str, dict[str, dict[str, Any]]],
        same: bool,
    ) -> dict[str, Any]:
        distinct: dict[str, dict[str, Any]] = {}
        for position, statement in enumerate(statements, 1):
            entry = distinct.get(statement.sql)
            if entry is None:
                # A multi-row INSERT (insertmanyvalues) is kept with its first row only.
                shown = display_sql(statement.sql)
                params = statement.param_sets[0]
                if shown != statement.sql:
                    params = params[: len(re.findall(r"\$\d+", shown))]
                entry = distinct[statement.sql] = {
                    "cycle": self.kind,
                    "call": call,
                    "statement": statement.name,
                    "label": statement.name or label(call, statement.sql),
                    "position": position,
                    "sql": shown,
                    "sql_chars": len(statement.sql),
                    "executions": 0,
                    "executemany": statement.executemany,
                    "parameter_sets": 0,
                    "parameters": jsonable(params),
                    "plans": {name: plans[statement.sql] for name, plans in explained.items()},
                }
            entry["executions"] += 1
            entry["parameter_sets"] += len(statement.param_sets)
        return {
            "cycle": self.kind,
            "call": call,
            "tables_at_explain": facts,
            "statements_sent": len(statements),
            "same_sql_as_committed_run": same,
            "statements": list(distinct.values()),
        }


#: The cycles: `stale`, the fresh rows committed after the last ANALYZE (a burst on a large table,
#: which autovacuum's thresholds leave unanalysed); `analyzed`, after a VACUUM ANALYZE of them.
CYCLES = ("stale", "analyzed")


async def drive_cycle(
    kind: str,
    index: int,
    store: RehearsalStore,
    cycle: Cycle,
    *,
    fresh: int,
    backlog: int,
    changed_old: int,
    old_rows: int,
) -> dict[str, Any]:
    """Commit a batch of fresh outbox rows and a backlog behind it, then ingest the batch
    (leasing half of it), claim_due (every pending delivery), record a DELIVERED answer for every
    claim; finally drop the backlog, still unprocessed."""
    payloads = fresh_payloads(fresh, changed_old, old_rows, offset=index)
    behind = backlog_payloads(payloads, backlog, offset=index)
    await put_fresh_work(cycle.database, payloads)
    if behind:
        await put_fresh_work(cycle.database, behind)
    summary: dict[str, Any] = {"kind": kind, "fresh_rows": len(payloads), "backlog": len(behind)}
    if kind == "analyzed":
        summary["vacuum_analyze_seconds"] = await vacuum_analyze(cycle.database)
    log(f"cycle {kind}: committed {len(payloads)} fresh outbox rows and {len(behind)} behind them")
    cycle.kind = kind
    lease_seconds = float(Settings.model_fields["relay_lease_seconds"].default)
    lease = LeaseRequest(worker_id=WORKER_ID, limit=fresh // 2, seconds=lease_seconds)
    report = await cycle.step("ingest", lambda: store.ingest(limit=fresh, lease=lease))
    assert report is not None, "another ingester holds the lock"
    log(f"ingest: {report.rows} rows, {len(report.claims)} leased, {report.queued} queued")
    claims: list[Claim] = list(report.claims)

    limit = max(await pending_deliveries(cycle.database), 1)
    claimed = await cycle.step(
        "claim_due",
        lambda: store.claim_due(worker_id=WORKER_ID, limit=limit, lease_seconds=lease_seconds),
    )
    log(f"claim_due: {len(claimed)} claimed")
    claims += claimed

    started = datetime.now(UTC)
    results = [
        AttemptResult(
            claim=c,
            verdict=Verdict.DELIVERED,
            started_at=started,
            duration_ms=5,
            status_code=200,
            response_body='{"status":"ok"}',
        )
        for c in claims
    ]
    settled = await cycle.step("record", lambda: store.record(results, worker_id=WORKER_ID))
    statuses = Counter(str(s.status) for s in settled)
    log(f"record: {dict(statuses)}")
    summary["backlog_dropped"] = await drop_backlog(cycle.database)
    summary |= {
        "ingest": {
            "limit": fresh,
            "lease_limit": lease.limit,
            "rows": report.rows,
            "outcomes": dict(report.outcomes),
            "leased": len(report.claims),
            "queued": report.queued,
        },
        "claim_due": {"limit": limit, "claimed": len(claimed)},
        "record": {"results": len(results), "statuses": dict(statuses)},
        "lease_seconds": lease_seconds,
    }
    return summary


async def drive(
    engine: AsyncEngine,
    database: str,
    *,
    kinds: Sequence[str],
    fresh: int,
    backlog: int,
    changed_old: int,
    old_rows: int,
    variants: Sequence[Variant],
    threshold: int,
) -> dict[str, Any]:
    capture = Capture()
    event.listen(engine.sync_engine, "before_cursor_execute", capture.listener)
    store = RehearsalStore(engine)
    capture.name_statements(store.tools)
    await store.ping()  # the dialect's first-connect queries, outside any capture
    relay_settings = await relay_session_settings(engine)
    cycle = Cycle(store, capture, database, relay_settings, variants, threshold)
    cycles = [
        await drive_cycle(
            kind,
            index,
            store,
            cycle,
            fresh=fresh,
            backlog=backlog,
            changed_old=changed_old,
            old_rows=old_rows,
        )
        for index, kind in enumerate(kinds)
    ]
    return {
        "relay_session_settings": {
            k: v for k, v in relay_settings.items() if not k.startswith("category:")
        },
        "cycles": cycles,
        "calls": cycle.calls,
        "statements_not_sent": sorted(set(statement_names()) - capture.sent),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    started = datetime.now(UTC)
    variants = [v for v in VARIANTS if not (v.generic and args.no_generic)]
    kinds = [k.strip() for k in args.cycles.split(",") if k.strip()]
    workdir = Workdir()
    report: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.plans", *sys.argv[1:]]),
        "machine": machine_summary(),
        "sources": SOURCES,
        "old_rows": args.old_rows,
        "fresh_rows": args.fresh,
        "backlog_rows": args.backlog,
        "changed_old_bookings": min(args.changed_old, args.old_rows, args.fresh),
        "filter_threshold": args.filter_threshold,
        "variants": [v.name for v in variants],
    }
    name = ""
    try:
        async with pg_database("plans") as name:
            url = pg_url(name)
            await migrate(url, workdir=workdir.path)
            conn = await pg_connect(name)
            try:
                report["postgresql"] = await conn.fetchval("SELECT version()")
                report["server_settings"] = {
                    r["name"]: r["setting"]
                    for r in await conn.fetch(
                        "SELECT name, setting || coalesce(' ' || unit, '') AS setting "
                        "FROM pg_settings WHERE name = ANY($1::text[])",
                        list(SERVER_SETTINGS),
                    )
                }
            finally:
                await conn.close()
            if args.old_rows:
                await load_old_rows(name, args.old_rows)
            report["vacuum_analyze_seconds"] = await vacuum_analyze(name)
            report["indexes"] = await index_definitions(name)
            engine = create_engine(normalise_database_url(url))
            try:
                report |= await drive(
                    engine,
                    name,
                    kinds=kinds,
                    fresh=args.fresh,
                    backlog=args.backlog,
                    changed_old=args.changed_old,
                    old_rows=args.old_rows,
                    variants=variants,
                    threshold=args.filter_threshold,
                )
            finally:
                await engine.dispose()
            report["tables_at_end"] = await table_facts(name)
    finally:
        workdir.cleanup()
    report["database"] = name
    report["database_dropped"] = not await database_exists(name)
    report["seconds"] = round((datetime.now(UTC) - started).total_seconds(), 1)
    return report


SERVER_SETTINGS = (
    "server_version",
    "shared_buffers",
    "work_mem",
    "random_page_cost",
    "effective_cache_size",
    "autovacuum",
    "jit",
    "plan_cache_mode",
)


# -- output --------------------------------------------------------------------------------------


def _variant_line(name: str, plan: dict[str, Any]) -> str:
    if "error" in plan:
        return f"    {name:<17} ERROR {plan['error']}"
    ms = plan.get("execution_ms")
    return (
        f"    {name:<17} {ms:8.3f} ms  rows {plan['actual_rows']!s:>5}  "
        f"hit {plan['shared_hit']:>5} read {plan['shared_read']:>4}  {plan['shape']}"
    )


def print_summary(report: dict[str, Any]) -> None:
    out = sys.stdout
    print(f"\n{report['postgresql']}", file=out)
    print(f"{report['date']}  {report['command']}", file=out)
    print(f"relay session settings: {report['relay_session_settings']}", file=out)
    for section in report["calls"]:
        counts = ", ".join(
            f"{t} {f['rows']:,}"
            for t, f in section["tables_at_explain"].items()
            if t in GROWING_TABLES
        )
        print(f"\n== {section['cycle']} cycle, {section['call']}  ({counts})", file=out)
        for st in section["statements"]:
            many = f", executemany of {st['parameter_sets']}" if st["executemany"] else ""
            print(f"  #{st['position']} {st['label']}  (x{st['executions']}{many})", file=out)
            print(f"    {shorten(st['sql'])}", file=out)
            for name, plan in st["plans"].items():
                print(_variant_line(name, plan), file=out)
            for name, plan in st["plans"].items():
                for flag in plan.get("flags", []):
                    print(f"    ! {name}: {flag}", file=out)
    flagged = _flagged(report)
    print("\nFlagged (cost that would grow with the table):", file=out)
    for line in flagged or ["none"]:
        print(f"  {line}", file=out)
    print("\nPlans that differ from the relay's:", file=out)
    for line in _differences(report) or ["none"]:
        print(f"  {line}", file=out)
    print("\nNamed statements no cycle sent (not planned here):", file=out)
    print(f"  {', '.join(report['statements_not_sent']) or 'none'}", file=out)
    print(f"\ndatabase {report['database']} dropped: {report['database_dropped']}", file=out)


def _where(section: dict[str, Any], st: dict[str, Any]) -> str:
    return f"{section['cycle']}/{section['call']} #{st['position']} {st['label']}"


def _flagged(report: dict[str, Any]) -> list[str]:
    lines = []
    for section in report["calls"]:
        for st in section["statements"]:
            for name, plan in st["plans"].items():
                for flag in plan.get("flags", []):
                    lines.append(f"{_where(section, st)} [{name}]: {flag}")
    return lines


def _differences(report: dict[str, Any]) -> list[str]:
    lines = []
    for section in report["calls"]:
        for st in section["statements"]:
            plans = st["plans"]
            base = plans.get("relay", {}).get("shape")
            for name, plan in plans.items():
                if name != "relay" and plan.get("shape") != base:
                    lines.append(
                        f"{_where(section, st)} [{name}]: "
                        f"{plan.get('shape', plan.get('error'))}  (relay: {base})"
                    )
    return lines


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Query plans of the relay's hot statements",
        "",
        f"- Date: {report['date']}",
        f"- Command: `{report['command']}`",
        f"- Server: {report['postgresql']}",
        f"- Server settings: {report['server_settings']}",
        f"- Relay session settings: {report['relay_session_settings']}",
        f"- Relay code measured (sha256 prefixes): {report['sources']}; "
        f"commit {report['machine']['commit']}",
        f"- Old rows per table: {report['old_rows']:,} (then VACUUM ANALYZE); fresh outbox rows "
        f"per cycle: {report['fresh_rows']} ({report['changed_old_bookings']} of them new states "
        f"of old bookings), then {report['backlog_rows']} more left unprocessed behind them (one "
        "in ten a newer state of a booking of the batch)",
        *(f"- Cycle `{c['kind']}`: {json.dumps(c)}" for c in report["cycles"]),
        f"- Variants: {', '.join(report['variants'])} (`relay`: the relay's session settings; "
        "`defaults`: PostgreSQL's; `-generic`: a prepared statement's generic plan, "
        "from auto_explain)",
        f"- Database `{report['database']}` dropped at the end: {report['database_dropped']}",
        "- Per statement and variant: the summary line is from `EXPLAIN (ANALYZE, BUFFERS, "
        "FORMAT JSON)`, the text plan from a second execution (`EXPLAIN (ANALYZE, BUFFERS)`), "
        "both rolled back; long array literals are cut to their length",
        "",
        "## Flagged",
        "",
    ]
    lines += [f"- {line}" for line in _flagged(report)] or ["- none"]
    lines += ["", "## Plans that differ from the relay's", ""]
    lines += [f"- {line}" for line in _differences(report)] or ["- none"]
    lines += ["", "## Named statements no cycle sent (not planned here)", ""]
    lines += [f"- `{name}`" for name in report["statements_not_sent"]] or ["- none"]
    for section in report["calls"]:
        lines += [
            "",
            f"## {section['cycle']} cycle: {section['call']}",
            "",
            "| table | rows | heap | indexes |",
            "|---|---:|---:|---:|",
        ]
        for table, facts in section["tables_at_explain"].items():
            lines.append(
                f"| {table} | {facts['rows']:,} | {facts['heap_bytes'] / 2**20:,.1f} MiB "
                f"| {facts['index_bytes'] / 2**20:,.1f} MiB |"
            )
        for st in section["statements"]:
            many = f", executemany of {st['parameter_sets']}" if st["executemany"] else ""
            lines += [
                "",
                f"### {section['cycle']}/{section['call']} #{st['position']}: {st['label']}",
                "",
                f"Sent {st['executions']} time(s){many}.",
                "",
                "```sql",
                display_sql(st["sql"]).strip(),
                "```",
            ]
            for name, plan in st["plans"].items():
                if "error" in plan:
                    lines += ["", f"**{name}**: error `{plan['error']}`"]
                    continue
                flags = "; ".join(plan["flags"]) or "none"
                lines += [
                    "",
                    f"**{name}**: {plan['execution_ms']:.3f} ms, rows {plan['actual_rows']}, "
                    f"buffers hit {plan['shared_hit']} read {plan['shared_read']}; "
                    f"indexes {', '.join(plan['indexes']) or 'none'}; flags: {flags}",
                    "",
                    "```",
                    plan["text"],
                    "```",
                ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old-rows", type=int, default=1_000_000, help="old rows per table")
    parser.add_argument("--fresh", type=int, default=500, help="fresh outbox rows")
    parser.add_argument(
        "--backlog",
        type=int,
        default=2000,
        help="outbox rows committed behind the batch and left unprocessed during the cycle",
    )
    parser.add_argument(
        "--changed-old", type=int, default=50, help="how many fresh rows are old bookings' states"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write JSON")
    parser.add_argument("--markdown", type=Path, default=None, help="where to write Markdown")
    parser.add_argument(
        "--filter-threshold",
        type=int,
        default=1000,
        help="flag a node that discards (or reads beyond what it returns) more rows than this",
    )
    parser.add_argument(
        "--cycles",
        default=",".join(CYCLES),
        help="comma-separated: stale (fresh rows not analysed), analyzed (VACUUM ANALYZE first)",
    )
    parser.add_argument(
        "--no-generic", action="store_true", help="skip the generic-plan (auto_explain) variants"
    )
    args = parser.parse_args()
    if args.fresh < 2:
        parser.error("--fresh must be at least 2 (half leased by ingest, half claimed)")
    unknown = set(args.cycles.split(",")) - set(CYCLES)
    if unknown:
        parser.error(f"unknown cycles {sorted(unknown)}: choose from {', '.join(CYCLES)}")
    report = asyncio.run(run(args))
    print_summary(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(jsonable(report), indent=1, ensure_ascii=False) + "\n")
    log(f"wrote {args.json}")
    if args.markdown is not None:
        args.markdown.write_text(markdown(report))
        log(f"wrote {args.markdown}")
    return 0 if report["database_dropped"] else 1


if __name__ == "__main__":
    sys.exit(main())
