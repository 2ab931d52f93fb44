"""Shared plumbing of the benchmarks: databases, processes, payloads, CPU accounting, stats.

Every database a benchmark makes is called `mozrest_bench_*` and is dropped when it ends; no other
database is touched. Every process it starts is stopped by its own pid. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
RELAY = str(Path(PYTHON).with_name("mozrest-relay"))
PG_HOST = os.environ.get("BENCH_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("BENCH_PG_PORT", "5432"))
PG_USER = os.environ.get("BENCH_PG_USER", "postgres")
MARIADB_HOST = os.environ.get("BENCH_MARIADB_HOST", "127.0.0.1")
MARIADB_PORT = int(os.environ.get("BENCH_MARIADB_PORT", "3306"))
#: Every database a benchmark creates starts with this, and only those are ever dropped.
DB_PREFIX = "mozrest_bench_"
#: The token the relay sends; the receiver is on loopback and does not check it.
WEBHOOK_TOKEN = "bench-token"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- numbers ------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


def median(values: Iterable[float]) -> float | None:
    return percentile(list(values), 50.0)


# -- the machine ---------------------------------------------------------------------------------


def machine_summary() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    load = load_average()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=ROOT,
        ).stdout.strip()
        # Other engineers change app/ while benchmarks run: say what the relay's code was.
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "app", "migrations"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=ROOT,
        ).stdout.strip()
        if dirty:
            commit += " + uncommitted changes in app/ or migrations/"
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average_at_start": load,
        "commit": commit,
    }


# -- payloads -----------------------------------------------------------------------------------

FIRST_NAMES = ("John", "Maria", "Wei", "Aisha", "Lucas", "Sofía", "Hiroshi", "Emma", "Omar", "Zoé")
LAST_NAMES = ("Doe", "García", "Chen", "Khan", "Müller", "Rossi", "Tanaka", "Smith", "Haddad")
NOTES = (
    "I am allergic to peanuts",
    "Window table if possible",
    "Birthday: bring a candle with dessert",
    "High chair needed",
    "",
)


def booking_id(tag: int, i: int) -> str:
    """A 24-hex-character id like Mozrest's example, unique per (tag, i)."""
    return f"{tag & 0xFFFFFFFF:08x}{i:016x}"


def venue_id(v: int) -> str:
    return f"60e890aca5f0{v:012x}"


def seated_payload(
    tag: int, i: int, *, venues: int = 200, rng: random.Random | None = None
) -> dict:
    """A seated booking shaped like Mozrest's documented example."""
    rng = rng or random.Random(i * 7919 + tag)
    first = rng.choice(FIRST_NAMES)
    last = rng.choice(LAST_NAMES)
    payload: dict[str, Any] = {
        "bookingId": booking_id(tag, i),
        "venueId": venue_id(rng.randrange(venues)),
        "partySize": rng.randint(1, 8),
        "status": "seated",
        "tables": [f"28c3ce8b-8c10-4a64-8099-{rng.randrange(16**12):012x}"],
        "date": 1_764_000_000 + rng.randrange(0, 90 * 86400, 900),
        "prepayment": rng.choice((0, 20.0, 50.0, 50.5)),
        "contact": {
            "firstname": first,
            "lastname": last,
            "email": f"{first.lower()}.{last.lower()}{i % 1000}@mail.com",
            "telephone": f"346{rng.randrange(10**8):08d}",
            "locale": rng.choice(("en", "es", "fr", "de")),
        },
        "notes": rng.choice(NOTES),
    }
    if not payload["notes"]:
        del payload["notes"]
    if rng.random() < 0.2:
        payload["items"] = [
            {"sku": f"SKU-{rng.randrange(500):03d}", "quantity": rng.randint(1, 4)}
            for _ in range(rng.randint(1, 3))
        ]
    return payload


def change(payload: dict, step: int, rng: random.Random) -> dict:
    """The next full state of a booking: a table move, a party size change, new notes or items."""
    new = json.loads(json.dumps(payload))
    kind = step % 4
    if kind == 0:
        new["tables"] = [f"28c3ce8b-8c10-4a64-8099-{rng.randrange(16**12):012x}"]
    elif kind == 1:
        new["partySize"] = 1 + (new["partySize"] + step) % 12
    elif kind == 2:
        new["notes"] = f"change {step}: {rng.choice(NOTES) or 'no notes'}"
    else:
        new["items"] = [{"sku": f"SKU-{rng.randrange(500):03d}", "quantity": 1 + step % 5}]
    return new


