#!/usr/bin/env bash
# The container image, built and run as a user would, on a machine that reaches no container
# registry (issue 13; docs/platform.md, "The container image"). Needs root and Debian's packages.
#
#   tools     podman, runc and debootstrap from Debian (installed when missing)
#   stand-in  the Dockerfile's base cannot be pulled: a stand-in of the same Debian release and
#             Python, built from Debian's packages, cached by its recipe (see build_standin_rootfs)
#   build     the project's Dockerfile on that stand-in (BASE_IMAGE), in docker format so that
#             HEALTHCHECK is kept
#   then, against a fresh database on the CI PostgreSQL: migrate; the emulator and the relay in
#   containers on the host network; a seated booking enqueued and received by the emulator; the
#   image's own HEALTHCHECK, /healthz and /readyz; SIGTERM with a request on the wire exits 0
#   within RELAY_SHUTDOWN_GRACE.
#
# One verdict line per step; the first failure stops the run with a non-zero status. Containers
# and the database are removed on every exit. Measured on the CI kind of machine (2 cores shared
# with other work): cold (podman installed, the stand-in made) 143 and 149 s; warm (stand-in
# cached) 33 to 89 s, 40 s typical, most of it the image build.
#
# Settings (environment): CONTAINER_CHECK_PG (default postgresql://postgres@127.0.0.1:5432),
# CONTAINER_CHECK_CACHE (default /var/cache/mozrest-relay-ci), DEBIAN_MIRROR (debootstrap's
# default when unset), CONTAINER_CHECK_KEEP_LOGS=1 keeps the log folder after a passing run.
set -euo pipefail
cd "$(dirname "$0")/.."

