"""`make bench` / `make bench-smoke`: run the relay's benchmark scenarios, print a table and write
`bench/results/latest.json` (or `smoke.json`).

    python -m bench.run                  the full suite (about fifteen minutes on 2 cores)
    python -m bench.run --smoke          small sizes (a minute or two); exits non-zero only when a
                                         state was lost or stale, never for speed
    python -m bench.run --only drain,latency --runs 1 --n 20000
    python -m bench.run --only peer      the relay against the tuned PgQueuer peer, both backlogs
    python -m bench.run --only scaleout  1, 2 and 4 workers against a Mozrest answering in 200 ms
    python -m bench.run --only rms       an RMS's transactions beside the relay draining
    python -m bench.run --tune-peer ...  try the peer's knobs (`bench/peers/tune.py`)

Scenarios: receiver (standalone rate), drain (PostgreSQL, median of --runs), ceiling (the same
HTTP client with no database), latency (open loop, RELAY_NOTIFY false and true), coalescing,
replicas (2 workers), growth (1,000,000 old rows), backlog (a --backlog-n state backlog
committed before the worker starts: the rate of its last tenth against its first, peak RSS;
about 20 minutes at a million), peer_preloaded and peer_live (the relay and
the tuned PgQueuer peer drained in turn; `peer` names both), scaleout (workers against a
receiver that answers after --scaleout-delay-ms), rms (an RMS-like load beside the relay
draining: lock waits and commit latency), sqlite, mariadb, rate_limit (RELAY_RATE_LIMIT against
the rate measured over 10-second windows; `rate-limit` works too), fairness (venue B's latency
behind venue A's 50,000-state backlog, with and without a limit).
Every database is a fresh `mozrest_bench_*` one, dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.common import (
    Receiver,
    RelayConfig,
    Workdir,
    load_average,
    log,
    machine_summary,
    median,
    pg_version,
    server_autovacuum,
    standalone_rate,
)
from bench.profile_summary import summarise

RESULTS = Path(__file__).resolve().parent / "results"
ALL = (
    "receiver",
    "drain",
    "ceiling",
    "latency",
    "coalescing",
    "replicas",
    "growth",
    "backlog",
    "peer_preloaded",
    "peer_live",
    "scaleout",
    "rms",
    "sqlite",
    "mariadb",
    "rate_limit",
    "fairness",
    "diagnose",
)
#: What `make bench` runs: all but the diagnosis drains and the dead-tuple EXPLAINs (`--only`).
DEFAULT = tuple(s for s in ALL if s != "diagnose")
#: Names in `--only` and `--skip` that stand for several scenarios.
ALIASES = {"peer": ("peer_preloaded", "peer_live"), "rate-limit": ("rate_limit",)}
#: Issue 6's targets.
TARGETS = {
    "drain_pg": 3000.0,
    "drain_sqlite": 1000.0,
    "ceiling_ratio": 0.60,
    "peer_ratio": 1.5,
    # Issue 19: at least the tuned peer's drain rate, for both kinds of backlog.
    "tuned_peer_ratio": 1.0,
    "idle_poll_p50_ms": 30.0,
    "idle_notify_p50_ms": 10.0,
    "idle_notify_p99_ms": 50.0,
    "half_drain_p99_ms": 100.0,
    # Issue 19: processes x concurrency / Mozrest's latency, when Mozrest is the bottleneck.
    "scaleout_of_ceiling": 0.90,
    "growth_within": 0.15,
    "rss_mb": 200.0,
    # Issue 19: a million-state backlog, peak RSS and the rate of its last tenth to its first.
    "backlog_rss_mb": 150.0,
    "backlog_within": 0.15,
    # SPEC 11: over every 10-second window at most 11 x the limit, at least 8 x while work waits.
    "rate_window_max": 1.1,
    "rate_window_min": 0.8,
    # Fairness: venue B's states land within 1 s at p99 behind venue A's backlog.
    "fairness_p99_ms": 1000.0,
}


class Suite:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.results: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.tag = int(time.time()) & 0xFFFFFF

    def next_tag(self) -> int:
        self.tag += 1
        return self.tag

    async def run(self, only: list[str]) -> None:
        for name in only:
            started = time.monotonic()
            log(f"== {name}")
            try:
                self.results[name] = await getattr(self, f"s_{name}")()
            except Exception as exc:
                self.errors[name] = f"{type(exc).__name__}: {exc}"
                log(f"{name} failed:\n{traceback.format_exc()}")
            self.results.setdefault("durations", {})[name] = round(time.monotonic() - started, 1)

    # -- scenarios ----------------------------------------------------------------------------

    async def s_rate_limit(self) -> dict[str, Any]:
        """Each `--rate-limit-cases` pairing (REPLICASxLIMIT) drains a backlog larger than the
        run for `--rate-limit-seconds`: measured rate and 10-second windows against the limit."""
        runs = []
        for case in self.args.rate_limit_cases.split(","):
            replicas, _, limit = case.partition("x")
            runs.append(
                await scenarios.rate_limit_pg(
                    self.workdir,
                    limit=float(limit),
                    replicas=int(replicas),
                    seconds=self.args.rate_limit_seconds,
                    tag=self.next_tag(),
                )
            )
        ratios = [r["busiest_ratio"] for r in runs]
        lows = [r["quietest_ratio"] for r in runs if r["quietest_ratio"] is not None]
        return {
            "busiest_ratio": max(ratios) if ratios else None,
            "quietest_ratio": min(lows) if lows else None,
            "runs": runs,
        }

    async def s_fairness(self) -> dict[str, Any]:
        """Venue B's states alone, then behind venue A's backlog with no limit and with
        `--fairness-limit`: the latency of B's states from COMMIT to arrival."""
        a = self.args
        phases = [
            ("alone", 0, 0.0, "deliveries"),
            ("behind", a.fairness_backlog, 0.0, "deliveries"),
        ]
        if a.fairness_limit:
            phases.append(("behind, limited", a.fairness_backlog, a.fairness_limit, "deliveries"))
        if a.fairness_outbox:
            phases.append(("behind, outbox", a.fairness_backlog, 0.0, "outbox"))
        out: dict[str, Any] = {}
        for name, backlog, limit, waiting_in in phases:
            out[name] = await scenarios.fairness_pg(
                self.workdir,
                backlog=backlog,
                samples=a.fairness_samples,
                rate_limit=limit,
                waiting_in=waiting_in,
                tag=self.next_tag() << 1,
            )
        # The target is about due deliveries (a resumed venue): an outbox backlog is reported
        # beside it, since ingest reads the outbox in the order the RMS wrote it.
        behind = [
            out[k]["p99_ms"]
            for k in ("behind", "behind, limited")
            if k in out and out[k]["p99_ms"] is not None
        ]
        out["worst_p99_ms"] = max(behind) if behind else None
        return out

    async def s_receiver(self) -> dict[str, Any]:
        rate = await standalone_rate(self.workdir, seconds=self.args.receiver_seconds)
        log(f"receiver standalone: {rate:,.0f} requests/s")
        return {"rate": round(rate, 1)}

    async def s_drain(self) -> dict[str, Any]:
        runs = []
        for k in range(self.args.runs):
            profile = self.workdir / "drain-profile.txt" if k == 0 and self.args.profile else None
            runs.append(
                await scenarios.drain_pg(
                    self.workdir, n=self.args.n, tag=self.next_tag(), profile=profile
                )
            )
            if profile is not None and profile.exists():
                summary = summarise(profile, top=25)
                runs[-1]["profile"] = summary
                if not self.args.smoke:
                    raw = RESULTS / "drain-profile.txt"
                    raw.write_text(profile.read_text())
        return {
            "rate": median(r["rate"] for r in runs),
            "peak_rss_mb": max(max(x for x in r["peak_rss_mb"] if x) for r in runs),
            "runs": runs,
        }

    async def s_ceiling(self) -> dict[str, Any]:
        runs = [
            await scenarios.ceiling(self.workdir, n=self.args.n, tag=self.next_tag())
            for _ in range(self.args.runs)
        ]
        return {"rate": median(r["rate"] for r in runs), "runs": runs}

    def _half_drain_rate(self) -> float:
        drain = self.results.get("drain")
        if drain and drain.get("rate"):
            return round(float(drain["rate"]) / 2, 1)
        previous = RESULTS / "latest.json"
        if previous.exists():
            try:
                saved = json.loads(previous.read_text())
                return round(float(saved["results"]["drain"]["rate"]) / 2, 1)
            except (KeyError, TypeError, ValueError):
                pass
        return 250.0

    async def s_latency(self) -> dict[str, Any]:
        half = self._half_drain_rate()
        a = self.args
        phases = [
            ("idle", 10.0, a.idle_samples),
            ("500/s", 500.0, int(500 * a.rate_seconds)),
            ("half drain", half, max(int(half * a.rate_seconds), 100)),
        ]
        out = {}
        for notify in (False, True):
            out["notify" if notify else "poll"] = await scenarios.latency_pg(
                self.workdir, phases=phases, tag=self.next_tag() << 4, notify=notify
            )
        out["half_drain_rate"] = half
        return out

    async def s_coalescing(self) -> dict[str, Any]:
        return await scenarios.coalescing_pg(
            self.workdir,
            bookings=self.args.coalesce_bookings,
            changes=self.args.coalesce_changes,
            tag=self.next_tag(),
        )

    async def s_replicas(self) -> dict[str, Any]:
        runs = [
            await scenarios.drain_pg(
                self.workdir, n=self.args.n, tag=self.next_tag(), replicas=2, label="replicas"
            )
            for _ in range(self.args.other_runs)
        ]
        return {"rate": median(r["rate"] for r in runs), "runs": runs}

    async def s_backlog(self) -> dict[str, Any]:
        """Issue 19's target 4: a backlog of a million states committed before the worker
        starts, drained by one worker with its defaults."""
        n = self.args.backlog_n
        run = await scenarios.drain_pg(
            self.workdir,
            n=n,
            tag=self.next_tag(),
            preload=True,
            label="backlog",
            within=max(scenarios.DRAIN_TIMEOUT, n / 100),
        )
        tenths = run["rate_by_tenth"]
        first, last = tenths["first"], tenths["last"]
        return {
            "n": n,
            "rate": run["rate"],
            "correct": run["correct"]["ok"],
            "peak_rss_mb": max((x for x in run["peak_rss_mb"] if x), default=None),
            "rate_first_tenth": first,
            "rate_last_tenth": last,
            "last_of_first": round(last / first, 3) if first and last else None,
            "runs": [run],
        }

    async def s_growth(self) -> dict[str, Any]:
        runs = [
            await scenarios.drain_pg(
                self.workdir,
                n=self.args.n,
                tag=self.next_tag(),
                old_rows=self.args.old_rows,
                label="growth",
            )
            for _ in range(self.args.other_runs)
        ]
        return {
            "rate": median(r["rate"] for r in runs),
            "old_rows": self.args.old_rows,
            "runs": runs,
        }

    async def s_peer_preloaded(self) -> dict[str, Any]:
        return await self._versus(preload=True)

    async def s_peer_live(self) -> dict[str, Any]:
        return await self._versus(preload=False)

    async def _versus(self, *, preload: bool) -> dict[str, Any]:
        """The relay (its defaults, one worker) and the tuned PgQueuer peer drained in turn,
        `--versus-rounds` rounds each (who goes first alternates), on the same PostgreSQL server
        and the same receiver; each round also times the peer's HTTP client with no database.
        The receiver's standalone rate is measured first, to tell whether it could be the
        limit. `preload`: the states are committed before the worker starts (rates from the
        first POST to the last); otherwise while it runs (from the COMMIT to the last POST)."""
        from bench.peers.pgqueuer_relay import BEST

        a = self.args
        load_before = load_average()
        standalone = await standalone_rate(self.workdir, seconds=a.receiver_seconds)
        runs: list[dict[str, Any]] = []
        ceilings: list[dict[str, Any]] = []
        async with Receiver(self.workdir) as receiver:
            for k in range(a.versus_rounds):
                tag = self.next_tag()
                engines = ("relay", "peer") if k % 2 == 0 else ("peer", "relay")
                for engine in engines:
                    drain = scenarios.drain_pg if engine == "relay" else scenarios.drain_pgqueuer
                    run = await drain(
                        self.workdir, n=a.versus_n, tag=tag, preload=preload, receiver=receiver
                    )
                    runs.append({"engine": engine, "round": k + 1, **run})
                ceilings.append(
                    await scenarios.ceiling_peer_client(
                        self.workdir, n=a.versus_n, tag=tag, receiver=receiver
                    )
                )
        rates = {
            engine: [r["rate"] for r in runs if r["engine"] == engine]
            for engine in ("relay", "peer")
        }
        relay_rate = median(rates["relay"])
        peer_rate = median(rates["peer"])
        ceiling_rate = median(c["rate"] for c in ceilings)
        out = {
            "backlog": "preloaded" if preload else "live",
            "n": a.versus_n,
            "relay": {"rate": relay_rate, "rates": rates["relay"]},
            "peer": {"rate": peer_rate, "rates": rates["peer"], "settings": BEST.describe()},
            "ratio": round(relay_rate / peer_rate, 3) if relay_rate and peer_rate else None,
            "ceiling": {"rate": ceiling_rate, "rates": [c["rate"] for c in ceilings]},
            "receiver_standalone": round(standalone, 1),
            "load_average": {"before": load_before, "after": load_average()},
            "runs": runs,
            "ceiling_runs": ceilings,
        }
        log(
            f"versus ({out['backlog']}): relay {relay_rate:,.0f}/s {rates['relay']}, "
            f"peer {peer_rate:,.0f}/s {rates['peer']}, ratio {out['ratio']}, "
            f"bare client {ceiling_rate:,.0f}/s, receiver {standalone:,.0f}/s"
        )
        return out

    def _scaleout_plan(self) -> list[tuple[int, int, int | None]]:
        """(processes, concurrency each, RELAY_BATCH_SIZE or None for the relay's default)."""
        a = self.args
        default_batch = RelayConfig().batch_size
        wide = [(1, a.scaleout_wide, None)]
        if a.scaleout_batch and a.scaleout_batch != default_batch:
            wide.append((1, a.scaleout_wide, a.scaleout_batch))
        if a.smoke:
            # Correctness across processes (overlaps, final states); about 20 s.
            return [(2, 64, None)]
        return [*wide, (1, 64, None), (2, 64, None), (4, 64, None)]

    async def s_scaleout(self) -> dict[str, Any]:
        """Workers against a receiver that answers every POST after --scaleout-delay-ms: the
        rate is then bounded by requests in flight / latency. Each setting drains a preloaded
        backlog of --scaleout-seconds at its ceiling; --scaleout-rounds rounds of the plan."""
        a = self.args
        delay_s = a.scaleout_delay_ms / 1000.0
        load_before = load_average()
        runs: list[dict[str, Any]] = []
        async with Receiver(self.workdir, delay_ms=a.scaleout_delay_ms) as receiver:
            for round_ in range(a.scaleout_rounds):
                for processes, concurrency, batch in self._scaleout_plan():
                    ceiling = processes * concurrency / delay_s
                    run = await scenarios.scaleout_pg(
                        self.workdir,
                        receiver=receiver,
                        processes=processes,
                        concurrency=concurrency,
                        batch_size=batch,
                        n=max(int(ceiling * a.scaleout_seconds), 200),
                        tag=self.next_tag(),
                    )
                    runs.append({"round": round_ + 1, **run})
        settings: dict[tuple[int, int, int], list[dict[str, Any]]] = {}
        for run in runs:
            key = (run["processes"], run["concurrency"], run["config"]["RELAY_BATCH_SIZE"])
            settings.setdefault(key, []).append(run)
        rows = []
        for (processes, concurrency, batch), group in settings.items():
            rate = median(r["rate"] for r in group if r["rate"])
            ceiling = group[0]["ceiling"]
            rows.append(
                {
                    "processes": processes,
                    "concurrency": concurrency,
                    "batch_size": batch,
                    "default_batch_size": batch == RelayConfig().batch_size,
                    "ceiling": ceiling,
                    "rate": rate,
                    "rates": [r["rate"] for r in group],
                    "of_ceiling": round(rate / ceiling, 3) if rate else None,
                    "overlaps": sum(r["overlaps"] for r in group),
                    "max_in_flight": max(r["max_in_flight"] for r in group),
                    "correct": all(r["correct"]["ok"] for r in group),
                }
            )
        return {
            "delay_ms": a.scaleout_delay_ms,
            "steady": "requests by arrival, the first and last 10% left out",
            "rows": rows,
            "load_average": {"before": load_before, "after": load_average()},
            "runs": runs,
        }

    async def s_rms(self) -> dict[str, Any]:
        a = self.args
        load_before = load_average()
        out = await scenarios.rms_pg(
            self.workdir,
            backlog=a.rms_backlog,
            clients=a.rms_clients,
            rate=a.rms_rate,
            seconds=a.rms_seconds,
            tag=self.next_tag(),
        )
        out["load_average"] = {"before": load_before, "after": load_average()}
        return out

    async def s_sqlite(self) -> dict[str, Any]:
        runs = [
            await scenarios.drain_other(
                self.workdir,
                scenarios.SqliteDb(self.workdir, "sqlite"),
                n=self.args.n_other,
                tag=self.next_tag(),
            )
            for _ in range(self.args.other_runs)
        ]
        return {"rate": median(r["rate"] for r in runs), "runs": runs}

    async def s_diagnose(self) -> dict[str, Any]:
        """Drains with the instrumented worker: the baseline and each variant of
        `bench/diagnose.py`, interleaved, to price the suggested changes."""
        variants: list[list[str]] = [[]] + [v.split("+") for v in self.args.variants.split(",")]
        out: dict[str, Any] = {}
        for _ in range(self.args.diagnose_runs):
            for variant in variants:
                name = "+".join(variant) or "baseline"
                run = await scenarios.drain_pg(
                    self.workdir,
                    n=self.args.diagnose_n,
                    tag=self.next_tag(),
                    diagnose=variant,
                    label="diagnose",
                )
                out.setdefault(name, []).append(run)
        return {
            name: {
                "rate": median(r["rate"] for r in runs),
                "rates": [r["rate"] for r in runs],
                "counters": runs[-1]["diagnose"]["counters"],
                "cpu_cores": runs[-1]["cpu_cores"],
            }
            for name, runs in out.items()
        }

    async def s_mariadb(self) -> dict[str, Any]:
        try:
            import asyncmy  # noqa: F401
        except ImportError:
            return {"skipped": "asyncmy is not installed: the relay has no MySQL driver here"}
        runs = []
        for _ in range(self.args.other_runs):
            try:
                runs.append(
                    await scenarios.drain_other(
                        self.workdir,
                        scenarios.MariaDb("mariadb"),
                        n=self.args.n_other,
                        tag=self.next_tag(),
                    )
                )
            except (RuntimeError, OSError) as exc:
                if "migrate failed" in str(exc) or "Connect" in type(exc).__name__:
                    return {"skipped": f"the relay cannot run on MariaDB here: {exc}"[:500]}
                raise
        return {"rate": median(r["rate"] for r in runs), "runs": runs}