def dumps(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


# -- ports and processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """The environment without any relay setting a developer may have exported."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RELAY_", "MOZREST_")) and k != "DATABASE_URL"
    }


@dataclass
class Proc:
    """A child process we started; stopped by its own pid only."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def vm_hwm_kb(self) -> int | None:
        """Peak resident set size so far (VmHWM), in KiB."""
        try:
            with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"{self.name} (pid {self.pid}) ignored SIGTERM for {timeout:g}s: killing it")
                self.popen.kill()
                self.popen.wait(timeout=10)
        return self.popen.returncode

    def tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def spawn(name: str, argv: list[str], *, env: dict[str, str] | None = None, workdir: Path) -> Proc:
    log_path = workdir / f"{name}.log"
    out = open(log_path, "wb")  # the child inherits it; ours is closed below
    try:
        popen = subprocess.Popen(
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env if env is not None else _clean_env(),
            cwd=workdir,  # never read a developer's .env
        )
    finally:
        out.close()
    return Proc(name=name, popen=popen, log_path=log_path)


class Workdir:
    """A temporary folder for logs, dumps and SQLite files; removed at the end."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="mozrest-bench-"))

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


# -- the receiver -------------------------------------------------------------------------------


def _read_and_remove(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
        return data
    finally:
        path.unlink(missing_ok=True)


def load_average() -> list[str]:
    with open("/proc/loadavg", encoding="ascii") as f:
        return f.read().split()[:3]


class Receiver:
    """The fast webhook stand-in (`bench/receiver.py`) in its own process."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: Proc | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/rms"

    async def start(self) -> None:
        self.proc = spawn(
            "receiver",
            [PYTHON, "-m", "bench.receiver", "--port", str(self.port)],
            env={**_clean_env(), "PYTHONPATH": str(ROOT)},
            workdir=self.workdir,
        )
        self._session = self._session or aiohttp.ClientSession()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                await self.stats()
                return
            if not self.proc.alive():
                break
            await asyncio.sleep(0.05)
        raise RuntimeError(f"receiver did not start:\n{self.proc.tail()}")

    async def _call(self, method: str, path: str) -> dict[str, Any]:
        assert self._session is not None
        async with self._session.request(
            method, f"http://127.0.0.1:{self.port}{path}", timeout=aiohttp.ClientTimeout(total=60)
        ) as response:
            response.raise_for_status()
            data: dict[str, Any] = await response.json()
            return data

    async def stats(self) -> dict[str, Any]:
        return await self._call("GET", "/_stats")

    async def reset(self) -> None:
        await self._call("POST", "/_reset")

    async def dump(self, *, arrivals: bool = False) -> dict[str, Any]:
        """Per booking what arrived; with `arrivals`, also every request's arrival time."""
        path = self.workdir / f"dump-{time.monotonic_ns()}.json"
        await self._call("POST", f"/_dump?path={path}{'&arrivals=1' if arrivals else ''}")
        return await asyncio.to_thread(_read_and_remove, path)

    async def wait_for(self, count: int, *, within: float, poll: float = 0.05) -> dict[str, Any]:
        """Wait until at least `count` requests arrived (or `within` seconds); the last stats."""
        deadline = time.monotonic() + within
        stats = await self.stats()
        while stats["received"] < count and time.monotonic() < deadline:
            await asyncio.sleep(poll)
            stats = await self.stats()
        return stats

    async def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Receiver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def standalone_rate(workdir: Path, seconds: float = 5.0, connections: int = 64) -> float:
    """The receiver's rate driven by a raw-socket client in another process (no relay)."""
    argv = [PYTHON, "-m", "bench.receiver", "--selftest", "--port", str(free_port())]
    argv += ["--seconds", str(seconds), "--connections", str(connections)]
    _, out = await run_child(argv, within=seconds + 60)
    return float(json.loads(out.strip().splitlines()[-1])["rate"])


# -- PostgreSQL ---------------------------------------------------------------------------------


def pg_url(database: str) -> str:
    return f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/{database}"


async def pg_connect(database: str = "postgres") -> asyncpg.Connection:
    return await asyncpg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, database=database)


