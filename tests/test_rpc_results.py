"""``AsyncResult.get()`` with the ``rpc://`` result backend: the result comes back to the queue of
the thread that made the call (``app.thread_oid``), though another process (the relay inside the
worker) publishes the task. (0.1 took the reply queue in the sending thread, so the result went to
a queue nobody read and ``get()`` never returned.)"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator

import pytest
from django.db import transaction

from tests.celery_app import app
from tests.conftest import Broker, Process, _subprocess_env, wait_for
from tests.testapp.tasks import add

pytestmark = [
    pytest.mark.services,
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
]


@pytest.fixture(scope="module")
def rpc_worker(  # type: ignore[no-untyped-def]
    broker: Broker, django_db_setup: None, django_db_blocker
) -> Iterator[Process]:
    """A relaying worker whose results go back through rpc://."""
    if not broker.url.startswith("amqp"):
        pytest.skip("the rpc:// result backend replies through AMQP queues (RabbitMQ)")
    env = {**_subprocess_env(broker), **broker.env, "AFTERCOMMIT_TEST_RESULT_BACKEND": "rpc://"}
    overrides = json.loads(env.get("AFTERCOMMIT_TEST_SETTINGS", "{}"))
    overrides["RELAY_IN_WORKER"] = True
    env["AFTERCOMMIT_TEST_SETTINGS"] = json.dumps(overrides)
    proc = Process(
        "rpc-worker",
        [
            sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "-P", "threads",
            "-c", "2", "-Q", "celery", "-l", "info", "--without-heartbeat", "--without-gossip",
            "--without-mingle", "-n", f"rpc-{os.getpid()}@%h",
        ],
        env,
    )  # fmt: skip
    try:
        wait_for(lambda: "ready." in proc.output() or proc.proc.poll() is not None, timeout=60)
        if proc.proc.poll() is not None:
            raise RuntimeError(f"the worker exited:\n{proc.output()[-3000:]}")
        yield proc
    finally:
        proc.stop()


@pytest.fixture
def rpc_backend() -> Iterator[None]:
    """This process's app on rpc:// too, as a web process configured so would be."""
    previous = app.conf.result_backend
    cached, local = app._backend_cache, app._local.__dict__.pop("backend", None)
    app.conf.result_backend = "rpc://"
    app._backend_cache = None
    try:
        yield
    finally:
        rpc = app._backend
        consumer = getattr(rpc, "result_consumer", None)
        if consumer is not None and consumer._connection is not None:
            consumer.stop()
            consumer._connection.close()
        app.conf.result_backend = previous
        app._backend_cache = cached
        app._local.__dict__.pop("backend", None)
        if local is not None:
            app._local.backend = local


def test_rpc_backend__get_returns_the_result_to_the_caller(rpc_worker, rpc_backend) -> None:  # type: ignore[no-untyped-def]
    with transaction.atomic():
        result = add.apply_async((20, 22), ignore_result=False)
    assert result.get(timeout=20) == 42
    with transaction.atomic():
        results = [add.apply_async((n, n), ignore_result=False) for n in range(3)]
    assert [r.get(timeout=20) for r in results] == [0, 2, 4]
