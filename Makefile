# One entry point for people and CI. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test faults lint bench clean matrix matrix-ci

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
	AFTERCOMMIT_FAULTS=long AFTERCOMMIT_FAULTS_REPORT=$(CURDIR)/docs/faults.md AFTERCOMMIT_SKIP_EXAMPLE=1 AFTERCOMMIT_SKIP_BENCH=1 \
		AFTERCOMMIT_SETUPS=postgresql+redis,postgresql+rabbitmq \
		$(BIN)/python tests/matrix.py -m faults $(ARGS)

# Every benchmark in one run on PostgreSQL + Redis (and RabbitMQ for the drain), then the report.
# BENCH_ARGS=--quick runs the small form that only checks the code (`make test` runs it).
BENCH_OUT ?= $(CURDIR)/benchmarks/results
BENCH_REPORT ?= $(CURDIR)/benchmarks/REPORT.md
BENCH := BENCH_OUT=$(BENCH_OUT) $(BIN)/python benchmarks
bench: $(BIN)/.installed  ## side-by-side benchmarks -> benchmarks/REPORT.md (about 10 minutes)
	mkdir -p $(BENCH_OUT) && rm -f $(BENCH_OUT)/*.json $(BENCH_OUT)/*.png
	$(BENCH)/request_path.py $(BENCH_ARGS)
	$(BENCH)/latency.py $(BENCH_ARGS)
	$(BENCH)/drain.py $(BENCH_ARGS)
	BROKER_URL=amqp://guest:guest@127.0.0.1:5672// $(BENCH)/drain.py \
		--messages 20000 --baseline-messages 5000 $(BENCH_ARGS)
	$(BENCH)/memory.py $(BENCH_ARGS)
	$(BENCH)/propagation.py $(BENCH_ARGS)
	$(BENCH)/big_outbox.py $(BENCH_ARGS)
	$(BENCH)/report.py --output $(BENCH_REPORT)

# The version matrix (noxfile.py): each session installs the package with one Django / Celery pair
# into its own venv and runs tests/matrix.py on one setup; `report` then prints the table and checks
# the README's compatibility line. ARGS go to pytest.
matrix: $(BIN)/.installed  ## every Python x Django x Celery x setup session (about an hour)
	rm -rf .artifacts/matrix
	$(BIN)/nox -t matrix -- $(ARGS); status=$$?; $(BIN)/nox -s report && exit $$status

matrix-ci: $(BIN)/.installed  ## the representative set CI runs (a few minutes)
	rm -rf .artifacts/matrix
	$(BIN)/nox -t ci -- $(ARGS); status=$$?; $(BIN)/nox -s report && exit $$status

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	DJANGO_SETTINGS_MODULE=tests.settings $(BIN)/python -m django makemigrations --check --dry-run
	cd example && EXAMPLE_STATE=$$(mktemp -d) ../$(BIN)/python manage.py makemigrations --check --dry-run

clean:
	rm -rf $(VENV) .artifacts .nox
