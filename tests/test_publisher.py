"""The in-process publisher: it sends right after commit, flushes at exit and survives fork."""

from __future__ import annotations

import sys

import pytest

from aftercommit.models import OutboxMessage, Status
from tests.conftest import wait_for
from tests.testapp.models import TaskRun

pytestmark = [
    pytest.mark.services,
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("worker"),
]


def writer(spawn_process, token: str, *args: str):  # type: ignore[no-untyped-def]
    proc = spawn_process([sys.executable, "-m", "tests.fault_writer", "--token", token, *args])
    assert proc.proc.wait(60) == 0, proc.output()
    return proc.printed_ids()


@pytest.fixture
def spawn_process(broker):  # type: ignore[no-untyped-def]
    from tests.conftest import Process, _subprocess_env

    started = []

    def start(argv):  # type: ignore[no-untyped-def]
        proc = Process(f"writer-{len(started)}", argv, {**_subprocess_env(broker), **broker.env})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def test_clean_exit__publisher_flushes_what_it_holds(token, spawn_process) -> None:  # type: ignore[no-untyped-def]
    ids = writer(spawn_process, token, "--count", "50")
    assert len(ids) == 50
    # No relay runs: only the exiting process's publisher can have sent and marked these.
    wait_for(
        lambda: set(TaskRun.objects.filter(token=token).values_list("task_id", flat=True)) >= ids
    )
    statuses = set(
        OutboxMessage.objects.filter(message_id__in=ids).values_list("status", flat=True)
    )
    assert statuses == {Status.SENT}


def test_fork__parent_and_child_each_send_their_own(token, spawn_process) -> None:  # type: ignore[no-untyped-def]
    ids = writer(spawn_process, token, "--fork")
    assert len(ids) == 3
    wait_for(
        lambda: set(TaskRun.objects.filter(token=token).values_list("task_id", flat=True)) >= ids
    )
    runs = list(TaskRun.objects.filter(token=token).values_list("task_id", flat=True))
    assert sorted(runs) == sorted(ids), "a message was sent twice or by the wrong process"
    statuses = set(
        OutboxMessage.objects.filter(message_id__in=ids).values_list("status", flat=True)
    )
    assert statuses == {Status.SENT}
