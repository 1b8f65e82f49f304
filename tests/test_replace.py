"""Celery's ``Task.replace()`` inside a worker: the replacement is recorded under the running
task's id (Celery reuses it, and the outbox allows it), runs, and the chain goes on after it.
(0.1 refused the reused id with a DispatchError, so replace() failed.)"""

from __future__ import annotations

import pytest
from celery import chain
from django.db import transaction

from tests.conftest import wait_for
from tests.testapp.models import TaskRun
from tests.testapp.tasks import read_item, replaced_by_read_item

pytestmark = [
    pytest.mark.services,
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("worker"),
]


def test_replace_in_a_chain__replacement_runs_with_the_same_id_and_the_chain_goes_on(token) -> None:  # type: ignore[no-untyped-def]
    with transaction.atomic():
        chain(replaced_by_read_item.si(token), read_item.si(token, None, 2)).delay()
    wait_for(lambda: TaskRun.objects.filter(token=token).count() >= 3, timeout=60)
    runs = list(TaskRun.objects.filter(token=token).order_by("started_at"))
    # The replaced task, its replacement, then the chain's next task, each once.
    assert [r.expected_version for r in runs] == [0, 1, 2]
    assert runs[1].task_id == runs[0].task_id  # the replacement took the replaced task's id
    assert runs[2].task_id != runs[0].task_id
