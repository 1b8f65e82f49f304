"""Tasks the worker runs; each records what it saw."""

from __future__ import annotations

import json
import time

import celery
from celery import shared_task

from .models import Item, TaskRun


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


@shared_task(ignore_result=False)
def keeps_result(number: int) -> int:
    """Its result is stored, on every Celery version (the test project ignores results)."""
    return number
