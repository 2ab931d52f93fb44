"""The admin API under bad requests: 4xx, never an undocumented 5xx (SPEC section 6).

The documented 5xx are 502 from the routes that read Mozrest's POS tables when Mozrest fails and
503 from `/readyz` (and from `/api/*` with no admin token, which is not the case here: the token is
set and sent). A real `mozrest-relay api` process serves a database with a few deliveries in it;
schemathesis fuzzes every operation of its live OpenAPI schema, valid and invalid inputs alike,
and a handful of hand-written requests cover what a schema cannot describe.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chaos.harness import (
    ADMIN_TOKEN,
    Rms,
    relay_env,
    start_emulator,
    start_worker,
    wait_settled,
)
from tests.conftest import Launcher, PostgresDatabases, free_port

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
#: Examples per operation and generation mode: ~15 operations x 2 modes stay well under 60 s.
MAX_EXAMPLES = 40


@dataclass
class Api:
    base_url: str
    booking_ids: list[str]


def seated(booking_id: str, **changes: Any) -> dict[str, Any]:
    return {
        "bookingId": booking_id,
        "venueId": "venue-1",
        "partySize": 2,
        "status": "seated",
        "tables": ["T1"],
        "date": 1790000000,
        **changes,
    }


@contextmanager
def api_server(database_url: str, tmp_path: Path) -> Iterator[Api]:
    """An API process over a database holding delivered, dead and invalid rows."""
    launcher = Launcher(tmp_path)
    rms = Rms(database_url)
    try:
        _, receiver = start_emulator(launcher)
        env = relay_env(database_url, receiver.url, admin_token=ADMIN_TOKEN)
        receiver.set_faults(fail_next=1, fail_next_status=400)  # the first delivery is dead
        worker = start_worker(launcher, env)
        for index in range(6):
            rms.write(seated(f"api-{index}", partySize=index + 1))
        rms.write_text("api-bad", "venue-1", '{"bookingId": "api-bad"}')
        wait_settled(rms, timeout=30, what="the seed rows to be delivered")
        worker.terminate()
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        launcher.start("api", env={**env, "RELAY_PORT": str(port)}, wait_url=f"{base_url}/healthz")
        yield Api(base_url, [f"api-{index}" for index in range(6)])
    finally:
        rms.close()
        launcher.stop_all()


@pytest.fixture(scope="module")
def postgresql_api(
    postgres: PostgresDatabases | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Api]:
    if postgres is None:
        pytest.skip("PostgreSQL is not available (set TEST_DATABASE_URL)")
    name = postgres.create()
    try:
        with api_server(postgres.url(name), tmp_path_factory.mktemp("api-pg")) as api:
            yield api
    finally:
        postgres.drop(name)


@pytest.fixture(scope="module")
def sqlite_api(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    folder = tmp_path_factory.mktemp("api-sqlite")
    (folder / "relay.db").write_bytes(sqlite_template.read_bytes())
    with api_server(f"sqlite+aiosqlite:///{folder / 'relay.db'}", folder) as api:
        yield api


def undocumented_5xx(method: str, path: str, status: int, declared: set[str]) -> bool:
    if status < 500:
        return False
    if status == 503 and path == "/readyz":
        return False
    return not (status == 502 and "502" in declared)


def test_fuzzing_the_live_schema_finds_no_undocumented_5xx(postgresql_api: Api) -> None:
    """Every operation, fed schema-valid and schema-invalid input, answers without an
    undocumented 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    api = postgresql_api
    schema = schemathesis.openapi.from_url(f"{api.base_url}/openapi.json", timeout=10)
    failures: list[str] = []
    answers: Counter[int] = Counter()
    started = time.monotonic()
    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # our own schema loads whole
        declared = {str(code) for code in operation.definition.raw.get("responses", {})}
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def exercise(case: Any) -> None:
                response = case.call(base_url=api.base_url, headers=AUTH, timeout=15)
                answers[response.status_code] += 1
                method, path = case.operation.method.upper(), case.operation.path
                if undocumented_5xx(method, path, response.status_code, declared):  # noqa: B023
                    failures.append(
                        f"{response.status_code} {method} {case.formatted_path} "
                        f"query={case.query!r} body={case.body!r:.200}: {response.text[:300]}"
                    )

            try:
                exercise()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # nothing to get wrong: no parameters
    elapsed = time.monotonic() - started
    summary = ", ".join(f"{code}: {n}" for code, n in sorted(answers.items()))
    print(f"\nschemathesis: {answers.total()} requests in {elapsed:.1f} s ({summary})")
    assert answers.total() > 0
    assert not failures, "\n".join(failures[:20])


