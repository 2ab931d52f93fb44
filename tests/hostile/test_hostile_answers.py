"""Whatever Mozrest answers, the damage stays with that delivery (SPEC 9.1, 9.2, 3.9).

A real `mozrest-relay run` process sends to a stand-in whose answers are drawn at random: any
status, 1xx interim answers, any headers (Retry-After in every valid and invalid form, Date in
every zone spelling), bodies with NUL, invalid UTF-8 or a mebibyte, a reset after the status line,
a stall past the relay's timeout, a close without an answer. Then the stand-in turns healthy and
every booking gets one more material change: a dead delivery is never retried by itself, but a
newer state must still go. Each example checks what an operator and Mozrest would see: the newest
state of every booking is the last one Mozrest accepted, the process is alive, every row has an
outcome, every stored answer is sanitised text, and nothing waits for a retry past its deadline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, note
from hypothesis import strategies as st

from tests.hostile.answers import (
    MEBIBYTE_BODY,
    ZONES,
    Answer,
    HeaderValue,
    HttpDate,
)
from tests.hostile.conftest import PROFILE, PROPERTY_TIMEOUT
from tests.hostile.relay import (
    CIRCUIT_COOLDOWN_SECONDS,
    LEASE_SECONDS,
    RETRY_MAX_AGE_SECONDS,
    Relay,
    storable,
    wait_for,
    wait_until,
)

pytestmark = pytest.mark.slow

#: Stored answer bodies are cut to this many bytes of UTF-8 (SPEC section 6: 4 KiB).
BODY_LIMIT = 4096
#: Retry-After delays the tests use are either this short (honoured, and the example goes on)...
SHORT_SECONDS = 3
#: ... or at least this long: far beyond RELAY_RETRY_MAX_AGE, so the delivery is dead at once.
BEYOND_SECONDS = 3600
RETRYABLE = frozenset({408, 425, 429, *range(500, 600)})


def state(booking_id: str, **changes: Any) -> dict[str, Any]:
    """A valid seated state, already in the normalised form the relay sends."""
    return {
        "bookingId": booking_id,
        "venueId": "venue-hostile",
        "partySize": 2,
        "status": "seated",
        "tables": ["T1"],
        "date": 1790000000,
        **changes,
    }


# -- drawing answers ----------------------------------------------------------------------------

#: Retry-After values that are neither delta-seconds (ASCII digits only) nor an HTTP-date: each
#: must be ignored, so the normal backoff applies. Non-ASCII digit strings are numbers to Python's
#: `float()`; they spell 3600 so that honouring them would show.
NOT_RETRY_AFTER = [
    "²".encode(),
    "٣٦٠٠".encode(),  # Arabic-Indic 3600
    "３６００".encode(),  # fullwidth 3600
    "३६००".encode(),  # Devanagari 3600
    b"-3600",
    b"-999999999999",
    b"3600.5",
    b"0.25",
    b"1e5",
    b"0x10",
    b"+3600",
    b"3600 3600",
    b"soon",
    b"Infinity",
    b"NaN",
    b"\xff\xfe",
    b"Thu, 32 Foo 2024 25:61:61 GMT",
]
#: Delta-seconds far past RELAY_RETRY_MAX_AGE: the delivery is dead at once, naming Retry-After.
HUGE_RETRY_AFTER = [
    b"86400",
    b"999999999999",
    b"18446744073709551616",
    b"9" * 400,
]
#: (literal HTTP-date, whether it lies beyond the deadline)
LITERAL_DATES = [
    (b"Fri, 31 Dec 9999 23:59:59 GMT", True),
    (b"Sun, 06 Nov 1994 08:49:37 GMT", False),
    (b"Sunday, 06-Nov-94 08:49:37 GMT", False),
    (b"Sun Nov  6 08:49:37 1994", False),
    (b"Mon, 01 Jan 0001 00:00:00 GMT", False),
]
DATE_OFFSETS = [-86400.0, -1.0, 2.0, float(BEYOND_SECONDS), 400 * 86400.0, 7000 * 365 * 86400.0]


def _plausible(date: HttpDate) -> bool:
    # rfc850 writes two-digit years: a date decades ahead reads as one in the past (RFC 9110).
    return date.form != "rfc850" or date.offset_seconds < 10 * 365 * 86400


http_dates = st.builds(
    HttpDate,
    offset_seconds=st.sampled_from(DATE_OFFSETS),
    form=st.sampled_from(["imf", "rfc850", "asctime"]),
    zone=st.sampled_from(sorted(ZONES)),
).filter(_plausible)
retry_after_values: st.SearchStrategy[HeaderValue] = st.one_of(
    st.integers(0, SHORT_SECONDS).map(lambda n: str(n).encode()),
    st.sampled_from(HUGE_RETRY_AFTER),
    st.sampled_from(NOT_RETRY_AFTER),
    st.sampled_from([value for value, _ in LITERAL_DATES]),
    http_dates,
)
date_values: st.SearchStrategy[HeaderValue] = st.one_of(
    st.builds(
        HttpDate,
        offset_seconds=st.just(0.0),
        form=st.sampled_from(["imf", "rfc850", "asctime"]),
        zone=st.sampled_from(sorted(ZONES)),
    ),
    st.sampled_from([b"yesterday", b"", b"Fri, 31 Dec 9999 23:59:59 GMT", b"\xff"]),
)
junk_headers = st.one_of(
    st.tuples(
        st.sampled_from([b"X-Junk", b"Content-Type", b"Set-Cookie", b"Location", b"X-\xff"]),
        st.binary(max_size=40).filter(lambda v: b"\r" not in v and b"\n" not in v),
    ),
    st.just((b"X-Long", b"x" * 10000)),
    st.just((b"Content-Encoding", b"gzip")),
)
bodies = st.one_of(
    st.sampled_from(
        [
            b'{"status":"ok"}',
            b"",
            b"\x00",
            b'{"detail":"bad\x00request"}',
            b"\xff\xfe\xfd",
            b"caf\xc3\xa9 \xf0\x9f\x8d\x95 \xc3(",
            b"\x00" * 5000,
            b"a" + "é".encode() * 3000,  # the 4 KiB cut falls inside a character
            MEBIBYTE_BODY,
        ]
    ),
    st.binary(max_size=64),
)


@st.composite
def answers(draw: st.DrawFn) -> Answer:
    headers: list[tuple[bytes, HeaderValue]] = []
    if draw(st.booleans()):
        headers.append((b"Retry-After", draw(retry_after_values)))
    if draw(st.booleans()):
        headers.append((b"Date", draw(date_values)))
    headers.extend(draw(st.lists(junk_headers, max_size=2)))
    return Answer(
        status=draw(
            st.one_of(
                st.sampled_from([200, 204, 304, 401, 403, 408, 425, 429, 500, 503]),
                st.integers(200, 599),
            )
        ),
        headers=tuple(headers),
        body=draw(bodies),
        kind=draw(st.sampled_from(["answer"] * 6 + ["reset", "truncated", "stall", "close"])),
        framing=draw(st.sampled_from(["length", "chunked", "until-close"])),
        interim=tuple(draw(st.lists(st.sampled_from([100, 102, 103, 150, 199]), max_size=2))),
        reason=draw(st.sampled_from([b"Whatever", b"", "Ça va".encode(), b"\xff\xfe"])),
    )


# -- reading an answer as the contract does ----------------------------------------------------


def retry_after_beyond_deadline(answer: Answer) -> bool:
    """Whether the contract makes this answer end its delivery at once: a retryable status the
    relay can read, with a Retry-After (delta-seconds or HTTP-date) beyond RELAY_RETRY_MAX_AGE."""
    if answer.kind != "answer" or answer.status not in RETRYABLE or not _clean_head(answer):
        return False
    values = [value for name, value in answer.headers if name == b"Retry-After"]
    if len(values) != 1:
        return False
    value = values[0]
    if isinstance(value, HttpDate):
        return value.offset_seconds >= BEYOND_SECONDS
    if value.strip(b" \t").isdigit() and value.strip(b" \t").isascii():
        return int(value.strip(b" \t")) >= BEYOND_SECONDS
    return dict(LITERAL_DATES).get(value, False)


def _clean_head(answer: Answer) -> bool:
    """Headers any HTTP/1.1 client reads (no control bytes, no 10 kB line, no unknown coding)."""
    for name, value in answer.headers:
        if isinstance(value, HttpDate):
            continue
        if len(value) > 4000 or any((b < 0x20 and b != 0x09) or b == 0x7F for b in value):
            return False
        if name == b"Content-Encoding" or not name.isascii():
            return False
    return True


# -- one example ----------------------------------------------------------------------------


@dataclass
class Example:
    relay: Relay
    booking_ids: list[str]
    first_row: int
    rows: list[int]


def start_example(relay: Relay, script: list[Answer], bookings: int) -> Example:
    """Play `script` to the seated states of `bookings` new bookings, until it is used up or
    nothing is left to send."""
    relay.begin_example()
    relay.mozrest.play(script)
    booking_ids = [relay.new_id("ans") for _ in range(bookings)]
    rows = [relay.write(state(b)) for b in booking_ids]
    example = Example(relay, booking_ids, rows[0], rows)
    # An unanswered request waits for its lease before the retry; an honoured Retry-After for
    # up to SHORT_SECONDS: the cap gives each scripted answer that much time.
    deadline = time.monotonic() + min(4 + len(script) * (LEASE_SECONDS + 0.5), 20)
    while time.monotonic() < deadline:
        relay.assert_alive()
        if relay.mozrest.script_left() == 0 or settled(example):
            break
        time.sleep(0.05)
    return example


def settled(example: Example) -> bool:
    relay = example.relay
    if relay.unprocessed(example.rows):
        return False
    assert relay.engine is not None
    return not relay.active_deliveries(example.booking_ids)


def answered(example: Example) -> bool:
    """Whether the first answer to each booking's seated state has been recorded."""
    relay = example.relay
    return not relay.unprocessed(example.rows) and all(
        (relay.get("/api/deliveries", booking_id=b)["items"] or [{}])[-1].get("attempt_count")
        for b in example.booking_ids
    )


