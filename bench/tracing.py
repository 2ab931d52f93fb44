"""What tracing costs the drain: today's relay, this one with tracing off, and with it on.

    python -m bench.tracing                      4 rounds of 10,000-booking drains on PostgreSQL
    python -m bench.tracing --n 10000 --rounds 5 --baseline main

Each round drains once per variant, in a rotating order (the machine is shared: load
shifts within minutes): `baseline` is the relay as committed at `--baseline` (its `app/` and
migrations extracted to a temporary folder and put first on the worker's PYTHONPATH), `off` is
this tree with no `OTEL_*` set, `on` is this tree exporting every span over OTLP/HTTP to a
collector stand-in in this process (it decodes each request, to count the spans that arrived),
`sampled` is `on` keeping one trace in ten (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`).
The drain is `bench/scenarios.py`'s: the worker idle, then n seated bookings committed at once,
timed to the last POST at the receiver. Its rows carry no `traceparent`, so with tracing on each
delivery also starts its own trace (`delivery.created`): the dearer case. Reported per variant:
the median rate, and the worker's CPU per delivery (steadier on a shared machine). Writes
`bench/results/tracing.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench import scenarios
from bench.common import RelayConfig, Workdir, load_average, machine_summary, median

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VARIANTS = ("baseline", "off", "on", "sampled")


class _Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP collector stand-in: 200 to every export, counting the spans it decodes."""

    spans = 0
    requests = 0

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        request = ExportTraceServiceRequest()
        request.ParseFromString(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests += 1
        type(self).spans += sum(
            len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans
        )
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def collector() -> Iterator[tuple[str, type[_Collector]]]:
    handler = type("Collector", (_Collector,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def baseline_tree(revision: str) -> Iterator[Path]:
    """The relay's packages as committed at `revision`, laid out as the installed package
    is (`app.migrations` is `migrations/`)."""
    with tempfile.TemporaryDirectory(prefix="mozrest-bench-baseline-") as folder:
        archive = subprocess.run(
            ["git", "archive", revision, "app", "migrations", "mozrest_outbox"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(folder, filter="data")
        (Path(folder) / "app" / "migrations").symlink_to(Path(folder) / "migrations")
        yield Path(folder)


@contextlib.contextmanager
def relay_from(tree: Path | None) -> Iterator[None]:
    """Run the relay's commands (migrate, worker) from `tree`: the harness passes its own
    environment on to them, so PYTHONPATH is set here for the length of one drain."""
    if tree is None:
        yield
        return
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tree)
    try:
        yield
    finally:
        if before is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = before


async def drain(
    variant: str, workdir: Path, *, n: int, tag: int, tree: Path, endpoint: str
) -> dict[str, Any]:
    extra = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint} if variant in {"on", "sampled"} else {}
    if variant == "sampled":
        extra |= {
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        }
    with relay_from(tree if variant == "baseline" else None):
        result = await scenarios.drain_pg(
            workdir, n=n, tag=tag, config=RelayConfig(extra=extra), label=f"drain-{variant}"
        )
    cores = result["cpu_cores"]
    result["worker_ms_per_delivery"] = round(cores["worker0"] * result["seconds"] / n * 1000, 4)
    if not result["correct"]["ok"]:
        raise RuntimeError(f"{variant}: states lost or stale: {result['correct']}")
    return result


async def amain(args: argparse.Namespace) -> int:
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[name]  # the workers inherit this environment: only `on` traces
    workdir = Workdir()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    tag = int(time.time()) & 0xFFFFFF
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_summary(),
        "load_average_start": load_average(),
        "n": args.n,
        "rounds": args.rounds,
        "baseline": _short_revision(args.baseline),
        "this": _short_revision("HEAD"),
    }
    spans_before = 0
    try:
        with baseline_tree(args.baseline) as tree, collector() as (endpoint, sink):
            for k in range(args.rounds):
                order = VARIANTS[k % len(VARIANTS) :] + VARIANTS[: k % len(VARIANTS)]
                for variant in order:
                    tag += 1
                    result = await drain(
                        variant, workdir.path, n=args.n, tag=tag, tree=tree, endpoint=endpoint
                    )
                    if variant in {"on", "sampled"}:
                        await asyncio.sleep(1)  # the worker exported the rest as it exited
                        result["spans_received"] = sink.spans - spans_before
                        spans_before = sink.spans
                    runs[variant].append(result)
    finally:
        workdir.cleanup()
    report["load_average_end"] = load_average()
    report["summary"] = {
        variant: {
            "rate": median(r["rate"] for r in results),
            "rates": [r["rate"] for r in results],
            "worker_ms_per_delivery": median(r["worker_ms_per_delivery"] for r in results),
            "peak_rss_mb": max(max(x for x in r["peak_rss_mb"] if x) for r in results),
        }
        for variant, results in runs.items()
    }
    for variant in ("on", "sampled"):
        report["summary"][variant]["spans_received"] = [r["spans_received"] for r in runs[variant]]
    report["runs"] = runs
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "tracing.json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    return 0


def _short_revision(revision: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", "--short", revision],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def table(report: dict[str, Any]) -> str:
    summary = report["summary"]
    base = summary["baseline"]
    lines = [
        f"{report['n']:,}-booking drains on PostgreSQL, {report['rounds']} rounds, "
        f"baseline {report['baseline']}, this {report['this']}",
        "| variant | median rate | runs | worker CPU per delivery | vs baseline | peak RSS |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for variant in VARIANTS:
        s = summary[variant]
        lines.append(
            f"| {variant} | {s['rate']:,.0f}/s | {', '.join(f'{r:,.0f}' for r in s['rates'])} "
            f"| {s['worker_ms_per_delivery']:.3f} ms "
            f"| {s['worker_ms_per_delivery'] / base['worker_ms_per_delivery'] - 1:+.1%} CPU, "
            f"{s['rate'] / base['rate'] - 1:+.1%} rate | {s['peak_rss_mb']} MB |"
        )
    for variant in ("on", "sampled"):
        lines.append(f"spans received per `{variant}` drain: {summary[variant]['spans_received']}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__)
    parser.add_argument("--n", type=int, default=10_000, help="bookings per drain")
    parser.add_argument("--rounds", type=int, default=4, help="drains of each variant")
    parser.add_argument("--baseline", default="main", help="git revision to compare with")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(amain(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
