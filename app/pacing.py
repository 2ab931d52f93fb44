"""How much a backlog's ingest leases at a time, by how long Mozrest takes to answer.

While a backlog waits, ingest refills the request slots its answers free. When Mozrest answers
quickly, slots free all the time and each ingest leases every free slot: the fewest
transactions. When each request takes several times an ingest (Mozrest answering in a few
hundred milliseconds), the answers of a wave of requests sent together all come back together,
and the slots would stay empty while the next ingest runs: with 64 in flight at 200 ms, one
64-row ingest of about 40 ms made each cycle 240 ms (81% of 64 / 0.2 s). Leasing a quarter of
the concurrency at a time staggers the waves, so that each refill overlaps the other waves'
requests instead of following them (`make bench BENCH_ARGS="--only scaleout"`;
docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass

#: Requests count as slow when one takes this many times what refilling every slot in one
#: ingest would (the ingest's time per leased row, times the concurrency). Measured: a drain
#: bound by the worker's core stays at 0.2 (0.7 at worst: a request's own exchange takes 2-3 ms
#: against 12 ms to refill 64 slots); Mozrest answering in 200 ms gives about 5 at 64 in flight
#: and 2.7 at 256. Not the ingest's own time, which shrinks with the waves it makes.
SLOW_RATIO = 1.5
#: Weight of the newest figure in the running averages.
SMOOTHING = 0.2
#: Waves a backlog's slots are refilled in while requests are slow.
WAVES = 4


@dataclass(slots=True)
class Pacing:
    """Running averages of a request's duration and of an ingest's time per leased row, in
    seconds."""

    concurrency: int
    request_seconds: float = 0.0
    ingest_row_seconds: float = 0.0

    def requests_took(self, seconds: list[float]) -> None:
        for value in seconds:
            self.request_seconds = _average(self.request_seconds, value)

    def ingest_took(self, seconds: float, leased: int) -> None:
        if leased > 0:
            self.ingest_row_seconds = _average(self.ingest_row_seconds, seconds / leased)

    @property
    def slow(self) -> bool:
        refill = self.ingest_row_seconds * self.concurrency
        return refill > 0 and self.request_seconds > SLOW_RATIO * refill

    def wave(self) -> int | None:
        """How many deliveries a backlog's ingest may lease at once: None for every free slot
        (quick answers), a quarter of the concurrency while requests are slow."""
        return max(1, self.concurrency // WAVES) if self.slow else None


def _average(current: float, value: float) -> float:
    return value if current == 0.0 else current + SMOOTHING * (value - current)