def finish_example(example: Example) -> dict[str, dict[str, Any]]:
    """Turn the stand-in healthy and write one more material change per booking; check that
    each booking's newest state is the last one Mozrest accepted, and everything an operator
    sees. Returns the final states."""
    relay = example.relay
    relay.assert_alive()
    assert_no_retry_past_deadline(relay, example.booking_ids)
    relay.mozrest.turn_healthy()
    finals = {b: state(b, partySize=7, notes="final change") for b in example.booking_ids}
    example.rows += [relay.write(final) for final in finals.values()]

    def newest_landed() -> bool:
        return settled(example) and all(
            relay.mozrest.last_accepted(b) == final for b, final in finals.items()
        )

    wait_until(
        newest_landed,
        timeout=15 + LEASE_SECONDS + 4 * CIRCUIT_COOLDOWN_SECONDS,
        relay=relay,
        what="every booking's final change to be accepted and every delivery to end",
    )
    relay.assert_alive()
    outcomes = relay.outbox_rows(example.first_row)
    missing = [row for row in example.rows if (outcomes.get(row) or {}).get("outcome") is None]
    assert not missing, f"outbox rows without an outcome: {missing}"
    assert_storable_attempts(relay, example.booking_ids)
    assert_no_retry_past_deadline(relay, example.booking_ids)
    return finals


