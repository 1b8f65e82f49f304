"""The processes the catalog runs beside the web server: a Celery worker, which also relays (the
aftercommit relay runs inside it), and, on request, a standalone relay.

Each child gets its own session, so Ctrl-C reaches only us and we stop them in order, by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings

EXAMPLE_DIR = Path(__file__).resolve().parent.parent


class Child:
    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        logs = settings.STATE_DIR / "logs"
        logs.mkdir(exist_ok=True)
        self.log_path = logs / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            cwd=EXAMPLE_DIR,
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def manage(*args: str) -> list[str]:
    return [sys.executable, str(EXAMPLE_DIR / "manage.py"), *args]


def start_worker(
    name: str = "worker", concurrency: int = 4, env: dict[str, str] | None = None
) -> Child:
    """A Celery worker: it runs the tasks and, by default, relays the outbox too. ``env`` is added
    to its environment (the race's outage points its publishing elsewhere)."""
    worker = Child(
        name,
        [
            *[sys.executable, "-m", "celery", "-A", "example", "worker"],
            *[
                "-P",
                "threads",
                "-c",
                str(concurrency),
                "-l",
                "info",
                "-n",
                f"{name}-{os.getpid()}@%h",
            ],
            *["--without-heartbeat", "--without-gossip", "--without-mingle"],
        ],
        env,
    )
    wait_until(worker, "ready.")
    return worker


def start_relay(name: str = "relay", **env: str) -> Child:
    """`manage.py aftercommit relay`, for a deployment that sends apart from its workers; the worker
    relays by itself, so nothing needs this by default."""
    return Child(name, manage("aftercommit", "relay"), env)


def start_web(port: int) -> Child:
    web = Child("web", manage("runserver", f"127.0.0.1:{port}", "--noreload", "--skip-checks"))
    wait_until(web, "Quit the server with")
    return web


def wait_until(child: Child, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in child.output():
        if not child.alive() or time.monotonic() > deadline:
            child.stop()
            tail = child.output()[-3000:]
            raise RuntimeError(f"{child.name} did not start (log {child.log_path}):\n{tail}")
        time.sleep(0.1)


def stop_all(children: list[Child]) -> None:
    for child in reversed(children):
        child.stop()