# -- the report ---------------------------------------------------------------------------------


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):  # before int, which it is
        return "yes" if value else "no"
    if isinstance(value, float):
        text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}"
    else:
        text = f"{value:,}" if isinstance(value, int) else str(value)
    return f"{text}{unit}"


def evaluate(results: dict[str, Any]) -> dict[str, Any]:
    """Which of issue 6's targets are met (None: not measured in this run)."""
    t = TARGETS
    drain = results.get("drain", {}).get("rate")
    ceiling = results.get("ceiling", {}).get("rate")
    ratios = {kind: results.get(f"peer_{kind}", {}).get("ratio") for kind in ("preloaded", "live")}
    worst_ratio = min((x for x in ratios.values() if x), default=None)
    sqlite = results.get("sqlite", {}).get("rate")
    growth = results.get("growth", {}).get("rate")
    lat = results.get("latency", {})
    idle_poll = lat.get("poll", {}).get("phases", {}).get("idle", {})
    idle_notify = lat.get("notify", {}).get("phases", {}).get("idle", {})
    half_poll = lat.get("poll", {}).get("phases", {}).get("half drain", {})
    half_notify = lat.get("notify", {}).get("phases", {}).get("half drain", {})
    rss = results.get("drain", {}).get("peak_rss_mb")
    rms = results.get("rms", {})
    backlog = results.get("backlog", {})
    # Ratios of the busiest and quietest 10-second window to 10 x the limit, worst of the runs.
    rate_max = results.get("rate_limit", {}).get("busiest_ratio")
    rate_min = results.get("rate_limit", {}).get("quietest_ratio")
    fair_p99 = results.get("fairness", {}).get("worst_p99_ms")

    def check(value: float | None, ok: bool) -> dict[str, Any]:
        return {"value": value, "met": ok if value is not None else None}

    def at_most(value: float | None, limit: float) -> dict[str, Any]:
        return check(value, value is not None and value <= limit)

    out = {
        "drain_pg >= 3000/s": check(drain, drain is not None and drain >= t["drain_pg"]),
        "drain_sqlite >= 1000/s": check(sqlite, sqlite is not None and sqlite >= t["drain_sqlite"]),
        "relay >= 60% of ceiling": check(
            round(drain / ceiling, 3) if drain and ceiling else None,
            bool(drain and ceiling and drain / ceiling >= t["ceiling_ratio"]),
        ),
        **{
            f"relay >= 1.0x tuned PgQueuer peer, {kind} backlog": check(
                ratio, bool(ratio and ratio >= t["tuned_peer_ratio"])
            )
            for kind, ratio in ratios.items()
        },
        "relay >= 1.5x tuned PgQueuer peer, both backlogs": check(
            worst_ratio, bool(worst_ratio and worst_ratio >= t["peer_ratio"])
        ),
        "idle p50 <= 30 ms (polling)": at_most(idle_poll.get("p50_ms"), t["idle_poll_p50_ms"]),
        "idle p50 <= 10 ms (NOTIFY)": at_most(idle_notify.get("p50_ms"), t["idle_notify_p50_ms"]),
        "idle p99 <= 50 ms (NOTIFY)": at_most(idle_notify.get("p99_ms"), t["idle_notify_p99_ms"]),
        "p99 <= 100 ms at half drain rate (polling)": at_most(
            half_poll.get("p99_ms"), t["half_drain_p99_ms"]
        ),
        "p99 <= 100 ms at half drain rate (NOTIFY)": at_most(
            half_notify.get("p99_ms"), t["half_drain_p99_ms"]
        ),
        "1M old rows within 15%": check(
            round(growth / drain, 3) if growth and drain else None,
            bool(growth and drain and growth >= drain * (1 - t["growth_within"])),
        ),
        "worker peak RSS <= 200 MB": check(rss, rss is not None and rss <= t["rss_mb"]),
        "1M backlog: every final state right": check(
            backlog.get("correct"), backlog.get("correct") is True
        ),
        "1M backlog: worker peak RSS <= 150 MB": at_most(
            backlog.get("peak_rss_mb"), t["backlog_rss_mb"]
        ),
        "1M backlog: last tenth's rate within 15% of the first's": check(
            backlog.get("last_of_first"),
            bool(backlog.get("last_of_first"))
            and backlog["last_of_first"] >= 1 - t["backlog_within"],
        ),
        "rate limit: every 10-s window <= 11x limit": check(
            rate_max, rate_max is not None and rate_max <= t["rate_window_max"]
        ),
        "rate limit: every 10-s window >= 8x limit (work waiting)": check(
            rate_min, rate_min is not None and rate_min >= t["rate_window_min"]
        ),
        "fairness: venue B p99 <= 1 s behind a backlog": check(
            fair_p99, fair_p99 is not None and fair_p99 <= t["fairness_p99_ms"]
        ),
    }
    for row in results.get("scaleout", {}).get("rows", []):
        batch = "default" if row["default_batch_size"] else "set"
        name = (
            f"scale-out {row['processes']} x {row['concurrency']} (batch {row['batch_size']}, "
            f"{batch}) >= 90% of {row['ceiling']:,.0f}/s"
        )
        ratio = row["of_ceiling"]
        out[name] = check(ratio, ratio is not None and ratio >= t["scaleout_of_ceiling"])
    if results.get("scaleout", {}).get("rows"):
        overlaps = sum(r["overlaps"] for r in results["scaleout"]["rows"])
        out["scale-out: no request while another of its booking is unanswered"] = check(
            overlaps, overlaps == 0
        )
    if "rms_waits_on_relay" in rms:
        waits = rms["rms_waits_on_relay"]
        out["RMS never waits on a lock a relay session holds"] = check(waits, waits == 0)
    return out


