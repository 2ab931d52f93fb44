"""Named tokens and roles, the audit trail, erasure and payload retention, on each backend."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from app.db import metadata
from app.models import booking, delivery, outbox
from app.policy import Verdict
from app.store import AttemptResult
from tests import factories
from tests.integration.conftest import ADMIN_TOKEN, Api, running_api
from tests.integration.test_api import api_requests

VIEWER, OPERATOR = "viewer-token-1", "operator-token-1"
TOKENS = ",".join(
    f"{name}:{role}:{hashlib.sha256(token.encode()).hexdigest()}"
    for name, role, token in (("vera", "viewer", VIEWER), ("otto", "operator", OPERATOR))
)
GUEST = {
    "firstname": "Zebulon",
    "lastname": "Quixwell",
    "email": "zq.unique@example.org",
    "telephone": "+44700900123",
    "locale": "en",
}
DISTINCT = (
    "Zebulon",
    "Quixwell",
    "zq.unique@example.org",
    "+44700900123",
    "peanut-allergy-77",
    "extra-cheese-99",
)


@pytest.fixture
async def api(database_url: str) -> AsyncIterator[Api]:
    async with running_api(database_url) as running:
        yield running


def personal_state(booking_id: str, **changes: Any) -> dict[str, Any]:
    return factories.state(
        booking_id,
        venue_id="v1",
        contact=GUEST,
        notes="peanut-allergy-77",
        items=[{"sku": "PIZZA", "quantity": 1, "notes": "extra-cheese-99"}],
        **changes,
    )


def as_(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def audit_rows(api: Api, **params: Any) -> list[dict[str, Any]]:
    response = await api.client.get("/api/audit", params=params)
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


async def test_viewer_reads_but_may_not_change_and_the_refusal_is_audited(
    database_url: str,
) -> None:
    """A viewer's GET is 200; its POST is 403 naming `operator`, with a refused audit row;
    an operator's change is done and audited under its own name; the admin token is `admin`."""
    async with running_api(database_url, relay_api_tokens=TOKENS) as api:
        await api.write(factories.state("b1", venue_id="v1"))
        [delivery_id] = await api.answer(400)
        assert (await api.client.get("/api/deliveries", headers=as_(VIEWER))).status_code == 200
        refused = await api.client.post(f"/api/deliveries/{delivery_id}/retry", headers=as_(VIEWER))
        assert refused.status_code == 403
        assert "operator" in refused.json()["detail"]
        done = await api.client.post(f"/api/deliveries/{delivery_id}/retry", headers=as_(OPERATOR))
        assert done.status_code == 200, done.text
        conflict = await api.client.post(f"/api/deliveries/{delivery_id}/retry", headers=AUTH)
        assert conflict.status_code == 409
        rows = await audit_rows(api)
        assert [(r["actor"], r["action"], r["target"], r["result"]) for r in rows] == [
            ("admin", "delivery.retry", str(delivery_id), "refused"),
            ("otto", "delivery.retry", str(delivery_id), "ok"),
            ("vera", "delivery.retry", str(delivery_id), "refused"),
        ]
        assert rows[0]["detail"]["status"] == 409
        assert rows[2]["detail"]["status"] == 403
        assert all(VIEWER not in json.dumps(r) and OPERATOR not in json.dumps(r) for r in rows)


AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def test_audit_lists_filter_and_page(api: Api) -> None:
    """`/api/audit` filters by actor and action and pages newest first with its cursor."""
    await api.write(*(factories.state(f"b{i}", venue_id="v1") for i in range(3)))
    for delivery_id in await api.answer(503):
        assert (await api.client.post(f"/api/deliveries/{delivery_id}/cancel")).status_code == 200
    assert (
        await api.client.post("/api/deliveries/retry", json={"status": "dead"})
    ).status_code == 200
    first = (await api.client.get("/api/audit", params={"limit": 2})).json()
    second = (
        await api.client.get("/api/audit", params={"limit": 2, "cursor": first["next_cursor"]})
    ).json()
    ids = [r["id"] for r in first["items"] + second["items"]]
    assert ids == sorted(ids, reverse=True) and len(ids) == 4 and second["next_cursor"] is None
    bulk = await audit_rows(api, action="deliveries.retry_bulk")
    assert len(bulk) == 1 and bulk[0]["detail"] == {"requeued": 0}
    assert json.loads(bulk[0]["target"]) == {"status": "dead"}
    assert len(await audit_rows(api, actor="admin", action="delivery.cancel")) == 3
    assert await audit_rows(api, actor="nobody") == []