@contextlib.asynccontextmanager
async def pg_database(label: str) -> AsyncIterator[str]:
    """A fresh database `mozrest_bench_<label>_<pid>`, dropped at the end; yields its name."""
    name = f"{DB_PREFIX}{label}_{os.getpid()}"
    admin = await pg_connect()
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield name
    finally:
        admin = await pg_connect()
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def pg_version() -> str:
    conn = await pg_connect()
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def migrate(database_url: str, *, notify: bool = False, workdir: Path) -> None:
    env = {**_clean_env(), "DATABASE_URL": database_url, "RELAY_NOTIFY": str(notify).lower()}
    code, out = await run_child([RELAY, "migrate"], within=120, env=env, cwd=workdir)
    if code != 0:
        raise RuntimeError(f"migrate failed for {database_url}:\n{out[-2000:]}")


async def copy_outbox(conn: asyncpg.Connection, payloads: Sequence[dict]) -> None:
    """Insert outbox rows with COPY, in the caller's transaction (or its own)."""
    await conn.copy_records_to_table(
        "mozrest_outbox",
        records=[(p["bookingId"], p["venueId"], dumps(p)) for p in payloads],
        columns=["booking_id", "venue_id", "payload"],
    )


async def server_autovacuum() -> bool:
    conn = await pg_connect()
    try:
        return str(await conn.fetchval("SHOW autovacuum")) == "on"
    finally:
        await conn.close()


class AutovacuumStandIn:
    """PostgreSQL's autovacuum rule, applied by the harness to its own database.

    The shared server here runs with `autovacuum = off` (test speed); a production server runs it
    on. Every `naptime` seconds (PostgreSQL's default: 60) each relay table whose dead tuples
    exceed 50 + 20% of its live ones (the default threshold and scale factor) is vacuumed and
    analysed, as autovacuum would. Logged, counted, and reported with the results."""

    def __init__(self, database: str, naptime: float | None) -> None:
        self.database = database
        self.naptime = naptime
        self.runs: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._t0 = time.monotonic()

    async def _loop(self) -> None:
        assert self.naptime is not None
        conn = await pg_connect(self.database)
        try:
            while True:
                await asyncio.sleep(self.naptime)
                # Every table of the database, as autovacuum does (the relay's, or the peer's).
                rows = await conn.fetch(
                    "SELECT relname, n_live_tup, n_dead_tup FROM pg_stat_user_tables"
                )
                for row in rows:
                    if row["n_dead_tup"] > 50 + 0.2 * row["n_live_tup"]:
                        started = time.monotonic()
                        await conn.execute(f'VACUUM (ANALYZE) "{row["relname"]}"')
                        self.runs.append(
                            {
                                "table": row["relname"],
                                "at_s": round(started - self._t0, 1),
                                "dead": row["n_dead_tup"],
                                "seconds": round(time.monotonic() - started, 2),
                            }
                        )
        finally:
            await conn.close()

    def start(self) -> None:
        self._t0 = time.monotonic()
        if self.naptime:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> list[dict[str, Any]]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.runs


