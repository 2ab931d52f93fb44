"""`mozrest-relay doctor`: the set-up checked in order, one line per check with what to do.

The checks follow the path a state takes: settings, the database, its schema, the clocks, the
webhook, the Partner API, the workers, the backlog. A check that needs an earlier one that failed
is skipped and says so. The exit status is 0 only when nothing the relay needs to deliver failed;
warnings (a clock skew, a Partner API problem, a backlog) leave it at 0.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal, TypeVar
from urllib.parse import urlsplit

import httpx
from sqlalchemy import exc as sa_exc

from app.db import create_engine
from app.migrate import schema_problem
from app.models import ACTIVE_STATUSES
from app.policy import KNOWN_STATUSES
from app.runtime import build_store, describe_database_error, safe_database_url
from app.settings import ConfigError, Settings, load_settings
from app.states import CircuitState, DeliveryStatus
from app.store import Store, StoreError

Verdict = Literal["ok", "warn", "fail", "skip"]

#: Largest difference between this host's clock and the database's before it is worth a warning.
CLOCK_SKEW_SECONDS = 1.0
#: A state waiting longer than this is worth a look.
BACKLOG_WARN_SECONDS = 300.0
#: No check waits longer than this for an answer.
CHECK_TIMEOUT_SECONDS = 5.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report: what was checked, the verdict, what was found and what to do."""

    name: str
    verdict: Verdict
    detail: str

    def line(self) -> str:
        return f"{self.verdict:<4}  {self.name:<11} {self.detail}"