async def test_a_change_that_fails_leaves_no_ok_audit_row(api: Api) -> None:
    """The audit row commits with the change: a failure after the change rolls both back."""
    await api.write(factories.state("b1", venue_id="v1"))
    [delivery_id] = await api.answer(400)
    original = api.store.audit.change

    def failing(entry: Any) -> Any:
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def wrapped() -> Any:
            async with original(entry) as change:
                yield change
                raise RuntimeError("injected after the change")

        return wrapped()

    api.store.audit.change = failing  # type: ignore[method-assign]
    try:
        await api.store.requeue_delivery(
            delivery_id, audit=_entry("delivery.retry", str(delivery_id))
        )
    except RuntimeError:
        pass
    finally:
        api.store.audit.change = original  # type: ignore[method-assign]
    assert await audit_rows(api) == []
    [row] = await api.deliveries()
    assert row["status"] == "dead"


def _entry(action: str, target: str) -> Any:
    from app.store import AuditEntry

    return AuditEntry(actor="t", action=action, target=target)


async def _dump(api: Api) -> str:
    """Every column of every relay table, as text."""
    chunks = []
    async with api.store.engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in await conn.execute(select(table)):
                chunks.append(json.dumps([str(v) for v in row], ensure_ascii=False))
    return "\n".join(chunks)


async def test_erasure_removes_personal_data_everywhere_and_later_states_send_it_again(
    api: Api,
) -> None:
    """After erase no distinctive personal value is left in any column of any table; the
    deliveries stay listed; a later state with the same contact is sent with `contact` among
    its changed fields; an erase while a delivery is pending is a 409, audited."""
    await api.write(personal_state("b1"))
    await api.write(personal_state("b1", partySize=3))
    answered = await api.answer(200)
    # Mozrest's answer echoed the state.
    await api.write(personal_state("b1", partySize=4))
    claims = await api.store.claim_due(worker_id="t", limit=10, lease_seconds=30)
    pending = await api.client.post("/api/bookings/b1/erase")
    assert pending.status_code == 409, pending.text
    await api.store.record(
        [
            AttemptResult(
                claim=c,
                verdict=Verdict.DELIVERED,
                started_at=datetime.now(UTC),
                duration_ms=3,
                status_code=200,
                response_body=json.dumps({"echo": personal_state("b1")}),
            )
            for c in claims
        ],
        worker_id="t",
    )
    assert answered
    before = await _dump(api)
    assert all(value in before for value in DISTINCT)
    response = await api.client.post("/api/bookings/b1/erase")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["booking_id"] == "b1"
    assert body["erased"]["outbox_rows"] == 3 and body["erased"]["snapshots"] == 1
    assert body["erased"]["deliveries"] >= 2
    dump = await _dump(api)
    assert [value for value in DISTINCT if value in dump] == []
    assert {d["status"] for d in await api.deliveries(booking_id="b1")} == {
        "delivered",
        "superseded",
    }
    assert (await api.client.post("/api/bookings/nobody/erase")).status_code == 404
    await api.write(personal_state("b1", partySize=4))
    newest = (await api.deliveries(booking_id="b1"))[0]
    assert newest["status"] == "pending" and "contact" in newest["changed_fields"]
    assert "notes" in newest["changed_fields"]
    results = [(r["action"], r["target"], r["result"]) for r in await audit_rows(api)]
    assert results == [
        ("booking.erase", "nobody", "refused"),
        ("booking.erase", "b1", "ok"),
        ("booking.erase", "b1", "refused"),
    ]


