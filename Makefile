# One entry point for people and CI. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test faults lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(BIN)/.installed  ## the seed's system: admin + worker + relay, SQLite and a serverless broker
	$(BIN)/python example/manage.py demo $(ARGS)

test: $(BIN)/.installed  ## run the tests on every setup whose servers are reachable
	$(BIN)/python tests/matrix.py $(ARGS)

faults: $(BIN)/.installed  ## the long fault suite (a short form runs inside `make test`)
	mkdir -p docs
	printf '# Fault suite\n\n`make faults`, %s, on %s (%s cores).\n' "$$(date -u +%F)" \
		"$$(uname -srm)" "$$(nproc)" > docs/faults.md
	AFTERCOMMIT_FAULTS=long AFTERCOMMIT_FAULTS_REPORT=$(CURDIR)/docs/faults.md AFTERCOMMIT_SKIP_EXAMPLE=1 \
		AFTERCOMMIT_SETUPS=postgresql+redis,postgresql+rabbitmq \
		$(BIN)/python tests/matrix.py -m faults $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	DJANGO_SETTINGS_MODULE=tests.settings $(BIN)/python -m django makemigrations --check --dry-run
	cd example && EXAMPLE_STATE=$$(mktemp -d) ../$(BIN)/python manage.py makemigrations --check --dry-run

clean:
	rm -rf $(VENV) .artifacts