def assert_storable_attempts(relay: Relay, booking_ids: list[str]) -> None:
    """Every stored answer is sanitised text: no NUL, valid UTF-8, at most 4 KiB (SPEC 9.1)."""
    wrong = []
    for booking_id in booking_ids:
        for found in relay.deliveries(booking_id):
            problem = storable(found["last_error"])
            if problem:
                wrong.append(f"delivery {found['id']} last_error {problem}")
            for attempt in found["attempts"]:
                for key in ("response_body", "error"):
                    problem = storable(attempt[key])
                    if problem:
                        wrong.append(f"delivery {found['id']} attempt {key} {problem}")
                body = attempt["response_body"]
                if body is not None and storable(body) is None:
                    size = len(body.encode("utf-8"))
                    if size > BODY_LIMIT:
                        wrong.append(f"delivery {found['id']} response_body is {size} bytes")
    assert not wrong, "stored answers not sanitised:\n" + "\n".join(wrong)


def assert_no_retry_past_deadline(relay: Relay, booking_ids: list[str]) -> None:
    """No delivery waits in `retrying` for a time past its creation plus RELAY_RETRY_MAX_AGE:
    such a delivery is `dead` at once (SPEC 9.2)."""
    late = []
    for booking_id in booking_ids:
        for item in relay.get("/api/deliveries", booking_id=booking_id)["items"]:
            if item["status"] != "retrying" or item["next_attempt_at"] is None:
                continue
            created = datetime.fromisoformat(item["created_at"])
            due = datetime.fromisoformat(item["next_attempt_at"])
            if due > created + timedelta(seconds=RETRY_MAX_AGE_SECONDS + 2):
                late.append(
                    f"delivery {item['id']} retrying until {item['next_attempt_at']} "
                    f"(created {item['created_at']}), last_error {item['last_error']!r}"
                )
    assert not late, "deliveries retrying past their deadline:\n" + "\n".join(late)


def initial_delivery(relay: Relay, booking_id: str) -> dict[str, Any]:
    """The delivery of a booking's first (seated) state, with its attempts."""
    return relay.deliveries(booking_id)[0]