async def test_payload_retention_strips_finished_bookings_and_keeps_active_ones(
    api: Api,
) -> None:
    """Past RELAY_PAYLOAD_RETENTION a finished booking's personal fields are gone from every
    table; an active booking keeps its own."""
    await api.write(personal_state("done"))
    await api.answer(200)
    await api.write(personal_state("busy"))
    async with api.store.engine.begin() as conn:
        await conn.execute(
            update(delivery).where(delivery.c.booking_id == "done").values(updated_at=_ago(10))
        )
        await conn.execute(update(outbox).values(processed_at=_ago(10)))
    removed = await api.store.prune(retention_seconds=30 * 86400, payload_retention_seconds=86400)
    assert removed["snapshots_scrubbed"] == 1
    async with api.store.engine.connect() as conn:
        snapshot = (
            await conn.execute(
                select(booking.c.accepted_payload).where(booking.c.booking_id == "done")
            )
        ).scalar_one()
        busy = (
            await conn.execute(select(delivery.c.payload).where(delivery.c.booking_id == "busy"))
        ).scalar_one()
    assert "contact" not in snapshot and "notes" not in snapshot
    assert busy["contact"] == GUEST
    again = await api.store.prune(retention_seconds=30 * 86400, payload_retention_seconds=86400)
    assert not again.get("snapshots_scrubbed")
    async with api.store.engine.connect() as conn:
        rows = (await conn.execute(select(outbox.c.booking_id, outbox.c.payload))).all()
    assert all("contact" not in payload for _, payload in rows)  # processed long ago, both


async def test_payload_retention_walks_in_batches_and_blanks_echoed_answers(api: Api) -> None:
    """Retention in batches smaller than the rows due resumes each walk at its mark, strips every
    finished booking (and blanks answers that echoed its state), and leaves an active one."""
    for name in ("r1", "r2", "r3"):
        await api.write(personal_state(name))
    claims = await api.store.claim_due(worker_id="t", limit=10, lease_seconds=30)
    await api.store.record(
        [
            AttemptResult(
                claim=c,
                verdict=Verdict.DELIVERED,
                started_at=datetime.now(UTC),
                duration_ms=3,
                status_code=200,
                response_body=json.dumps({"echo": personal_state("r1")}),
            )
            for c in claims
        ],
        worker_id="t",
    )
    busy_guest = {"firstname": "Busybee", "lastname": "Other", "email": "b@example.org"}
    await api.write(factories.state("busy", venue_id="v1", contact=busy_guest))
    async with api.store.engine.begin() as conn:
        for days, name in enumerate(("r1", "r2", "r3"), start=10):
            await conn.execute(
                update(delivery).where(delivery.c.booking_id == name).values(updated_at=_ago(days))
            )
        await conn.execute(update(outbox).values(processed_at=_ago(10)))
    for _ in range(10):
        removed = await api.store.prune(
            retention_seconds=30 * 86400, payload_retention_seconds=86400, batch_size=2
        )
        if not removed.get("walked"):
            break
    dump = await _dump(api)
    assert [value for value in DISTINCT if value in dump] == []
    assert "Busybee" in dump
    assert len(await api.deliveries()) == 4


def _ago(days: int) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


async def test_audit_rows_are_kept_their_own_retention(api: Api) -> None:
    """Audit rows older than RELAY_AUDIT_RETENTION are pruned; newer ones stay."""
    from app.models import audit

    await api.client.post("/api/bookings/nobody/erase")
    await api.client.post("/api/bookings/nobody2/erase")
    async with api.store.engine.begin() as conn:
        await conn.execute(update(audit).where(audit.c.target == "nobody").values(at=_ago(400)))
    removed = await api.store.prune(
        retention_seconds=7 * 86400, audit_retention_seconds=365 * 86400
    )
    assert removed["audit"] == 1
    assert [r["target"] for r in await audit_rows(api)] == ["nobody2"]


async def test_a_wrong_token_is_refused_on_the_new_routes(api: Api) -> None:
    """The audit list and erasure need a token like every other /api route."""
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=api.app), base_url="http://relay"
    ) as anonymous:
        assert (await anonymous.get("/api/audit", headers=as_("wrong"))).status_code == 401
        assert (await anonymous.post("/api/bookings/b1/erase")).status_code == 401


