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
