"""Effectively once (``once=True``): a second delivery of a task id has no second effect.

Deliveries are counted in the other database before the body runs (CountingTask.before_start,
outside the once-transaction); effects are Item rows the body writes in the default database,
inside it.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter

import pytest
from celery import shared_task
from celery import states as celery_states
from django.conf import settings as django_settings
from django.db import connections

from aftercommit import ImproperlyConfigured
from aftercommit.celery import Task
from aftercommit.models import OnceRecord
from tests.celery_app import app
from tests.conftest import Process, wait_for
from tests.testapp.models import Item, TaskRun
from tests.testapp.tasks import once_effect, once_replaced, once_unbound

pytestmark = [pytest.mark.django_db(transaction=True, databases=["default", "other"])]
with_worker = [pytest.mark.services, pytest.mark.usefixtures("worker")]


def deliveries(token: str) -> Counter[str]:
    return Counter(TaskRun.objects.filter(token=token).values_list("task_id", flat=True))


def effects(token: str) -> Counter[int]:
    return Counter(Item.objects.filter(name=token).values_list("version", flat=True))


def ignored(worker: Process, task_id: str) -> bool:
    """Celery's own log line for a task that raised Ignore: acknowledged, no result stored."""
    return f"[{task_id}] ignored" in worker.output()


# In this process (Celery's apply: the same tracer as a worker) ------------------------------------


def test_same_task_id_applied_twice__body_runs_once(token) -> None:  # type: ignore[no-untyped-def]
    task_id = str(uuid.uuid4())
    first = once_effect.apply((token, 1), task_id=task_id)
    second = once_effect.apply((token, 1), task_id=task_id)
    assert (first.state, first.result) == (celery_states.SUCCESS, 1)
    assert second.state == celery_states.IGNORED
    assert effects(token) == {1: 1}
    assert deliveries(token) == {task_id: 2}
    assert OnceRecord.objects.filter(task_id=task_id, task_name=once_effect.name).exists()


def test_unbound_task__body_runs_once(token) -> None:  # type: ignore[no-untyped-def]
    task_id = str(uuid.uuid4())
    once_unbound.apply((token, 7), task_id=task_id)
    assert once_unbound.apply((token, 7), task_id=task_id).state == celery_states.IGNORED
    assert effects(token) == {7: 1}


def test_run_that_raises__records_nothing_and_runs_again(token) -> None:  # type: ignore[no-untyped-def]
    calls = []

    @shared_task(bind=True, base=Task, once=True, name=f"tests.once_fails_{token[-12:]}")
    def fails_first(self, token: str) -> None:  # type: ignore[no-untyped-def]
        Item.objects.create(name=token, version=len(calls))
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("first run fails")

    task = app.tasks[fails_first.name]
    task_id = str(uuid.uuid4())
    assert task.apply((token,), task_id=task_id).state == celery_states.FAILURE
    assert not OnceRecord.objects.filter(task_id=task_id).exists()
    assert effects(token) == {}  # the failed run's write rolled back with it
    assert task.apply((token,), task_id=task_id).state == celery_states.SUCCESS
    assert task.apply((token,), task_id=task_id).state == celery_states.IGNORED
    assert effects(token) == {1: 1}


def test_called_directly__runs_without_a_record(token) -> None:  # type: ignore[no-untyped-def]
    assert once_effect(token, 3) == 3
    assert once_effect(token, 3) == 3  # a function call is not a delivery: nothing to match
    assert effects(token) == {3: 2}
    assert not OnceRecord.objects.exists()


def test_once_not_true_or_an_alias__refused_when_the_task_is_made() -> None:
    with pytest.raises(ImproperlyConfigured, match="once=3 is not valid"):

        class Bad(Task):  # type: ignore[misc]
            once = 3


def test_once_names_an_unknown_alias__error_names_the_aliases(token) -> None:  # type: ignore[no-untyped-def]
    class Elsewhere(Task):  # type: ignore[misc]
        name = f"tests.once_elsewhere_{token[-12:]}"
        once = "nowhere"

        def run(self) -> None:
            pass

    task = app.register_task(Elsewhere())
    result = task.apply(task_id=str(uuid.uuid4()))
    assert result.state == celery_states.FAILURE
    assert "once='nowhere' names no database alias" in str(result.result)
    assert "default" in str(result.result)


