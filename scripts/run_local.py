"""`make run`: the local Mozrest emulator and the relay on SQLite, pointed at each other.

Settings already in the environment or in `.env` are honoured (RELAY_ADMIN_TOKEN, RELAY_PORT,
DATABASE_URL, ...), except the Mozrest URLs: this command exists to talk to the emulator. An admin
token is generated only when none is set. Ctrl-C stops both processes cleanly.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parent.parent
RELAY = [sys.executable, "-m", "app"]


def _setting(name: str, default: str | None = None) -> str | None:
    """The environment wins over `.env`, as for the relay itself."""
    if name in os.environ:
        return os.environ[name]
    file_values = dotenv_values(ROOT / ".env") if (ROOT / ".env").exists() else {}
    value = file_values.get(name)
    return value if value is not None else default


def _wait_http(url: str, process: subprocess.Popen[bytes], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"make run: {' '.join(process.args)} exited with {process.returncode}")  # type: ignore[arg-type]
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback only
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"make run: {url} did not answer within {seconds:g}s")


def main() -> int:
    emulator_port = _setting("MOZREST_EMULATOR_PORT", "8090") or "8090"
    webhook_token = _setting("MOZREST_WEBHOOK_TOKEN") or "local-webhook-token"
    api_key = _setting("MOZREST_API_KEY") or "local-api-key"
    admin_token = _setting("RELAY_ADMIN_TOKEN")
    generated = admin_token is None
    if admin_token is None:
        admin_token = secrets.token_urlsafe(24)
    relay_host = _setting("RELAY_HOST", "127.0.0.1") or "127.0.0.1"
    relay_port = _setting("RELAY_PORT", "8000") or "8000"
    emulator_url = f"http://127.0.0.1:{emulator_port}"

    env = {
        **os.environ,
        "MOZREST_WEBHOOK_URL": f"{emulator_url}/rms",
        "MOZREST_API_URL": emulator_url,
        "MOZREST_WEBHOOK_TOKEN": webhook_token,
        "MOZREST_API_KEY": api_key,
        "RELAY_ADMIN_TOKEN": admin_token,
        "RELAY_LOG_FORMAT": _setting("RELAY_LOG_FORMAT", "text") or "text",
    }
    migrate = subprocess.run([*RELAY, "migrate"], env=env, cwd=ROOT, check=False)
    if migrate.returncode != 0:
        return migrate.returncode

    emulator = subprocess.Popen(
        [
            *RELAY,
            "emulator",
            "--port",
            emulator_port,
            "--token",
            webhook_token,
            "--api-key",
            api_key,
        ],
        env=env,
        cwd=ROOT,
    )
    _wait_http(f"{emulator_url}/_emulator/stats", emulator)
    relay = subprocess.Popen([*RELAY, "run"], env=env, cwd=ROOT)
    admin_url = f"http://{relay_host}:{relay_port}"
    _wait_http(f"{admin_url}/healthz", relay)

    token_note = "generated for this run" if generated else "from your settings"
    print(
        f"""
mozrest-relay is running against the local Mozrest emulator.

  admin API     {admin_url}/docs
  admin token   {admin_token}   ({token_note})
  emulator      {emulator_url}/  (what Mozrest received: {emulator_url}/_emulator/bookings)

Enqueue a sample booking, as the RMS would, from another terminal:

  .venv/bin/mozrest-relay enqueue examples/seated.json && curl -s {emulator_url}/_emulator/bookings

Deliveries:  curl -s -H "Authorization: Bearer {admin_token}" {admin_url}/api/deliveries
Press Ctrl-C to stop both.
""",
        flush=True,
    )

    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    exit_code = 0
    while not stopping:
        if relay.poll() is not None or emulator.poll() is not None:
            exit_code = 1
            break
        time.sleep(0.2)
    for process in (relay, emulator):
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in (relay, emulator):
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
    print("make run: stopped", flush=True)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
