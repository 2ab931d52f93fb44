"""Checks a delivery history against the invariants of SPEC 3.1 to 3.4: pure functions, no I/O.

A history has two sides. What the RMS wrote: the outbox rows in id order, each with the payload
text as the database holds it and the outcome the relay gave it. What the receiver got: every
request in arrival order, with its arrival and finish times (one monotonic clock), its answer
(`None` for a dropped connection) and its JSON body.

The rules, per booking:

- **lost**: when the relay has settled, the state Mozrest last accepted (the 2xx request that
  finished last) must equal the booking's newest valid state, compared normalised (SPEC 3.5). The
  send policy (SPEC 3.6) allows one exception: a booking whose newest state has no send status and
  that never had a request may have nothing at all (its seated state was coalesced away and the
  newest one `held`). A row left without an outcome is lost too (SPEC 3.1).
- **stale**: no request carries a state older than one an earlier request of the same booking
  carried (SPEC 3.2), whatever the answers were. Equal states written at several ids (A, B, A) are
  given the reading most favourable to the relay.
- **overlap**: no request of a booking arrives before the previous one finished (SPEC 3.3).
- **unexpected**: a booking that never had a state with a send status is never sent at all.
- **phantom**: every request carries a state the RMS actually wrote for that booking.
- **outcome**: a row is `invalid` exactly when its payload breaks the contract.

Duplicates (the same written state accepted twice) are counted, not flagged: delivery is
at-least-once (ADR 0001).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.contract import ContractError, State, canonical, parse_state, serialize

DEFAULT_SEND_STATUSES = frozenset({"seated"})
#: Rules whose violations count as lost in the figures.
LOST_RULES = ("lost", "unsettled")


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One row the RMS wrote; `payload_text` is the column as the database renders it."""

    id: int
    booking_id: str
    venue_id: str
    payload_text: str | None
    outcome: str | None


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """One request the receiver got; `status_code` None means the connection was dropped."""

    booking_id: str | None
    arrival_ns: int
    finished_ns: int
    status_code: int | None
    body: Any
    seq: int = 0

    @property
    def accepted(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True, slots=True)
class Violation:
    rule: str
    booking_id: str | None
    detail: str

    def __str__(self) -> str:
        return f"{self.rule} [{self.booking_id}]: {self.detail}"


@dataclass(slots=True)
class Report:
    """What a history shows: counts, and every broken rule with its booking."""

    changes: int
    bookings: int
    requests: int
    accepted: int
    duplicates: int
    violations: list[Violation] = field(default_factory=list)

    def count(self, *rules: str) -> int:
        return sum(1 for v in self.violations if v.rule in rules)

    @property
    def lost(self) -> int:
        return self.count(*LOST_RULES)

    @property
    def stale(self) -> int:
        return self.count("stale")

    @property
    def overlaps(self) -> int:
        return self.count("overlap")

    @property
    def ok(self) -> bool:
        return not self.violations

    def describe(self, limit: int = 20) -> str:
        counts = Counter(v.rule for v in self.violations)
        head = (
            f"{self.changes} changes, {self.bookings} bookings, {self.requests} requests "
            f"({self.accepted} accepted, {self.duplicates} duplicates); violations: "
            + (", ".join(f"{rule} {n}" for rule, n in sorted(counts.items())) or "none")
        )
        shown = [f"  {v}" for v in self.violations[:limit]]
        if len(self.violations) > limit:
            shown.append(f"  ... and {len(self.violations) - limit} more")
        return "\n".join([head, *shown])


def sendable_state(
    row: OutboxRow, *, send_items: bool = True, max_payload_bytes: int = 65536
) -> State | None:
    """The row's normalised state, or None when the contract makes it `invalid` (SPEC 3.7-3.8).

    The size limit applies to the serialised state (what goes on the wire), not to however the
    database happens to render the stored JSON.
    """
    if row.payload_text is None:
        return None
    try:
        state = parse_state(json.loads(row.payload_text))
    except (ValueError, RecursionError):  # ContractError is a ValueError
        return None
    if state["bookingId"] != row.booking_id or state["venueId"] != row.venue_id:
        return None
    if not send_items:
        state.pop("items", None)
    if len(serialize(state)) > max_payload_bytes:
        return None
    return state


def _wire_state(body: Any) -> State | None:
    try:
        return parse_state(body)
    except (ContractError, RecursionError):
        return None