def rate_trace(arrivals_ns: Sequence[int], t0_ns: int, window_s: float = 5.0) -> list[float]:
    """Deliveries per second in consecutive windows after t0: shows a rate that decays."""
    if not arrivals_ns:
        return []
    buckets: dict[int, int] = {}
    for ns in arrivals_ns:
        k = int((ns - t0_ns) / 1e9 // window_s)
        buckets[k] = buckets.get(k, 0) + 1
    return [round(buckets.get(k, 0) / window_s, 1) for k in range(max(buckets) + 1)]


async def run_child(
    argv: list[str], *, within: float, env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[int, str]:
    """Run a helper process to completion (stdout captured); killed if we are cancelled or it
    overruns."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=str(cwd or ROOT),
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=within)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return int(proc.returncode or 0), out.decode(errors="replace")


# -- the relay ----------------------------------------------------------------------------------


def _relay_default(name: str) -> Any:
    """The relay's own default for a setting, so the benchmarks follow the app when it changes."""
    from app.settings import Settings

    return Settings.model_fields[name].default


def _seconds_text(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


@dataclass
class RelayConfig:
    """The relay's settings for a run: its own defaults unless a scenario says otherwise."""

    concurrency: int = field(default_factory=lambda: int(_relay_default("relay_concurrency")))
    batch_size: int = field(default_factory=lambda: int(_relay_default("relay_batch_size")))
    poll_interval: str = field(
        default_factory=lambda: _seconds_text(_relay_default("relay_poll_interval"))
    )
    notify: bool = False
    transport: str = field(default_factory=lambda: str(_relay_default("relay_http_transport")))
    log_level: str = field(default_factory=lambda: str(_relay_default("relay_log_level")))
    extra: dict[str, str] = field(default_factory=dict)

    def env(self, database_url: str, webhook_url: str) -> dict[str, str]:
        return {
            **_clean_env(),
            "DATABASE_URL": database_url,
            "MOZREST_WEBHOOK_URL": webhook_url,
            "MOZREST_WEBHOOK_TOKEN": WEBHOOK_TOKEN,
            "RELAY_CONCURRENCY": str(self.concurrency),
            "RELAY_BATCH_SIZE": str(self.batch_size),
            "RELAY_POLL_INTERVAL": self.poll_interval,
            "RELAY_NOTIFY": str(self.notify).lower(),
            "RELAY_HTTP_TRANSPORT": self.transport,
            "RELAY_LOG_LEVEL": self.log_level,
            **self.extra,
        }

    def describe(self) -> dict[str, Any]:
        return {
            "RELAY_CONCURRENCY": self.concurrency,
            "RELAY_BATCH_SIZE": self.batch_size,
            "RELAY_POLL_INTERVAL": self.poll_interval,
            "RELAY_NOTIFY": self.notify,
            "RELAY_HTTP_TRANSPORT": self.transport,
            "RELAY_LOG_LEVEL": self.log_level,
            **self.extra,
        }


def start_worker(
    name: str, database_url: str, webhook_url: str, config: RelayConfig, workdir: Path
) -> Proc:
    return spawn(
        name, [RELAY, "worker"], env=config.env(database_url, webhook_url), workdir=workdir
    )


async def wait_registered_pg(database: str, procs: Sequence[Proc], within: float = 30) -> None:
    """Wait until every worker process has registered itself in `mozrest_worker`."""
    conn = await pg_connect(database)
    try:
        deadline = time.monotonic() + within
        pids = {p.pid for p in procs}
        while time.monotonic() < deadline:
            rows = await conn.fetch("SELECT pid FROM mozrest_worker WHERE stopped_at IS NULL")
            if pids <= {r["pid"] for r in rows}:
                return
            for p in procs:
                if not p.alive():
                    raise RuntimeError(f"{p.name} exited:\n{p.tail()}")
            await asyncio.sleep(0.05)
        raise RuntimeError("workers did not register in time:\n" + procs[0].tail())
    finally:
        await conn.close()


# -- CPU accounting -----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _proc_cpu(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def _comm(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


def _machine_busy() -> tuple[float, float]:
    with open("/proc/stat", encoding="ascii") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + parts[4]
    return (sum(parts) - idle) / _TICK, sum(parts) / _TICK


class CpuMeter:
    """CPU seconds used by named processes, by all `postgres`/`mariadbd` processes, and by the
    whole machine, between `start()` and `stop()`."""

    def __init__(self, procs: dict[str, int], servers: tuple[str, ...] = ("postgres",)) -> None:
        self.procs = procs
        self.servers = servers
        self._start: dict[str, float] = {}
        self._servers_start: dict[int, float] = {}
        self._t0 = 0.0

    def _server_cpu(self) -> dict[int, float]:
        return {
            int(pid): _proc_cpu(int(pid))
            for pid in os.listdir("/proc")
            if pid.isdigit() and _comm(pid) in self.servers
        }

    def _snapshot(self) -> dict[str, float]:
        snap = {name: _proc_cpu(pid) for name, pid in self.procs.items()}
        busy, _ = _machine_busy()
        snap["machine"] = busy
        return snap

    def start(self) -> None:
        self._start = self._snapshot()
        self._servers_start = self._server_cpu()
        self._t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        """Average cores used by each, over the interval (1.0 = one core busy)."""
        end = self._snapshot()
        # Per server process: one that exited meanwhile (another run's backend) would otherwise
        # take its whole past off the total. Its last moments are lost; the workers' and the
        # consumer's connections live through the interval.
        servers = self._server_cpu()
        end["database"] = sum(
            cpu - self._servers_start.get(pid, 0.0) for pid, cpu in servers.items()
        )
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        used = {k: round((end[k] - self._start.get(k, 0.0)) / elapsed, 2) for k in end}
        # What the rest of the machine (other people's tests, this harness) took meanwhile.
        used["others"] = round(
            max(used["machine"] - sum(v for k, v in used.items() if k != "machine"), 0.0), 2
        )
        return used
