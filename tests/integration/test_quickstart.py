"""The README's quickstart on a fresh clone: `make run`, then a booking reaches Mozrest."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.slow


def _clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RELAY_", "MOZREST_", "DATABASE_URL", "VIRTUAL_ENV"))
    }


def test_make_run_on_a_fresh_clone_delivers_an_enqueued_booking(tmp_path: Path) -> None:
    """`make run` installs, starts the emulator and the relay, prints a token, and a booking
    enqueued as the README shows reaches the emulator within a second; Ctrl-C stops both."""
    if shutil.which("make") is None or shutil.which("git") is None:
        pytest.skip("make and git are needed")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    relay_port, emulator_port = free_port(), free_port()
    env = {
        **_clean_env(),
        "RELAY_PORT": str(relay_port),
        "MOZREST_EMULATOR_PORT": str(emulator_port),
        # Reuse this machine's wheels: the test is about the commands, not the network.
        "PIP_FIND_LINKS": os.environ.get("PIP_FIND_LINKS", ""),
    }
    log_path = tmp_path / "make-run.log"
    with log_path.open("wb") as log:
        make = subprocess.Popen(
            ["make", "run"],
            cwd=clone,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 300
        token = None
        while time.monotonic() < deadline and token is None:
            assert make.poll() is None, log_path.read_text()
            match = re.search(r"admin token\s+(\S+)", log_path.read_text())
            token = match.group(1) if match else None
            time.sleep(0.2)
        assert token, f"no admin token printed:\n{log_path.read_text()}"

        enqueue = subprocess.run(
            [str(clone / ".venv/bin/mozrest-relay"), "enqueue", "examples/seated.json"],
            cwd=clone,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert enqueue.returncode == 0, enqueue.stderr
        enqueued_at = time.monotonic()
        emulator = f"http://127.0.0.1:{emulator_port}"
        booking = None
        while time.monotonic() - enqueued_at < 5 and booking is None:
            answer = httpx.get(f"{emulator}/_emulator/bookings/60e890aca5f07b6ee5b950b1")
            booking = answer.json() if answer.status_code == 200 else None
            time.sleep(0.02)
        arrived_after = time.monotonic() - enqueued_at
        assert booking is not None, log_path.read_text()
        assert booking["state"]["status"] == "seated"
        assert arrived_after < 1.0, f"took {arrived_after:.2f}s"

        stats = httpx.get(
            f"http://127.0.0.1:{relay_port}/api/stats",
            headers={"Authorization": f"Bearer {token}"},
        )
        assert stats.status_code == 200
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground group
        exit_code = make.wait(60)
    output = log_path.read_text()
    assert "make run: stopped" in output, output
    # make itself dies of the interrupt (-2) or reports it (2) once its child has stopped cleanly.
    assert exit_code in (0, 2, -2), output