def check(
    outbox: Sequence[OutboxRow],
    received: Sequence[ReceivedRequest],
    *,
    send_statuses: frozenset[str] = DEFAULT_SEND_STATUSES,
    send_items: bool = True,
    max_payload_bytes: int = 65536,
) -> Report:
    """Check a settled history; see the module docstring for the rules."""
    violations: list[Violation] = []
    # Valid states per booking, oldest first, with their outbox ids.
    states: dict[str, list[tuple[int, State]]] = defaultdict(list)
    booking_ids: dict[str, None] = {}
    for row in sorted(outbox, key=lambda r: r.id):
        booking_ids.setdefault(row.booking_id)
        if row.outcome is None:
            violations.append(
                Violation("unsettled", row.booking_id, f"outbox row {row.id} has no outcome")
            )
        state = sendable_state(row, send_items=send_items, max_payload_bytes=max_payload_bytes)
        if (state is None) != (row.outcome == "invalid") and row.outcome is not None:
            expected = "invalid" if state is None else "a valid outcome"
            violations.append(
                Violation(
                    "outcome",
                    row.booking_id,
                    f"row {row.id} is {row.outcome!r}, expected {expected}",
                )
            )
        if state is not None:
            states[row.booking_id].append((row.id, canonical(state)))

    requests: dict[str | None, list[ReceivedRequest]] = defaultdict(list)
    for request in sorted(received, key=lambda r: (r.arrival_ns, r.seq)):
        requests[request.booking_id].append(request)
    for booking_id in requests:
        if booking_id is not None:
            booking_ids.setdefault(booking_id)
    for request in requests.pop(None, []):
        violations.append(Violation("phantom", None, f"request {request.seq} names no booking"))

    duplicates = 0
    for booking_id in booking_ids:
        booking_states = states.get(booking_id, [])
        booking_requests = requests.get(booking_id, [])
        violations.extend(_check_overlaps(booking_id, booking_requests))
        found, duplicate_count = _check_order(booking_id, booking_states, booking_requests)
        violations.extend(found)
        duplicates += duplicate_count
        violations.extend(_check_final(booking_id, booking_states, booking_requests, send_statuses))

    return Report(
        changes=len(outbox),
        bookings=len(booking_ids),
        requests=len(received),
        accepted=sum(1 for r in received if r.accepted),
        duplicates=duplicates,
        violations=violations,
    )


def _check_overlaps(booking_id: str, requests: Iterable[ReceivedRequest]) -> list[Violation]:
    found = []
    busy_until: int | None = None
    for request in requests:
        if busy_until is not None and request.arrival_ns < busy_until:
            found.append(
                Violation(
                    "overlap",
                    booking_id,
                    f"request {request.seq} arrived {(busy_until - request.arrival_ns) / 1e6:.1f}"
                    " ms before the previous one of this booking finished",
                )
            )
        busy_until = max(busy_until or 0, request.finished_ns)
    return found


def _check_order(
    booking_id: str, states: list[tuple[int, State]], requests: Iterable[ReceivedRequest]
) -> tuple[list[Violation], int]:
    """Stale and phantom requests, and the number of duplicate acceptances."""
    found = []
    newest_sent = 0
    accepted_versions: set[int] = set()
    duplicates = 0
    for request in requests:
        wire = _wire_state(request.body)
        wire_canonical = None if wire is None else canonical(wire)
        candidates = [i for i, s in states if s == wire_canonical]
        if not candidates:
            found.append(
                Violation(
                    "phantom", booking_id, f"request {request.seq} carries a state never written"
                )
            )
            continue
        # The smallest matching id not older than what was already sent keeps every later
        # request's options open: if any reading is in order, this one is.
        in_order = [i for i in candidates if i >= newest_sent]
        if in_order:
            version = min(in_order)
            newest_sent = version
        else:
            version = max(candidates)
            found.append(
                Violation(
                    "stale",
                    booking_id,
                    f"request {request.seq} carries outbox row {version}'s state after row "
                    f"{newest_sent}'s was sent",
                )
            )
        if request.accepted:
            if version in accepted_versions:
                duplicates += 1
            accepted_versions.add(version)
    return found, duplicates


