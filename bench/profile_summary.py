"""Summarise a py-spy raw (collapsed stacks) profile: where the worker's CPU goes.

    python -m bench.profile_summary PROFILE.txt [--top 25]

Prints the share of samples per component (inclusive: a sample counts for each component that
appears on its stack, innermost first) and the top functions by self time.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

#: (component, pattern on a frame "function (file:line)"), checked innermost frame first.
COMPONENTS = (
    ("logging (JSON log lines)", re.compile(r"\(.*(/logging/|app/logs\.py)")),
    ("json encode/decode", re.compile(r"\(.*/json/")),
    ("payload contract (parse/diff)", re.compile(r"\(.*app/contract\.py|\(.*app/policy\.py")),
    ("asyncpg driver", re.compile(r"\(.*asyncpg/")),
    ("SQLAlchemy (compile, execute, rows)", re.compile(r"\(.*sqlalchemy/")),
    ("httpx", re.compile(r"\(.*httpx/")),
    ("httpx-aiohttp", re.compile(r"\(.*httpx_aiohttp/")),
    ("aiohttp", re.compile(r"\(.*aiohttp/")),
    ("prometheus metrics", re.compile(r"\(.*prometheus_client/")),
    ("pydantic (validation, serialisation)", re.compile(r"\(.*pydantic")),
    ("FastAPI / Starlette", re.compile(r"\(.*(fastapi|starlette)/")),
    ("uvicorn", re.compile(r"\(.*uvicorn/")),
    ("tenacity", re.compile(r"\(.*tenacity/")),
    ("asyncio event loop", re.compile(r"\(.*asyncio/")),
)
#: Exclusive attribution: each sample goes to the innermost frame's owner, where stdlib frames
#: (the event loop, sockets, selectors) are charged to the library that called them.
OWNERS = (
    ("asyncpg", re.compile(r"asyncpg/")),
    ("SQLAlchemy", re.compile(r"sqlalchemy/")),
    ("httpx", re.compile(r"httpx/")),
    ("httpx-aiohttp", re.compile(r"httpx_aiohttp/")),
    ("aiohttp", re.compile(r"aiohttp/")),
    ("FastAPI/Starlette/uvicorn", re.compile(r"(fastapi|starlette|uvicorn)/")),
    ("pydantic", re.compile(r"pydantic")),
    ("prometheus_client", re.compile(r"prometheus_client/")),
    ("tenacity", re.compile(r"tenacity/")),
    ("relay: logging", re.compile(r"app/logs\.py|/logging/")),
    ("relay: contract/policy (json, validation, diff)", re.compile(r"app/(contract|policy)\.py")),
    ("relay: store (app/store.py)", re.compile(r"app/store(_admin)?\.py")),
    ("relay: worker loop (app/worker.py)", re.compile(r"app/worker\.py")),
    ("relay: publisher (app/publisher.py)", re.compile(r"app/publisher\.py")),
    ("relay: other app code", re.compile(r"app/(?!cli\.py|runtime\.py|__main__\.py)")),
)

#: Entry points of the relay's own work, to split time between its loops.
STAGES = (
    ("ingest", re.compile(r"Store\.ingest \(.*app/store\.py")),
    ("claim_due", re.compile(r"Store\.claim_due \(.*app/store\.py")),
    ("record", re.compile(r"Store\.record \(.*app/store\.py")),
    ("publish (HTTP POST)", re.compile(r"Publisher\.publish \(.*app/publisher\.py")),
    ("heartbeat/prune", re.compile(r"Store\.(heartbeat|prune) \(.*app/store\.py")),
)


def summarise(path: Path, top: int = 25) -> dict[str, object]:
    samples = 0
    components: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    owners: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        self_time[re.sub(r":\d+\)$", ")", frames[-1])] += count
        owner = "event loop, stdlib, idle"
        for frame in reversed(frames):
            match = next((name for name, pattern in OWNERS if pattern.search(frame)), None)
            if match is not None:
                owner = match
                break
        owners[owner] += count
        seen = set()
        for frame in reversed(frames):
            for name, pattern in COMPONENTS:
                if name not in seen and pattern.search(frame):
                    seen.add(name)
                    components[name] += count
                    break
        for name, pattern in STAGES:
            if any(pattern.search(f) for f in frames):
                stages[name] += count
                break
    return {
        "samples": samples,
        "components": {k: round(100 * v / max(samples, 1), 1) for k, v in components.most_common()},
        "stages": {k: round(100 * v / max(samples, 1), 1) for k, v in stages.most_common()},
        "owners": {k: round(100 * v / max(samples, 1), 1) for k, v in owners.most_common()},
        "top_self": [
            (k, round(100 * v / max(samples, 1), 1)) for k, v in self_time.most_common(top)
        ],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    result = summarise(args.profile, args.top)
    print(f"samples: {result['samples']}")
    print("by component (inclusive, % of samples):")
    for k, v in result["components"].items():  # type: ignore[union-attr]
        print(f"  {v:5.1f}%  {k}")
    print("by owner (exclusive: stdlib and socket time charged to the library calling it):")
    for k, v in result["owners"].items():  # type: ignore[union-attr]
        print(f"  {v:5.1f}%  {k}")
    print("by relay stage (inclusive):")
    for k, v in result["stages"].items():  # type: ignore[union-attr]
        print(f"  {v:5.1f}%  {k}")
    print("top functions by self time:")
    for k, v in result["top_self"]:  # type: ignore[union-attr]
        print(f"  {v:5.1f}%  {k}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