@dataclass
class Doctor:
    """Runs the checks in order; each may stop the ones that depend on it."""

    venue_id: str | None
    checks: list[Check] = field(default_factory=list)
    settings: Settings | None = None
    store: Store | None = None
    database_ok: bool = False
    schema_ok: bool = False

    def add(self, name: str, verdict: Verdict, detail: str) -> None:
        check = Check(name, verdict, detail)
        self.checks.append(check)
        print(check.line(), flush=True)

    @property
    def failed(self) -> bool:
        return any(check.verdict == "fail" for check in self.checks)

    async def run(self) -> None:
        self.check_settings()
        if self.settings is None:
            for name in ("database", "schema", "clock", "webhook", "partner-api", "workers"):
                self.add(name, "skip", "needs settings that parse")
            self.add("backlog", "skip", "needs settings that parse")
            return
        self.store = build_store(
            self.settings, create_engine(self.settings.database_url, pool_size=1)
        )
        try:
            clock_skew = await self.check_database()
            await self.check_schema()
            self.check_clock(clock_skew)
            await self.check_webhook()
            await self.check_partner_api()
            await self.check_workers()
            await self.check_backlog()
        finally:
            await self.store.engine.dispose()

    # -- the checks, in order -------------------------------------------------------------

    def check_settings(self) -> None:
        try:
            settings = load_settings()
        except ConfigError as exc:
            self.add("settings", "fail", f"{exc}: fix it in the environment or .env")
            return
        self.settings = settings
        try:
            settings.check_can_send()
        except ConfigError as exc:
            self.add("settings", "fail", str(exc))
            return
        unknown = sorted(settings.relay_send_statuses - KNOWN_STATUSES)
        if unknown:
            self.add(
                "settings",
                "warn",
                f"RELAY_SEND_STATUSES names {', '.join(unknown)}, none of the usual statuses "
                f"({', '.join(sorted(KNOWN_STATUSES))}; compared exactly): check the spelling",
            )
            return
        self.add(
            "settings",
            "ok",
            f"parsed; sends to {settings.webhook_url}, first at status "
            f"{','.join(sorted(settings.relay_send_statuses))}",
        )

    async def check_database(self) -> float | None:
        """The database answers; returns how far its clock is ahead of this host's."""
        assert self.settings is not None and self.store is not None
        url = safe_database_url(self.settings.database_url)
        before = time.time()
        try:
            database_now = await _within(self.store.ping())
        except (StoreError, sa_exc.SQLAlchemyError, OSError, TimeoutError) as exc:
            self.add(
                "database",
                "fail",
                f"{url} does not answer: {describe_database_error(exc)}; check DATABASE_URL, "
                "that the server runs and that this host may reach it",
            )
            return None
        after = time.time()
        self.database_ok = True
        self.add("database", "ok", f"{url} answers ({(after - before) * 1000:.0f} ms)")
        host_now = datetime.fromtimestamp((before + after) / 2, UTC)
        return (database_now - host_now).total_seconds()

    async def check_schema(self) -> None:
        assert self.store is not None
        if not self.database_ok:
            self.add("schema", "skip", "needs the database")
            return
        try:
            revision = await _within(self.store.schema_revision())
        except (StoreError, sa_exc.SQLAlchemyError, OSError, TimeoutError) as exc:
            self.add("schema", "fail", f"cannot read it: {describe_database_error(exc)}")
            return
        problem = schema_problem(revision)
        if problem is not None:
            self.add("schema", "fail", problem)
            return
        self.schema_ok = True
        self.add("schema", "ok", f"at revision {revision}, this relay's newest")

    def check_clock(self, skew_seconds: float | None) -> None:
        assert self.settings is not None
        if skew_seconds is None:
            self.add("clock", "skip", "needs the database")
            return
        if self.settings.dialect == "sqlite":
            self.add("clock", "ok", "the database is a file on this host: one clock")
            return
        if abs(skew_seconds) > CLOCK_SKEW_SECONDS:
            self.add(
                "clock",
                "warn",
                f"the database's clock is {skew_seconds:+.1f}s from this host's: the relay times "
                "everything on the database's clock, but logs and times you compare will "
                "disagree; sync both with NTP",
            )
            return
        self.add("clock", "ok", f"this host and the database agree within {abs(skew_seconds):.2f}s")

    async def check_webhook(self) -> None:
        assert self.settings is not None
        url = self.settings.webhook_url
        host = urlsplit(url).hostname or ""
        port = urlsplit(url).port or (443 if url.startswith("https") else 80)
        try:
            await _within(asyncio.get_running_loop().getaddrinfo(host, port))
        except (OSError, TimeoutError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "timed out"
            self.add(
                "webhook",
                "fail",
                f"cannot resolve {host} ({reason}): check MOZREST_WEBHOOK_URL / MOZREST_ENV and "
                "this host's DNS",
            )
            return
        headers = {}
        if self.settings.mozrest_webhook_token is not None:
            headers["Authorization"] = f"Bearer {self.settings.mozrest_webhook_token}"
        try:
            async with httpx.AsyncClient(timeout=CHECK_TIMEOUT_SECONDS) as client:
                # OPTIONS carries no booking: nothing reaches a POS, whatever the answer.
                response = await client.options(url, headers=headers)
        except httpx.HTTPError as exc:
            self.add(
                "webhook",
                "fail",
                f"{url} does not answer ({type(exc).__name__}): check MOZREST_WEBHOOK_URL, and "
                "that this host may reach it (firewall, proxy)",
            )
            return
        rejected = await self._fleet_credentials_rejected()
        if rejected:
            self.add(
                "webhook",
                "fail",
                f"{url} answers, but Mozrest refuses MOZREST_WEBHOOK_TOKEN (401 to the workers' "
                "recent deliveries; sending is paused): set the token Mozrest gave you",
            )
            return
        if response.status_code in (401, 403):
            self.add(
                "webhook",
                "warn",
                f"{url} answers HTTP {response.status_code} to a request without a booking: the "
                "token may be wrong, or it asks one of every request; only a delivery can tell",
            )
            return
        self.add(
            "webhook",
            "ok",
            f"{url} answers (HTTP {response.status_code} to OPTIONS, which sends no booking); "
            "whether MOZREST_WEBHOOK_TOKEN is accepted only a delivery tells: a 401 pauses "
            "sending and shows in /readyz and /api/stats",
        )

    async def check_partner_api(self) -> None:
        assert self.settings is not None
        if self.venue_id is None:
            self.add(
                "partner-api",
                "skip",
                "give --venue VENUE_ID to check MOZREST_API_KEY (POS tables; not needed to "
                "deliver)",
            )
            return
        from app.partner_api import PartnerApi, PartnerApiError

        api = PartnerApi(
            base_url=self.settings.api_url,
            api_key=self.settings.mozrest_api_key,
            timeout_seconds=CHECK_TIMEOUT_SECONDS,
        )
        try:
            answer = await api.pos_tables(self.venue_id)
        except PartnerApiError as exc:
            self.add(
                "partner-api",
                "warn",
                f"{self.settings.api_url}: {exc} (POS tables only; delivery does not need them)",
            )
            return
        finally:
            await api.aclose()
        self.add(
            "partner-api",
            "ok",
            f"MOZREST_API_KEY works: venue {self.venue_id} has {answer['count']} POS tables",
        )

    async def check_workers(self) -> None:
        assert self.settings is not None and self.store is not None
        if not self.schema_ok:
            self.add("workers", "skip", "needs the schema")
            return
        stale_after = 3 * self.settings.relay_heartbeat_interval_seconds
        try:
            workers = await _within(self.store.list_workers(seen_within_seconds=stale_after))
        except (StoreError, sa_exc.SQLAlchemyError, OSError, TimeoutError) as exc:
            self.add("workers", "fail", f"cannot read them: {describe_database_error(exc)}")
            return
        if not workers:
            self.add(
                "workers",
                "fail",
                f"no worker has checked in within {stale_after:g}s: start mozrest-relay run (or "
                "worker) against this database; its log says why it stopped",
            )
            return
        hosts = sorted({f"{w['hostname']}:{w['pid']}" for w in workers})
        open_circuits = [w for w in workers if w["circuit"] != CircuitState.CLOSED]
        if open_circuits:
            self.add(
                "workers",
                "warn",
                f"{len(workers)} alive ({', '.join(hosts[:5])}); the circuit is open on "
                f"{len(open_circuits)}: Mozrest keeps failing, sending resumes when a probe "
                "succeeds",
            )
            return
        self.add("workers", "ok", f"{len(workers)} alive ({', '.join(hosts[:5])})")

    async def check_backlog(self) -> None:
        assert self.settings is not None and self.store is not None
        if not self.schema_ok:
            self.add("backlog", "skip", "needs the schema")
            return
        try:
            gauges = await _within(
                self.store.gauges(
                    stale_after_seconds=3 * self.settings.relay_heartbeat_interval_seconds
                )
            )
        except (StoreError, sa_exc.SQLAlchemyError, OSError, TimeoutError) as exc:
            self.add("backlog", "fail", f"cannot read it: {describe_database_error(exc)}")
            return
        oldest = gauges.oldest_pending_age_seconds
        waiting = sum(gauges.deliveries.get(status, 0) for status in ACTIVE_STATUSES)
        dead = gauges.deliveries.get(DeliveryStatus.DEAD, 0)
        summary = (
            f"{gauges.outbox_unprocessed} outbox rows unprocessed, {waiting} deliveries waiting"
            + (f", the oldest waiting {oldest:.0f}s" if oldest is not None else "")
            + f", {dead} dead"
        )
        if oldest is not None and oldest > BACKLOG_WARN_SECONDS:
            self.add(
                "backlog",
                "warn",
                f"{summary}: states wait longer than {BACKLOG_WARN_SECONDS:g}s; see "
                "/api/deliveries?status=retrying for Mozrest's answers",
            )
        elif dead:
            self.add(
                "backlog",
                "warn",
                f"{summary}: see /api/deliveries?status=dead, replay with POST "
                "/api/deliveries/retry",
            )
        else:
            self.add("backlog", "ok", summary)

    async def _fleet_credentials_rejected(self) -> bool:
        if not self.schema_ok or self.store is None or self.settings is None:
            return False
        try:
            fleet = await _within(
                self.store.fleet_health(
                    stale_after_seconds=3 * self.settings.relay_heartbeat_interval_seconds
                )
            )
        except (StoreError, sa_exc.SQLAlchemyError, OSError, TimeoutError):
            return False
        return fleet.credentials_rejected


async def _within(call: Awaitable[T]) -> T:
    return await asyncio.wait_for(call, timeout=CHECK_TIMEOUT_SECONDS)


def run_doctor(*, venue_id: str | None) -> int:
    """Print the report; 0 when the relay can deliver, 1 otherwise."""
    doctor = Doctor(venue_id=venue_id)
    asyncio.run(doctor.run())
    if doctor.failed:
        first = next(check for check in doctor.checks if check.verdict == "fail")
        print(
            f"not ready to deliver: fix the first fail line ({first.name}) and run "
            "mozrest-relay doctor again",
            flush=True,
        )
        return 1
    warnings = sum(check.verdict == "warn" for check in doctor.checks)
    print(
        "ready to deliver"
        + (f" ({warnings} warning{'s' * (warnings > 1)} above)" if warnings else ""),
        flush=True,
    )
    return 0


__all__ = ["Check", "Doctor", "run_doctor"]
