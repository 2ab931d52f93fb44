"""Freezing relay processes: SIGSTOP at a chosen moment, SIGCONT after a while, always.

A frozen process (SIGSTOP, a VM pause, a long GC pause) keeps its sockets, its database sessions
and every lock those sessions hold, but runs no code. The freezer chooses the moment from
PostgreSQL's `pg_stat_activity`, read every millisecond or two on a dedicated connection: a relay
process names its sessions `mozrest-relay/<pid>` (`application_name`), so a row tells which
replica a session belongs to, what it runs (`query`) and whether it is inside a transaction.
Relays older than that named every session `mozrest-relay`; their sessions are matched to
processes by client port, read from /proc.

The phases a freeze can aim at, and when it *landed* inside one:

- `ingest`: a session of the process is inside a transaction that holds the ingest lock (its
  `backend_xid` is the lock row's `xmax`). Landed: that transaction is still open once the
  process has stopped.
- `claim`: a session is inside a `claim_due` transaction (the scan for due deliveries, the booking
  rows locked with SKIP LOCKED, the lease update). Landed: as for ingest.
- `record`: a session is inside a `record` transaction (`INSERT INTO mozrest_attempt`). Landed:
  as for ingest.
- `request`: no session of the process is in a transaction and it holds live leases granted a
  moment ago, so its requests are on the wire (the receiver holds them with latency). Landed:
  the receiver's log shows a request of one of those bookings that arrived before the stop and
  finished after it (`Freezer.verify_requests`, once the log is read).
- `send`: the moment a transaction that leased deliveries to the process (ingest or claim)
  commits, before its requests are all written: SPEC 9.3's window. Landed: some of those claims
  had not reached the receiver before the stop (`Freezer.verify_requests`).

- `idle`: no session of the process is in a transaction (to set a replica aside for a moment).
  Landed: still none once it has stopped.

`random` freezes at whatever moment it is; the freeze records what the process was doing.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import psycopg2
from sqlalchemy.engine import make_url

from tests.chaos.checker import ReceivedRequest

PHASES = ("ingest", "claim", "record", "request", "send", "idle")

#: Statements only `Store.claim_due` runs (kept in step with app/store.py's SQL): the scan for due
#: deliveries, the booking rows it locks with SKIP LOCKED, the lease and `sent_outbox_id` updates.
_CLAIM = re.compile(
    r"^SELECT mozrest_delivery\.booking_id FROM mozrest_delivery"
    r"|^SELECT mozrest_booking\..* FROM mozrest_booking .*FOR UPDATE SKIP LOCKED"
    r"|^UPDATE mozrest_delivery SET (?!status).*lease_owner=\$.* WHERE mozrest_delivery\.id = ANY"
    r"|^UPDATE mozrest_booking SET sent_outbox_id="
)
#: `Store.record`'s first write.
_RECORD = re.compile(r"^INSERT INTO mozrest_attempt")
_IN_TRANSACTION = ("active", "idle in transaction", "idle in transaction (aborted)")
#: How long the freezer sleeps between two reads of `pg_stat_activity`.
POLL_SECONDS = 0.001


@dataclass(frozen=True, slots=True)
class Session:
    """One relay session as `pg_stat_activity` shows it."""

    backend: int
    relay_pid: int | None
    state: str
    query: str
    xact_start: datetime | None
    holds_ingest: bool

    @property
    def in_transaction(self) -> bool:
        return (
            self.state in _IN_TRANSACTION
            and self.xact_start is not None
            and not self.query.startswith("COMMIT")
        )

    @property
    def phase(self) -> str | None:
        """`ingest`, `claim` or `record` when the session is inside one, else None."""
        if not self.in_transaction:
            return None
        if self.holds_ingest:
            return "ingest"
        if _CLAIM.search(self.query):
            return "claim"
        if _RECORD.search(self.query):
            return "record"
        return None


@dataclass(slots=True)
class Freeze:
    """One SIGSTOP and its SIGCONT, with what the process was doing when it stopped."""

    relay_pid: int
    wanted: str
    """The phase aimed at (`PHASES`), or `random`."""
    seen: str | None
    """The statement that showed the phase, or None when the wait for it ran out."""
    at_stop: str
    """What the process's sessions were doing once it had stopped: a phase, or `idle`."""
    landed: bool
    stopped_ns: int
    leased: dict[str, float] = field(default_factory=dict)
    """Bookings leased to the process when it stopped (its requests on the wire or about to be),
    with the seconds each lease had left."""
    thawed_ns: int | None = None
    misses: int = 0
    """Earlier tries that stopped the process a moment too late and thawed it at once."""
    on_wire: int = 0
    """Of `leased`, how many had a request at the receiver spanning the stop."""
    unsent: int = 0
    """Of `leased`, how many had no request at the receiver between the lease and the thaw."""

    @property
    def held_seconds(self) -> float:
        end = self.thawed_ns if self.thawed_ns is not None else time.monotonic_ns()
        return (end - self.stopped_ns) / 1e9

    def describe(self) -> str:
        seen = f" (seen: {self.seen[:70]})" if self.seen else ""
        return (
            f"pid {self.relay_pid} wanted {self.wanted}, at stop {self.at_stop}, "
            f"{'landed' if self.landed else 'missed'}, held {self.held_seconds:.1f} s, "
            f"{len(self.leased)} leased, {self.on_wire} on the wire, {self.unsent} unsent{seen}"
        )