PG=${CONTAINER_CHECK_PG:-postgresql://postgres@127.0.0.1:5432}
CACHE_DIR=${CONTAINER_CHECK_CACHE:-/var/cache/mozrest-relay-ci}
IMAGE_TAG=localhost/mozrest-relay:ci-check
# Podman's defaults (nofile 1048576, nproc 32768) are refused by this kernel ("error setting
# rlimits ... operation not permitted"): every container gets explicit limits.
RUN=(podman run --runtime runc --network host --ulimit nofile=8192:8192 --ulimit nproc=4096:4096)
SHUTDOWN_GRACE_SECONDS=15 # the relay's default RELAY_SHUTDOWN_GRACE, set explicitly below
STOP_MARGIN_SECONDS=5
BOOKING=examples/seated.json
NEXT_BOOKING=examples/finished.json # the same booking, sent while the relay is told to stop

SUFFIX=$(head -c 4 /dev/urandom | od -An -tx1 | tr -d ' \n')
DATABASE=mozrest_container_check_$SUFFIX
EMULATOR=mozrest-check-$SUFFIX-emulator
RELAY=mozrest-check-$SUFFIX-relay
WEBHOOK_TOKEN=webhook-$SUFFIX
ADMIN_TOKEN=admin-$SUFFIX
LOG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/mozrest-container-check.XXXXXX")
STARTED=$SECONDS
CURRENT_STEP=""
STEP_STARTED=0
DATABASE_CREATED=0

verdict() { # WORD STEP TEXT
    printf 'container-check: %-4s %-11s %s\n' "$1" "$2" "$3"
}

fail() { # TEXT [LOG_FILE]: the current step's FAIL line, the log's tail, and stop
    verdict FAIL "$CURRENT_STEP" "$1"
    if [ -n "${2:-}" ] && [ -s "$2" ]; then
        echo "---- last lines of $2"
        tail -n 40 "$2"
        echo "----"
    fi
    CURRENT_STEP=""
    exit 1
}

fail_with_logs() { # TEXT CONTAINER: fail, showing the container's log
    podman logs "$2" >"$LOG_DIR/$2.log" 2>&1 || true
    fail "$1" "$LOG_DIR/$2.log"
}

pass() { # TEXT
    verdict ok "$CURRENT_STEP" "$1 ($((SECONDS - STEP_STARTED))s)"
    CURRENT_STEP=""
}

begin() { # STEP
    CURRENT_STEP=$1
    STEP_STARTED=$SECONDS
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ -n "$CURRENT_STEP" ]; then
        verdict FAIL "$CURRENT_STEP" "stopped by an unexpected error (exit $rc); logs in $LOG_DIR"
        rc=1
    fi
    if command -v podman >/dev/null 2>&1; then
        for name in "$RELAY" "$EMULATOR"; do
            if podman container exists "$name" 2>/dev/null; then
                podman logs "$name" >"$LOG_DIR/$name.log" 2>&1 || true
                podman rm --force --time 0 "$name" >/dev/null 2>>"$LOG_DIR/cleanup.log" || true
            fi
        done
    fi
    rm -rf "$LOG_DIR/standin-root" # a debootstrap that failed half-way
    if [ "$DATABASE_CREATED" = 1 ]; then
        if ! psql -q "$PG/postgres" -c "DROP DATABASE IF EXISTS $DATABASE WITH (FORCE)" \
            >>"$LOG_DIR/cleanup.log" 2>&1; then
            verdict FAIL cleanup "could not drop $DATABASE" && rc=1
        fi
    fi
    if [ "$rc" = 0 ]; then
        verdict PASS all "in $((SECONDS - STARTED))s"
        [ "${CONTAINER_CHECK_KEEP_LOGS:-0}" = 1 ] || rm -rf "$LOG_DIR"
    else
        verdict FAIL all "after $((SECONDS - STARTED))s; logs in $LOG_DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

http_code() { # URL: the status code, 000 when nothing answers
    curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$1" || true
}

json_field() { # PYTHON_EXPRESSION over `doc`, reading JSON on stdin; empty on bad JSON
    python3 -c "import json, sys
try:
    doc = json.load(sys.stdin)
    print($1)
except Exception:
    pass"
}

# --- tools -----------------------------------------------------------------------------------

step_tools() {
    begin tools
    [ "$(id -u)" = 0 ] || fail "needs root (podman with runc, debootstrap, apt-get)"
    local missing=() command package
    for pair in podman:podman runc:runc debootstrap:debootstrap curl:curl psql:postgresql-client; do
        command=${pair%%:*}
        package=${pair#*:}
        command -v "$command" >/dev/null 2>&1 || missing+=("$package")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$LOG_DIR/apt.log" 2>&1; then
            apt-get update -q >>"$LOG_DIR/apt.log" 2>&1 || true
            apt-get install -y -q --no-install-recommends "${missing[@]}" >>"$LOG_DIR/apt.log" 2>&1 \
                || fail "apt-get install ${missing[*]} failed" "$LOG_DIR/apt.log"
        fi
    fi
    podman info >"$LOG_DIR/podman-info.log" 2>&1 \
        || fail "podman cannot run on this machine (podman info failed)" "$LOG_DIR/podman-info.log"
    local installed="already installed"
    [ "${#missing[@]}" = 0 ] || installed="installed ${missing[*]}"
    pass "$installed: $(podman --version), $(runc --version | head -n 1)"
}

# --- stand-in base image ---------------------------------------------------------------------

# The Dockerfile's default base, e.g. python:3.11-slim-bookworm, names the Python version and the
# Debian release that the stand-in must have.
read_base_image() {
    BASE_DEFAULT=$(sed -n 's/^ARG BASE_IMAGE=//p' Dockerfile | head -n 1)
    if [[ ! "$BASE_DEFAULT" =~ ^python:([0-9]+\.[0-9]+)-slim-([a-z]+)$ ]]; then
        fail "Dockerfile: expected ARG BASE_IMAGE=python:X.Y-slim-RELEASE, found '$BASE_DEFAULT'"
    fi
    PYTHON_VERSION=${BASH_REMATCH[1]}
    DEBIAN_SUITE=${BASH_REMATCH[2]}
    STANDIN=localhost/python-standin:$PYTHON_VERSION-$DEBIAN_SUITE
}

STANDIN_PACKAGES=python3,python3-venv,python3-pip,ca-certificates,netbase,tzdata
# What the official image's configuration says that a plain root file system cannot.
STANDIN_CHANGES=(
    --change 'ENV=PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin'
    --change 'ENV=LANG=C.UTF-8'
    --change 'CMD=["python3"]'
)

# The stand-in's root file system: Debian's own packages, with the commands where the official
# image has them (/usr/local/bin/python, pip). Its text is part of the cache key: edit it and the
# next run builds a new stand-in.
build_standin_rootfs() { # FOLDER
    local root=$1
    # shellcheck disable=SC2086 # DEBIAN_MIRROR is one optional word
    debootstrap --variant=minbase --include="$STANDIN_PACKAGES" "$DEBIAN_SUITE" "$root" \
        ${DEBIAN_MIRROR:-} >"$LOG_DIR/debootstrap.log" 2>&1 || {
        [ -f "$root/debootstrap/debootstrap.log" ] \
            && tail -n 20 "$root/debootstrap/debootstrap.log" >>"$LOG_DIR/debootstrap.log"
        return 1
    }
    mkdir -p "$root/usr/local/bin"
    ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
    ln -sf /usr/bin/python3 "$root/usr/local/bin/python3"
    ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip"
    ln -sf /usr/bin/pip3 "$root/usr/local/bin/pip3"
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/* "$root"/tmp/*
}

# Cold: debootstrap and import, 54 to 105 s measured. Warm: the image is still in podman's storage
# (1 s), or podman's storage was wiped and it is imported from the cached tar (9 s).
step_standin() {
    begin stand-in
    read_base_image
    local key tarball source
    key=$(printf '%s\n' "$(declare -f build_standin_rootfs)" "$DEBIAN_SUITE" "$STANDIN_PACKAGES" \
        "${STANDIN_CHANGES[@]}" | sha256sum | cut -c 1-16)
    tarball=$CACHE_DIR/python-standin-$DEBIAN_SUITE-$key.tar
    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/.lock"
    flock 9 # another checkout's run on this machine may be making the same stand-in
    if [ "$(podman image inspect --format '{{index .Labels "mozrest-relay.standin-key"}}' \
        "$STANDIN" 2>/dev/null)" = "$key" ]; then
        source="podman storage"
    else
        if [ -f "$tarball" ]; then
            source="cached $tarball"
        else
            source="debootstrap $DEBIAN_SUITE, cached as $tarball"
            local root=$LOG_DIR/standin-root
            build_standin_rootfs "$root" || fail "debootstrap $DEBIAN_SUITE failed" "$LOG_DIR/debootstrap.log"
            tar --numeric-owner -C "$root" -cf "$tarball.tmp" . || fail "could not write $tarball"
            mv "$tarball.tmp" "$tarball"
            rm -rf "$root"
            find "$CACHE_DIR" -maxdepth 1 -name 'python-standin-*.tar' ! -path "$tarball" -delete
        fi
        podman import "${STANDIN_CHANGES[@]}" --change "LABEL=mozrest-relay.standin-key=$key" \
            "$tarball" "$STANDIN" >"$LOG_DIR/import.log" 2>&1 \
            || fail "podman import of the stand-in failed" "$LOG_DIR/import.log"
    fi
    flock -u 9
    exec 9>&-
    local seen
    # shellcheck disable=SC2016 # expanded by the container's shell
    seen=$("${RUN[@]}" --rm --no-healthcheck "$STANDIN" sh -c \
        'printf "%s %s %s" "$(cat /etc/debian_version)" "$(python --version)" "$(pip --version | cut -d" " -f1-2)"' \
        2>"$LOG_DIR/standin-run.log") || fail "the stand-in does not run (runc)" "$LOG_DIR/standin-run.log"
    # debian_version: "12.12"; python: "Python 3.11.2"; pip: "pip 23.0.1".
    local debian=${seen%% *} python
    python=$(echo "$seen" | cut -d ' ' -f 3)
    [[ "$python" == "$PYTHON_VERSION".* ]] \
        || fail "the stand-in has Python $python, the Dockerfile's base $BASE_DEFAULT has $PYTHON_VERSION"
    local expected_debian
    case $DEBIAN_SUITE in
        bullseye) expected_debian=11 ;;
        bookworm) expected_debian=12 ;;
        trixie) expected_debian=13 ;;
        *) fail "no Debian version known for '$DEBIAN_SUITE': add it to step_standin" ;;
    esac
    [[ "$debian" == "$expected_debian".* ]] \
        || fail "the stand-in is Debian $debian, $BASE_DEFAULT is Debian $expected_debian ($DEBIAN_SUITE)"
    pass "$STANDIN from $source: Debian $debian, Python $python, as $BASE_DEFAULT"
}

# --- the project's image ---------------------------------------------------------------------

# 22 to 59 s measured, mostly pip downloading and installing the pinned dependencies. --layers=false:
# CI's sources change with every commit, so cached layers would rarely be reused, and without them
# podman's storage holds only the stand-in and the last image however many runs there are.
step_build() {
    begin build
    local previous
    previous=$(podman image inspect --format '{{.Id}}' "$IMAGE_TAG" 2>/dev/null || true)
    # --format docker: the OCI image format has no HEALTHCHECK, and podman drops it there.
    # The host's CA bundle is mounted over the stand-in's during RUN steps only: pip's traffic
    # goes through this network's TLS proxy, and nothing of it stays in the image.
    podman build --isolation=chroot --format docker --pull=never --layers=false \
        --build-arg "BASE_IMAGE=$STANDIN" \
        --ulimit nofile=8192:8192 --ulimit nproc=4096:4096 \
        --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
        --iidfile "$LOG_DIR/image-id" --tag "$IMAGE_TAG" . >"$LOG_DIR/build.log" 2>&1 \
        || fail "podman build failed" "$LOG_DIR/build.log"
    IMAGE=$(cat "$LOG_DIR/image-id")
    if [ -n "$previous" ] && [ "$previous" != "$IMAGE" ]; then
        podman rmi "$previous" >/dev/null 2>&1 || true # the last run's image, now untagged
    fi
    local healthcheck user
    healthcheck=$(podman image inspect --format '{{json .HealthCheck}}' "$IMAGE")
    case $healthcheck in "" | null) fail "the built image has no HEALTHCHECK" ;; esac
    user=$(podman image inspect --format '{{.Config.User}}' "$IMAGE")
    [ "$user" = 10001 ] || fail "the image runs as '$user', not 10001"
    pass "$IMAGE_TAG (${IMAGE:7:12}), docker format with its HEALTHCHECK, user $user"
}

# --- the image at work ------------------------------------------------------------------------

step_database() {
    begin database
    pg_isready -q -d "$PG/postgres" || fail "no PostgreSQL answers at $PG"
    psql -q "$PG/postgres" -c "CREATE DATABASE $DATABASE" >"$LOG_DIR/createdb.log" 2>&1 \
        || fail "CREATE DATABASE $DATABASE failed" "$LOG_DIR/createdb.log"
    DATABASE_CREATED=1
    pass "$DATABASE created on ${PG#*@}"
}

step_migrate() {
    begin migrate
    "${RUN[@]}" --rm --no-healthcheck -e "DATABASE_URL=$PG/$DATABASE" "$IMAGE" migrate \
        >"$LOG_DIR/migrate.log" 2>&1 || fail "mozrest-relay migrate failed" "$LOG_DIR/migrate.log"
    grep -q '^database is at schema revision' "$LOG_DIR/migrate.log" \
        || fail "migrate did not report a schema revision" "$LOG_DIR/migrate.log"
    pass "$(grep '^database is at schema revision' "$LOG_DIR/migrate.log")"
}

step_emulator() {
    begin emulator
    EMULATOR_PORT=$(free_port)
    "${RUN[@]}" --detach --name "$EMULATOR" --no-healthcheck "$IMAGE" \
        emulator --host 127.0.0.1 --port "$EMULATOR_PORT" --token "$WEBHOOK_TOKEN" \
        >"$LOG_DIR/emulator-start.log" 2>&1 || fail "the emulator did not start" "$LOG_DIR/emulator-start.log"
    local deadline=$((SECONDS + 60))
    until [ "$(http_code "http://127.0.0.1:$EMULATOR_PORT/_emulator/stats")" = 200 ]; do
        [ "$(podman inspect --format '{{.State.Running}}' "$EMULATOR")" = true ] \
            || fail_with_logs "the emulator container exited" "$EMULATOR"
        [ "$SECONDS" -lt "$deadline" ] || fail "the emulator did not answer within 60s"
        sleep 0.5
    done
    pass "mozrest-relay emulator in a container on 127.0.0.1:$EMULATOR_PORT, token required"
}

step_relay() {
    begin relay
    RELAY_PORT=$(free_port)
    # --health-interval disable: no systemd here for podman's health timers; the image's own
    # HEALTHCHECK command still runs on demand (`podman healthcheck run`, below).
    "${RUN[@]}" --detach --name "$RELAY" --health-interval disable \
        -e "DATABASE_URL=$PG/$DATABASE" \
        -e RELAY_HOST=127.0.0.1 -e "RELAY_PORT=$RELAY_PORT" \
        -e "MOZREST_WEBHOOK_URL=http://127.0.0.1:$EMULATOR_PORT/rms" \
        -e "MOZREST_API_URL=http://127.0.0.1:$EMULATOR_PORT" \
        -e "MOZREST_WEBHOOK_TOKEN=$WEBHOOK_TOKEN" -e "MOZREST_API_KEY=key-$SUFFIX" \
        -e "RELAY_ADMIN_TOKEN=$ADMIN_TOKEN" \
        -e "RELAY_SHUTDOWN_GRACE=${SHUTDOWN_GRACE_SECONDS}s" \
        "$IMAGE" >"$LOG_DIR/relay-start.log" 2>&1 || fail "the relay did not start" "$LOG_DIR/relay-start.log"
    local deadline=$((SECONDS + 60))
    until [ "$(http_code "http://127.0.0.1:$RELAY_PORT/healthz")" = 200 ]; do
        [ "$(podman inspect --format '{{.State.Running}}' "$RELAY")" = true ] \
            || fail_with_logs "the relay container exited" "$RELAY"
        [ "$SECONDS" -lt "$deadline" ] || fail_with_logs "/healthz did not answer 200 within 60s" "$RELAY"
        sleep 0.5
    done
    pass "mozrest-relay run (the image's default command) on 127.0.0.1:$RELAY_PORT"
}

step_deliver() {
    begin deliver
    BOOKING_ID=$(json_field 'doc["bookingId"]' <"$BOOKING")
    "${RUN[@]}" --rm -i --no-healthcheck -e "DATABASE_URL=$PG/$DATABASE" "$IMAGE" enqueue - \
        <"$BOOKING" >"$LOG_DIR/enqueue.log" 2>&1 || fail "mozrest-relay enqueue - failed" "$LOG_DIR/enqueue.log"
    local enqueued=$SECONDS deadline=$((SECONDS + 30)) status="" delivery=""
    until [ "$status" = seated ] && [ "$delivery" = delivered ]; do
        [ "$SECONDS" -lt "$deadline" ] \
            || fail_with_logs "after 30s the emulator holds status '$status', the relay says '$delivery'" \
                "$RELAY"
        sleep 0.5
        status=$(curl -s --max-time 3 "http://127.0.0.1:$EMULATOR_PORT/_emulator/bookings/$BOOKING_ID" \
            | json_field 'doc["state"]["status"]')
        delivery=$(curl -s --max-time 3 -H "Authorization: Bearer $ADMIN_TOKEN" \
            "http://127.0.0.1:$RELAY_PORT/api/deliveries?booking_id=$BOOKING_ID" \
            | json_field 'doc["items"][0]["status"]')
    done
    pass "$BOOKING enqueued in a container; the emulator holds booking $BOOKING_ID seated, the relay says delivered, within $((SECONDS - enqueued))s"
}

step_health() {
    begin health
    local healthz readyz ready
    healthz=$(http_code "http://127.0.0.1:$RELAY_PORT/healthz")
    [ "$healthz" = 200 ] || fail "/healthz answered $healthz"
    readyz=$(http_code "http://127.0.0.1:$RELAY_PORT/readyz")
    ready=$(curl -s --max-time 3 "http://127.0.0.1:$RELAY_PORT/readyz" | json_field 'doc["checks"]')
    [ "$readyz" = 200 ] || fail "/readyz answered $readyz: $ready"
    podman healthcheck run "$RELAY" >"$LOG_DIR/healthcheck.log" 2>&1 \
        || fail "the image's HEALTHCHECK command failed" "$LOG_DIR/healthcheck.log"
    pass "/healthz 200, /readyz 200 $ready, the image's HEALTHCHECK passes"
}

# SIGTERM while a request is on the wire: the emulator answers after 3 s, and the relay must let
# that request finish, then exit 0, all within its grace. A request that had not left yet when
# the signal came (a very slow machine) is released instead: the verdict says which happened.
step_stop() {
    begin stop
    local limit=$((SHUTDOWN_GRACE_SECONDS + STOP_MARGIN_SECONDS)) started_ns exit_code elapsed_ms
    local faults
    faults=$(curl -s -o /dev/null -w '%{http_code}' --max-time 3 -X PUT \
        -H 'Content-Type: application/json' -d '{"latency_ms": 3000}' \
        "http://127.0.0.1:$EMULATOR_PORT/_emulator/faults" || true)
    [ "$faults" = 200 ] || fail "the emulator refused a latency fault ($faults)"
    "${RUN[@]}" --rm -i --no-healthcheck -e "DATABASE_URL=$PG/$DATABASE" "$IMAGE" enqueue - \
        <"$NEXT_BOOKING" >>"$LOG_DIR/enqueue.log" 2>&1 || fail "mozrest-relay enqueue - failed" "$LOG_DIR/enqueue.log"
    sleep 1
    started_ns=$(date +%s%N)
    podman kill --signal TERM "$RELAY" >/dev/null 2>"$LOG_DIR/kill.log" || fail "podman kill failed" "$LOG_DIR/kill.log"
    exit_code=$(timeout "$limit" podman wait "$RELAY" 2>"$LOG_DIR/wait.log") \
        || fail "the relay was still running ${limit}s after SIGTERM (grace ${SHUTDOWN_GRACE_SECONDS}s)"
    elapsed_ms=$((($(date +%s%N) - started_ns) / 1000000))
    podman logs "$RELAY" >"$LOG_DIR/relay.log" 2>&1
    [ "$exit_code" = 0 ] || fail "the relay exited $exit_code after SIGTERM" "$LOG_DIR/relay.log"
    if grep -q Traceback "$LOG_DIR/relay.log"; then
        fail "the relay's log has a traceback" "$LOG_DIR/relay.log"
    fi
    local drained="no request was on the wire"
    if grep -q '"event": "worker.draining"' "$LOG_DIR/relay.log"; then
        local status
        status=$(curl -s --max-time 3 "http://127.0.0.1:$EMULATOR_PORT/_emulator/bookings/$BOOKING_ID" \
            | json_field 'doc["state"]["status"]')
        [ "$status" = finished ] \
            || fail "the request on the wire at SIGTERM did not finish: the emulator holds '$status'" "$LOG_DIR/relay.log"
        drained="the request on the wire finished"
    fi
    pass "SIGTERM: exit 0 after $((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000)))s (limit: grace ${SHUTDOWN_GRACE_SECONDS}s + ${STOP_MARGIN_SECONDS}s), $drained, no traceback"
}

step_tools
step_standin
step_build
step_database
step_migrate
step_emulator
step_relay
step_deliver
step_health
step_stop
