"""`make run`: the local Mozrest emulator and the relay on SQLite, pointed at each other.

Settings already in the environment or in `.env` are honoured (RELAY_ADMIN_TOKEN, RELAY_PORT,
DATABASE_URL, ...), except the Mozrest URLs: this command exists to talk to the emulator, which
listens on MOZREST_EMULATOR_PORT (default 8090). An admin token is generated only when none is
set. Both ports are checked before anything starts; the banner prints the `export` lines a second
terminal needs. Ctrl-C stops both processes cleanly.
"""

from __future__ import annotations

import errno
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parent.parent
RELAY = [sys.executable, "-m", "app"]
#: The relay's own default (app.settings, `./mozrest-relay.db`, and the relay runs in ROOT), made
#: absolute so the exported line works from any folder.
DEFAULT_DATABASE_URL = f"sqlite:///{ROOT}/mozrest-relay.db"


def _setting(name: str, default: str | None = None) -> str | None:
    """The environment wins over `.env`, as for the relay itself."""
    if name in os.environ:
        return os.environ[name]
    file_values = dotenv_values(ROOT / ".env") if (ROOT / ".env").exists() else {}
    value = file_values.get(name)
    return value if value is not None else default


def _safe_url(url: str) -> str:
    """A database URL with its password masked."""
    scheme, sep, rest = url.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not sep or not at or ":" not in credentials:
        return url
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{location}"


def _port_taken(host: str, port: int) -> bool:
    """Whether another process listens on host:port (bound as uvicorn binds, SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _died(name: str, process: subprocess.Popen[bytes]) -> str:
    """Which child died and why, in one line (its own error line is just above)."""
    code = process.returncode
    if code < 0:
        why = f"killed by signal {-code}"
    else:
        why = f"exited with status {code}; its error line is above"
    command = " ".join(str(arg) for arg in list(process.args)[len(RELAY) :])  # type: ignore[arg-type]
    return f"make run: the {name} (mozrest-relay {command}) {why}"


def _wait_http(
    url: str, name: str, process: subprocess.Popen[bytes], seconds: float = 30.0
) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(_died(name, process))
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
    # Another process on either port would answer the health checks below as if it were ours.
    for variable, host, port in (
        ("MOZREST_EMULATOR_PORT", "127.0.0.1", emulator_port),
        ("RELAY_PORT", relay_host, relay_port),
    ):
        if _port_taken(host, int(port)):
            sys.exit(
                f"make run: error: {variable}: {host}:{port} is already in use by another "
                f"process: stop it, or run e.g. `{variable}={int(port) + 1} make run`"
            )

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
    _wait_http(f"{emulator_url}/_emulator/stats", "emulator", emulator)
    relay = subprocess.Popen([*RELAY, "run"], env=env, cwd=ROOT)
    admin_url = f"http://{relay_host}:{relay_port}"
    _wait_http(f"{admin_url}/healthz", "relay", relay)

    token_note = "generated for this run" if generated else "from your settings"
    database = _setting("DATABASE_URL", DEFAULT_DATABASE_URL) or DEFAULT_DATABASE_URL
    second_terminal = {
        "DATABASE_URL": database,
        "MOZREST_WEBHOOK_URL": env["MOZREST_WEBHOOK_URL"],
        "MOZREST_WEBHOOK_TOKEN": webhook_token,
        "MOZREST_API_URL": emulator_url,
        "MOZREST_API_KEY": api_key,
        "RELAY_ADMIN_TOKEN": admin_token,
    }
    exports = "\n".join(
        f"  export {name}={shlex.quote(value)}" for name, value in second_terminal.items()
    )
    print(
        f"""
mozrest-relay is running against the local Mozrest emulator.

  admin API     {admin_url}/docs
  admin token   {admin_token}   ({token_note})
  database      {_safe_url(database)}
  emulator      {emulator_url}/  (what Mozrest received: {emulator_url}/_emulator/bookings)

In another terminal, first give it this run's settings (the relay's commands read them):

{exports}

then enqueue a sample booking, as the RMS would, and see what Mozrest received:

  .venv/bin/mozrest-relay enqueue examples/seated.json && curl -s {emulator_url}/_emulator/bookings
  curl -s -H "Authorization: Bearer $RELAY_ADMIN_TOKEN" {admin_url}/api/deliveries
  .venv/bin/mozrest-relay pos-tables 60e890aca5f07b6ee5b950b1
  .venv/bin/mozrest-relay doctor

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
        for name, process in (("relay", relay), ("emulator", emulator)):
            if process.poll() is not None:
                print(_died(name, process), file=sys.stderr, flush=True)
                exit_code = 1
                stopping = True
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