def _process_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return "?"


def _client_ports(pid: int) -> set[int]:
    """The local TCP ports of a process's sockets (for relays that do not name their sessions)."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as lines:
                for line in list(lines)[1:]:
                    parts = line.split()
                    if len(parts) > 9 and parts[9] in inodes:
                        ports.add(int(parts[1].rpartition(":")[2], 16))
        except OSError:
            continue
    return ports


class Freezer:
    """Stops relay processes inside chosen phases and thaws them; `close()` (or leaving the
    `with` block) thaws every process still frozen, whatever happened."""

    _SESSIONS = """
        SELECT a.pid, a.application_name, a.client_port, a.state, a.query, a.xact_start,
               a.backend_xid IS NOT NULL AND a.backend_xid = l.xmax AS holds_ingest
        FROM pg_stat_activity a
        LEFT JOIN mozrest_lock l ON l.name = 'ingest'
        WHERE a.datname = current_database() AND a.application_name LIKE 'mozrest-relay%%'
          AND a.pid <> pg_backend_pid()
    """
    _LEASED = """
        SELECT d.booking_id, extract(epoch FROM d.lease_expires_at - clock_timestamp())
        FROM mozrest_delivery d JOIN mozrest_worker w ON w.id = d.lease_owner
        WHERE w.pid = %s AND d.status IN ('pending', 'retrying')
          AND d.lease_expires_at > clock_timestamp()
    """

    def __init__(self, database_url: str, *, relay_pids: Iterable[int], lease_seconds: float):
        url = make_url(database_url)
        self._conn = psycopg2.connect(
            host=url.host or "127.0.0.1",
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            dbname=url.database,
            application_name="chaos-freezer",
        )
        self._conn.autocommit = True
        self._cursor = self._conn.cursor()
        self.relay_pids = list(relay_pids)
        self.lease_seconds = lease_seconds
        self._ports: dict[int, int] = {}
        self._frozen: set[int] = set()
        self.freezes: list[Freeze] = []

    def __enter__(self) -> Freezer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.thaw_all()
        self._conn.close()

    # -- reading the server ---------------------------------------------------------------

    def sessions(self) -> list[Session]:
        self._cursor.execute(self._SESSIONS)
        rows = self._cursor.fetchall()
        found = []
        for backend, name, port, state, query, xact_start, holds in rows:
            found.append(
                Session(
                    backend=backend,
                    relay_pid=self._owner(name, port),
                    state=state or "",
                    query=" ".join((query or "").split()),
                    xact_start=xact_start,
                    holds_ingest=bool(holds),
                )
            )
        return found

    def _owner(self, application_name: str, port: int | None) -> int | None:
        _, _, pid = application_name.partition("/")
        if pid.isdigit():
            return int(pid)
        if port is None:
            return None
        if port not in self._ports:
            self._ports = {p: pid for pid in self.relay_pids for p in _client_ports(pid)}
        return self._ports.get(port)

    def leases(self, relay_pid: int) -> dict[str, float]:
        """Seconds of lease left, by booking id, for each live lease the process holds."""
        self._cursor.execute(self._LEASED, (relay_pid,))
        return {booking_id: float(left) for booking_id, left in self._cursor.fetchall()}

    # -- freezing -------------------------------------------------------------------------

    def _stop(self, pid: int) -> int:
        os.kill(pid, signal.SIGSTOP)
        self._frozen.add(pid)
        deadline = time.monotonic() + 2
        while _process_state(pid) not in ("T", "t") and time.monotonic() < deadline:
            time.sleep(0.0001)
        return time.monotonic_ns()

    def _cont(self, pid: int) -> None:
        self._frozen.discard(pid)
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass

    def thaw(self, freeze: Freeze) -> None:
        self._cont(freeze.relay_pid)
        freeze.thawed_ns = time.monotonic_ns()

    def thaw_all(self) -> None:
        for pid in list(self._frozen):
            self._cont(pid)
        now = time.monotonic_ns()
        for freeze in self.freezes:
            if freeze.thawed_ns is None:
                freeze.thawed_ns = now

    def _doing(self, pid: int) -> tuple[str, Session | None]:
        """What the (stopped) process's sessions are doing: the first phase found, or idle."""
        mine = [s for s in self.sessions() if s.relay_pid == pid]
        for session in mine:
            if session.phase is not None:
                return session.phase, session
        return "idle", None

    def stop_now(self, pid: int, *, wanted: str = "random") -> Freeze:
        """Freeze the process at whatever moment this is."""
        stopped = self._stop(pid)
        at_stop, _ = self._doing(pid)
        freeze = Freeze(pid, wanted, None, at_stop, wanted == "random", stopped)
        freeze.leased = self.leases(pid)
        self.freezes.append(freeze)
        return freeze

    def catch(
        self, pid: int, phase: str, *, timeout: float, tries: int = 5, send_delay: float = 0.0
    ) -> Freeze:
        """Freeze the process the moment `phase` shows. A stop that comes a moment too late
        (the transaction seen has ended) is thawed at once and tried again, up to `tries` times;
        when `timeout` runs out the process is frozen where it is (`landed` False). For `send`,
        the stop comes `send_delay` seconds after the leasing transaction commits."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        deadline = time.monotonic() + timeout
        misses = 0
        while time.monotonic() < deadline:
            seen = self._wait_for(pid, phase, deadline)
            if seen is None:
                break
            if phase == "send" and send_delay > 0:
                time.sleep(send_delay)
            stopped = self._stop(pid)
            freeze = self._confirm(pid, phase, seen, stopped)
            freeze.misses = misses
            if freeze.landed or misses + 1 >= tries:
                self.freezes.append(freeze)
                return freeze
            self._cont(pid)
            misses += 1
        freeze = self.stop_now(pid, wanted=phase)
        freeze.misses = misses
        return freeze

    def _wait_for(self, pid: int, phase: str, deadline: float) -> Session | str | None:
        """Poll until the phase shows: the session that shows it (or, for `request`, a note)."""
        armed: Session | None = None  # `send`: the leasing transaction seen, not yet committed
        while time.monotonic() < deadline:
            mine = [s for s in self.sessions() if s.relay_pid == pid]
            if phase in ("ingest", "claim", "record"):
                for session in mine:
                    if session.phase == phase:
                        return session
            elif phase == "idle":
                if not any(s.in_transaction for s in mine):
                    return "no transaction"
            elif phase == "request":
                if not any(s.in_transaction for s in mine):
                    leases = self.leases(pid)
                    # Granted at least 20 ms ago: the request has left, the receiver holds it.
                    if any(left < self.lease_seconds - 0.02 for left in leases.values()):
                        return f"{len(leases)} leases, no transaction"
            elif phase == "send":
                if armed is not None:
                    current = next((s for s in mine if s.backend == armed.backend), None)
                    if current is None or current.xact_start != armed.xact_start:
                        return armed  # committed: its requests are being written now
                else:
                    armed = next((s for s in mine if _leases_in(s)), None)
            time.sleep(POLL_SECONDS)
        return None

    def _confirm(self, pid: int, phase: str, seen: Session | str, stopped_ns: int) -> Freeze:
        at_stop, _ = self._doing(pid)
        leased = self.leases(pid)
        if isinstance(seen, Session):
            text = f"{seen.state}: {seen.query}"
            if phase == "send":
                landed = bool(leased)  # verified against the receiver's log later
            else:
                current = next(
                    (s for s in self.sessions() if s.backend == seen.backend and s.in_transaction),
                    None,
                )
                landed = current is not None and current.xact_start == seen.xact_start
                if phase == "ingest":
                    landed = landed and current is not None and current.holds_ingest
        elif phase == "idle":
            text = seen
            landed = not any(s.in_transaction for s in self.sessions() if s.relay_pid == pid)
        else:
            text = seen
            landed = bool(leased)  # verified against the receiver's log later
        return Freeze(pid, phase, text, at_stop, landed, stopped_ns, leased)

    def verify_requests(self, received: Sequence[ReceivedRequest]) -> None:
        """Count, per freeze, the leased bookings whose request was on the wire at the stop and
        those never sent before the thaw; settle `landed` for `request` and `send` freezes."""
        by_booking: dict[str, list[ReceivedRequest]] = {}
        for request in received:
            if request.booking_id is not None:
                by_booking.setdefault(request.booking_id, []).append(request)
        lease_ns = int(self.lease_seconds * 1e9)
        for freeze in self.freezes:
            freeze.on_wire = freeze.unsent = 0
            for booking_id, left in freeze.leased.items():
                requests = by_booking.get(booking_id, [])
                # Until its lease ends only the frozen process may send for the booking, and it
                # sends nothing after the stop: a request arriving by then left before the stop.
                lease_to = freeze.stopped_ns + left * 1e9
                lease_from = lease_to - lease_ns
                if any(r.arrival_ns <= freeze.stopped_ns < r.finished_ns for r in requests):
                    freeze.on_wire += 1
                elif not any(lease_from <= r.arrival_ns <= lease_to for r in requests):
                    freeze.unsent += 1
            if freeze.wanted == "request":
                freeze.landed = freeze.on_wire > 0
            elif freeze.wanted == "send":
                freeze.landed = freeze.unsent > 0


def _leases_in(session: Session) -> bool:
    """Whether the session is inside a transaction that leases deliveries: ingest writing its
    deliveries, or a claim writing its leases."""
    return session.in_transaction and (
        (session.holds_ingest and session.query.startswith("INSERT INTO mozrest_delivery"))
        or (session.phase == "claim" and session.query.startswith("UPDATE mozrest_delivery"))
    )


def summary(freezes: Sequence[Freeze]) -> dict[str, tuple[int, int]]:
    """Per wanted phase: (freezes that landed inside it, freezes aimed at it)."""
    counts: dict[str, list[int]] = {}
    for freeze in freezes:
        landed, total = counts.setdefault(freeze.wanted, [0, 0])
        counts[freeze.wanted] = [landed + freeze.landed, total + 1]
    return {phase: (landed, total) for phase, (landed, total) in counts.items()}


def windows(freezes: Sequence[Freeze]) -> list[tuple[int, int]]:
    """The (stop, thaw) times of the freezes, monotonic nanoseconds."""
    return [(f.stopped_ns, f.thawed_ns or time.monotonic_ns()) for f in freezes]
