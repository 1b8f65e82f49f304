"""Real services for the tests: a Celery worker process, relay processes, and a switchable broker.

DATABASE_URL and BROKER_URL choose the services (tests/matrix.py runs each setup). A setup whose
server is unreachable skips, saying why; with REQUIRE_SERVICES=1 (CI) it fails instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.conf import settings
from django.db import connections

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("AFTERCOMMIT_ARTIFACTS", ROOT / ".artifacts"))
REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES") == "1"


def wait_for(
    predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05
) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {predicate}")
        time.sleep(interval)


# Services ----------------------------------------------------------------------------------------


def _unavailable(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.exit(f"REQUIRE_SERVICES=1 and {reason}", returncode=3)
    pytest.skip(reason)


def _broker_reachable() -> str | None:
    url = settings.BROKER_URL
    if url.startswith("filesystem"):
        return None
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
    except OSError as exc:
        return f"broker {parts.scheme}://{parts.hostname}:{parts.port} unreachable ({exc})"
    return None


@pytest.fixture(scope="session")
def services(django_db_blocker) -> None:  # type: ignore[no-untyped-def]
    problem = _broker_reachable()
    if problem:
        _unavailable(problem)
    with django_db_blocker.unblock():
        try:
            connections["default"].ensure_connection()
        except Exception as exc:
            db = settings.DATABASES["default"]
            _unavailable(f"database {db['ENGINE']} {db.get('HOST', '')} unreachable ({exc})")
        finally:
            connections["default"].close()


# A broker we can take away -----------------------------------------------------------------------


class Proxy:
    """A TCP proxy to the broker: ``down()`` makes it unreachable, ``up()`` brings it back."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # close() alone leaves a blocked accept() listening; shutdown() wakes it
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)  # idle broker connections are normal, keep them
            with self._lock:
                self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
                with self._lock:
                    if s in self._socks:
                        self._socks.remove(s)


class Broker:
    """The broker as the web process and the relay see it (the worker always sees the real one)."""

    def __init__(self) -> None:
        self.url = settings.BROKER_URL
        self.filesystem = self.url.startswith("filesystem")
        self.proxy: Proxy | None = None
        self.client_url = self.url
        self.env: dict[str, str] = {}
        if self.filesystem:
            # Producers write through a symlink; removing it is the outage (the worker, reading
            # the folder itself, stays up as it would with a networked broker's own outage).
            self.folder = Path(settings.FS_BROKER_DIR)
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            self.link = self.folder.with_name("broker-out")
            self.link.unlink(missing_ok=True)
            self.link.symlink_to(self.folder)
            self.env["AFTERCOMMIT_TEST_FS_OUT"] = str(self.link)
        else:
            parts = urlsplit(self.url)
            default_port = {"redis": 6379, "amqp": 5672, "pyamqp": 5672}.get(parts.scheme, 0)
            self.proxy = Proxy((parts.hostname or "127.0.0.1", parts.port or default_port))
            netloc = parts.netloc.rsplit("@", 1)
            host = f"127.0.0.1:{self.proxy.port}"
            netloc_new = f"{netloc[0]}@{host}" if len(netloc) == 2 else host
            self.client_url = urlunsplit(parts._replace(netloc=netloc_new))
            self.env["AFTERCOMMIT_TEST_PROXY_URL"] = self.client_url

    def down(self) -> None:
        if self.proxy is not None:
            self.proxy.down()
        else:
            self.link.unlink()

    def up(self) -> None:
        if self.proxy is not None:
            self.proxy.up()
        else:
            self.link.symlink_to(self.folder)


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


def _subprocess_env(broker: Broker) -> dict[str, str]:
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    env["AFTERCOMMIT_TEST_DB_NAMES"] = json.dumps(
        {alias: connections[alias].settings_dict["NAME"] for alias in settings.DATABASES}
    )
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Process:
    def __init__(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.log_path = ARTIFACTS / f"{name}.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def printed_ids(self) -> set[str]:
        """Task ids the process printed, one a line (tests/fault_writer.py)."""
        return {line for line in self.output().split() if len(line) == 36 and line.count("-") == 4}

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.log.close()
        return code


@pytest.fixture(scope="module")
def worker(  # type: ignore[no-untyped-def]
    request: pytest.FixtureRequest, broker: Broker, django_db_setup: None, django_db_blocker
) -> Iterator[Process]:
    """A Celery worker for the module's tests. It relays (the default deployment) unless the
    module sets ``WORKER_RELAYS = False`` to drive relays itself."""
    # The worker's own relay publishes through the broker the web process sees (the proxy the
    # outage tests cut); its consumer reads from the real one.
    env = {**_subprocess_env(broker), **broker.env}
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
def start_relay(broker: Broker) -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(*args: str, name: str = "relay") -> Process:
        env = {**_subprocess_env(broker), **broker.env}
        proc = Process(
            name,
            [sys.executable, "-m", "django", "aftercommit", "relay", *args],
            env,
        )
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
