# One entry point for people and CI. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test faults soak lint bench clean matrix matrix-ci celery-suite celery-suite-ci replica

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(BIN)/.installed  ## the seed's system: admin + a worker that relays, SQLite and a serverless broker
	$(BIN)/python example/manage.py demo $(ARGS)

test: $(BIN)/.installed  ## run the tests on every setup whose servers are reachable
	$(BIN)/python tests/matrix.py $(ARGS)

# A streaming replica of the local PostgreSQL on port 5433, lagging REPLICA_DELAY, for the
# replica-safe reads tests (tests/replica.py; `start` is a quick check when it already runs).
REPLICA_DELAY ?= 300ms
replica: $(BIN)/.installed  ## start the test replica; export the AFTERCOMMIT_TEST_REPLICA_URL it prints
	$(BIN)/python tests/replica.py start --delay $(REPLICA_DELAY)

faults: $(BIN)/.installed  ## the long fault suite (a short form runs inside `make test`)
	mkdir -p docs
	printf '# Fault suite\n\n`make faults`, %s, on %s (%s cores).\n' "$$(date -u +%F)" \
		"$$(uname -srm)" "$$(nproc)" > docs/faults.md
	AFTERCOMMIT_FAULTS=long AFTERCOMMIT_FAULTS_REPORT=$(CURDIR)/docs/faults.md AFTERCOMMIT_SKIP_EXAMPLE=1 AFTERCOMMIT_SKIP_BENCH=1 \
		AFTERCOMMIT_JOBS=1 \
		AFTERCOMMIT_SETUPS=postgresql+redis,postgresql+rabbitmq \
		$(BIN)/python tests/matrix.py -m faults $(ARGS)

# Every benchmark in one run on PostgreSQL + Redis (and RabbitMQ for the drain), then the report.
# BENCH_ARGS=--quick runs the small form that only checks the code (`make test` runs it).
BENCH_OUT ?= $(CURDIR)/benchmarks/results
# The RabbitMQ the drain runs on (its queue, aftercommit-bench, keeps it apart from the tests').
BENCH_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672//
BENCH_REPORT ?= $(CURDIR)/benchmarks/REPORT.md
BENCH := BENCH_OUT=$(BENCH_OUT) $(BIN)/python benchmarks
bench: $(BIN)/.installed  ## side-by-side benchmarks -> benchmarks/REPORT.md (about 10 minutes)
	mkdir -p $(BENCH_OUT) && rm -f $(BENCH_OUT)/*.json $(BENCH_OUT)/*.png
	$(BENCH)/request_path.py $(BENCH_ARGS)
	$(BENCH)/latency.py $(BENCH_ARGS)
	$(BENCH)/latency.py --pool threads --countdown 0 $(BENCH_ARGS)
	BROKER_URL=$(BENCH_AMQP_URL) $(BENCH)/latency.py $(BENCH_ARGS)
	BROKER_URL=$(BENCH_AMQP_URL) $(BENCH)/latency.py --pool threads --countdown 0 $(BENCH_ARGS)
	DATABASE_URL=mysql://root@127.0.0.1:3306/aftercommit_bench $(BENCH)/latency.py $(BENCH_ARGS)
	DATABASE_URL= BROKER_URL=filesystem:// $(BENCH)/latency.py $(BENCH_ARGS)
	$(BENCH)/drain.py $(BENCH_ARGS)
	BROKER_URL=$(BENCH_AMQP_URL) $(BENCH)/drain.py \
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
# Celery's own integration suite, plain and with aftercommit's task class (tests/celery_suite.py).
# ARGS="--celery 5.4.0" runs it on that Celery, in a venv of its own under .artifacts/.
$(BIN)/.suite-installed: $(BIN)/.installed
	$(BIN)/python -m pip install -q -e ".[dev,celery-suite]"
	touch $@

celery-suite: $(BIN)/.suite-installed  ## the whole suite, both ways, and what passes only on plain Celery
	$(BIN)/python tests/celery_suite.py $(ARGS)

celery-suite-ci: $(BIN)/.suite-installed  ## its representative subset (CI)
	$(BIN)/python tests/celery_suite.py --ci $(ARGS)

# The protocol model (tests/test_protocol_model.py) with many more examples than `make test`'s 50,
# on SQLite and PostgreSQL: each run prints how many examples and steps ran, and whether the
# invariants held. AFTERCOMMIT_SETUPS picks other setups.
SOAK_EXAMPLES ?= 2000
soak: $(BIN)/.installed  ## the protocol model, long (about 20 minutes on PostgreSQL)
	AFTERCOMMIT_SOAK_EXAMPLES=$(SOAK_EXAMPLES) AFTERCOMMIT_SKIP_EXAMPLE=1 \
		AFTERCOMMIT_SETUPS=$${AFTERCOMMIT_SETUPS:-sqlite+filesystem,postgresql+redis} \
		$(BIN)/python tests/matrix.py tests/test_protocol_model.py $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	DJANGO_SETTINGS_MODULE=tests.settings $(BIN)/python -m django makemigrations --check --dry-run
	cd example && EXAMPLE_STATE=$$(mktemp -d) ../$(BIN)/python manage.py makemigrations --check --dry-run

clean:
	rm -rf $(VENV) .artifacts .nox

.PHONY: package docs
package: $(BIN)/.installed  ## build sdist + wheel, twine check, run the example's tests on the installed wheel
	BIN=$(BIN) PYTHON=$(PYTHON) tests/wheel_check.sh $(ARGS)

docs: $(BIN)/.installed  ## the Sphinx documentation, warnings as errors -> docs/_build/html
	$(BIN)/sphinx-build -W --keep-going -b html docs docs/_build/html