def scripted_attempts(example: Example) -> list[tuple[Answer, dict[str, Any], dict[str, Any]]]:
    """Each scripted answer with the delivery and the attempt that recorded it: a booking's
    requests before its final change are its first delivery's attempts, in the same order (the
    script goes to requests in arrival order, so a retry can take an answer meant for another
    booking's first request)."""
    relay = example.relay
    paired = []
    for booking_id in example.booking_ids:
        first = initial_delivery(relay, booking_id)
        requests = relay.mozrest.requests([booking_id])
        for request, attempt in zip(requests, reversed(first["attempts"]), strict=False):
            if request.scripted:
                paired.append((request.answer, first, attempt))
    return paired


# -- the property -----------------------------------------------------------------------------


@pytest.mark.timeout(PROPERTY_TIMEOUT)
@given(
    script=st.lists(answers(), min_size=1, max_size=5 if PROFILE == "default" else 8),
    bookings=st.integers(1, 3),
)
def test_no_answer_stops_the_relay_or_loses_a_newer_state(
    relay: Relay, script: list[Answer], bookings: int
) -> None:
    """Whatever Mozrest answers, the relay stays alive, records each answer as sanitised text,
    lets no delivery wait past its deadline, ends at once a delivery told to retry past it, and
    a newer state still reaches Mozrest once it accepts again."""
    note(f"{bookings} bookings, script:\n" + "\n".join(map(repr, script)))
    example = start_example(relay, script, bookings)
    # A Retry-After beyond the deadline on a readable retryable answer ends its delivery at once.
    for booking_id in example.booking_ids:
        seen = relay.mozrest.requests([booking_id])
        told = [r for r in seen if r.scripted and retry_after_beyond_deadline(r.answer)]
        if told:
            first = initial_delivery(relay, booking_id)
            assert first["status"] == "dead", (
                f"{told[0].answer!r} left delivery {first['id']} {first['status']} "
                f"(last_error {first['last_error']!r})"
            )
            assert "retry-after" in (first["last_error"] or "").lower(), first["last_error"]
            assert seen[-1] is told[0], f"requests after {told[0].answer!r}: {seen[-1].answer!r}"
    finish_example(example)
    relay.end_example()


# -- the known cases, pinned --------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_nul_bytes_and_odd_bytes_in_answer_bodies_are_recorded_sanitised(relay: Relay) -> None:
    """Answers whose bodies hold NUL, invalid UTF-8 or a mebibyte are each recorded for their
    own delivery, as sanitised text; the accepted ones are delivered, the failed ones retried
    (on PostgreSQL a NUL once stopped all recording, issue 12 finding 1)."""
    script = [
        Answer(200, body=b'{"status":"ok"}\x00'),
        Answer(500, body=b"\x00" * 10),
        Answer(503, body=b"oops\x00\xff\xfe"),
        Answer(200, body=MEBIBYTE_BODY),
        Answer(502, body=b"\xc3(" * 4000, framing="chunked"),
    ]
    example = start_example(relay, script, bookings=len(script))
    wait_until(
        lambda: settled(example), timeout=15, relay=relay, what="every answer to be recorded"
    )
    for booking_id in example.booking_ids:
        first = initial_delivery(relay, booking_id)
        assert first["status"] == "delivered", (booking_id, first["status"], first["last_error"])
    codes = sorted(
        attempt["status_code"]
        for booking_id in example.booking_ids
        for attempt in initial_delivery(relay, booking_id)["attempts"]
    )
    assert codes == [200] * 5 + [500, 502, 503], codes
    assert_storable_attempts(relay, example.booking_ids)
    finish_example(example)
    relay.end_example()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("value", HUGE_RETRY_AFTER, ids=["a day", "12 nines", "2**64", "400 nines"])
def test_a_huge_retry_after_makes_the_delivery_dead_at_once(relay: Relay, value: bytes) -> None:
    """A Retry-After in delta-seconds past the deadline, however large, overflows nothing: the
    delivery is dead after that one attempt, its last_error naming Retry-After, and the relay
    goes on (issue 12 finding 2a, 2b)."""
    example = start_example(relay, [Answer(503, headers=((b"Retry-After", value),))], bookings=1)
    wait_until(lambda: answered(example), timeout=15, relay=relay, what="the answer recorded")
    first = initial_delivery(relay, example.booking_ids[0])
    assert (first["status"], first["attempt_count"]) == ("dead", 1), first
    assert "retry-after" in (first["last_error"] or "").lower(), first["last_error"]
    finish_example(example)
    relay.end_example()


