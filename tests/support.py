"""The machinery the tests share: a broker the tests can take away (a TCP proxy, or a link on the
filesystem transport), the subprocesses they start (workers, relays, writers), and waiting.

tests/conftest.py turns these into fixtures; test modules import what they need from here.
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
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.conf import settings
from django.db import connections

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("AFTERCOMMIT_ARTIFACTS", ROOT / ".artifacts"))
REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES") == "1"
# Hypothesis keeps its example database and caches here, not in a .hypothesis/ at the root.
HYPOTHESIS_DIR = ARTIFACTS / "hypothesis"
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(HYPOTHESIS_DIR))


T = TypeVar("T")


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


def from_another_connection(query: Callable[[], T]) -> T:
    """``query()`` on a connection of its own (a thread's), as the relay or a worker would see the
    database: outside the caller's open transaction and its snapshot."""
    result: list[T] = []

    def run() -> None:
        try:
            result.append(query())
        finally:
            connections.close_all()

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


def unavailable(reason: str) -> None:
    if REQUIRE_SERVICES:
        pytest.exit(f"REQUIRE_SERVICES=1 and {reason}", returncode=3)
    pytest.skip(reason)


def broker_reachable() -> str | None:
    url = settings.BROKER_URL
    if url.startswith("filesystem"):
        return None
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname, parts.port), timeout=2).close()
    except OSError as exc:
        return f"broker {parts.scheme}://{parts.hostname}:{parts.port} unreachable ({exc})"
    return None


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


# Processes ---------------------------------------------------------------------------------------


def subprocess_env(broker: Broker) -> dict[str, str]:
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


def relay_argv(*args: str) -> list[str]:
    """``manage.py aftercommit relay`` with ``args``, for the ``spawn`` fixture."""
    return [sys.executable, "-m", "django", "aftercommit", "relay", *args]


def kill_between_publish_and_mark(process: Process, app_name: str) -> list[str]:
    """SIGKILL a sending process (a relay, a relaying worker) after it published a batch and
    before it marked it: where a crash makes duplicates. A random moment rarely lands there
    (a batch is built and published in milliseconds), so the claimed rows are locked: the process
    publishes them and waits at its mark. Once the worker ran one of them, the process is killed
    and its database sessions (``application_name``) cut, so a mark it already sent never runs.
    Returns the batch's task ids; they are due again when the killed process's lease ends."""
    from django.db import transaction
    from django.db.models.functions import Now

    from aftercommit.models import OutboxMessage, Status
    from tests.testapp.models import TaskRun

    # Claimed, not marked: the claim moved due_at to the end of its lease.
    in_flight = OutboxMessage.objects.filter(status=Status.PENDING, due_at__gt=Now())
    wait_for(in_flight.exists, timeout=60, interval=0.005)
    with transaction.atomic():
        batch = list(in_flight.select_for_update().values_list("task_id", flat=True))
        wait_for(TaskRun.objects.filter(task_id__in=batch).exists, timeout=60)
        process.signal(signal.SIGKILL)
        process.proc.wait(10)
        with connections["default"].cursor() as cursor:
            cursor.execute(
                # (waits up to 5 s for each session to end, before this transaction's locks go)
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
                "WHERE application_name = %s",
                [app_name],
            )
    return batch
