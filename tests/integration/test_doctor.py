"""`mozrest-relay doctor` against a healthy set-up (a real emulator and a real worker) and against
each broken one: one line per check, in order, and exit 0 only when the relay can deliver."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import PYTHON, ROOT, Launcher, Process, free_port

CHECKS = [
    "settings",
    "database",
    "schema",
    "clock",
    "webhook",
    "partner-api",
    "workers",
    "backlog",
]
TOKEN = "test-token"
API_KEY = "test-key"
LINE = re.compile(r"^(ok|warn|fail|skip) +(\S+) +(.+)$")


def doctor(
    *args: str, cwd: Path, **env: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, tuple[str, str]]]:
    """Run `mozrest-relay doctor ARGS` with only `env` as settings; answer the result and each
    check's (verdict, detail)."""
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RELAY_", "MOZREST_", "DATABASE_URL"))
    }
    result = subprocess.run(
        [PYTHON, "-m", "app", "doctor", *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    lines = result.stdout.strip().splitlines()
    parsed = [LINE.match(line) for line in lines[:-1]]
    assert all(parsed), result.stdout
    assert [m.group(2) for m in parsed if m] == CHECKS, result.stdout
    return result, {m.group(2): (m.group(1), m.group(3)) for m in parsed if m}


def relay_env(database_url: str, emulator: Process, **extra: str) -> dict[str, str]:
    assert emulator.url is not None
    return {
        "DATABASE_URL": database_url,
        "MOZREST_WEBHOOK_URL": f"{emulator.url}/rms",
        "MOZREST_API_URL": emulator.url,
        "MOZREST_WEBHOOK_TOKEN": TOKEN,
        "MOZREST_API_KEY": API_KEY,
        "RELAY_HEARTBEAT_INTERVAL": "1s",
        "RELAY_POLL_INTERVAL": "50ms",
        **extra,
    }


def start_worker(launcher: Launcher, env: dict[str, str]) -> Process:
    """A real worker, once it has checked in (it logs `worker.started` after registering)."""
    worker = launcher.start("worker", env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        assert worker.popen.poll() is None, worker.output()
        if "worker.started" in worker.output():
            return worker
        time.sleep(0.05)
    raise AssertionError(f"the worker never checked in:\n{worker.output()}")


def test_healthy_set_up_is_all_ok_and_exits_zero(
    database_url: str, launcher: Launcher, tmp_path: Path
) -> None:
    """A migrated database, the emulator and a live worker: every check ok, exit 0; the Partner
    API key is checked with --venue and skipped without it; no secret is printed."""
    emulator = launcher.emulator(token=TOKEN, api_key=API_KEY)
    env = relay_env(database_url, emulator)
    start_worker(launcher, env)
    result, checks = doctor("--venue", "v1", cwd=tmp_path, **env)
    assert result.returncode == 0, result.stdout
    assert {verdict for verdict, _ in checks.values()} == {"ok"}, result.stdout
    assert "4 POS tables" in checks["partner-api"][1]
    assert "sends no booking" in checks["webhook"][1]
    assert "only a delivery tells" in checks["webhook"][1]
    assert result.stdout.strip().endswith("ready to deliver")
    assert TOKEN not in result.stdout + result.stderr
    assert API_KEY not in result.stdout + result.stderr
    assert _emulator_received(emulator) == 0, "doctor never sends a booking"

    without_venue, checks = doctor(cwd=tmp_path, **env)
    assert without_venue.returncode == 0
    assert checks["partner-api"][0] == "skip" and "--venue" in checks["partner-api"][1]

    wrong_key, checks = doctor("--venue", "v1", cwd=tmp_path, **{**env, "MOZREST_API_KEY": "no"})
    assert wrong_key.returncode == 0, "POS tables are not needed to deliver"
    assert checks["partner-api"][0] == "warn"
    assert "MOZREST_API_KEY" in checks["partner-api"][1]


def _emulator_received(emulator: Process) -> int:
    import httpx

    stats = httpx.get(f"{emulator.url}/_emulator/stats").json()
    return int(stats["received"])


def test_settings_that_do_not_parse_fail_first_and_skip_the_rest(tmp_path: Path) -> None:
    """A bad setting is the first line, naming the variable; every other check is skipped."""
    result, checks = doctor(cwd=tmp_path, RELAY_POLL_INTERVAL="soon")
    assert result.returncode == 1
    assert checks["settings"][0] == "fail" and "RELAY_POLL_INTERVAL" in checks["settings"][1]
    assert {checks[name][0] for name in CHECKS[1:]} == {"skip"}
    assert "fix the first fail line (settings)" in result.stdout


def test_unreachable_database_fails_and_skips_what_needs_it(tmp_path: Path) -> None:
    """A closed port: database fails naming DATABASE_URL; schema, clock, workers, backlog skip."""
    url = f"postgresql://relay@127.0.0.1:{free_port()}/relay"
    result, checks = doctor(
        cwd=tmp_path, DATABASE_URL=url, MOZREST_WEBHOOK_URL="http://127.0.0.1:9/rms"
    )
    assert result.returncode == 1
    assert checks["database"][0] == "fail"
    assert "Connection refused" in checks["database"][1]
    assert "DATABASE_URL" in checks["database"][1]
    for name in ("schema", "clock", "workers", "backlog"):
        assert checks[name][0] == "skip", name


def test_unmigrated_database_fails_the_schema_naming_migrate(
    launcher: Launcher, tmp_path: Path
) -> None:
    """A database never migrated: the schema line says to run mozrest-relay migrate."""
    emulator = launcher.emulator(token=TOKEN, api_key=API_KEY)
    env = relay_env(f"sqlite:///{tmp_path}/never-migrated.db", emulator)
    result, checks = doctor(cwd=tmp_path, **env)
    assert result.returncode == 1
    assert checks["database"][0] == "ok"
    assert checks["schema"] == ("fail", "not migrated: run mozrest-relay migrate")
    assert checks["workers"][0] == "skip"


def test_webhook_that_does_not_answer_fails(database_url: str, tmp_path: Path) -> None:
    """Nobody listens at MOZREST_WEBHOOK_URL: the webhook line fails naming it."""
    url = f"http://127.0.0.1:{free_port()}/rms"
    result, checks = doctor(cwd=tmp_path, DATABASE_URL=database_url, MOZREST_WEBHOOK_URL=url)
    assert result.returncode == 1
    assert checks["webhook"][0] == "fail"
    assert url in checks["webhook"][1] and "MOZREST_WEBHOOK_URL" in checks["webhook"][1]


def test_webhook_host_that_does_not_resolve_fails(database_url: str, tmp_path: Path) -> None:
    """A webhook host name that does not resolve says so."""
    env = {
        "DATABASE_URL": database_url,
        "MOZREST_WEBHOOK_URL": "https://no-such-host.invalid/rms",
        "MOZREST_WEBHOOK_TOKEN": TOKEN,
    }
    result, checks = doctor(cwd=tmp_path, **env)
    assert result.returncode == 1
    assert checks["webhook"][0] == "fail" and "cannot resolve" in checks["webhook"][1]


def test_no_live_worker_fails(database_url: str, launcher: Launcher, tmp_path: Path) -> None:
    """Everything answers but no worker runs: the workers line fails, saying what to start."""
    emulator = launcher.emulator(token=TOKEN, api_key=API_KEY)
    result, checks = doctor(cwd=tmp_path, **relay_env(database_url, emulator))
    assert result.returncode == 1
    assert checks["workers"][0] == "fail"
    assert "mozrest-relay run" in checks["workers"][1]
    assert {checks[name][0] for name in CHECKS if name != "workers"} <= {"ok", "skip"}


def test_rejected_webhook_token_fails(launcher: Launcher, tmp_path: Path) -> None:
    """Once a worker's delivery got a 401, the webhook line fails naming MOZREST_WEBHOOK_TOKEN."""
    database = f"sqlite:///{tmp_path}/relay.db"
    emulator = launcher.emulator(token=TOKEN, api_key=API_KEY)
    env = relay_env(database, emulator, MOZREST_WEBHOOK_TOKEN="wrong-token")
    migrate = subprocess.run(
        [PYTHON, "-m", "app", "migrate"],
        cwd=tmp_path,
        env={**os.environ, "DATABASE_URL": database},
        capture_output=True,
        check=False,
    )
    assert migrate.returncode == 0
    start_worker(launcher, env)
    example = json.loads((ROOT / "examples" / "seated.json").read_text())
    enqueue = subprocess.run(
        [PYTHON, "-m", "app", "enqueue", "-"],
        cwd=tmp_path,
        env={**os.environ, "DATABASE_URL": database},
        input=json.dumps(example),
        capture_output=True,
        text=True,
        check=False,
    )
    assert enqueue.returncode == 0, enqueue.stderr
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        result, checks = doctor(cwd=tmp_path, **env)
        if checks["webhook"][0] == "fail":
            break
        time.sleep(0.3)
    assert result.returncode == 1, result.stdout
    assert checks["webhook"][0] == "fail"
    assert "MOZREST_WEBHOOK_TOKEN" in checks["webhook"][1]
    assert "wrong-token" not in result.stdout


@pytest.mark.parametrize("statuses", ["Seated"])
def test_send_status_the_relay_does_not_know_warns(
    database_url: str, tmp_path: Path, statuses: str
) -> None:
    """RELAY_SEND_STATUSES=Seated would hold every booking: a warning names it."""
    _, checks = doctor(
        cwd=tmp_path,
        DATABASE_URL=database_url,
        MOZREST_WEBHOOK_URL="http://127.0.0.1:9/rms",
        RELAY_SEND_STATUSES=statuses,
    )
    assert checks["settings"][0] == "warn"
    assert "Seated" in checks["settings"][1] and "RELAY_SEND_STATUSES" in checks["settings"][1]
