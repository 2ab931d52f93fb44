"""A worker's request slots: how many claims it may hold, and who holds them.

A claim is held only while its request is on the wire (or about to be): a state still waiting for
a connection stays in the database, where a newer state can supersede it. Ingest and dispatch
both lease, so a claiming transaction asks for slots (`take(n)`) only once it knows how many it
can lease; reserving up front would hold every free slot for the whole transaction, and the two
would starve each other (measured: states left for dispatch's next poll, 50 ms later).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from app.store import Claim


class RequestSlots:
    """At most `concurrency` claims in flight; `freed` is set whenever one comes free."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency
        self.in_flight: dict[asyncio.Task[None], Claim] = {}
        """The request tasks on the wire, or about to be, and their claims."""
        self.reserved = 0
        """Slots granted to a claim still in its transaction."""
        self.freed = asyncio.Event()
        """Set when a request ends or a grant is returned; ingest waits on it to pace a backlog."""

    def free(self) -> int:
        return max(0, self.concurrency - len(self.in_flight) - self.reserved)

    @contextlib.contextmanager
    def granting(self, allowed: Callable[[], bool]) -> Iterator[Callable[[int], int]]:
        """A `take(wanted)` for one claiming call: grants free slots (none unless `allowed()`
        at that moment) and holds them until the call returns, when its claims are in flight."""
        taken = 0

        def take(wanted: int) -> int:
            nonlocal taken
            if not allowed():
                return 0
            granted = max(0, min(wanted, self.free()))
            self.reserved += granted
            taken += granted
            return granted

        try:
            yield take
        finally:
            self.reserved -= taken
            if taken:
                self.freed.set()

    def hold(self, task: asyncio.Task[None], claim: Claim) -> None:
        self.in_flight[task] = claim

    def release(self, task: asyncio.Task[None]) -> None:
        self.in_flight.pop(task, None)
        self.freed.set()
