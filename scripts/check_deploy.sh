#!/usr/bin/env bash
# Validate the deployment files: Dockerfile (hadolint), compose (docker compose config, where a
# docker client exists), Kubernetes manifests (kubernetes-validate), alert rules (check-jsonschema).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
"$BIN/hadolint" --failure-threshold warning Dockerfile
echo "Dockerfile: hadolint ok"
if command -v docker >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    docker compose -f docker-compose.yml config --quiet
    echo "docker-compose.yml: docker compose config ok"
elif command -v docker-compose >/dev/null 2>&1; then
    docker-compose -f docker-compose.yml config --quiet
    echo "docker-compose.yml: docker-compose config ok"
elif [ "${REQUIRE_COMPOSE:-0}" = 1 ]; then
    echo "docker-compose.yml: REQUIRE_COMPOSE=1 but no compose client is installed" >&2
    exit 1
else
    echo "docker-compose.yml: no compose client here, not validated"
fi
"$BIN/kubernetes-validate" --strict --quiet deploy/kubernetes.yaml
echo "deploy/kubernetes.yaml: kubernetes-validate ok"
"$BIN/check-jsonschema" --schemafile deploy/schemas/prometheus-rules.schema.json deploy/prometheus-rules.yaml

# promtool (Debian's prometheus package) checks the rules' PromQL, which a schema cannot, and
# runs their unit tests; CI installs it, and REQUIRE_PROMTOOL=1 makes its absence a failure.
if command -v promtool >/dev/null 2>&1; then
    promtool check rules deploy/prometheus-rules.yaml
    promtool test rules deploy/prometheus-rules.test.yaml
    echo "deploy/prometheus-rules.yaml: promtool check and test ok"
elif [ "${REQUIRE_PROMTOOL:-0}" = 1 ]; then
    echo "deploy/prometheus-rules.yaml: REQUIRE_PROMTOOL=1 but promtool is not installed" >&2
    exit 1
else
    echo "deploy/prometheus-rules.yaml: no promtool here, PromQL not checked"
fi
