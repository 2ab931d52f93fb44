"""Nothing from outside stops the relay (SPEC 9): each finding of the reliability review, pinned.

A raw TCP stand-in for Mozrest answers exactly the bytes a test gives it (a NUL in the body, any
`Retry-After`), which no HTTP framework would send; the worker is the real one, on each backend.
Rows the database itself refuses are made with a trigger, the one way to make a valid row fail
at the database on purpose.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.clock import lease_clock
from app.models import attempt, booking, delivery, outbox
from app.partner_api import PartnerApi, PartnerApiError
from app.publisher import make_publisher
from app.runtime import build_store, build_worker
from app.settings import Settings
from app.store import Store
from app.worker import Worker
from tests.conftest import eventually
from tests.factories import state

TOKEN = "test-token"
FAST: dict[str, Any] = {
    "relay_poll_interval_seconds": 0.02,
    "relay_retry_base_delay_seconds": 0.05,
    "relay_retry_max_delay_seconds": 0.2,
    "relay_circuit_threshold": 50,
    "relay_circuit_cooldown_seconds": 0.3,
    "relay_lease_seconds": 3.0,
    "relay_http_timeout_seconds": 1.0,
    "relay_shutdown_grace_seconds": 2.0,
    "relay_heartbeat_interval_seconds": 1.0,
    "relay_retry_max_age_seconds": 3600.0,
}
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def answer(status: int, body: bytes = b"", *headers: str) -> bytes:
    """One raw HTTP/1.1 answer with exactly these headers and body bytes."""
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class RawMozrest:
    """A Mozrest stand-in on loopback that answers each request with the next scripted bytes
    (then 200 `{}`), and keeps every request body it read."""

    script: dict[str, list[bytes]] = field(default_factory=dict)
    received: list[dict[str, Any]] = field(default_factory=list)
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = json.loads(await reader.readexactly(length)) if length else {}
                self.received.append(body)
                pending = self.script.get(body.get("bookingId", ""), [])
                writer.write(pending.pop(0) if pending else OK)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def landed(self, booking_id: str) -> list[dict[str, Any]]:
        return [b for b in self.received if b.get("bookingId") == booking_id]


@pytest.fixture
async def mozrest() -> AsyncIterator[RawMozrest]:
    stand_in = RawMozrest()
    await stand_in.start()
    try:
        yield stand_in
    finally:
        await stand_in.close()


class World:
    """The database, the stand-in, and one real worker at a time."""

    def __init__(self, engine: AsyncEngine, database_url: str, mozrest: RawMozrest) -> None:
        self.engine = engine
        self.database_url = database_url
        self.mozrest = mozrest
        self.worker: Worker | None = None
        self.task: asyncio.Task[None] | None = None

    def settings(self, **overrides: Any) -> Settings:
        values = {
            "database_url": self.database_url,
            "mozrest_webhook_url": self.mozrest.url + "/rms",
            "mozrest_webhook_token": TOKEN,
            **FAST,
            **overrides,
        }
        return Settings(_env_file=None, **values)

    def store(self, **overrides: Any) -> Store:
        return build_store(self.settings(**overrides), self.engine)

    async def start(self, **overrides: Any) -> Worker:
        settings = self.settings(**overrides)
        self.worker = build_worker(settings, build_store(settings, self.engine))
        self.task = asyncio.create_task(self.worker.run())
        return self.worker

    async def stop(self) -> None:
        if self.worker is None or self.task is None:
            return
        self.worker.stop()
        try:
            await asyncio.wait_for(self.task, 10)
        finally:
            await self.worker.publisher.aclose()
            self.task = None

    async def insert(self, *payloads: dict[str, Any]) -> list[int]:
        return [
            await self.insert_raw(p["bookingId"], p["venueId"], json.dumps(p)) for p in payloads
        ]

    async def insert_raw(self, booking_id: str, venue_id: str, payload_text: str) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                text(
                    "INSERT INTO mozrest_outbox (booking_id, venue_id, payload) "
                    "VALUES (:b, :v, :p) RETURNING id"
                ),
                {"b": booking_id, "v": venue_id, "p": payload_text},
            )
            return int(result.scalar_one())

    async def rows(self, table: Any, *where: Any) -> list[Any]:
        async with self.engine.connect() as conn:
            order = list(table.primary_key.columns)
            return list(await conn.execute(select(table).where(*where).order_by(*order)))

    async def delivery_of(self, outbox_id: int) -> Any:
        rows = await self.rows(delivery, delivery.c.outbox_id == outbox_id)
        return rows[0] if rows else None

    async def wait_delivery(self, outbox_id: int, *statuses: str, timeout: float = 8) -> Any:
        async def check() -> Any:
            row = await self.delivery_of(outbox_id)
            return row if row is not None and row.status in statuses else None

        return await eventually(check, timeout=timeout, message=f"delivery {statuses}")

    async def wait_outcome(self, *outbox_ids: int, timeout: float = 8) -> list[Any]:
        async def check() -> list[Any] | None:
            async with self.engine.connect() as conn:
                rows = list(
                    await conn.execute(
                        select(outbox.c.id, outbox.c.outcome, outbox.c.error)
                        .where(outbox.c.id.in_(outbox_ids))
                        .order_by(outbox.c.id)
                    )
                )
            return rows if all(r.outcome is not None for r in rows) else None

        return await eventually(check, timeout=timeout, message=f"outcomes of {outbox_ids}")


@pytest.fixture
async def world(
    engine: AsyncEngine, database_url: str, mozrest: RawMozrest
) -> AsyncIterator[World]:
    harness = World(engine, database_url, mozrest)
    try:
        yield harness
    finally:
        await harness.stop()


# -- Mozrest's answers (SPEC 9.1, 9.2) -----------------------------------------------------------


async def test_an_answer_with_nul_bytes_is_recorded_sanitised_and_the_batch_goes_on(
    world: World,
) -> None:
    """A NUL byte (and invalid UTF-8) in Mozrest's answer is stored escaped, as valid text; the
    delivery retries and lands, and another booking's answer in the same stretch is recorded
    too (on PostgreSQL the NUL once failed every recording of the batch, forever)."""
    world.mozrest.script["bk-nul"] = [answer(500, b"boom\x00\xff\xfe tail")]
    worker = await world.start()
    nul_id, other_id = await world.insert(state("bk-nul"), state("bk-other"))
    delivered = await world.wait_delivery(nul_id, "delivered")
    await world.wait_delivery(other_id, "delivered")
    (first, second) = await world.rows(attempt, attempt.c.delivery_id == delivered.id)
    assert (first.status_code, second.status_code) == (500, 200)
    assert first.response_body == "boom\\x00\ufffd\ufffd tail"
    assert world.mozrest.landed("bk-nul")[-1] == state("bk-nul")
    assert worker.failure is None


@pytest.mark.parametrize(
    "retry_after",
    ["999999999999", "9" * 400, "Fri, 31 Dec 99999 23:59:59 GMT", "Fri, 31 Dec 9999 23:59:59 GMT"],
    ids=["twelve-nines", "400-nines", "year-99999", "year-9999"],
)
async def test_a_retry_after_past_the_deadline_makes_the_delivery_dead_at_once(
    world: World, retry_after: str
) -> None:
    """A Retry-After of any size past RELAY_RETRY_MAX_AGE ends the delivery `dead` at once,
    naming Retry-After: no overflow, no crash loop, no delivery retrying until the year 5195."""
    world.mozrest.script["bk-late"] = [answer(503, b"later", f"Retry-After: {retry_after}")]
    worker = await world.start()
    (late_id,) = await world.insert(state("bk-late"))
    dead = await world.wait_delivery(late_id, "dead")
    assert "Retry-After" in dead.last_error
    assert dead.next_attempt_at is None
    (after_id,) = await world.insert(state("bk-after"))
    await world.wait_delivery(after_id, "delivered")  # the worker lives on
    assert worker.failure is None


@pytest.mark.parametrize(
    "headers",
    [
        ("Retry-After: \u00b2",),
        ("Retry-After: -5",),
        ("Retry-After: 1.5",),
        ("Retry-After: soon",),
        ("Retry-After: Sun, 06 Nov 1994 08:49:37 -0000", "Date: Sun, 06 Nov 1994 08:49:30 -0000"),
        ("Retry-After: Sunday, 06-Nov-94 08:49:37 GMT", "Date: nonsense"),
        ("Retry-After: Sun Nov  6 08:49:37 1994",),
    ],
    ids=["superscript-two", "negative", "fraction", "word", "minus-zero-zone", "rfc850", "asctime"],
)
async def test_an_odd_retry_after_never_turns_an_answer_into_our_error(
    world: World, headers: tuple[str, ...]
) -> None:
    """Odd Retry-After and Date headers are read or ignored: the 503 is recorded as a 503 and
    retried with the normal backoff, and a 200 with the same headers is delivered, never an
    "internal error" without a status."""
    world.mozrest.script["bk-odd"] = [
        answer(503, b"", *(h.encode().decode("latin-1") for h in headers)),
        answer(200, b"{}", *(h.encode().decode("latin-1") for h in headers)),
    ]
    await world.start()
    (odd_id,) = await world.insert(state("bk-odd"))
    # The minus-zero-zone dates ask for a 7-second wait, which is honoured: leave room for it.
    delivered = await world.wait_delivery(odd_id, "delivered", timeout=30)
    codes = [
        a.status_code for a in await world.rows(attempt, attempt.c.delivery_id == delivered.id)
    ]
    assert codes == [503, 200]


# -- outbox rows (SPEC 9.1, 9.6) -----------------------------------------------------------------


async def test_odd_rows_are_invalid_naming_the_field_and_later_rows_proceed(
    world: World, backend: str
) -> None:
    """Ids that differ only by a trailing space (a MariaDB crash loop), a key with a lone
    surrogate (an SQLite crash loop), outer whitespace and control characters each make their
    own row `invalid` with a storable error; the valid rows around them are delivered."""
    (first,) = await world.insert(state("B1"))
    spaced = await world.insert_raw("B1 ", "venue-1", json.dumps(state("B1 ")))
    # PostgreSQL's and MariaDB's JSON columns refuse a lone surrogate: the RMS sees that itself.
    surrogate = (
        await world.insert_raw("B2", "venue-1", json.dumps(state("B2"))[:-1] + ',"\\ud800":1}')
        if backend == "sqlite"
        else None
    )
    tab = await world.insert_raw("B\t3", "venue-1", json.dumps(state("B\t3")))
    (last,) = await world.insert(state("B4"))
    await world.start()
    ids = [i for i in (first, spaced, surrogate, tab, last) if i is not None]
    rows = {row.id: row for row in await world.wait_outcome(*ids)}
    assert rows[spaced].outcome == "invalid"
    assert rows[spaced].error == "bookingId: must not have leading or trailing whitespace"
    if surrogate is not None:
        assert rows[surrogate].outcome == "invalid"
        assert rows[surrogate].error == "\\ud800: is not a field of the Mozrest webhook payload"
    assert rows[tab].error == "bookingId: must not contain control characters"
    await world.wait_delivery(first, "delivered")
    await world.wait_delivery(last, "delivered")
    assert [b["bookingId"] for b in world.mozrest.received] == ["B1", "B4"]


async def test_a_payload_that_is_not_utf8_is_invalid_on_sqlite(world: World, backend: str) -> None:
    """SQLite stores whatever bytes an RMS writes: a payload that is not UTF-8 is `invalid`
    (it once stopped every later row, logged as if the database were down)."""
    if backend != "sqlite":
        pytest.skip("only SQLite stores bytes that are not UTF-8 in a JSON column")
    async with world.engine.begin() as conn:
        await conn.exec_driver_sql(
            "INSERT INTO mozrest_outbox (booking_id, venue_id, payload) "
            "VALUES ('B1', 'venue-1', X'fffe')"
        )
        await conn.exec_driver_sql(
            "INSERT INTO mozrest_outbox (booking_id, venue_id, payload) VALUES (X'ff', 'v', '{}')"
        )
    (after,) = await world.insert(state("B2"))
    await world.start()
    rows = await world.wait_outcome(1, 2, after)
    assert [(r.outcome, r.error) for r in rows[:2]] == [
        ("invalid", "payload: is not valid UTF-8 text"),
        ("invalid", "bookingId: is required"),
    ]
    await world.wait_delivery(after, "delivered")


async def _refuse(engine: AsyncEngine, backend: str, *, table: str, condition: str) -> None:
    """Make the database refuse inserts into `table` when `condition` (on NEW) holds."""
    async with engine.begin() as conn:
        if backend == "sqlite":
            await conn.exec_driver_sql(
                f"CREATE TRIGGER refuse BEFORE INSERT ON {table} WHEN {condition} "
                "BEGIN SELECT RAISE(ABORT, 'refused'); END"
            )
        elif backend == "postgresql":
            await conn.exec_driver_sql(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF {condition} THEN RAISE EXCEPTION 'refused' USING ERRCODE = '22023'; "
                "END IF; RETURN NEW; END $$"
            )
            await conn.exec_driver_sql(
                f"CREATE TRIGGER refuse BEFORE INSERT ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
        else:
            await conn.exec_driver_sql(
                f"CREATE TRIGGER refuse BEFORE INSERT ON {table} FOR EACH ROW "
                f"IF {condition} THEN SIGNAL SQLSTATE '22023' "
                "SET MESSAGE_TEXT = 'refused'; END IF"
            )


async def test_a_row_the_database_refuses_is_set_aside_and_the_rest_proceed(
    world: World, backend: str
) -> None:
    """A valid row that the database refuses to process (here a trigger) fails its batch; the
    batch is taken again row by row, the refused row is set aside `invalid` naming the refusal,
    and the rows before and after it are delivered. Before, the error killed the ingest loop."""
    await _refuse(
        world.engine, backend, table="mozrest_delivery", condition="NEW.booking_id = 'bk-poison'"
    )
    ids = await world.insert(state("bk-a"), state("bk-poison"), state("bk-b"))
    worker = await world.start()
    rows = await world.wait_outcome(*ids)
    assert [r.outcome for r in rows] == ["queued", "invalid", "queued"]
    assert rows[1].error.startswith("payload: the database refused this row")
    assert "bk-poison" not in rows[1].error
    await world.wait_delivery(ids[0], "delivered")
    await world.wait_delivery(ids[2], "delivered")
    assert worker.failure is None


async def test_an_answer_the_database_refuses_is_recorded_without_its_text(
    world: World, backend: str
) -> None:
    """An answer the database refuses to store (a trigger on its text) is recorded without
    that text, and the other answers of its batch are recorded as they came."""
    await _refuse(
        world.engine, backend, table="mozrest_attempt", condition="NEW.response_body = 'poison'"
    )
    world.mozrest.script["bk-poison"] = [answer(200, b"poison")]
    ids = await world.insert(state("bk-a"), state("bk-poison"), state("bk-b"))
    worker = await world.start()
    poisoned = await world.wait_delivery(ids[1], "delivered")
    await world.wait_delivery(ids[0], "delivered")
    await world.wait_delivery(ids[2], "delivered")
    (bare,) = await world.rows(attempt, attempt.c.delivery_id == poisoned.id)
    assert bare.status_code == 200 and bare.response_body is None
    assert "could not be stored" in bare.error
    assert worker.failure is None


# -- "sent once" and the held rules (SPEC 3.6, 9.5) ----------------------------------------------


async def test_a_claim_given_back_unsent_leaves_the_booking_as_if_never_claimed(
    world: World,
) -> None:
    """Seated is claimed, the claim is given back unsent (the circuit opened), then the booking
    is cancelled: Mozrest never saw the booking, so its cancellation is held, not sent."""
    store = world.store()
    (seated_id,) = await world.insert(state("bk-1"))
    await store.ingest(limit=10)
    (claim,) = await store.claim_due(worker_id="w1", limit=10, lease_seconds=30)
    (cancelled_id,) = await world.insert(state("bk-1", status="cancelled"))
    await store.ingest(limit=10)  # queued behind the claim, which may still be sent
    await store.release([claim])
    assert await store.claim_due(worker_id="w1", limit=10, lease_seconds=30) == []
    rows = await world.rows(outbox, outbox.c.id.in_([seated_id, cancelled_id]))
    assert [r.outcome for r in rows] == ["superseded", "held"]
    (snapshot,) = await world.rows(booking)
    assert snapshot.sent_outbox_id is None


async def test_a_released_claim_of_a_booking_already_sent_keeps_it_sent(world: World) -> None:
    """A booking sent before keeps its "sent once" mark when a later claim is given back, so its
    cancellation still goes."""
    store = world.store()
    await world.insert(state("bk-1"))
    await store.ingest(limit=10)
    (first,) = await store.claim_due(worker_id="w1", limit=10, lease_seconds=30)
    (moved_id,) = await world.insert(state("bk-1", tables=["T2"]))
    await store.ingest(limit=10)
    await store.release([first])  # never sent: the booking is unsent again
    (second,) = await store.claim_due(worker_id="w1", limit=10, lease_seconds=30)
    assert second.outbox_id == moved_id and second.previous_sent_outbox_id is None
    (snapshot,) = await world.rows(booking)
    assert snapshot.sent_outbox_id == moved_id


async def test_a_release_by_a_process_that_lost_its_lease_changes_nothing(world: World) -> None:
    """A frozen process thawed after its lease gives its claim back: the booking's new owner
    keeps its lease and the booking stays "sent once"."""
    store = world.store()
    await world.insert(state("bk-1"))
    await store.ingest(limit=10)
    (stale,) = await store.claim_due(worker_id="w1", limit=10, lease_seconds=0.2)
    await asyncio.sleep(0.3)
    (current,) = await store.claim_due(worker_id="w2", limit=10, lease_seconds=30)
    await store.release([stale])
    (row,) = await world.rows(delivery)
    assert row.lease_token == current.lease_token
    (snapshot,) = await world.rows(booking)
    assert snapshot.sent_outbox_id == current.outbox_id


@pytest.mark.parametrize("same_batch", [True, False], ids=["one-batch", "two-batches"])
async def test_a_booking_seated_and_finished_before_seated_left_is_sent_finished(
    world: World, same_batch: bool
) -> None:
    """Amended SPEC 3.6: seated, then finished while Mozrest had not yet been sent seated (down,
    or both in one batch): the booking reached a send status, so finished is sent."""
    store = world.store()
    (seated_id,) = await world.insert(state("bk-1"))
    if not same_batch:
        await store.ingest(limit=10)
    (finished_id,) = await world.insert(state("bk-1", status="finished"))
    await store.ingest(limit=10)
    rows = await world.rows(outbox, outbox.c.id.in_([seated_id, finished_id]))
    assert [r.outcome for r in rows] == ["superseded", "queued"]
    (claim,) = await store.claim_due(worker_id="w1", limit=10, lease_seconds=30)
    assert claim.payload["status"] == "finished"


async def test_a_cancellation_is_never_the_first_state_sent(world: World) -> None:
    """Seated then cancelled before seated left: nothing is sent (cancelled is held)."""
    store = world.store()
    await world.insert(state("bk-1"), state("bk-1", status="cancelled"))
    await store.ingest(limit=10)
    assert await store.claim_due(worker_id="w1", limit=10, lease_seconds=30) == []
    assert [r.outcome for r in await world.rows(outbox)] == ["superseded", "held"]


async def test_an_unknown_status_is_held_with_a_note_naming_the_known_ones(world: World) -> None:
    """A status spelled "Seated" is held, and its row's `error` says it is not one the relay
    knows, so an RMS developer sees why nothing is sent."""
    store = world.store()
    (row_id,) = await world.insert(state("bk-1", status="Seated"))
    await store.ingest(limit=10)
    (row,) = await world.rows(outbox, outbox.c.id == row_id)
    assert row.outcome == "held"
    assert row.error.startswith("status: 'Seated' is not a status the relay knows (")
    assert "seated" in row.error


# -- the lease at the moment of writing (SPEC 9.3) -----------------------------------------------


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
async def test_no_body_is_written_once_the_deadline_has_passed(
    mozrest: RawMozrest, transport: str
) -> None:
    """A request whose deadline has passed by the moment its body would be written writes no
    state: Mozrest receives nothing, and the answer says the lease ran out (a process frozen
    after its lease check and thawed too late must not send)."""
    publisher = make_publisher(
        url=mozrest.url + "/rms",
        token=TOKEN,
        timeout_seconds=2,
        concurrency=2,
        transport=transport,  # type: ignore[arg-type]
    )
    try:
        sent = await publisher.publish(b'{"bookingId":"fresh"}', deadline=lease_clock() + 2)
        late = await publisher.publish(b'{"bookingId":"late"}', deadline=lease_clock())
    finally:
        await publisher.aclose()
    assert sent.status_code == 200 and sent.written
    assert late.lease_expired and not late.written and late.status_code is None
    await asyncio.sleep(0.1)
    assert [b["bookingId"] for b in mozrest.received] == ["fresh"]


# -- the Partner API (SPEC 9.7) ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (b'{"venueId":"V","tables":[{"id":"T1","name":"One","area":5}],"count":1}', "area"),
        (b'{"venueId":"V","tables":[{"id":1,"name":"One","area":null}],"count":1}', ".id"),
        (b'{"venueId":"V","tables":"none"}', "`tables`"),
        (b"<html>maintenance</html>", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"venueId":"V","tables":[' + b'{"id":"T","name":"N"},' * 60000 + b"]}", "larger"),
    ],
    ids=["area-number", "id-number", "tables-string", "html", "array", "oversized"],
)
async def test_pos_tables_that_do_not_match_the_documentation_are_a_clear_error(
    mozrest: RawMozrest, body: bytes, what: str
) -> None:
    """A POS tables answer off Mozrest's documentation (wrong types, not JSON, oversized) is a
    `PartnerApiError` naming what is wrong (the API answers it 502), never a crash."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer(200, body, "Content-Type: application/json"))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    api = PartnerApi(base_url=f"http://127.0.0.1:{port}", api_key="key", timeout_seconds=5)
    try:
        with pytest.raises(PartnerApiError) as caught:
            await api.pos_tables("V")
    finally:
        await api.aclose()
        server.close()
        await server.wait_closed()
    assert what in str(caught.value)
