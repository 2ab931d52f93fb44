"""The RMS-side helper `mozrest_outbox`: one outbox row inside the RMS's own transaction."""

from __future__ import annotations

import subprocess
import sys

import pytest
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import mozrest_outbox
from mozrest_outbox import enqueue, enqueue_async
from tests.conftest import PYTHON, ROOT

SEATED = {
    "bookingId": "bk-helper",
    "venueId": "v1",
    "partySize": 2,
    "status": "seated",
    "tables": ["T1"],
    "date": 1639578600,
    "notes": "Zoë 🎉",
}
SYNC_DRIVERS = {"sqlite": "sqlite", "postgresql": "postgresql+psycopg2", "mysql": "mysql+pymysql"}


def _sync_url(database_url: str) -> str:
    url = make_url(database_url)
    return url.set(drivername=SYNC_DRIVERS[url.get_backend_name()]).render_as_string(
        hide_password=False
    )


async def _rows(engine: AsyncEngine) -> list[tuple[str, str]]:
    async with engine.connect() as conn:
        result = await conn.execute(text("SELECT booking_id, venue_id FROM mozrest_outbox"))
        return [(row[0], row[1]) for row in result]


async def test_enqueue_commits_and_rolls_back_with_the_rms_transaction(
    database_url: str, engine: AsyncEngine
) -> None:
    """A synchronous Session's rolled-back transaction leaves no row; a committed one leaves
    exactly one, with the booking and venue columns taken from the payload."""
    sync_engine = create_engine(_sync_url(database_url))
    try:
        with Session(sync_engine) as session:
            with session.begin():
                enqueue(session, SEATED)
                session.rollback()
        assert await _rows(engine) == []
        with Session(sync_engine) as session, session.begin():
            enqueue(session, SEATED)
        assert await _rows(engine) == [("bk-helper", "v1")]
    finally:
        sync_engine.dispose()


async def test_enqueue_async_joins_an_async_session(engine: AsyncEngine) -> None:
    """`enqueue_async` writes through an AsyncSession and commits with it."""
    async with AsyncSession(engine) as session, session.begin():
        await enqueue_async(session, SEATED)
    assert await _rows(engine) == [("bk-helper", "v1")]


def test_enqueue_refuses_a_payload_without_its_ids() -> None:
    """A payload that is not a dict, or lacks bookingId or venueId, is refused before any SQL."""
    with pytest.raises(TypeError):
        enqueue(None, [SEATED])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bookingId"):
        enqueue(None, {**SEATED, "bookingId": ""})
    with pytest.raises(ValueError, match="venueId"):
        enqueue(None, {k: v for k, v in SEATED.items() if k != "venueId"})


async def _traceparents(engine: AsyncEngine) -> list[str | None]:
    async with engine.connect() as conn:
        result = await conn.execute(text("SELECT traceparent FROM mozrest_outbox ORDER BY id"))
        return [row[0] for row in result]


async def test_enqueue_inside_a_span_writes_its_trace_context(engine: AsyncEngine) -> None:
    """With OpenTelemetry in the RMS, a state enqueued inside a span carries that span's W3C
    `traceparent`; one enqueued outside any span carries none."""
    tracer = TracerProvider().get_tracer("rms")
    with tracer.start_as_current_span("PUT /reservations/42") as span:
        async with AsyncSession(engine) as session, session.begin():
            await enqueue_async(session, SEATED)
    async with AsyncSession(engine) as session, session.begin():
        await enqueue_async(session, SEATED)
    context = span.get_span_context()
    assert await _traceparents(engine) == [
        f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}",
        None,
    ]


async def test_enqueue_without_opentelemetry_writes_no_trace_context(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An RMS without OpenTelemetry (its import blocked here) enqueues as before: the
    column stays NULL, even inside what would have been a span."""
    monkeypatch.setitem(sys.modules, "opentelemetry", None)
    monkeypatch.setattr(mozrest_outbox, "_trace", None)  # forget an earlier import
    with TracerProvider().get_tracer("rms").start_as_current_span("PUT /reservations/42"):
        async with AsyncSession(engine) as session, session.begin():
            await enqueue_async(session, SEATED)
        assert mozrest_outbox.current_traceparent() is None
    assert await _traceparents(engine) == [None]


def test_the_helper_imports_sqlalchemy_only() -> None:
    """Importing and using the helper imports no OpenTelemetry until a statement is built,
    and needs none of the relay."""
    script = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None\n"
        "import mozrest_outbox\n"
        "statement = mozrest_outbox.outbox_insert("
        "{'bookingId': 'b', 'venueId': 'v', 'status': 'seated'})\n"
        "assert 'traceparent' not in statement.compile().params\n"
        "assert not [m for m in sys.modules if m == 'app' or m.startswith('app.')]\n"
        "print('ok')\n"
    )
    done = subprocess.run([PYTHON, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
