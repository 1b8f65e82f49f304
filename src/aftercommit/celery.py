"""The Celery task class, for ``Celery(task_cls="aftercommit.celery:Task")`` or
``@shared_task(base=Task)``.

``apply_async`` (and so ``delay``) records the call in the current transaction instead of publishing
it; the rest of Celery is untouched.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import Any

import celery
from celery.result import AsyncResult
from django.db import connections

from . import dispatch, guard
from .models import OutboxMessage
from .publisher import publisher

_sending_retry: ContextVar[bool] = ContextVar("aftercommit_sending_retry", default=False)


class Task(celery.Task):  # type: ignore[misc]
    #: ``@shared_task(after_commit=False)`` for a task that reads nothing from the database:
    #: it is published at once, like plain Celery.
    after_commit: bool = True

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
        **options: Any,
    ) -> AsyncResult:
        """Send after the current transaction commits; see Celery's ``apply_async`` for options.

        ``using``: the database alias whose transaction to join (default: the one with an open
        atomic block). ``after_commit=False``: publish now, like plain Celery.
        """
        if after_commit is None:
            after_commit = self.after_commit and not _sending_retry.get()
        if not after_commit:
            with guard.exempt():  # an explicit choice (opt-out or retry), not a mistake
                return super().apply_async(
                    args, kwargs, task_id, producer, link, link_error, shadow, **options
                )
        args = tuple(args or ())
        kwargs = dict(kwargs or {})
        options = self._send_options(args, kwargs, link, link_error, shadow, options)
        app = self._get_app()
        if app.conf.task_always_eager:
            return self._apply_eager_at_commit(args, kwargs, task_id, using, options)

        def publish(message: OutboxMessage) -> None:
            message.committed_at = time.time()  # type: ignore[attr-defined]
            publisher.submit(app, message)

        message = dispatch.record(
            self, args, kwargs, options, task_id=task_id, using=using, on_commit=publish
        )
        return self.AsyncResult(str(message.message_id))

    def _send_options(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        link: Any,
        link_error: Any,
        shadow: str | None,
        options: dict[str, Any],
    ) -> dict[str, Any]:
        """The front half of Celery's apply_async: checks and defaults, before anything is sent."""
        if self.soft_time_limit and self.time_limit and self.soft_time_limit > self.time_limit:
            raise ValueError("soft_time_limit must be less than or equal to time_limit")
        if self.typing:
            try:
                check_arguments = self.__header__
            except AttributeError:  # pragma: no cover
                pass
            else:
                check_arguments(*args, **kwargs)
        dispatch.check_options(self.name, options)
        if self.__v2_compat__:
            shadow = shadow or self.shadow_name(self(), args, kwargs, options)
        else:
            shadow = shadow or self.shadow_name(args, kwargs, options)
        merged = dict(self._get_exec_options(), **options)
        merged.setdefault("ignore_result", self.ignore_result)
        if shadow:
            merged["shadow"] = shadow
        if link:
            merged["link"] = link
        if link_error:
            merged["link_error"] = link_error
        # Sent later, from another thread: keep the parent task this call was made from.
        parent = self._get_app().current_worker_task
        if parent is not None:
            merged.setdefault("root_id", parent.request.root_id or parent.request.id)
            merged.setdefault("parent_id", parent.request.id)
        return {k: v for k, v in merged.items() if v is not None or k == "ignore_result"}

    def _apply_eager_at_commit(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        task_id: str | None,
        using: str | None,
        options: dict[str, Any],
    ) -> AsyncResult:
        """task_always_eager: run the task when the transaction commits, as production would."""
        alias = dispatch.resolve_alias(using, self.name)
        serializer = options.get("serializer") or self.serializer
        dispatch.encode_arguments(self, args, kwargs, serializer)
        task_id = task_id or celery.uuid()
        for local in dispatch.LOCAL_OPTIONS:
            options.pop(local, None)

        def run() -> None:
            self.apply(args, kwargs, task_id=task_id, **options)

        connections[alias].on_commit(run)
        return self.AsyncResult(task_id)

    def retry(self, *args: Any, **kwargs: Any) -> Any:
        # A retry continues a task that is already running; it must not wait for (or be rolled back
        # with) a transaction the task body has open, so it is published at once.
        token = _sending_retry.set(True)
        try:
            return super().retry(*args, **kwargs)
        finally:
            _sending_retry.reset(token)
