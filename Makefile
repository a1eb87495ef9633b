# The two commands the README documents: `make demo` and `make test`; `make check` is the
# developer's minute: lint and the fast tests.
SHELL := /bin/bash
VENV := .venv/bin
# Parallel test processes for `make test` (pytest-xdist). The tests mostly wait on PostgreSQL,
# S3, gpg and child processes, so more workers than cores pay off: 4 measured fastest on
# 2 cores. Override with `make test TEST_WORKERS=N` (0 runs everything in one process).
TEST_WORKERS ?= 4

.PHONY: demo test check bootstrap ui lint format demo-stop bench

# Runs pytest with the given arguments; status 5 (no test collected or selected) fails too,
# so a wrong path, marker or -k never passes silently.
define pytest_strict
	@set +e; $(VENV)/pytest $(1); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; \
	exit $$status
endef

bootstrap:
	@scripts/bootstrap.sh

## Start a throwaway PostgreSQL with a sample database, back it up through Dagster, prove it restores.
demo: bootstrap
	@$(VENV)/python -m backup_pipelines.devtools.demo

## Open the Dagster UI on the demo's instance (http://127.0.0.1:3000).
ui: bootstrap
	@$(VENV)/python -m backup_pipelines.devtools.demo --ui

demo-stop:
	@$(VENV)/python -m backup_pipelines.devtools.demo --stop

## Run the whole test suite (real PostgreSQL, S3 server, gpg, SMTP, browser), in parallel.
test: bootstrap
	@$(VENV)/ruff check backup_pipelines backup_pipelines_tests benchmarks
	@$(VENV)/mypy
	@$(VENV)/dg check defs >/dev/null
	@$(VENV)/dagster definitions validate -w workspace.yaml >/dev/null 2>&1 || $(VENV)/dagster definitions validate -w workspace.yaml
	$(call pytest_strict,-n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS))

## Lint and the fast tier (no PostgreSQL, S3, daemon, browser or slow process): about a minute.
check: $(VENV)/.synced
	@$(VENV)/ruff check backup_pipelines backup_pipelines_tests benchmarks
	@$(VENV)/ruff format --check backup_pipelines backup_pipelines_tests benchmarks
	@$(VENV)/mypy
	$(call pytest_strict,-q -m fast -n 2 $(PYTEST_ARGS))

# The environment, when there is none yet or the lock file changed since (`make test` always
# refreshes it).
$(VENV)/.synced: uv.lock pyproject.toml
	@scripts/bootstrap.sh
	@touch $@

lint:
	@$(VENV)/ruff check backup_pipelines backup_pipelines_tests benchmarks
	@$(VENV)/ruff format --check backup_pipelines backup_pipelines_tests benchmarks
	@$(VENV)/mypy

format:
	@$(VENV)/ruff format backup_pipelines backup_pipelines_tests benchmarks
	@$(VENV)/ruff check --fix backup_pipelines backup_pipelines_tests benchmarks

bench: bootstrap
	@$(VENV)/python benchmarks/bench_backup.py
