"""Tasks the worker runs; each records what it saw."""

from __future__ import annotations

import json
import time
from typing import Any

import celery
from celery import shared_task

from aftercommit.celery import Task as AftercommitTask

from .models import Item, ReplicaItem, TaskRun


def _record(task: celery.Task, token: str, item_id: int | None, expected: int | None) -> None:
    started = time.time()
    seen = None
    if item_id is not None:
        seen = Item.objects.filter(pk=item_id).values_list("version", flat=True).first()
    req = task.request
    TaskRun.objects.create(
        token=token,
        task_id=req.id,
        item_id=item_id,
        expected_version=expected,
        seen_version=seen,
        started_at=started,
        eta=str(req.eta or ""),
        queue=(req.delivery_info or {}).get("routing_key") or "",
        priority=(req.delivery_info or {}).get("priority"),
        headers=json.dumps({"custom": getattr(req, "custom", None)}),
    )


@shared_task(bind=True)
def read_item(
    self: celery.Task, token: str, item_id: int | None = None, expected: int | None = None
) -> None:
    """aftercommit's task (the app's task_cls)."""
    _record(self, token, item_id, expected)


@shared_task(bind=True, base=celery.Task)
def plain_read_item(
    self: celery.Task, token: str, item_id: int | None = None, expected: int | None = None
) -> None:
    """The same task on plain Celery: what the seed's code did."""
    _record(self, token, item_id, expected)


@shared_task(bind=True, after_commit=False)
def read_now(self: celery.Task, token: str) -> None:
    """Opted out of after-commit sending: published at the call."""
    _record(self, token, None, None)


@shared_task(bind=True, acks_late=True)
def slow_read(self: celery.Task, token: str, seconds: float = 3.0) -> None:
    """Acknowledged only when done: a worker killed midway leaves it to run again. Only the first
    run is slow, so the run after the kill finishes before Redis could hand it out a third time."""
    first = not TaskRun.objects.filter(task_id=self.request.id).exists()
    _record(self, token, None, None)
    if first:
        time.sleep(seconds)


@shared_task(bind=True)
def fan_out(self: celery.Task, token: str, count: int) -> None:
    """Dispatches from inside a worker (a prefork child), in a transaction of its own."""
    from django.db import transaction

    with transaction.atomic():
        for i in range(count):
            read_item.delay(token, None, i)


@shared_task(bind=True)
def replaced_by_read_item(self: celery.Task, token: str) -> None:
    """Records its own run, then hands over to read_item with Celery's ``replace()``, which gives
    the replacement this task's id (and the rest of a chain this task was part of)."""
    _record(self, token, None, 0)
    raise self.replace(read_item.si(token, None, 1))


@shared_task
def add(x: int, y: int) -> int:
    """Returns a result, for the result backend tests."""
    return x + y


@shared_task(bind=True)
def read_replica_item(
    self: celery.Task, token: str, item_id: int, expected: int, retry: bool = False
) -> None:
    """Reads through the routers, which prefer the replica; records where the read went and the
    log position the message carried. With ``retry``, the first run retries once."""
    if retry and not self.request.retries:
        raise self.retry(countdown=0)
    started = time.time()
    reads = ReplicaItem.objects.filter(pk=item_id)
    alias = reads.db
    seen = reads.values_list("version", flat=True).first()
    req = self.request
    TaskRun.objects.create(
        token=token,
        task_id=req.id,
        item_id=item_id,
        expected_version=expected,
        seen_version=seen,
        started_at=started,
        priority=req.retries,
        headers=json.dumps({"read_from": alias, "lsn": getattr(req, "aftercommit_lsn", None)}),
    )


# Effectively once (issue 14) -------------------------------------------------------------------


class CountingTask(AftercommitTask):
    """Counts every delivery before the body (and before a once-task's check), in the other
    database: outside the once-transaction, so a skipped duplicate is still counted. A user's own
    base class, as ``base=`` takes it."""

    def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
        TaskRun.objects.create(token=args[0], task_id=task_id, started_at=time.time())


@shared_task(bind=True, base=CountingTask, once=True, ignore_result=False)
def once_effect(
    self: celery.Task, token: str, n: int, sleep: float = 0.0, fail_first: bool = False
) -> int:
    """Its effect is an Item row (the default database, the once-transaction's)."""
    Item.objects.create(name=token, version=n)
    if sleep:
        time.sleep(sleep)
    if fail_first and not self.request.retries:
        raise self.retry(countdown=0.2, max_retries=3)
    return n


@shared_task(base=CountingTask, once=True)
def once_unbound(token: str, n: int) -> None:
    """The same without bind=True (Celery makes run a staticmethod)."""
    Item.objects.create(name=token, version=n)


@shared_task(bind=True, base=CountingTask, once=True)
def once_replaced(self: celery.Task, token: str) -> None:
    """Writes its effect, then hands over to another task (which keeps this task id)."""
    Item.objects.create(name=token, version=0)
    raise self.replace(read_item.s(token))


@shared_task(ignore_result=False)
def keeps_result(number: int) -> int:
    """Its result is stored, on every Celery version (the test project ignores results)."""
    return number
