# mozrest-relay: the project's vocabulary. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e '.[test,lint]'
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## create the virtual environment and install (pinned by requirements.lock)

.PHONY: run
run: $(STAMP) ## start the local Mozrest emulator and the relay on SQLite, pointed at each other
	@$(BIN)/python scripts/run_local.py

.PHONY: test
test: $(STAMP) ## run the whole test suite (PostgreSQL tests run when a server answers)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

.PHONY: test-fast
test-fast: $(STAMP) ## the unit tier only (pure logic, fakes): seconds
	$(BIN)/python -m pytest tests/unit -q $(PYTEST_ARGS)

.PHONY: lint
lint: $(STAMP) ## ruff (lint and format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/mypy --explicit-package-bases tests

.PHONY: check-deploy
check-deploy: $(STAMP) ## validate Dockerfile, docker-compose.yml, Kubernetes manifests, alert rules
	BIN=$(BIN) scripts/check_deploy.sh

.PHONY: format
format: $(STAMP) ## format the code
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

.PHONY: migrate
migrate: $(STAMP) ## upgrade DATABASE_URL to the newest schema
	$(BIN)/mozrest-relay migrate

.PHONY: container-check
container-check: ## build the image on a Debian stand-in base, run it against PostgreSQL (root; CI)
	scripts/container_check.sh

.PHONY: bench
bench: $(STAMP) ## the benchmark suite, about 15 minutes on a quiet machine: prints a table, writes bench/results/latest.json
	@$(BIN)/python -c 'import pgqueuer, uvloop' 2>/dev/null || $(BIN)/pip install --quiet -c requirements.lock -e '.[bench]'
	$(BIN)/python -m bench.run $(BENCH_ARGS)

.PHONY: bench-peer-tune
bench-peer-tune: $(STAMP) ## try the PgQueuer peer's knobs (~15 min): bench/results/peer-tune.json
	@$(BIN)/python -c 'import pgqueuer, uvloop' 2>/dev/null || $(BIN)/pip install --quiet -c requirements.lock -e '.[bench]'
	$(BIN)/python -m bench.peers.tune $(BENCH_ARGS)

.PHONY: bench-smoke
bench-smoke: $(STAMP) ## a short benchmark run for CI (a minute or two): fails only on lost or stale states
	$(BIN)/python -m bench.run --smoke $(BENCH_ARGS)

.PHONY: bench-backlog
bench-backlog: $(STAMP) ## one worker drains a 1,000,000-state backlog (~20 min): rate of its last tenth against its first, peak RSS; bench/results/backlog.json
	@$(BIN)/python -c 'import uvloop' 2>/dev/null || $(BIN)/pip install --quiet -c requirements.lock -e '.[bench]'
	$(BIN)/python -m bench.run --only backlog --output bench/results/backlog.json $(BENCH_ARGS)

.PHONY: bench-api
bench-api: $(STAMP) ## admin API list latencies over 1,000,000 deliveries: bench/results/api.json
	@$(BIN)/python -c 'import uvloop' 2>/dev/null && test -x $(BIN)/py-spy || $(BIN)/pip install --quiet -c requirements.lock -e '.[bench]'
	$(BIN)/python -m bench.api $(BENCH_ARGS)

.PHONY: bench-scrub
bench-scrub: $(STAMP) ## payload retention over 1,000,000 rows: plans, delivery latency beside it (~30 min): bench/results/scrub.json
	@$(BIN)/python -c 'import uvloop' 2>/dev/null || $(BIN)/pip install --quiet -c requirements.lock -e '.[bench]'
	$(BIN)/python -m bench.scrub $(BENCH_ARGS)

.PHONY: soak
soak: $(STAMP) ## 30 min soak on PostgreSQL: 2 workers, 300 states/s, faults, a SIGKILL every 5 min (SOAK_MINUTES, SOAK_RATE, ...)
	$(BIN)/python -m bench.soak

.PHONY: chaos
chaos: $(STAMP) ## fault-injection suite at full scale, ~20,000 changes a scenario (docs/reliability.md)
	CHAOS_SCALE=full $(BIN)/python -m pytest tests/chaos $(PYTEST_ARGS)

.PHONY: chaos-smoke
chaos-smoke: $(STAMP) ## fault-injection suite at the scale `make test` runs it, ~2,000 changes
	CHAOS_SCALE=smoke $(BIN)/python -m pytest tests/chaos $(PYTEST_ARGS)

.PHONY: hostile
hostile: $(STAMP) ## hostile answers and rows (hypothesis) with many examples; HOSTILE_EXAMPLES=N to change
	HYPOTHESIS_PROFILE=full $(BIN)/python -m pytest tests/hostile $(PYTEST_ARGS)

.PHONY: lock
lock: ## re-pin requirements.lock from a fresh install
	rm -rf /tmp/mozrest-relay-lock && $(PYTHON) -m venv /tmp/mozrest-relay-lock
	/tmp/mozrest-relay-lock/bin/pip install --quiet -e '.[test,lint,bench]'
	/tmp/mozrest-relay-lock/bin/pip freeze --exclude-editable | grep -v '^-e' > requirements.lock
