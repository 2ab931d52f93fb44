"""`mozrest-relay token new`, `erase`, and a malformed RELAY_API_TOKENS, as real processes."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from tests.integration.test_cli_errors import one_error_line, relay

HASH = hashlib.sha256(b"some token").hexdigest()


def test_token_new_prints_a_random_token_and_its_entry(tmp_path: Path) -> None:
    """The token is URL-safe, of at least 32 random bytes, and the entry holds its SHA-256."""
    first = relay("token", "new", "ana.b-1", "--role", "viewer", cwd=tmp_path)
    second = relay("token", "new", "ana.b-1", "--role", "viewer", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    token = re.search(r"never stored\): (\S+)", first.stdout)
    assert token is not None
    assert re.fullmatch(r"[A-Za-z0-9_-]{43,}", token.group(1))
    digest = hashlib.sha256(token.group(1).encode()).hexdigest()
    assert f"add to RELAY_API_TOKENS: ana.b-1:viewer:{digest}" in first.stdout
    assert token.group(1) not in second.stdout
    one_error_line(relay("token", "new", "a b", "--role", "viewer", cwd=tmp_path), "NAME")


def test_a_malformed_api_tokens_entry_stops_start_up_without_echoing_it(tmp_path: Path) -> None:
    """One line naming RELAY_API_TOKENS and the entry; no hash, however wrong."""
    for bad in (f"ana:boss:{HASH}", f"ana:viewer:{HASH[:-1]}", f"ana:viewer:{HASH.upper()}", "x"):
        result = relay("api", cwd=tmp_path, RELAY_API_TOKENS=f"ok:viewer:{HASH[::-1]},{bad}")
        line = one_error_line(result, "RELAY_API_TOKENS", "entry 2")
        assert (
            HASH[:16] not in line and HASH.upper()[:16] not in line and HASH[::-1][:16] not in line
        )


def test_erase_of_an_unknown_booking_is_one_error_line(tmp_path: Path) -> None:
    """`erase` on a migrated database: an unknown booking is one error line; the audit has it."""
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    assert relay("migrate", cwd=tmp_path, DATABASE_URL=url).returncode == 0
    one_error_line(relay("erase", "nobody", cwd=tmp_path, DATABASE_URL=url), "nobody")


def test_erase_prints_what_it_erased(tmp_path: Path) -> None:
    """A booking with an outbox row: the row's personal fields are erased, the counts printed."""
    url = f"sqlite:///{tmp_path / 'relay.db'}"
    assert relay("migrate", cwd=tmp_path, DATABASE_URL=url).returncode == 0
    import sqlite3

    with sqlite3.connect(tmp_path / "relay.db") as db:
        db.execute(
            "INSERT INTO mozrest_outbox (booking_id, venue_id, payload, processed_at, outcome) "
            "VALUES ('b1', 'v1', ?, '2020-01-01 00:00:00.000000', 'invalid')",
            (json.dumps({"bookingId": "b1", "venueId": "v1", "notes": "secret-notes"}),),
        )
    result = relay("erase", "b1", cwd=tmp_path, DATABASE_URL=url)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "booking_id": "b1",
        "erased": {"outbox_rows": 1, "deliveries": 0, "snapshots": 0},
    }
    with sqlite3.connect(tmp_path / "relay.db") as db:
        assert "secret-notes" not in str(
            db.execute("SELECT payload FROM mozrest_outbox").fetchall()
        )
        assert db.execute("SELECT actor, action, result FROM mozrest_audit").fetchall() == [
            ("cli", "booking.erase", "ok")
        ]
