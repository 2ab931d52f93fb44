"""The process's clock for leases: one that keeps running while the process is stopped.

A lease is granted on the database's clock and measured here from before the claiming call. The
measure must count time the process spent frozen (SIGSTOP, a VM pause, a suspended laptop), or a
thawed process would think its lease still good and send a state that a newer one has already
overtaken (docs/reliability.md). Linux's CLOCK_BOOTTIME counts suspended time too; elsewhere the
monotonic clock is the best there is.
"""

from __future__ import annotations

import time

_CLOCK = getattr(time, "CLOCK_BOOTTIME", None)


def lease_clock() -> float:
    """Seconds on a clock that never goes back and runs while the process is stopped."""
    if _CLOCK is not None:
        return time.clock_gettime(_CLOCK)
    return time.monotonic()