BAD_REQUESTS = [
    ("GET", "/api/deliveries?limit=abc", None),
    ("GET", "/api/deliveries?limit=0", None),
    ("GET", "/api/deliveries?limit=501", None),
    ("GET", "/api/deliveries?limit=" + "9" * 40, None),
    ("GET", "/api/deliveries?status=exploded", None),
    ("GET", "/api/deliveries?cursor=not-a-cursor", None),
    ("GET", "/api/deliveries?cursor=ZGVsaXZlcnk6OTk5OTk5OTk5OTk5OTk5OTk5OTk5", None),
    ("GET", "/api/deliveries?cursor=%00%ff", None),
    ("GET", "/api/deliveries?booking_id=%00", None),
    ("GET", "/api/deliveries?venue_id=" + "v" * 65, None),
    ("GET", "/api/deliveries/abc", None),
    ("GET", "/api/deliveries/0", None),
    ("GET", "/api/deliveries/-1", None),
    ("GET", "/api/deliveries/99999999999999999999999999", None),
    ("GET", "/api/deliveries/9223372036854775808", None),
    ("POST", "/api/deliveries/9223372036854775807/retry", None),
    ("POST", "/api/deliveries/1/cancel", None),
    ("GET", "/api/bookings/%00", None),
    ("GET", "/api/bookings/%ff%fe", None),
    ("GET", "/api/bookings/" + "b" * 65, None),
    ("GET", "/api/bookings/" + "%F0%9F%8D%95" * 64, None),
    ("GET", "/api/outbox?outcome=lost", None),
    ("GET", "/api/outbox?outcome=unprocessed&limit=-5", None),
    ("GET", "/api/venues/..%2F..%2Fadmin/pos-tables", None),
    ("GET", "/api/venues/%00/pos-tables", None),
    ("POST", "/api/deliveries/retry", b"{not json"),
    ("POST", "/api/deliveries/retry", b'{"status": "delivered"}'),
    ("POST", "/api/deliveries/retry", b'{"status": "dead", "since": "yesterday"}'),
    ("POST", "/api/deliveries/retry", b'{"status": "dead", "since": "99999-01-01T00:00:00Z"}'),
    ("POST", "/api/deliveries/retry", b'{"status": "dead", "venue_id": "\\u0000"}'),
    ("POST", "/api/deliveries/retry", b'["dead"]'),
    ("POST", "/api/deliveries/retry", b'{"status": "dead", "x": ' + b"[" * 5000 + b"]" * 5000),
    ("POST", "/api/deliveries/retry", b'{"status": "dead", "pad": "' + b"x" * 2_000_000 + b'"}'),
    ("DELETE", "/api/stats", None),
    ("PUT", "/api/deliveries/1", b"{}"),
    ("PATCH", "/api/deliveries/retry", b"{}"),
    ("POST", "/healthz", None),
    ("POST", "/readyz", None),
    ("DELETE", "/metrics", None),
    ("GET", "/api/nothing-here", None),
]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_hand_written_bad_requests_get_4xx(backend: str, request: pytest.FixtureRequest) -> None:
    """Bad parameters, ids beyond bigint, NUL and broken UTF-8, huge and malformed bodies, and
    wrong methods: every answer is a 4xx with a JSON `detail`."""
    api: Api = request.getfixturevalue(f"{backend}_api")
    wrong = []
    with httpx.Client(base_url=api.base_url, headers=AUTH, timeout=30) as client:
        for method, path, body in BAD_REQUESTS:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            response = client.request(method, path, content=body, headers=headers)
            if not 400 <= response.status_code < 500:
                wrong.append(f"{response.status_code} {method} {path[:80]}: {response.text[:200]}")
            elif "detail" not in response.json():
                wrong.append(f"{response.status_code} {method} {path[:80]} has no detail")
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eA=="}):
            response = client.get("/api/stats", headers={"Authorization": "", **headers})
            if response.status_code != 401:
                wrong.append(f"{response.status_code} GET /api/stats with {headers}")
    assert not wrong, "\n".join(wrong)


def test_the_api_without_an_admin_token_answers_503_on_api_routes_only(
    launcher: Launcher, tmp_path: Path
) -> None:
    """No RELAY_ADMIN_TOKEN: /api/* is shut with 503 (documented), health stays open."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {"DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'none.db'}", "RELAY_PORT": str(port)}
    launcher.start("api", env=env, wait_url=f"{base_url}/healthz")
    assert httpx.get(f"{base_url}/healthz").status_code == 200
    answer = httpx.get(f"{base_url}/api/stats", headers=AUTH)
    assert answer.status_code == 503
    assert answer.json() == {"detail": "RELAY_ADMIN_TOKEN is not set"}