#: What each role gets from each `/api/` route: reads for everyone with a valid token, writes
#: for operators only (their codes on an empty database: no such delivery, booking or venue).
#: A new route without a row here fails `test_every_route_answers_each_role_as_the_table_says`.
ROUTE_CODES: dict[tuple[str, str], tuple[int, int]] = {
    # (method, path): (viewer, operator)
    ("GET", "/api/deliveries"): (200, 200),
    ("POST", "/api/deliveries/retry"): (403, 200),
    ("GET", "/api/deliveries/1"): (404, 404),
    ("POST", "/api/deliveries/1/retry"): (403, 404),
    ("POST", "/api/deliveries/1/cancel"): (403, 404),
    ("GET", "/api/bookings/b1"): (404, 404),
    ("POST", "/api/bookings/b1/erase"): (403, 404),
    ("GET", "/api/outbox"): (200, 200),
    ("GET", "/api/stats"): (200, 200),
    ("GET", "/api/workers"): (200, 200),
    ("GET", "/api/audit"): (200, 200),
    ("GET", "/api/venues"): (200, 200),
    ("GET", "/api/venues/v1"): (404, 404),
    ("POST", "/api/venues/v1/pause"): (403, 200),
    ("POST", "/api/venues/v1/resume"): (403, 200),
    ("PATCH", "/api/venues/v1"): (403, 422),
    ("POST", "/api/venues/v1/resync"): (403, 200),
    ("GET", "/api/venues/v1/pos-tables"): (502, 502),
    ("GET", "/api/venues/v1/table-matching"): (502, 502),
}


async def test_every_route_answers_each_role_as_the_table_says(database_url: str) -> None:
    """Every `/api/` route, called with a viewer's, an operator's, a wrong and no token: 401
    without a valid one, and each role's code as `ROUTE_CODES` says (a viewer's write is a
    403). A route the table does not know fails the test."""
    async with running_api(
        database_url,
        relay_api_tokens=TOKENS,
        mozrest_api_url="http://127.0.0.1:9",
    ) as api:
        routes = {
            (method, path)
            for method, path in api_requests(api.app)
            if path != "/api/no-such-route" and (method, path) != ("DELETE", "/api/deliveries/1")
        }
        assert routes == set(ROUTE_CODES), "a route has no row in ROUTE_CODES (or one is gone)"
        transport = httpx.ASGITransport(app=api.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://relay") as bare:
            await _check_codes(bare)


async def _check_codes(client: httpx.AsyncClient) -> None:
    for (method, path), (viewer_code, operator_code) in sorted(ROUTE_CODES.items()):
        body = {"status": "dead"} if path == "/api/deliveries/retry" else None
        for headers, expected in (
            ({}, 401),
            ({"Authorization": "Bearer wrong"}, 401),
            ({"Authorization": f"Bearer {VIEWER}"}, viewer_code),
            ({"Authorization": f"Bearer {OPERATOR}"}, operator_code),
        ):
            answer = await client.request(
                method, path, headers=headers, json=body if method != "GET" else None
            )
            shown = headers.get("Authorization", "no token")
            assert answer.status_code == expected, (method, path, shown, answer.text)


async def test_a_change_and_its_audit_row_commit_or_roll_back_together(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the change, while its `ok` audit row is written, rolls the change back
    too: the dead delivery stays dead and no audit row is left."""
    from app.store import audit as audit_module
    from app.store.audit import AuditEntry

    await api.write(factories.state("rb-1"))
    await api.answer(400)
    (dead,) = await api.deliveries(status="dead")

    async def failing(*args: Any, **kwargs: Any) -> int:
        raise RuntimeError("the audit write failed")

    monkeypatch.setattr(audit_module, "record_entry", failing)
    entry = AuditEntry(actor="otto", action="delivery.retry", target=str(dead["id"]))
    with pytest.raises(RuntimeError):
        await api.store.requeue_delivery(dead["id"], audit=entry)
    monkeypatch.undo()
    assert [d["status"] for d in await api.deliveries(booking_id="rb-1")] == ["dead"]
    assert await api.store.audit.list(limit=10) == []
