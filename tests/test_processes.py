"""The ways a user's processes dispatch: forked web servers, Celery's prefork children, canvas.

Each runs against the real worker (which relays) and counts what ran: every call once, none before
its commit.
"""

from __future__ import annotations

import json
import socket
import sys
import time
import urllib.request
import uuid
from collections import Counter

import pytest
from celery import chain, group
from django.db import transaction

from tests.conftest import Broker, Process, _subprocess_env, wait_for
from tests.testapp.models import TaskRun
from tests.testapp.tasks import fan_out, read_item

pytestmark = [
    pytest.mark.services,
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("worker"),
]


def runs(token: str) -> Counter[str]:
    return Counter(TaskRun.objects.filter(token=token).values_list("task_id", flat=True))


def versions(token: str) -> list[int | None]:
    return sorted(
        TaskRun.objects.filter(token=token).values_list("expected_version", flat=True),
        key=lambda v: -1 if v is None else v,
    )


def test_canvas_inside_atomic__sent_after_the_commit(token: str) -> None:
    with transaction.atomic():
        chain(read_item.si(token, None, 1), read_item.si(token, None, 2)).apply_async()
        group(read_item.si(token, None, 3), read_item.si(token, None, 4)).apply_async()
        read_item.s(token, None).apply_async(kwargs={"expected": 5})
        time.sleep(0.5)
        assert not runs(token), "a canvas task ran before the commit"
    wait_for(lambda: sum(runs(token).values()) >= 5, timeout=30)
    time.sleep(1)
    assert versions(token) == [1, 2, 3, 4, 5]
    assert max(runs(token).values()) == 1


def test_canvas_rolled_back__nothing_sent(token: str) -> None:
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        chain(read_item.si(token, None, 1), read_item.si(token, None, 2)).apply_async()
        group(read_item.si(token, None, 3), read_item.si(token, None, 4)).apply_async()
        raise ZeroDivisionError
    read_item.delay(f"{token}-after")
    wait_for(lambda: runs(f"{token}-after"), timeout=30)
    time.sleep(1)
    assert not runs(token)


def _spawn(broker: Broker, name: str, argv: list[str], **env: str) -> Process:
    return Process(name, argv, {**_subprocess_env(broker), **broker.env, **env})


def test_task_dispatching_from_a_prefork_child__each_sent_once(token: str, broker: Broker) -> None:
    # A prefork pool forks its children before the relay's thread starts in the parent; the
    # children dispatch, the parent (or any worker) relays.
    worker = _spawn(
        broker,
        "worker-prefork",
        [
            sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "-P", "prefork",
            "-c", "2", "-Q", "prefork", "-l", "info", "--without-heartbeat", "--without-gossip",
            "--without-mingle", "-n", f"prefork-{uuid.uuid4().hex[:6]}@%h",
        ],
    )  # fmt: skip
    try:
        wait_for(lambda: "ready." in worker.output(), timeout=60)
        for part in range(3):
            fan_out.apply_async((f"{token}", 10), queue="prefork", task_id=f"{token}-{part}")
        wait_for(lambda: sum(runs(token).values()) >= 30, timeout=60)
        time.sleep(1)
        counts = runs(token)
        assert len(counts) == 30 and max(counts.values()) == 1
    finally:
        worker.stop()


def test_fork_after_dispatch__parent_and_child_each_record_their_own(
    token: str, broker: Broker
) -> None:
    argv = [sys.executable, "-m", "tests.fault_writer", "--token", token, "--fork"]
    writer = _spawn(broker, "writer-fork", argv)
    try:
        assert writer.proc.wait(60) == 0, writer.output()
    finally:
        writer.stop()
    ids = writer.printed_ids()
    assert len(ids) == 3
    wait_for(lambda: set(runs(token)) >= ids, timeout=30)
    time.sleep(1)
    assert runs(token) == Counter(dict.fromkeys(ids, 1))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_gunicorn_preload_several_workers__every_request_dispatches_once(
    token: str, broker: Broker
) -> None:
    # The app (and aftercommit) is imported in the master, then forked into three workers.
    port = _free_port()
    server = _spawn(
        broker,
        "gunicorn",
        [
            sys.executable, "-m", "gunicorn", "--preload", "-w", "3", "-b", f"127.0.0.1:{port}",
            "--access-logfile", "-", "tests.wsgi:application",
        ],
    )  # fmt: skip
    try:
        wait_for(lambda: "Booting worker" in server.output(), timeout=60)
        ids = set()
        for n in range(30):
            url = f"http://127.0.0.1:{port}/save/{token}/"
            for _attempt in range(50):  # the workers may still be starting
                try:
                    with urllib.request.urlopen(url, timeout=10) as response:
                        ids.add(json.load(response)["task_id"])
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                raise AssertionError(f"request {n} failed:\n{server.output()[-2000:]}")
        assert len(ids) == 30
        wait_for(lambda: set(runs(token)) >= ids, timeout=60)
        time.sleep(1)
        assert runs(token) == Counter(dict.fromkeys(ids, 1))
        # Each ran after its commit and read the committed row.
        seen = TaskRun.objects.filter(token=token).values_list("seen_version", flat=True)
        assert set(seen) == {1}
    finally:
        server.stop()
