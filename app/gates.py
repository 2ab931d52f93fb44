"""Whether requests may go to Mozrest: the circuit breaker, the credentials pause, the probe.

Two breakers shut the gate: the circuit (retryable failures in a row: Mozrest is down) and the
credentials (a 401: our token is wrong). While either is shut, one probe per cool-down may go;
its answer opens or keeps the gate (docs/adr/0001-delivery-semantics.md).
"""

from __future__ import annotations

import asyncio
import time

from app.policy import Breaker, Verdict
from app.states import CredentialsState


class Gates:
    """The circuit and credentials breakers of one worker, and its single probe."""

    def __init__(self, *, threshold: int, cooldown_seconds: float) -> None:
        self.circuit = Breaker(threshold=threshold, cooldown_seconds=cooldown_seconds)
        self.credentials = Breaker(threshold=1, cooldown_seconds=cooldown_seconds)
        self.probe_in_flight = False
        self.changed = asyncio.Event()
        """Set when either breaker changes state: the heartbeat reports it at once."""

    def may_send(self) -> bool:
        """Whether requests may go now (both breakers closed)."""
        return self.circuit.closed and self.credentials.closed

    @property
    def circuit_state(self) -> str:
        return str(self.circuit.state)

    @property
    def credentials_state(self) -> str:
        state = CredentialsState.OK if self.credentials.closed else CredentialsState.REJECTED
        return str(state)

    def claimable(self, free_slots: int) -> tuple[int, bool]:
        """How many claims dispatch may make now, and whether they are a probe."""
        if self.may_send():
            return free_slots, False
        if self.probe_in_flight:
            return 0, False
        now = time.monotonic()
        shut = [b for b in (self.circuit, self.credentials) if not b.closed]
        if all(b.allows_probe(now) for b in shut):
            return 1, True
        return 0, False

    def start_probe(self) -> None:
        self.probe_in_flight = True
        for breaker in (self.circuit, self.credentials):
            if not breaker.closed:
                breaker.start_probe()

    def end_probe(self, *, abandoned: bool) -> None:
        """The probe was answered, or (`abandoned`) could not be sent: try again later."""
        self.probe_in_flight = False
        if abandoned:
            now = time.monotonic()
            self.circuit.abandon_probe(now)
            self.credentials.abandon_probe(now)

    def record(self, verdict: Verdict) -> bool:
        """Move the breakers on one answer's verdict; True when either changed state."""
        before = (self.circuit.state, self.credentials.state)
        now = time.monotonic()
        if verdict is Verdict.DELIVERED:
            self.circuit.record_success()
            self.credentials.record_success()
        elif verdict is Verdict.RETRY:
            self.circuit.record_failure(now)
        elif verdict is Verdict.CREDENTIALS_REJECTED:
            self.circuit.record_success()  # Mozrest answered: not an outage
            self.credentials.record_failure(now)
        else:
            self.circuit.record_success()
            self.credentials.abandon_probe(now)  # says nothing of our credentials
        changed = (self.circuit.state, self.credentials.state) != before
        if changed:
            self.changed.set()
        return changed
