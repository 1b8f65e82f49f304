"""Fixtures on real services: a Celery worker process, the processes a test starts, and a switchable
broker (the machinery itself is in tests/support.py).

DATABASE_URL and BROKER_URL choose the services (tests/matrix.py runs each setup). A setup whose
server is unreachable skips, saying why; with REQUIRE_SERVICES=1 (CI) it fails instead.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator

import pytest
from django.conf import settings
from django.db import connections

# Re-exported: test modules written before tests/support.py import these from here.
from tests.support import ARTIFACTS as ARTIFACTS
from tests.support import REQUIRE_SERVICES as REQUIRE_SERVICES
from tests.support import ROOT as ROOT
from tests.support import Broker, Process, broker_reachable, subprocess_env, unavailable
from tests.support import subprocess_env as _subprocess_env  # noqa: F401
from tests.support import wait_for as wait_for

# Services ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def services(request, django_db_blocker) -> None:  # type: ignore[no-untyped-def]
    problem = broker_reachable()
    if problem:
        unavailable(problem)
    # The test databases first: the settings' own database need not exist (PostgreSQL +
    # RabbitMQ's test_rabbitmq never does), only the server, which creates them.
    try:
        request.getfixturevalue("django_db_setup")
    except Exception as exc:
        db = settings.DATABASES["default"]
        unavailable(f"database {db['ENGINE']} {db.get('HOST', '')} unreachable ({exc})")
    with django_db_blocker.unblock():
        try:
            connections["default"].ensure_connection()
        except Exception as exc:
            db = settings.DATABASES["default"]
            unavailable(f"database {db['ENGINE']} {db.get('HOST', '')} unreachable ({exc})")
        finally:
            connections["default"].close()


# A broker we can take away -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def broker(services: None) -> Iterator[Broker]:
    from tests.celery_app import app

    b = Broker()
    app.conf.broker_write_url = b.client_url
    if b.filesystem:
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "data_folder_out": str(b.link),
        }
    yield b
    if b.proxy is not None:
        b.proxy.down()


# Processes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker(  # type: ignore[no-untyped-def]
    request: pytest.FixtureRequest, broker: Broker, django_db_setup: None, django_db_blocker
) -> Iterator[Process]:
    """A Celery worker for the module's tests. It relays (the default deployment) unless the
    module sets ``WORKER_RELAYS = False`` to drive relays itself."""
    # The worker's own relay publishes through the broker the web process sees (the proxy the
    # outage tests cut); its consumer reads from the real one.
    env = {**subprocess_env(broker), **broker.env}
    overrides = json.loads(env.get("AFTERCOMMIT_TEST_SETTINGS", "{}"))
    overrides["RELAY_IN_WORKER"] = getattr(request.module, "WORKER_RELAYS", True)
    env["AFTERCOMMIT_TEST_SETTINGS"] = json.dumps(overrides)
    proc = Process(
        "worker",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "tests.celery_app",
            "worker",
            "-P",
            "threads",
            "-c",
            "4",
            "-Q",
            "celery,other",
            "-l",
            "info",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
            "-n",
            f"tests-{os.getpid()}@%h",
        ],
        env,
    )
    try:
        wait_for(lambda: "ready." in proc.output() or proc.proc.poll() is not None, timeout=60)
        if proc.proc.poll() is not None:
            raise RuntimeError(f"the worker exited:\n{proc.output()[-3000:]}")
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def spawn(broker: Broker) -> Iterator[Callable[..., Process]]:
    """Start a process of the test project (``spawn(name, relay_argv(), **env)``), logging to
    ``.artifacts/<name>.log``, with the test databases and the broker the web process sees; every
    one still running is stopped (SIGTERM, then SIGKILL) when the test ends."""
    started: list[Process] = []

    def start(name: str, argv: list[str], **env: str) -> Process:
        proc = Process(name, argv, {**subprocess_env(broker), **broker.env, **env})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def token(request: pytest.FixtureRequest) -> str:
    return f"{request.node.name[:60]}-{time.time_ns()}"


# The fault suite's table --------------------------------------------------------------------------

FAULT_ROWS: list[dict[str, object]] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FAULT_ROWS:
        return
    columns = list(FAULT_ROWS[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in FAULT_ROWS]
    table = "\n".join(lines)
    size = "long" if os.environ.get("AFTERCOMMIT_FAULTS") == "long" else "short"
    terminalreporter.write_sep("=", f"fault suite ({size})")
    terminalreporter.write_line(table)
    report = os.environ.get("AFTERCOMMIT_FAULTS_REPORT")
    if report:
        with open(report, "a") as out:
            out.write(f"\n{table}\n")