def cpu_cost(runs: list[dict[str, Any]]) -> dict[str, float] | None:
    """CPU milliseconds per delivery of the worker(s) and of PostgreSQL: steadier than the rate
    on a shared machine, and what a dedicated one could reach is 1000 / ms per core."""
    per: dict[str, list[float]] = {"worker_ms": [], "database_ms": [], "others_cores": []}
    for run in runs:
        cpu = run.get("cpu_cores") or {}
        workers = sum(v for k, v in cpu.items() if k.startswith(("worker", "consumer")))
        if not run.get("rate") or not workers:
            continue
        per["worker_ms"].append(1000 * workers / run["rate"])
        per["database_ms"].append(1000 * cpu.get("database", 0.0) / run["rate"])
        per["others_cores"].append(cpu.get("others", 0.0))
    if not per["worker_ms"]:
        return None
    return {k: float(median(v) or 0.0) for k, v in per.items()}


def _cost_note(entry: dict[str, Any]) -> str:
    cost = cpu_cost(entry.get("runs", []))
    if not cost:
        return ""
    return f"; CPU/delivery {cost['worker_ms']:.2f} ms relay, {cost['database_ms']:.2f} ms DB"


def _versus_rows(v: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The relay against the tuned peer, one backlog kind: medians, each round, the ceiling."""
    relay, peer = v["relay"]["rate"], v["peer"]["rate"]
    kind = v["backlog"]
    clock = "first POST to last" if kind == "preloaded" else "COMMIT to last POST"
    rows = []
    rec = v["receiver_standalone"]
    warn = ""
    if relay and rec < 3 * relay:
        warn = "  WARNING: under 3x the relay's rate: the receiver may be what is measured"
    rows.append(
        (
            f"receiver standalone ({kind} run)",
            _fmt(rec, "/s"),
            f"{rec / relay:.0f}x the relay{warn}" if relay else warn,
        )
    )
    s = v["peer"]["settings"]
    for engine, rate in (("relay (defaults, 1 worker)", relay), ("tuned PgQueuer peer", peer)):
        key = "relay" if engine.startswith("relay") else "peer"
        runs = [x for x in v["runs"] if x["engine"] == key]
        cost = cpu_cost(runs)
        note = (
            f"median of {', '.join(_fmt(x) for x in v[key]['rates'])}; {v['n']:,} states, {clock}"
        )
        if key == "peer":
            note += (
                f"; batch {s['batch_size']}, max_concurrent_tasks "
                f"{s['max_concurrent_tasks'] or 'no cap'}, "
                f"{'uvloop' if s['uvloop'] else 'asyncio'}"
            )
        if cost:
            note += f"; CPU/state {cost['worker_ms']:.2f} ms, DB {cost['database_ms']:.2f} ms"
        rows.append((f"drain, {kind} backlog: {engine}", _fmt(rate, "/s"), note))
    if v.get("ratio") is not None:
        rows.append(
            (
                f"relay / peer, {kind} backlog",
                f"{v['ratio']:.2f}x",
                "ratio of the medians, same run",
            )
        )
    c = v["ceiling"]["rate"]
    note = f"median of {', '.join(_fmt(x) for x in v['ceiling']['rates'])}"
    if c and relay and peer:
        note += f"; relay = {relay / c:.0%} of it, peer = {peer / c:.0%}"
    rows.append((f"bare HTTP client, no DB ({kind} run)", _fmt(c, "/s"), note))
    return rows


def _scaleout_rows(v: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not v or not v.get("rows"):
        return []
    rows = []
    for row in v["rows"]:
        batch = "default" if row["default_batch_size"] else "set"
        note = f"{row['of_ceiling']:.0%} of {row['ceiling']:,.0f}/s; " if row["of_ceiling"] else ""
        note += (
            f"overlaps {row['overlaps']}; max in flight {row['max_in_flight']}; "
            f"final states {'right' if row['correct'] else 'WRONG'}"
        )
        rows.append(
            (
                f"scale-out, Mozrest {v['delay_ms']:g} ms: {row['processes']} x "
                f"{row['concurrency']} (batch {row['batch_size']}, {batch})",
                _fmt(row["rate"], "/s"),
                note,
            )
        )
    return rows


def scaleout_table(v: dict[str, Any]) -> list[str]:
    """The scale-out result on its own: processes, concurrency, ceiling, rate, overlaps."""
    head = (
        "processes",
        "concurrency each",
        "batch",
        "ceiling",
        "steady rate",
        "% of ceiling",
        "overlaps",
        "max in flight",
    )
    body = [
        (
            str(row["processes"]),
            str(row["concurrency"]),
            f"{row['batch_size']}{'' if row['default_batch_size'] else ' (set)'}",
            _fmt(row["ceiling"], "/s"),
            _fmt(row["rate"], "/s"),
            f"{row['of_ceiling']:.0%}" if row["of_ceiling"] else "-",
            str(row["overlaps"]),
            str(row["max_in_flight"]),
        )
        for row in v["rows"]
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    lines = [
        f"scale-out: Mozrest answering after {v['delay_ms']:g} ms; steady rate = "
        f"{v.get('steady', 'middle of the drain')}"
    ]
    lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True)))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return lines


def _rms_rows(v: dict[str, Any] | None) -> list[tuple[str, str, str]]:
    if not v or "phases" not in v:
        return []
    rows = []
    for name, p in v["phases"].items():
        note = f"{p['transactions']:,} transactions, {v['clients']} clients"
        if v.get("offered_rate"):
            note += f" at {v['offered_rate']:g}/s offered"
        note += f"; COMMIT alone p99 {_fmt(p['commit_p99_ms'])} ms"
        if "relay_posts_per_s" in p:
            left = p["backlog_left_at_end"]
            note += (
                f"; relay {_fmt(p['relay_posts_per_s'])} POSTs/s, backlog left at end "
                f"{left['outbox_unread'] + left['deliveries_waiting']:,}"
            )
        rows.append(
            (
                f"RMS transactions, {name}",
                f"{_fmt(p['tx_per_s'])}/s, p50 {_fmt(p['tx_p50_ms'])} / p99 "
                f"{_fmt(p['tx_p99_ms'])} ms",
                note,
            )
        )
    busy = v["phases"].get("relay draining", {}).get("locks", {})
    rows.append(
        (
            "RMS lock waits on a relay session",
            str(v["rms_waits_on_relay"]),
            f"{busy.get('samples', 0):,} samples every {busy.get('mean_interval_ms')} ms; "
            f"RMS lock waits on anyone {busy.get('rms_lock_waits_any')}; "
            f"final states {'right' if v['correct']['ok'] else 'WRONG'}",
        )
    )
    return rows


def table(report: dict[str, Any]) -> str:
    r = report["results"]
    rows: list[tuple[str, str, str]] = []
    rec = r.get("receiver", {}).get("rate")
    drain = r.get("drain", {}).get("rate")
    if rec:
        warn = ""
        if drain and rec < 3 * drain:
            warn = "  WARNING: under 3x the relay's rate: the receiver may be what is measured"
        rows.append(("receiver standalone rate", _fmt(rec, "/s"), f"raw client, 64 conns{warn}"))
    if "drain" in r:
        runs = ", ".join(_fmt(x["rate"]) for x in r["drain"]["runs"])
        rows.append(
            (
                "drain, PostgreSQL (1 worker)",
                _fmt(drain, "/s"),
                f"median of {len(r['drain']['runs'])}: {runs}; n={r['drain']['runs'][0]['n']:,}",
            )
        )
        rows.append(
            ("worker peak RSS (VmHWM)", _fmt(r["drain"]["peak_rss_mb"], " MB"), "max over runs")
        )
        cost = cpu_cost(r["drain"]["runs"])
        if cost:
            rows.append(
                (
                    "CPU per delivery: worker / PostgreSQL",
                    f"{cost['worker_ms']:.2f} / {cost['database_ms']:.2f} ms",
                    f"medians; other processes used {cost['others_cores']:.2f} of "
                    f"{report['machine']['nproc']} cores meanwhile",
                )
            )
    if "ceiling" in r:
        c = r["ceiling"]["rate"]
        ratio = f"relay = {drain / c:.0%} of it" if drain and c else ""
        rows.append(("ceiling: same HTTP client, no DB", _fmt(c, "/s"), ratio))
    if "replicas" in r:
        x = r["replicas"]["rate"]
        rows.append(
            (
                "drain, 2 worker processes",
                _fmt(x, "/s"),
                (f"{x / drain:.2f}x one worker" if drain and x else "") + _cost_note(r["replicas"]),
            )
        )
    if "growth" in r:
        x = r["growth"]["rate"]
        rows.append(
            (
                f"drain with {r['growth']['old_rows']:,} old rows",
                _fmt(x, "/s"),
                (f"{x / drain:.0%} of the empty case" if drain and x else "")
                + _cost_note(r["growth"]),
            )
        )
    if "backlog" in r:
        b = r["backlog"]
        rows.append(
            (
                f"drain of a {b['n']:,}-state backlog",
                _fmt(b["rate"], "/s"),
                f"last tenth {b['rate_last_tenth']:,.0f}/s = {b['last_of_first']:.0%} of the "
                f"first's; peak RSS {b['peak_rss_mb']} MB; final states right: {b['correct']}"
                if b["last_of_first"]
                else "",
            )
        )
    for kind in ("preloaded", "live"):
        v = r.get(f"peer_{kind}")
        if not v:
            continue
        rows += _versus_rows(v)
    for key, label in (("sqlite", "drain, SQLite"), ("mariadb", "drain, MariaDB")):
        if key in r:
            if "skipped" in r[key]:
                rows.append((label, "skipped", r[key]["skipped"][:80]))
            else:
                note = f"n={r[key]['runs'][0]['n']:,}" + _cost_note(r[key])
                rows.append((label, _fmt(r[key]["rate"], "/s"), note))
    if "coalescing" in r:
        c = r["coalescing"]
        rows.append(
            (
                f"coalescing {c['bookings']:,}x{c['changes']}",
                f"{c['posts_after_up']:,} POSTs",
                f"ideal {c['ideal_posts']:,}; drained {c['drain_seconds']} s after up "
                f"(first POST {c['first_post_after_up_seconds']} s); "
                f"final states {'right' if c['correct']['ok'] else 'WRONG'}",
            )
        )
    rows += _scaleout_rows(r.get("scaleout"))
    rows += _rms_rows(r.get("rms"))
    for run in r.get("rate_limit", {}).get("runs", []):
        rows.append(
            (
                f"rate limit {run['limit']:g}/s, {run['replicas']} "
                f"replica{'s' if run['replicas'] > 1 else ''}",
                _fmt(run["rate"], "/s"),
                f"{run['window_seconds']:g}-s windows: busiest {run['busiest_ratio']:.3f}x, "
                f"quietest {run['quietest_ratio']}x of {run['window_seconds']:g} x limit "
                f"(contract: <= 1.1x, >= 0.8x); {run['requests']:,} requests in "
                f"{run['seconds']:g} s{'' if run['work_waited'] else '; BACKLOG RAN OUT'}",
            )
        )
    fair = r.get("fairness", {})
    alone = fair.get("alone")
    for name in ("behind", "behind, limited", "behind, outbox"):
        f = fair.get(name)
        if not f:
            continue
        limit = f"at {f['rate_limit']:g}/s" if f["rate_limit"] else "no rate limit"
        where = "due (resumed)" if f.get("waiting_in") == "deliveries" else "in the outbox"
        note = f"p50 {_fmt(f['p50_ms'])} ms, {f['landed']}/{f['samples']} landed"
        if f["landed"] < f["samples"]:
            note += f" within {scenarios.LANDING_TIMEOUT:g} s of the last write"
        if alone:
            note += f"; alone p50 {_fmt(alone['p50_ms'])} / p99 {_fmt(alone['p99_ms'])} ms"
        if f["backlog_waited_throughout"] is False:
            note += "; BACKLOG DRAINED while sampling"
        rows.append(
            (
                f"fairness: venue B behind {f['backlog']:,} on A {where}, {limit}",
                f"p99 {_fmt(f['p99_ms'])} ms"
                if f["p99_ms"] is not None
                else f"p99 over {scenarios.LANDING_TIMEOUT:g} s",
                note,
            )
        )
    lat = r.get("latency", {})
    for mode in ("poll", "notify"):
        for name, p in lat.get(mode, {}).get("phases", {}).items():
            value = f"p50 {_fmt(p['p50_ms'])} / p99 {_fmt(p['p99_ms'])}"
            if "p999_ms" in p:
                value += f" / p99.9 {_fmt(p['p999_ms'])}"
            switch = "on" if mode == "notify" else "off"
            rows.append(
                (
                    f"latency {name} ({p['rate']:g}/s), NOTIFY {switch}",
                    value + " ms",
                    f"{p['samples']:,} samples",
                )
            )
    width = max(len(a) for a, _, _ in rows) if rows else 10
    vwidth = max(len(b) for _, b, _ in rows) if rows else 10
    lines = [f"{'scenario':<{width}}  {'result':>{vwidth}}  notes", "-" * (width + vwidth + 40)]
    lines += [f"{a:<{width}}  {b:>{vwidth}}  {c}" for a, b, c in rows]
    lines.append("")
    lines.append("targets:")
    for name, v in report["targets"].items():
        mark = {True: "met", False: "NOT met", None: "not measured"}[v["met"]]
        value = v["value"]
        shown = f"{value:.2f}" if isinstance(value, float) and abs(value) < 10 else _fmt(value)
        lines.append(f"  {mark:<13} {name}  ({shown})")
    if r.get("scaleout", {}).get("rows"):
        lines.append("")
        lines += scaleout_table(r["scaleout"])
    if report.get("errors"):
        lines.append("")
        lines.append("errors:")
        lines += [f"  {k}: {v[:300]}" for k, v in report["errors"].items()]
    return "\n".join(lines)


def correctness_failures(results: dict[str, Any]) -> list[str]:
    """Lost or stale states anywhere: the only thing that fails `make bench-smoke`."""
    bad = []
    for name, value in results.items():
        if not isinstance(value, dict):
            continue
        runs = value.get("runs", [value])
        for run in runs:
            check = run.get("correct") if isinstance(run, dict) else None
            if check and (check["lost"] or check["stale"]):
                bad.append(f"{name}: {check['lost']} lost, {check['stale']} stale")
            if isinstance(run, dict) and run.get("overlaps"):
                bad.append(
                    f"{name}: {run['overlaps']} requests sent while another of their booking "
                    "was unanswered"
                )
        if name == "latency":
            for mode in ("poll", "notify"):
                for phase, p in value.get(mode, {}).get("phases", {}).items():
                    if p.get("lost"):
                        bad.append(f"latency {mode} {phase}: {p['lost']} never arrived")
    return bad


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smoke", action="store_true", help="small sizes; fail only on correctness"
    )
    parser.add_argument("--only", default=",".join(DEFAULT), help="comma-separated scenarios")
    parser.add_argument("--skip", default="", help="comma-separated scenarios to leave out")
    parser.add_argument("--n", type=int, default=50_000, help="bookings per drain")
    parser.add_argument(
        "--n-other", type=int, default=None, help="bookings per SQLite/MariaDB drain"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs of the drain and the ceiling")
    parser.add_argument("--other-runs", type=int, default=1, help="runs of the other drains")
    parser.add_argument("--old-rows", type=int, default=1_000_000)
    parser.add_argument("--backlog-n", type=int, default=1_000_000, help="states in `backlog`")
    parser.add_argument("--idle-samples", type=int, default=320)
    parser.add_argument("--rate-seconds", type=float, default=12.0)
    parser.add_argument("--coalesce-bookings", type=int, default=2000)
    parser.add_argument("--coalesce-changes", type=int, default=20)
    parser.add_argument("--versus-n", type=int, default=20_000, help="states per peer/relay drain")
    parser.add_argument("--versus-rounds", type=int, default=3, help="drains of each, in turn")
    parser.add_argument("--receiver-seconds", type=float, default=5.0)
    parser.add_argument(
        "--scaleout-delay-ms", type=float, default=200.0, help="scaleout: Mozrest's latency"
    )
    parser.add_argument(
        "--scaleout-seconds",
        type=float,
        default=13.0,
        help="scaleout: backlog = this many seconds at each setting's ceiling (the middle "
        "80%% then lasts 10.4 s at the ceiling)",
    )
    parser.add_argument(
        "--scaleout-wide", type=int, default=256, help="scaleout: one process's concurrency"
    )
    parser.add_argument(
        "--scaleout-batch",
        type=int,
        default=256,
        help="scaleout: RELAY_BATCH_SIZE of the one-process wide run, besides the default",
    )
    parser.add_argument("--scaleout-rounds", type=int, default=1)
    parser.add_argument("--rms-backlog", type=int, default=40_000)
    parser.add_argument("--rms-clients", type=int, default=16)
    parser.add_argument(
        "--rms-rate", type=float, default=200.0, help="RMS transactions/s in all; 0: back to back"
    )
    parser.add_argument("--rms-seconds", type=float, default=15.0)
    parser.add_argument("--no-profile", dest="profile", action="store_false")
    parser.add_argument(
        "--no-autovacuum-standin",
        dest="autovacuum_standin",
        action="store_false",
        help="when the server's autovacuum is off, do not vacuum the bench databases either",
    )
    parser.add_argument("--autovacuum-naptime", type=float, default=60.0)
    parser.add_argument(
        "--variants",
        default="analyze,claim-ahead,quiet,analyze+claim-ahead+quiet",
        help="diagnose: variants of bench/diagnose.py to price (+ combines)",
    )
    parser.add_argument("--diagnose-n", type=int, default=20_000)
    parser.add_argument("--diagnose-runs", type=int, default=1)
    parser.add_argument(
        "--rate-limit-cases",
        default="1x50,4x50,1x500,4x500",
        help="rate_limit: REPLICASxLIMIT pairings, comma-separated",
    )
    parser.add_argument("--rate-limit-seconds", type=float, default=25.0)
    parser.add_argument("--fairness-backlog", type=int, default=50_000)
    parser.add_argument("--fairness-samples", type=int, default=200)
    parser.add_argument(
        "--fairness-limit", type=float, default=500.0, help="fairness: the limited run's rate"
    )
    parser.add_argument(
        "--no-fairness-outbox",
        dest="fairness_outbox",
        action="store_false",
        help="fairness: leave out the run whose backlog waits in the outbox",
    )
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--update",
        action="store_true",
        help="replace only the scenarios run now in the saved --output (keep the others)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.n = min(args.n, 2000)
        args.runs = 1
        args.old_rows = min(args.old_rows, 20_000)
        args.idle_samples = min(args.idle_samples, 30)
        args.rate_seconds = min(args.rate_seconds, 3.0)
        args.coalesce_bookings = min(args.coalesce_bookings, 100)
        args.coalesce_changes = min(args.coalesce_changes, 5)
        args.receiver_seconds = 2.0
        args.scaleout_seconds = min(args.scaleout_seconds, 0.5)
        args.scaleout_rounds = 1
        args.rms_backlog = min(args.rms_backlog, 500)
        args.rms_seconds = min(args.rms_seconds, 2.0)
        args.profile = False
        args.rate_limit_cases = "2x50"
        args.rate_limit_seconds = min(args.rate_limit_seconds, 12.0)
        args.fairness_backlog = min(args.fairness_backlog, 5000)
        args.fairness_samples = min(args.fairness_samples, 40)
        args.backlog_n = min(args.backlog_n, 20_000)
        if args.only == ",".join(DEFAULT):
            # Not rms: its checks beyond final states are not correctness (~25 s more).
            args.only = "receiver,drain,latency,coalescing,replicas,growth,scaleout,sqlite"
    args.n_other = args.n_other or args.n
    args.output = args.output or RESULTS / ("smoke.json" if args.smoke else "latest.json")
    return args


async def amain(args: argparse.Namespace) -> int:
    def names(text: str) -> list[str]:
        return [x for name in text.split(",") if name for x in ALIASES.get(name, (name,))]

    skip = set(names(args.skip))
    only = [s for s in names(args.only) if s not in skip]
    unknown = [s for s in only if s not in ALL]
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(unknown)} (known: {', '.join(ALL)})")
    RESULTS.mkdir(exist_ok=True)
    workdir = Workdir()
    started = time.monotonic()
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_summary(),
        "relay_config": RelayConfig().describe(),
        "sizes": {
            k: getattr(args, k)
            for k in (
                "n",
                "n_other",
                "runs",
                "other_runs",
                "old_rows",
                "idle_samples",
                "rate_seconds",
                "coalesce_bookings",
                "coalesce_changes",
                "scaleout_delay_ms",
                "scaleout_seconds",
                "scaleout_rounds",
                "rms_backlog",
                "rms_clients",
                "rms_rate",
                "rms_seconds",
                "rate_limit_cases",
                "rate_limit_seconds",
                "fairness_backlog",
                "fairness_samples",
                "fairness_limit",
            )
        },
    }
    try:
        report["machine"]["postgresql"] = await pg_version()
        autovacuum = await server_autovacuum()
        report["machine"]["postgresql_autovacuum"] = autovacuum
        if not autovacuum and args.autovacuum_standin:
            scenarios.AUTOVACUUM_NAPTIME = args.autovacuum_naptime
            log(
                "the server runs with autovacuum=off: the harness applies autovacuum's default "
                f"rule to its own databases every {args.autovacuum_naptime:g}s"
            )
        report["autovacuum_standin_naptime"] = scenarios.AUTOVACUUM_NAPTIME
        suite = Suite(args, workdir.path)
        await suite.run(only)
    finally:
        workdir.cleanup()
    report["machine"]["load_average_at_end"] = load_average()
    report["results"] = suite.results
    report["errors"] = suite.errors
    if args.update and args.output.exists():
        # Re-ran some scenarios: keep the others from the saved run, and say which were redone.
        saved = json.loads(args.output.read_text())
        durations = {**saved["results"].get("durations", {}), **suite.results.get("durations", {})}
        saved["results"].update(suite.results)
        # Forget scenarios that no longer exist (the mis-tuned `peer` of before issue 19).
        saved["results"] = {k: v for k, v in saved["results"].items() if k in ALL}
        saved["results"]["durations"] = {k: v for k, v in durations.items() if k in ALL}
        saved.setdefault("updates", []).append(
            {"when": report["when"], "scenarios": only, "machine": report["machine"]}
        )
        saved["errors"] = {**saved.get("errors", {}), **suite.errors}
        for name in only:
            if name not in suite.errors:
                saved["errors"].pop(name, None)
        report = saved
    report["targets"] = evaluate(report["results"])
    report["total_seconds"] = (
        report.get("total_seconds", 0) if args.update else round(time.monotonic() - started, 1)
    )
    failures = correctness_failures(report["results"])
    report["correctness_failures"] = failures
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    m = report["machine"]
    print(f"\nmozrest-relay benchmarks ({'smoke' if args.smoke else 'full'}), {report['when']}")
    print(
        f"machine: {m['nproc']} cores, {m['cpu_model']}, PostgreSQL {m.get('postgresql')}, "
        f"load average {' '.join(m['load_average_at_start'])} at start"
    )
    print(table(report))
    print(f"\nwritten to {args.output} in {report['total_seconds']:.0f}s")
    if failures:
        print("CORRECTNESS FAILURES:\n  " + "\n  ".join(failures))
        return 1
    if args.smoke and suite.errors:
        # A scenario that could not run at all is not a speed problem, but it hides correctness.
        print("smoke scenarios failed to run: " + ", ".join(suite.errors))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--tune-peer"]:
        from bench.peers import tune

        return tune.main(argv[1:])
    if argv[:1] == ["--render"]:
        # Print the table of an earlier run: python -m bench.run --render bench/results/latest.json
        report = json.loads(Path(argv[1]).read_text())
        report["targets"] = evaluate(report["results"])
        print(table(report))
        return 0
    return asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
