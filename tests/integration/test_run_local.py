"""`make run` (scripts/run_local.py): taken ports are named before anything starts, the banner
gives a second terminal everything it needs, and a child that dies is named with why."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import PYTHON, ROOT, free_port

SCRIPT = ROOT / "scripts" / "run_local.py"


def _clean_env(**values: str) -> dict[str, str]:
    keep = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RELAY_", "MOZREST_", "DATABASE_URL"))
    }
    return {**keep, **values}


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("variable", ["RELAY_PORT", "MOZREST_EMULATOR_PORT"])
def test_a_taken_port_is_named_before_anything_starts(
    tmp_path: Path, taken_port: int, variable: str
) -> None:
    """Another process on either port: one line naming the variable, no "running" banner."""
    ports = {"RELAY_PORT": str(free_port()), "MOZREST_EMULATOR_PORT": str(free_port())}
    ports[variable] = str(taken_port)
    result = subprocess.run(
        [PYTHON, str(SCRIPT)],
        cwd=ROOT,
        env=_clean_env(DATABASE_URL=f"sqlite:///{tmp_path}/relay.db", **ports),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "Traceback" not in output
    assert f"{variable}: 127.0.0.1:{taken_port} is already in use" in output
    assert "is running" not in output
    assert not (tmp_path / "relay.db").exists(), "nothing started"


def test_banner_equips_a_second_terminal_and_a_dead_child_is_named(tmp_path: Path) -> None:
    """The banner names the database and prints export lines with which `pos-tables` works in a
    fresh shell; when the relay dies, make run says it was the relay and why."""
    log_path = tmp_path / "run.log"
    database = f"sqlite:///{tmp_path}/relay.db"
    env = _clean_env(
        DATABASE_URL=database,
        RELAY_PORT=str(free_port()),
        MOZREST_EMULATOR_PORT=str(free_port()),
    )
    with log_path.open("wb") as log:
        run = subprocess.Popen(
            [PYTHON, str(SCRIPT)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while "Press Ctrl-C" not in log_path.read_text() and time.monotonic() < deadline:
            assert run.poll() is None, log_path.read_text()
            time.sleep(0.1)
        banner = log_path.read_text()
        assert f"database      {database}" in banner
        exports = dict(re.findall(r"^  export (\w+)=(.+)$", banner, re.MULTILINE))
        assert {"RELAY_ADMIN_TOKEN", "MOZREST_API_KEY", "MOZREST_API_URL", "DATABASE_URL"} <= set(
            exports
        )
        second_terminal = _clean_env(**{k: shlex.split(v)[0] for k, v in exports.items()})
        tables = subprocess.run(
            [PYTHON, "-m", "app", "pos-tables", "60e890aca5f07b6ee5b950b1"],
            cwd=tmp_path,
            env=second_terminal,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert tables.returncode == 0, tables.stderr
        assert "POS tables" in tables.stdout

        admin = f"http://127.0.0.1:{env['RELAY_PORT']}"
        headers = {"Authorization": f"Bearer {second_terminal['RELAY_ADMIN_TOKEN']}"}
        workers: list[dict[str, int]] = []
        while not workers and time.monotonic() < deadline:
            workers = httpx.get(f"{admin}/api/workers", headers=headers).json()["items"]
            time.sleep(0.1)
        os.kill(workers[0]["pid"], signal.SIGKILL)
        assert run.wait(30) == 1
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGINT)
            run.wait(30)
    output = log_path.read_text()
    assert "make run: the relay (mozrest-relay run) killed by signal 9" in output, output
    assert "make run: stopped" in output
