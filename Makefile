# Sky Port — the two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
VENV := .venv
SKYPORT := $(VENV)/bin/skyport

.PHONY: setup run test lint typecheck bench clean

setup:
	@scripts/setup.sh

## Set everything up, start the core on https://localhost:8443 and send it a demo job (Ctrl-C stops it).
run: setup
	@$(SKYPORT) init
	@scripts/demo.sh & exec $(SKYPORT) server

## Set everything up and run the whole test suite (CI runs this). Its tests mostly wait on real daemons,
## so they run on 2 workers (pytest-xdist), a test file per worker at a time (module-scoped fixtures).
PYTEST_WORKERS ?= 2
test: setup lint typecheck
	@$(VENV)/bin/pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile

lint: setup
	@$(VENV)/bin/ruff check src tests bench
	@$(VENV)/bin/ruff format --check src tests bench

typecheck: setup
	@$(VENV)/bin/mypy

bench: setup
	@for b in bench/*.py; do echo "== $$b"; $(VENV)/bin/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
