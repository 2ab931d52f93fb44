"""Hostile answers and hostile rows (SPEC 9.1, 9.2, 9.6): hypothesis profiles, and one relay
process per backend and module, pointed at the hostile stand-in.

Profiles (`HYPOTHESIS_PROFILE`): `default`, a few examples for `make test`, derandomized so CI
runs the same ones every time; `full`, many random examples, shrunk on failure, with the seed
printed (`make hostile`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.conftest import BACKENDS, Launcher
from tests.hostile.answers import HostileMozrest
from tests.hostile.relay import Databases, Relay

settings.register_profile(
    "default",
    max_examples=6,
    deadline=None,
    derandomize=True,
    database=None,
    # A failing example costs a settle timeout; CI reports the drawn example as it is.
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "full",
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "75")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "default")
settings.load_profile(PROFILE)
#: The per-test timeout of a hypothesis test, for the profile this run uses.
PROPERTY_TIMEOUT = 240 if PROFILE == "default" else 3600


@pytest.fixture(scope="module")
def mozrest() -> Iterator[HostileMozrest]:
    stand_in = HostileMozrest().start()
    try:
        yield stand_in
    finally:
        stand_in.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def relay(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    sqlite_template: Path,
    mozrest: HostileMozrest,
) -> Iterator[Relay]:
    """A `mozrest-relay run` process on a fresh database of one backend, for a whole module."""
    backend = str(request.param)
    postgres = request.getfixturevalue("postgres") if backend == "postgresql" else None
    mysql = request.getfixturevalue("mysql") if backend == "mysql" else None
    if backend == "postgresql" and postgres is None:
        pytest.skip("PostgreSQL is not available (set TEST_DATABASE_URL)")
    if backend == "mysql" and mysql is None:
        pytest.skip("MariaDB tests are off (set TEST_MYSQL=1)")
    folder = tmp_path_factory.mktemp(f"hostile-{backend}")
    databases = Databases(
        backend, folder=folder, sqlite_template=sqlite_template, postgres=postgres, mysql=mysql
    )
    launcher = Launcher(folder)
    relay = Relay(databases, launcher, mozrest)
    relay.start()
    try:
        yield relay
    finally:
        relay.stop()
        launcher.stop_all()
