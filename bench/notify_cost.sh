#!/usr/bin/env bash
# What LISTEN/NOTIFY costs the RMS: pgbench runs RMS-like transactions (UPDATE a reservation,
# INSERT an outbox row, COMMIT) with 16 clients, without and with the relay's NOTIFY trigger.
# Usage: bench/notify_cost.sh [seconds]   (PostgreSQL on 127.0.0.1:5432, user postgres)
set -euo pipefail
SECONDS_PER_RUN=${1:-15}
DB=mozrest_notify_bench
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PSQL="psql -h 127.0.0.1 -U postgres -v ON_ERROR_STOP=1 -q"
$PSQL -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" -c "CREATE DATABASE $DB"
trap '$PSQL -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"' EXIT
DATABASE_URL="postgresql://postgres@127.0.0.1:5432/$DB" RELAY_NOTIFY=false "$ROOT/.venv/bin/mozrest-relay" migrate >/dev/null
$PSQL -d $DB -c "CREATE TABLE reservation (id int PRIMARY KEY, status text, version int)" \
      -c "INSERT INTO reservation SELECT g, 'booked', 0 FROM generate_series(1, 100000) g"
SCRIPT=$(mktemp)
cat > "$SCRIPT" <<'SQL'
\set rid random(1, 100000)
BEGIN;
UPDATE reservation SET status = 'seated', version = version + 1 WHERE id = :rid;
INSERT INTO mozrest_outbox (booking_id, venue_id, payload) VALUES ('b' || :rid, 'v1', '{"bookingId":"x","venueId":"v1","partySize":4,"status":"seated","tables":["T1"],"date":1639578600}');
COMMIT;
SQL
run() {
    pgbench -h 127.0.0.1 -U postgres -n -c 16 -j 2 -T "$SECONDS_PER_RUN" -f "$SCRIPT" $DB 2>/dev/null \
        | awk -v label="$1" '/^tps/ {tps=$3} /latency average/ {lat=$4} END {printf "%-22s %8.0f tps  %6.2f ms avg latency\n", label, tps, lat}'
}
for round in 1 2 3; do
    DATABASE_URL="postgresql://postgres@127.0.0.1:5432/$DB" RELAY_NOTIFY=false "$ROOT/.venv/bin/mozrest-relay" migrate >/dev/null
    run "round $round, no trigger"
    DATABASE_URL="postgresql://postgres@127.0.0.1:5432/$DB" RELAY_NOTIFY=true "$ROOT/.venv/bin/mozrest-relay" migrate >/dev/null
    run "round $round, NOTIFY"
done
rm -f "$SCRIPT"