def _check_final(
    booking_id: str,
    states: list[tuple[int, State]],
    requests: Sequence[ReceivedRequest],
    send_statuses: frozenset[str],
) -> list[Violation]:
    if not any(state["status"] in send_statuses for _, state in states):
        if requests:
            return [
                Violation(
                    "unexpected",
                    booking_id,
                    f"{len(requests)} request(s) for a booking with no state in "
                    f"{sorted(send_statuses)}",
                )
            ]
        return []
    newest_id, newest = states[-1]
    accepted = [r for r in requests if r.accepted]
    if not accepted:
        if newest["status"] not in send_statuses and not requests:
            return []  # coalesced into a state the send policy holds back
        return [Violation("lost", booking_id, f"row {newest_id}'s state was never accepted")]
    final = max(accepted, key=lambda r: (r.finished_ns, r.seq))
    wire = _wire_state(final.body)
    if wire is None or canonical(wire) != newest:
        return [
            Violation(
                "lost",
                booking_id,
                f"Mozrest holds request {final.seq}'s state, not row {newest_id}'s (the newest)",
            )
        ]
    return []


@dataclass(frozen=True, slots=True)
class Lag:
    """How long one written state waited: from its commit until Mozrest held it or a newer
    state of its booking (`seconds` None: it never did)."""

    booking_id: str
    outbox_id: int
    committed_ns: int
    seconds: float | None


def delivery_lags(
    outbox: Sequence[OutboxRow],
    received: Sequence[ReceivedRequest],
    committed_ns: Mapping[int, int],
    *,
    send_statuses: frozenset[str] = DEFAULT_SEND_STATUSES,
) -> list[Lag]:
    """For each row with a commit time (outbox id to monotonic ns, the receiver's clock): how
    long until Mozrest held its state or a newer one of its booking (held: the last accepted
    request by finish time). Rows the send policy keeps back are left out: invalid and `held`
    rows, rows before the booking's first state with a send status, and bookings never sent
    whose newest row is `held` (SPEC 3.6)."""
    rows: dict[str, list[tuple[OutboxRow, State | None]]] = defaultdict(list)
    for row in sorted(outbox, key=lambda r: r.id):
        state = sendable_state(row)
        rows[row.booking_id].append((row, None if state is None else canonical(state)))
    accepted: dict[str, list[tuple[int, State | None]]] = defaultdict(list)
    for request in sorted(received, key=lambda r: (r.finished_ns, r.seq)):
        if request.accepted and request.booking_id is not None:
            wire = _wire_state(request.body)
            accepted[request.booking_id].append(
                (request.finished_ns, None if wire is None else canonical(wire))
            )
    lags: list[Lag] = []
    for booking_id, booking_rows in rows.items():
        answers = accepted.get(booking_id, [])
        never_sent_and_held = not answers and booking_rows[-1][0].outcome == "held"
        sendable = False
        for index, (row, state) in enumerate(booking_rows):
            if state is not None and state["status"] in send_statuses:
                sendable = True
            at = committed_ns.get(row.id)
            if at is None or state is None or row.outcome in ("held", "invalid"):
                continue
            if not sendable or never_sent_and_held:
                continue
            targets = [s for _, s in booking_rows[index:] if s is not None]
            held: State | None = None
            seconds: float | None = None
            for finished_ns, wire in answers:
                if finished_ns <= at:
                    held = wire
                elif wire in targets:
                    seconds = (finished_ns - at) / 1e9
                    break
            if held is not None and held in targets:
                seconds = 0.0
            lags.append(Lag(booking_id, row.id, at, seconds))
    return lags


def timeline(
    booking_id: str, outbox: Sequence[OutboxRow], received: Sequence[ReceivedRequest]
) -> str:
    """One booking's history, for a person reading a failure: its rows, then its requests (times
    in ms from the first request)."""
    lines = [f"booking {booking_id}:"]
    for row in outbox:
        if row.booking_id == booking_id:
            lines.append(f"  row {row.id} {row.outcome}: {(row.payload_text or '')[:160]}")
    requests = sorted(
        (r for r in received if r.booking_id == booking_id), key=lambda r: (r.arrival_ns, r.seq)
    )
    origin = requests[0].arrival_ns if requests else 0
    for r in requests:
        body = json.dumps(r.body, ensure_ascii=False)[:160]
        lines.append(
            f"  request {r.seq} {(r.arrival_ns - origin) / 1e6:.0f}-"
            f"{(r.finished_ns - origin) / 1e6:.0f} ms -> {r.status_code}: {body}"
        )
    return "\n".join(lines)
