"""Outside a transaction the call's row commits at once, and from then on the relay may send the
task and a worker finish it. So the call does everything Celery's ``send_task`` does before it
publishes (the result backend's ``on_task_call``: Redis subscribes to the result channel, rpc://
declares the caller's reply queue) before it writes the row, as Celery publishes last. (Before,
the row came first: a task could be received, even finished, before ``delay()`` returned, and an
rpc:// reply could reach a queue not declared yet and be lost. Celery's integration suite showed
it as ``test_replaced_task_nesting_level_0``, whose ``task_received`` handler ran before the test
had reset its flag after ``delay()``.)"""

from __future__ import annotations

from typing import Any

import pytest
from celery.backends.base import BaseBackend
from django.db import transaction

from aftercommit.models import OutboxMessage, OutboxMessageQuerySet
from tests.celery_app import app
from tests.support import from_another_connection
from tests.testapp.tasks import read_item

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])


@pytest.fixture
def backend_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Each ``on_task_call`` of the app's result backend: the task id, and whether its row was
    already committed then (seen from another connection)."""
    calls: list[tuple[str, bool]] = []

    def on_task_call(self: BaseBackend, producer: Any, task_id: str) -> None:
        calls.append((task_id, committed(task_id)))

    monkeypatch.setattr(type(app.backend), "on_task_call", on_task_call)
    return calls


def committed(task_id: str) -> bool:
    """Whether another connection sees the row (as the relay would)."""
    return from_another_connection(OutboxMessage.objects.filter(task_id=task_id).exists)


def test_outside_a_transaction__backend_told_before_the_row_commits(backend_calls, token) -> None:  # type: ignore[no-untyped-def]
    result = read_item.apply_async((token,), ignore_result=False)
    assert backend_calls == [(result.id, False)]
    assert OutboxMessage.objects.filter(task_id=result.id).exists()  # and then it was written


def test_inside_a_transaction__backend_told_at_the_call(backend_calls, token) -> None:  # type: ignore[no-untyped-def]
    with transaction.atomic():
        result = read_item.apply_async((token,), ignore_result=False)
        assert backend_calls == [(result.id, False)]
    assert committed(result.id)


def test_ignore_result__backend_not_told(backend_calls, token) -> None:  # type: ignore[no-untyped-def]
    read_item.apply_async((token,), ignore_result=True)
    assert backend_calls == []


def test_row_refused__no_subscription_left(backend_calls, monkeypatch, token) -> None:  # type: ignore[no-untyped-def]
    """A write that fails after the backend was told takes the subscription back."""
    cancelled: list[str] = []

    class Consumer:
        def cancel_for(self, task_id: str) -> None:
            cancelled.append(task_id)

    # On the instance: an asynchronous backend (Redis) sets its consumer in __init__.
    monkeypatch.setattr(app.backend, "result_consumer", Consumer(), raising=False)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the database refused the row")

    monkeypatch.setattr(OutboxMessageQuerySet, "insert", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        read_item.apply_async((token,), ignore_result=False)
    assert len(backend_calls) == 1
    assert cancelled == [backend_calls[0][0]]
