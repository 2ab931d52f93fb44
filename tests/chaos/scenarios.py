"""The fault scenarios: each generates a history under one kind of fault, checks it, and prints
and returns its row of figures (changes, lost, stale, overlaps, duplicates, recovery time).

Each runs against PostgreSQL with two or three relay processes and the emulator, at the scale of
CHAOS_SCALE (smoke: 1,200 to 2,000 changes; full: 20,000). Recovery time is measured from the
end of the fault (or of the last disruption) to the moment every outbox row has an outcome and no
delivery is pending or retrying.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from app.migrate import upgrade
from tests.chaos.checker import delivery_lags
from tests.chaos.freezer import Freezer, summary, windows
from tests.chaos.harness import (
    ChangeWriter,
    Figures,
    PrivatePostgres,
    Rms,
    Termination,
    booking_histories,
    change_count,
    check_history,
    commit_times,
    log_events,
    publish,
    readiness_watch,
    relay_env,
    scaled,
    start_emulator,
    start_run,
    start_worker,
    terminate,
    ticker,
    wait_settled,
)
from tests.conftest import Launcher, Process

#: Changes written per second by the RMS threads.
WRITE_RATE = scaled(250, 400)
SETTLE_TIMEOUT = scaled(90, 300)


def _write_all(writer: ChangeWriter) -> float:
    return writer.join(timeout=writer.total / writer.rate * 3 + 60)


def on_database(database_url: str) -> str:
    """A label for scenarios that also run on MariaDB; PostgreSQL is the default."""
    return ", MariaDB" if database_url.startswith("mysql") else ""


def receiver_faults(launcher: Launcher, database_url: str) -> Figures:
    """The receiver answers 20% 500s, times out 5%, drops 2% and sends bursts of 429 with
    Retry-After, while three relays deliver; the faults last until everything has settled, so
    recovery is the time from the last change written to the last delivery.

    The emulator delays every request by a uniform draw in [0, timeout / 0.95], so 5% of requests
    (exactly, in expectation) outlast RELAY_HTTP_TIMEOUT; it has no knob to delay only some.
    """
    changes = change_count(1_200, 20_000)
    http_timeout = 1.0
    _, receiver = start_emulator(launcher)
    env = relay_env(
        database_url,
        receiver.url,
        concurrency=64,
        http_timeout=f"{http_timeout:g}s",
        lease_seconds="3s",
        circuit_cooldown="500ms",
    )
    workers = [start_worker(launcher, env) for _ in range(3)]
    rms = Rms(database_url)
    base: dict[str, Any] = {
        "failure_rate": 0.20,
        "failure_status": 500,
        "drop_rate": 0.02,
        "latency_ms": 0,
        "latency_jitter_ms": http_timeout * 1000 / 0.95,
    }
    receiver.set_faults(seed=1, **base)

    def faults(tick: int) -> None:
        # Every 4 s, a burst of 429s with Retry-After for about a second.
        if tick % 4 == 0:
            burst = {"fail_next": 40, "fail_next_status": 429, "retry_after_seconds": 1}
            receiver.set_faults(seed=tick + 2, **base, **burst)
        elif tick % 4 == 1:
            receiver.set_faults(seed=tick + 2, **base)

    writer = ChangeWriter(
        rms, booking_histories(changes, seed=11, prefix="faults"), rate=WRITE_RATE
    )
    with ticker(1.0, faults):
        writer.start()
        written = _write_all(writer)
        settled = wait_settled(rms, timeout=SETTLE_TIMEOUT)
    report = check_history(rms, receiver)
    received = receiver.requests()
    total = len(received) or 1
    slow = sum(1 for r in received if r.finished_ns - r.arrival_ns > http_timeout * 1e9)
    dropped = sum(1 for r in received if r.status_code is None)
    errors = sum(1 for r in received if r.status_code == 500)
    too_many = sum(1 for r in received if r.status_code == 429)
    assert all(w.popen.poll() is None for w in workers), "a worker died"
    rms.close()
    return publish(
        Figures.from_report(
            "receiver faults (500 / timeout / drop / 429 bursts)" + on_database(database_url),
            report,
            settled - written,
            f"{total:,} requests: {errors / total:.0%} 500, {slow / total:.1%} over the timeout, "
            f"{dropped / total:.1%} dropped, {too_many} 429",
        )
    )


def worker_kills(launcher: Launcher, database_url: str) -> Figures:
    """A relay process is SIGKILLed every few seconds, and restarted, while changes flow."""
    changes = change_count(2_000, 20_000)
    interval = scaled(1.5, 3.0)
    _, receiver = start_emulator(launcher)
    receiver.set_faults(latency_ms=5, latency_jitter_ms=60, seed=3)
    env = relay_env(database_url, receiver.url, lease_seconds="3s", http_timeout="1s")
    workers: list[Process] = [start_worker(launcher, env) for _ in range(3)]
    rms = Rms(database_url)
    rng = random.Random(5)
    kills = 0
    last_restart = time.monotonic()

    def kill_one(_: int) -> None:
        nonlocal kills, last_restart
        victim = rng.randrange(len(workers))
        workers[victim].kill()
        kills += 1
        workers[victim] = launcher.start("worker", env=env)
        last_restart = time.monotonic()

    writer = ChangeWriter(rms, booking_histories(changes, seed=21, prefix="kill"), rate=WRITE_RATE)
    with ticker(interval, kill_one):
        writer.start()
        _write_all(writer)
    settled = wait_settled(rms, timeout=SETTLE_TIMEOUT)
    report = check_history(rms, receiver)
    rms.close()
    return publish(
        Figures.from_report(
            "worker SIGKILLed and restarted" + on_database(database_url),
            report,
            settled - last_restart,
            f"{kills} kills, one every {interval:g} s, 3 workers, lease 3 s",
        )
    )


def database_restart(launcher: Launcher) -> Figures:
    """PostgreSQL (a private server) is restarted mid-run: the relays reconnect by themselves,
    `/readyz` goes 503 then 200, and nothing is lost."""
    changes = change_count(1_500, 20_000)
    down_seconds = scaled(3.0, 10.0)
    server = PrivatePostgres().init()
    stop_watch = None
    try:
        server.start()
        database_url = server.create_database("chaos")
        upgrade(database_url)
        _, receiver = start_emulator(launcher)
        env = relay_env(database_url, receiver.url)
        run, base_url = start_run(launcher, env)
        worker = start_worker(launcher, env)
        readiness, stop_watch = readiness_watch(base_url)
        rms = Rms(database_url)
        writer = ChangeWriter(
            rms, booking_histories(changes, seed=31, prefix="pg"), rate=WRITE_RATE
        ).start()
        writer.wait_written(changes // 3, timeout=60)
        stopped_at = time.monotonic()
        server.stop("fast")
        time.sleep(down_seconds)
        server.start()
        back_at = time.monotonic()
        _write_all(writer)
        settled = wait_settled(rms, timeout=SETTLE_TIMEOUT)
        report = check_history(rms, receiver)
        rms.close()
        assert run.popen.poll() is None and worker.popen.poll() is None, "a relay died"
        during = [status for at, status in readiness if stopped_at <= at <= back_at]
        assert 503 in during, f"/readyz never answered 503 while the database was down: {during}"
        ready_again = [at for at, status in readiness if at > back_at and status == 200]
        assert ready_again, "/readyz never answered 200 again"
        return publish(
            Figures.from_report(
                "PostgreSQL restarted mid-run",
                report,
                settled - back_at,
                f"down {down_seconds:g} s; /readyz 503 while down, 200 again "
                f"{ready_again[0] - back_at:.1f} s after restart; {writer.failures} RMS writes "
                "retried; 2 relays (run + worker)",
            )
        )
    finally:
        if stop_watch is not None:
            stop_watch.set()
        launcher.stop_all()
        server.remove()


def mozrest_outage(launcher: Launcher, database_url: str) -> Figures:
    """Mozrest answers 503 to everything for a while: the circuits open, the relays send few
    requests during the outage (probes), and the backlog drains once it is back."""
    changes = change_count(1_500, 20_000)
    outage_seconds = scaled(10.0, 60.0)
    cooldown = scaled(2.0, 5.0)
    threshold = 5
    processes = 2
    _, receiver = start_emulator(launcher)
    env = relay_env(
        database_url,
        receiver.url,
        circuit_threshold=threshold,
        circuit_cooldown=f"{cooldown:g}s",
        retry_max_delay="2s",
    )
    workers = [start_worker(launcher, env) for _ in range(processes)]
    rms = Rms(database_url)
    writer = ChangeWriter(
        rms,
        booking_histories(changes, seed=41, prefix="outage"),
        # Spread the changes over the outage so that it starts and ends with changes flowing.
        rate=max(WRITE_RATE / 2, changes / (outage_seconds + 5)),
    ).start()
    writer.wait_written(changes // 5, timeout=60)
    outage_from = time.monotonic_ns()
    receiver.set_faults(status=503)
    time.sleep(outage_seconds)
    receiver.clear_faults()
    outage_to = time.monotonic_ns()
    back = time.monotonic()
    _write_all(writer)
    settled = wait_settled(rms, timeout=SETTLE_TIMEOUT)
    report = check_history(rms, receiver)
    rms.close()
    during = [r for r in receiver.requests() if outage_from <= r.arrival_ns <= outage_to]
    opened = sum(
        1 for w in workers for e in log_events(w, "circuit.changed") if e.get("circuit") == "open"
    )
    assert opened >= processes, f"the circuit opened {opened} times across {processes} relays"
    # At worst: what each relay had on the wire when the outage began, the failures that open
    # its circuit, then one probe per cool-down.
    probes = processes * (math.ceil(outage_seconds / cooldown) + 1)
    return publish(
        Figures.from_report(
            "Mozrest down (503 to everything)",
            report,
            settled - back,
            f"down {outage_seconds:g} s: {len(during)} requests during the outage "
            f"({processes} relays, threshold {threshold}, cool-down {cooldown:g} s, "
            f"<= {probes} probes allowed)",
            requests_during_outage=len(during),
            probes_allowed=probes,
        )
    )


def graceful_shutdown(launcher: Launcher, database_url: str) -> Figures:
    """Relays get SIGTERM while requests are on the wire: each finishes or releases its work
    within the grace and exits 0, and nothing it had accepted or claimed is lost."""
    changes = change_count(1_500, 20_000)
    grace = 2.0
    _, receiver = start_emulator(launcher)
    receiver.set_faults(latency_ms=100, latency_jitter_ms=700, seed=9)
    env = relay_env(database_url, receiver.url, shutdown_grace=f"{grace:g}s")
    workers = [start_worker(launcher, env) for _ in range(3)]
    rms = Rms(database_url)
    exits: list[Termination] = []
    last_restart = time.monotonic()
    rng = random.Random(8)

    def shut_one(_: int) -> None:
        nonlocal last_restart
        victim = rng.randrange(len(workers))
        exits.append(terminate(workers[victim], timeout=grace + 10))
        workers[victim] = start_worker(launcher, env)  # started: its SIGTERM handler is set
        last_restart = time.monotonic()

    writer = ChangeWriter(rms, booking_histories(changes, seed=51, prefix="term"), rate=WRITE_RATE)
    with ticker(scaled(2.0, 4.0), shut_one):
        writer.start()
        written = _write_all(writer)
    settled = wait_settled(rms, timeout=SETTLE_TIMEOUT)
    exits.extend(terminate(w, timeout=grace + 10) for w in workers)  # and all of them, idle
    report = check_history(rms, receiver)
    rms.close()
    codes = sorted({e.code for e in exits}, key=str)
    drained = max((e.stopped_seconds or math.inf) for e in exits)
    exited = max(e.exit_seconds for e in exits)
    return publish(
        Figures.from_report(
            "SIGTERM under load",
            report,
            settled - max(last_restart, written),
            f"{len(exits)} SIGTERMs (grace {grace:g} s): exit codes {codes}, work finished or "
            f"released within {drained:.2f} s, process gone within {exited:.2f} s",
            exits=exits,
            grace=grace,
        )
    )


#: The freezes of `frozen_replicas`, in turn: a phase of `Freezer.catch`, or any moment.
FREEZE_PLAN = ("ingest", "claim", "record", "request", "send", "random")


def frozen_replicas(launcher: Launcher, database_url: str) -> Figures:
    """Relay processes are frozen (SIGSTOP) for longer than their lease and thawed (SIGCONT),
    one at a time, again and again while changes flow: in turn inside ingest, claim and record
    transactions, while requests are on the wire, just after a claim (between the lease check
    and the request, SPEC 9.3) and at any moment. Besides the invariants, each state written
    while a replica was frozen must reach Mozrest (itself or a newer state of its booking)
    within RELAY_LEASE_SECONDS + 5 s of its commit (SPEC 9.4)."""
    changes = change_count(1_200, 20_000)
    write_seconds = scaled(50.0, 240.0)
    lease = 3.0
    bound = lease + 5.0
    _, receiver = start_emulator(launcher)
    # Requests take 50-400 ms, so a replica frozen at any moment often has some on the wire.
    receiver.set_faults(latency_ms=50, latency_jitter_ms=350, seed=13)
    env = relay_env(database_url, receiver.url, lease_seconds=f"{lease:g}s", http_timeout="1s")
    workers = [start_worker(launcher, env) for _ in range(3)]
    pids = [w.popen.pid for w in workers]
    rms = Rms(database_url)
    rng = random.Random(17)
    writer = ChangeWriter(
        rms,
        booking_histories(changes, seed=71, prefix="frozen"),
        rate=changes / write_seconds,
    )
    last_thaw = time.monotonic()
    with Freezer(database_url, relay_pids=pids, lease_seconds=lease) as freezer:
        writer.start()
        turn = 0
        while writer.written < writer.total:
            wanted = FREEZE_PLAN[turn % len(FREEZE_PLAN)]
            pid = rng.choice(pids)
            if wanted == "random":
                time.sleep(rng.uniform(0.0, 1.0))
                freeze = freezer.stop_now(pid)
            else:
                freeze = freezer.catch(pid, wanted, timeout=3.0, send_delay=0.005)
            time.sleep(max(0.0, rng.uniform(4.0, 6.0) - freeze.held_seconds))
            freezer.thaw(freeze)
            last_thaw = time.monotonic()
            turn += 1
            time.sleep(rng.uniform(0.3, 1.0))
        _write_all(writer)
    settled = wait_settled(rms, timeout=SETTLE_TIMEOUT)
    report = check_history(rms, receiver)
    outbox, received = rms.outbox_rows(), receiver.requests()
    rms.close()
    assert all(w.popen.poll() is None for w in workers), "a worker died"
    freezer.verify_requests(received)
    spans = windows(freezer.freezes)
    lags = [
        lag
        for lag in delivery_lags(outbox, received, commit_times(outbox, writer.commits))
        if any(start <= lag.committed_ns <= end for start, end in spans)
    ]
    never = [lag for lag in lags if lag.seconds is None]
    slowest = max((lag.seconds for lag in lags if lag.seconds is not None), default=0.0)
    landed = summary(freezer.freezes)
    misses = sum(f.misses for f in freezer.freezes)
    for freeze in freezer.freezes:
        print(freeze.describe())
    for lag in sorted(lags, key=lambda lag: -math.inf if lag.seconds is None else -lag.seconds)[:3]:
        print(f"slow: {lag.booking_id} row {lag.outbox_id}: {lag.seconds} s")
    kinds = ", ".join(f"{phase} {n}/{total}" for phase, (n, total) in landed.items())
    return publish(
        Figures.from_report(
            "replicas frozen (SIGSTOP) past the lease",
            report,
            settled - last_thaw,
            f"{len(freezer.freezes)} freezes of 4-6 s, lease {lease:g} s, 3 workers; landed "
            f"inside the phase aimed at: {kinds} ({misses} stops a moment late, thawed at "
            f"once); states written while one was frozen: {len(lags)}, slowest to Mozrest "
            f"{slowest:.1f} s (bound {bound:g} s), never {len(never)}",
            slowest_seconds=slowest,
            bound_seconds=bound,
            never=never,
            measured=len(lags),
            landed=landed,
        )
    )
