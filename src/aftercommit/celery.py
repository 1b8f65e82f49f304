"""The Celery task class, for ``Celery(task_cls="aftercommit.celery:Task")`` or
``@shared_task(base=Task)``.

``apply_async`` (and so ``delay``) runs Celery's own ``apply_async``; where Celery would publish,
the call is recorded in the current transaction instead, and the relay sends it after the commit.
The rest of Celery is untouched.

Binding the class to an app (Celery's ``on_bound`` hook) does two things to that app, once: its
``send_task`` learns to hand a call made through this class to aftercommit (every other call goes
to Celery unchanged), and its workers get the relay as a bootstep (see ``RELAY_IN_WORKER``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import celery
from celery.result import AsyncResult
from django.db import connections

from . import debounce as debouncing
from . import dispatch, guard, once, replicas
from .exceptions import DispatchError

_sending_retry: ContextVar[bool] = ContextVar("aftercommit_sending_retry", default=False)


class _Call:
    """One apply_async in progress: what its send_task is recorded against."""

    __slots__ = ("debounce", "debounce_key", "task", "using")

    def __init__(
        self,
        task: celery.Task,
        using: str | None,
        debounce: float | None = None,
        debounce_key: str | None = None,
    ) -> None:
        self.task = task
        self.using = using
        self.debounce = debounce
        self.debounce_key = debounce_key


_recording: ContextVar[_Call | None] = ContextVar("aftercommit_recording", default=None)
_INTERCEPTED = "_aftercommit_send_task"


def _intercept_send_task(app: celery.Celery) -> None:
    """Make ``app.send_task`` record the call an aftercommit ``apply_async`` is making.

    Celery's ``Task.apply_async`` ends in ``app.send_task``, the one place where the call is
    complete (checked, converted, with the task's options) and nothing is built or sent yet.
    Outside an aftercommit ``apply_async`` the original runs, unchanged.
    """
    if getattr(app, _INTERCEPTED, None) is not None:
        return
    send_task: Callable[..., Any] = app.send_task

    def recording_send_task(name: str, args: Any = None, kwargs: Any = None, **options: Any) -> Any:
        call = _recording.get()
        if call is None or options.get("task_type") is not call.task:
            return send_task(name, args, kwargs, **options)
        token = _recording.set(None)  # anything published from here on is another call
        try:
            return dispatch.record(
                call.task, args, kwargs, options, using=call.using,
                debounce=call.debounce, debounce_key=call.debounce_key,
            )  # fmt: skip
        finally:
            _recording.reset(token)

    app.send_task = recording_send_task  # type: ignore[method-assign]
    setattr(app, _INTERCEPTED, send_task)


class Task(celery.Task):  # type: ignore[misc]
    #: ``@shared_task(after_commit=False)`` for a task that reads nothing from the database:
    #: it is published at once, like plain Celery.
    after_commit: bool = True
    #: ``@shared_task(once=True)``: effectively once for the task's database effects; the body runs
    #: in a transaction that records the task id on the default database (``once="<alias>"``: on
    #: that one), and a second delivery of the same id is skipped. See :mod:`aftercommit.once`.
    once: bool | str = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # once=True: the class's run is wrapped when the class is made (what @shared_task does),
        # so the worker calls it as any run, and tasks without it are untouched.
        super().__init_subclass__(**kwargs)
        once.check(cls.once, getattr(cls, "name", None) or cls.__name__)
        if cls.once:
            once.wrap_run(cls)

    @classmethod
    def on_bound(cls, app: celery.Celery) -> None:
        super().on_bound(app)
        _intercept_send_task(app)
        from .worker import add_relay_step

        add_relay_step(app)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        task_id: str | None = None,
        producer: Any = None,
        link: Any = None,
        link_error: Any = None,
        shadow: str | None = None,
        *,
        using: str | None = None,
        after_commit: bool | None = None,
        debounce: float | None = None,
        debounce_key: str | None = None,
        **options: Any,
    ) -> AsyncResult:
        """Send after the current transaction commits; see Celery's ``apply_async`` for options.

        ``using``: the database alias whose transaction to join (default: the one with an open
        atomic block). ``after_commit=False``: publish now, like plain Celery.
        ``debounce=<seconds>``: send once, that long after the commit of the last dispatch with
        the same arguments (or the same ``debounce_key``); see :mod:`aftercommit.debounce`.
        """
        if after_commit is None:
            after_commit = self.after_commit and not _sending_retry.get()
        if not after_commit and (debounce is not None or debounce_key is not None):
            raise DispatchError(
                f"{self.name}: debounce needs the outbox, and this call publishes at once "
                f"(after_commit=False). Leave out debounce, or send after the commit."
            )
        # Replica-safe reads (replicas.py): called from a task that waited for its replicas (a
        # retry, a chain's next step), the call needs at least the same log position.
        replicas.carry(options)
        if not after_commit:
            with guard.exempt():  # an explicit choice (opt-out or retry), not a mistake
                return super().apply_async(
                    args, kwargs, task_id, producer, link, link_error, shadow, **options
                )
        app = self._get_app()
        _intercept_send_task(app)  # a class bound before this module changed (tests)
        if app.conf.task_always_eager:
            # Eager runs each call at its commit: there is no relay to coalesce them.
            debouncing.check(self.name, debounce, debounce_key)
            return self._apply_eager_at_commit(
                args, kwargs, task_id, producer, link, link_error, shadow, using, options
            )
        token = _recording.set(_Call(self, using, debounce, debounce_key))
        try:
            result: AsyncResult = super().apply_async(
                args, kwargs, task_id, producer, link, link_error, shadow, **options
            )
        finally:
            _recording.reset(token)
        return result

    def _apply_eager_at_commit(
        self,
        args: Any,
        kwargs: Any,
        task_id: str | None,
        producer: Any,
        link: Any,
        link_error: Any,
        shadow: str | None,
        using: str | None,
        options: dict[str, Any],
    ) -> AsyncResult:
        """task_always_eager: run the task when the transaction commits, as production would."""
        dispatch.check_options(self._get_app(), self.name, options)
        alias = dispatch.resolve_alias(using, self.name)
        serializer = options.get("serializer") or self.serializer
        dispatch.encode_arguments(self.name, args or (), kwargs or {}, serializer)
        task_id = task_id or str(dispatch.time_ordered_uuid())
        dispatch.recorded_eagerly(self, args or (), kwargs or {}, {**options, "task_id": task_id})
        for local in dispatch.LOCAL_OPTIONS:
            options.pop(local, None)

        ran: list[AsyncResult] = []

        def run() -> None:
            ran.append(
                super(Task, self).apply_async(
                    args, kwargs, task_id, producer, link, link_error, shadow, **options
                )
            )

        connections[alias].on_commit(run)
        if ran:  # no transaction open: it ran at once, and its result is Celery's EagerResult
            return ran[0]
        return self.AsyncResult(task_id)

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        # A retry continues a task that is already running; it must not wait for (or be rolled back
        # with) a transaction the task body has open, so it is published at once.
        token = _sending_retry.set(True)
        try:
            return super().retry(*args, **kwargs)
        finally:
            _sending_retry.reset(token)