DATES_BEYOND = [
    (HttpDate(BEYOND_SECONDS, "imf", "GMT"), False),
    (HttpDate(BEYOND_SECONDS, "imf", "GMT"), True),
    (HttpDate(BEYOND_SECONDS, "imf", "UTC"), True),
    (HttpDate(BEYOND_SECONDS, "imf", "+0000"), False),
    (HttpDate(BEYOND_SECONDS, "imf", "-0000"), True),
    (HttpDate(BEYOND_SECONDS, "imf", "+0100"), True),
    (HttpDate(BEYOND_SECONDS, "rfc850", "GMT"), False),
    (HttpDate(BEYOND_SECONDS, "rfc850", "GMT"), True),
    (HttpDate(BEYOND_SECONDS, "asctime"), False),
    (HttpDate(BEYOND_SECONDS, "asctime"), True),
    (HttpDate(7000 * 365 * 86400, "imf", "GMT"), True),
]


@pytest.mark.timeout(120)
def test_a_retry_after_date_past_the_deadline_makes_the_delivery_dead_at_once(
    relay: Relay,
) -> None:
    """A Retry-After HTTP-date past the deadline, in any of the three RFC 9110 forms, any zone
    spelling, with or without a Date header, makes the delivery dead after that one attempt,
    naming Retry-After (SPEC 9.2; issue 12 finding 2b, 2c)."""
    script = []
    for date, with_date_header in DATES_BEYOND:
        headers: list[tuple[bytes, HeaderValue]] = [(b"Retry-After", date)]
        if with_date_header:
            headers.append((b"Date", HttpDate(0, date.form, date.zone)))
        script.append(Answer(503, headers=tuple(headers)))
    example = start_example(relay, script, bookings=len(script))
    wait_until(lambda: answered(example), timeout=20, relay=relay, what="every answer recorded")
    wrong = []
    for answer, first, attempt in scripted_attempts(example):
        error = first["last_error"] or ""
        if (
            first["status"] != "dead"
            or first["attempts"][0] is not attempt
            or "retry-after" not in error.lower()
        ):
            wrong.append(
                f"{answer!r}: delivery {first['status']} after {first['attempt_count']} attempts, "
                f"this one {attempt['status_code']} {attempt['error']!r}, last_error {error!r}"
            )
    assert not wrong, "\n".join(wrong)
    finish_example(example)
    relay.end_example()


@pytest.mark.timeout(120)
def test_a_retry_after_that_is_neither_seconds_nor_a_date_is_ignored(relay: Relay) -> None:
    """A Retry-After that is neither ASCII delta-seconds nor an HTTP-date (non-ASCII digits such
    as "²", signs, fractions, garbage) is ignored: the answer is recorded with its status and the
    normal backoff applies, so the state is delivered once Mozrest accepts (issue 12 finding 2c)."""
    script = [Answer(503, headers=((b"Retry-After", value),)) for value in NOT_RETRY_AFTER]
    example = start_example(relay, script, bookings=len(script))
    wait_for(lambda: settled(example), timeout=10, relay=relay)
    wrong = []
    for answer, first, attempt in scripted_attempts(example):
        if first["status"] != "delivered" or attempt["status_code"] != 503:
            wrong.append(
                f"{answer!r}: delivery {first['status']}, this attempt {attempt['status_code']} "
                f"{attempt['error']!r}, next attempt at {first['next_attempt_at']}"
            )
    assert not wrong, "\n".join(wrong)
    finish_example(example)
    relay.end_example()


@pytest.mark.timeout(120)
def test_an_accepted_answer_with_odd_dates_is_delivered(relay: Relay) -> None:
    """A 200 is accepted whatever dates come with it: a Date in any zone spelling (`-0000` once
    read as a naive time and crashed the reading) beside a Retry-After date is recorded as
    delivered on its first attempt, never as an internal error (issue 12 finding 2c)."""
    script = [
        Answer(
            200,
            headers=(
                (b"Date", HttpDate(0, "imf", zone)),
                (b"Retry-After", HttpDate(BEYOND_SECONDS, "imf", "GMT")),
            ),
        )
        for zone in ("-0000", "+0000", "GMT", "UTC", "+0100", "EST")
    ]
    example = start_example(relay, script, bookings=len(script))
    wait_for(lambda: settled(example), timeout=10, relay=relay)
    wrong = []
    for answer, first, attempt in scripted_attempts(example):
        if first["status"] != "delivered" or attempt["status_code"] != 200:
            wrong.append(
                f"{answer!r}: delivery {first['status']} after {first['attempt_count']} attempts, "
                f"this one {attempt['status_code']} {attempt['error']!r}"
            )
    assert not wrong, "\n".join(wrong)
    finish_example(example)
    relay.end_example()