def test_once_record_purge__removes_old_records_only(token) -> None:  # type: ignore[no-untyped-def]
    from aftercommit import once

    once_effect.apply((token, 1), task_id=f"{token}-old")
    assert once.purge("default", older_than=3600) == 0
    time.sleep(0.05)
    assert once.purge("default", older_than=0) >= 1
    assert not OnceRecord.objects.filter(task_id=f"{token}-old").exists()


# With a worker ----------------------------------------------------------------------------------


@pytest.mark.services
@pytest.mark.usefixtures("worker")
def test_duplicate_published_by_hand__effect_once_first_result_kept(token, worker) -> None:  # type: ignore[no-untyped-def]
    result = once_effect.delay(token, 5)
    wait_for(lambda: effects(token) == {5: 1})
    wait_for(lambda: f"[{result.id}] succeeded" in worker.output())
    # Plain Celery, the same task id: a publisher other than the relay.
    app.send_task(once_effect.name, (token, 5), task_id=result.id)
    wait_for(lambda: ignored(worker, result.id))
    assert deliveries(token) == {result.id: 2}
    assert effects(token) == {5: 1}
    if django_settings.BROKER_URL.startswith("redis"):  # the tests' result backend
        assert result.get(timeout=10) == 5  # the duplicate did not overwrite it


@pytest.mark.services
@pytest.mark.usefixtures("worker")
def test_unbound_task_duplicate__effect_once(token, worker) -> None:  # type: ignore[no-untyped-def]
    result = once_unbound.delay(token, 2)
    wait_for(lambda: f"[{result.id}] succeeded" in worker.output())
    app.send_task(once_unbound.name, (token, 2), task_id=result.id)
    wait_for(lambda: ignored(worker, result.id))
    assert effects(token) == {2: 1}


@pytest.mark.services
@pytest.mark.usefixtures("worker")
def test_fails_once_and_retries__effect_once(token, worker) -> None:  # type: ignore[no-untyped-def]
    result = once_effect.delay(token, 9, fail_first=True)
    wait_for(lambda: f"[{result.id}] succeeded" in worker.output())
    assert f"[{result.id}] retry" in worker.output()
    assert deliveries(token) == {result.id: 2}  # the first run and its retry
    assert effects(token) == {9: 1}  # the first run's write rolled back with it


@pytest.mark.services
@pytest.mark.usefixtures("worker")
def test_duplicate_while_first_runs__waits_then_skipped(token, worker) -> None:  # type: ignore[no-untyped-def]
    """The worker runs 4 threads: the duplicate starts while the first run sleeps in its body."""
    seconds = 3.0
    result = once_effect.delay(token, 4, sleep=seconds)
    wait_for(lambda: deliveries(token)[result.id] == 1)
    started = time.monotonic()
    app.send_task(once_effect.name, (token, 4), kwargs={"sleep": seconds}, task_id=result.id)
    wait_for(lambda: deliveries(token)[result.id] == 2)
    # Delivered, and waiting on the first run's transaction: not skipped yet.
    time.sleep(0.5)
    assert not ignored(worker, result.id)
    assert f"[{result.id}] succeeded" not in worker.output()
    wait_for(lambda: ignored(worker, result.id), timeout=30)
    assert time.monotonic() - started >= seconds - 1.0  # skipped only once the first had ended
    # (The first run's "succeeded" line may come after: Celery stores its result first.)
    wait_for(lambda: f"[{result.id}] succeeded" in worker.output())
    assert effects(token) == {4: 1}
    connections.close_all()


@pytest.mark.services
@pytest.mark.usefixtures("worker")
def test_replaced_by_another_task__effect_kept_and_replacement_runs(token, worker) -> None:  # type: ignore[no-untyped-def]
    result = once_replaced.delay(token)
    # Two rows of the same task id: the replaced task's delivery (CountingTask), and what the
    # replacement (read_item, the same id) recorded when it ran.
    wait_for(lambda: deliveries(token) == {result.id: 2}, timeout=30)
    assert effects(token) == {0: 1}  # the replaced task's write stands
    assert not OnceRecord.objects.filter(task_id=result.id).exists()
