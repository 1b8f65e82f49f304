"""Effectively once: ``@shared_task(once=True)`` runs the task body in a transaction that also
records the task id (an :class:`~aftercommit.models.OnceRecord`), so a second delivery of the same
task id finds the record and is acknowledged without running the body.

What it covers is the body's writes to that one database (and the tasks it dispatches there, which
are outbox rows in the same transaction). An email sent, an API called or a write to another
database from the body is not undone by the rollback, and happens again on a retry.

A duplicate is recognised by the task id alone, whoever published it. The record is an INSERT on a
unique key: a duplicate arriving while the first run is still going waits on that key (PostgreSQL,
MySQL: the row lock; SQLite: the write lock) until the first run's transaction ends, then finds the
record and is skipped; if the first run rolled back, it runs. A run that raises, or retries, rolls
back and records nothing, so the retry runs.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TypeVar

from celery.exceptions import Ignore
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connections, transaction
from django.db.models.functions import Now

from .conf import settings
from .exceptions import ImproperlyConfigured
from .models import OnceRecord

if TYPE_CHECKING:
    import celery

logger = logging.getLogger("aftercommit.once")

T = TypeVar("T")
_MARK = "_aftercommit_once"
# The task id whose once-transaction this thread is inside: a subclass's run() calling super().run()
# of an already wrapped run must not record the same id twice.
_running: ContextVar[str | None] = ContextVar("aftercommit_once_running", default=None)


class _Duplicate(Exception):
    pass


def check(value: Any, task_name: str) -> None:
    """``once`` is True/False or a database alias; refused when the task class is made."""
    if isinstance(value, bool) or value is None:
        return
    if not isinstance(value, str) or not value:
        raise ImproperlyConfigured(
            f"{task_name}: once={value!r} is not valid. Pass once=True (the default database) "
            f"or once='<alias>' (the database the task body writes to)."
        )


def alias_of(task: celery.Task) -> str:
    value = task.once
    alias = DEFAULT_DB_ALIAS if value is True else str(value)
    if alias not in connections.settings:
        raise ImproperlyConfigured(
            f"{task.name}: once={value!r} names no database alias. Configured aliases: "
            f"{', '.join(connections.settings)}. Pass the alias the task body writes to."
        )
    return alias


def wrap_run(cls: type[celery.Task]) -> None:
    """Make the class's ``run`` go through :func:`run_once` (once per class; a staticmethod body,
    as ``@shared_task`` without ``bind=True`` makes, is handled too)."""
    raw = inspect.getattr_static(cls, "run")
    if getattr(raw, _MARK, False):
        return
    if isinstance(raw, staticmethod):
        body: Callable[..., Any] = raw.__func__
        parameters = list(inspect.signature(body).parameters.values())
        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        signature = inspect.Signature([self_parameter, *parameters])

        def call(task: Any, *args: Any, **kwargs: Any) -> Any:
            return body(*args, **kwargs)

    else:
        body = raw
        signature = inspect.signature(body)
        call = body

    @functools.wraps(body)
    def run(self: celery.Task, *args: Any, **kwargs: Any) -> Any:
        if not self.once:  # a subclass turned it off
            return call(self, *args, **kwargs)
        return run_once(self, lambda: call(self, *args, **kwargs))

    del run.__wrapped__  # type: ignore[attr-defined]
    run.__signature__ = signature  # type: ignore[attr-defined]  # Celery's retry() reads it
    setattr(run, _MARK, True)
    cls.run = run  # type: ignore[method-assign]


def run_once(task: celery.Task, body: Callable[[], T]) -> T:
    """Run ``body`` in a transaction with the task id's record; a duplicate raises Celery's
    ``Ignore`` (the message is acknowledged, no result is stored, the first run's stays)."""
    request = task.request
    task_id = request.id
    if request.called_directly or not task_id or _running.get() == task_id:
        return body()  # a plain function call, not a delivery: nothing to recognise it by
    alias = alias_of(task)
    token = _running.set(task_id)
    records = OnceRecord.objects.using(alias)
    try:
        with transaction.atomic(using=alias):
            try:
                records.create(task_id=task_id, task_name=task.name, done_at=Now())
            except IntegrityError:
                raise _Duplicate from None  # leaves the atomic block: it rolls back
            try:
                return body()
            except Ignore as exc:
                # self.replace() (or the body's own Ignore): what the body did stands, the
                # replacement among it (an outbox row in this transaction). The replacement keeps
                # this task id, so the id is not recorded as done.
                records.filter(task_id=task_id).delete()
                ignored = exc
        raise ignored
    except _Duplicate:
        logger.info(
            "%s[%s]: duplicate delivery, acknowledged without running the body: a run of this "
            "task id already committed on database %r",
            task.name,
            task_id,
            alias,
        )
        raise Ignore(f"duplicate delivery of {task_id}") from None
    finally:
        _running.reset(token)


def purge(alias: str, *, older_than: float | None = None) -> int:
    """Delete once records older than the retention window (``AFTERCOMMIT["RETENTION"]``, as for
    sent messages), a batch at a time. A duplicate arriving after its record was purged runs."""
    seconds = settings.RETENTION if older_than is None else older_than
    total = 0
    while True:
        deleted = OnceRecord.objects.using(alias).purge_batch(
            older_than=seconds, batch_size=settings.PURGE_BATCH_SIZE
        )
        total += deleted
        if deleted < settings.PURGE_BATCH_SIZE:
            return total
