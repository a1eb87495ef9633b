# The two commands the README documents: `make demo` and `make test`.
SHELL := /bin/bash
VENV := .venv/bin

.PHONY: demo test bootstrap ui lint format demo-stop bench

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

## Run the whole test suite (real PostgreSQL, S3 server, gpg, SMTP, browser).
test: bootstrap
	@$(VENV)/ruff check backup_pipelines backup_pipelines_tests benchmarks
	@$(VENV)/dg check defs >/dev/null
	@$(VENV)/dagster definitions validate -w workspace.yaml >/dev/null 2>&1 || $(VENV)/dagster definitions validate -w workspace.yaml
	@set +e; $(VENV)/pytest $(PYTEST_ARGS); status=$$?; \
	if [ $$status -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; exit $$status

lint:
	@$(VENV)/ruff check backup_pipelines backup_pipelines_tests benchmarks
	@$(VENV)/ruff format --check backup_pipelines backup_pipelines_tests benchmarks

format:
	@$(VENV)/ruff format backup_pipelines backup_pipelines_tests benchmarks
	@$(VENV)/ruff check --fix backup_pipelines backup_pipelines_tests benchmarks

bench: bootstrap
	@$(VENV)/python benchmarks/bench_backup.py
