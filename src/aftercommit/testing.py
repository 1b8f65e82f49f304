"""Test helpers and a pytest plugin (registered through the ``pytest11`` entry point).

- :func:`capture` records the messages a block of code dispatched through aftercommit.
- :func:`commit` runs the on-commit hooks a block registered when it leaves, as a real commit
  would, also under Django's ``TestCase`` (whose transaction never commits).
- :func:`drain` runs every pending outbox message now, in this process, and marks it sent.
- :func:`guard` forces the unsafe-dispatch guard's mode for a block.
- The plugin makes the guard raise for the whole session (unless ``settings.AFTERCOMMIT`` sets
  ``"GUARD"`` itself) and provides the ``aftercommit`` fixture.
- :class:`AftercommitTestMixin` gives the same assertions to ``unittest``/Django ``TestCase`` users.

Nothing here imports Django models at import time: pytest loads this module before Django is set up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

try:  # the unittest mixin and the helpers work without pytest; the plugin needs it
    import pytest
except ImportError:  # pragma: no cover
    pytest = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .models import OutboxMessage

__all__ = [
    "AftercommitTestMixin",
    "Captured",
    "capture",
    "commit",
    "drain",
    "guard",
]


def _task_name(task: Any) -> str:
    return task if isinstance(task, str) else str(task.name)


class Captured:
    """The messages recorded while a :func:`capture` block (or the ``aftercommit`` fixture) ran."""

    def __init__(self) -> None:
        self.messages: list[OutboxMessage] = []

    def _receive(self, sender: Any, message: OutboxMessage, using: str, **kwargs: Any) -> None:
        self.messages.append(message)

    def calls(self, task: Any = None) -> list[tuple[str, list[Any], dict[str, Any]]]:
        """(task name, args, kwargs) of each message, in order; only ``task``'s when given."""
        from .dispatch import decode_arguments
        from .operations import celery_app

        name = None if task is None else _task_name(task)
        found = []
        for message in self.messages:
            if name is None or message.task_name == name:
                args, kwargs = decode_arguments(message, celery_app())
                found.append((message.task_name, list(args), dict(kwargs)))
        return found

    def assert_dispatched(
        self,
        task: Any,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        count: int | None = None,
    ) -> None:
        """``task`` (a task or its name) was dispatched, with these args/kwargs when given."""
        name = _task_name(task)
        calls = [
            c
            for c in self.calls(name)
            if (args is None or c[1] == list(args)) and (kwargs is None or c[2] == kwargs)
        ]
        if not calls or (count is not None and len(calls) != count):
            wanted = ""
            if args is not None or kwargs is not None:
                wanted = f" with args={args!r} kwargs={kwargs!r}"
            times = "" if count is None else f" {count} time(s)"
            seen = "; ".join(f"{n}(*{a!r}, **{k!r})" for n, a, k in self.calls()) or "nothing"
            raise AssertionError(f"{name} was not dispatched{wanted}{times}; dispatched: {seen}")

    def assert_not_dispatched(self, task: Any) -> None:
        name = _task_name(task)
        calls = self.calls(name)
        if calls:
            raise AssertionError(f"{name} was dispatched {len(calls)} time(s): {calls!r}")

    def clear(self) -> None:
        self.messages.clear()


@contextmanager
def _listening(captured: Captured) -> Iterator[Captured]:
    from . import signals

    signals.recorded.connect(captured._receive, weak=False)
    try:
        yield captured
    finally:
        signals.recorded.disconnect(captured._receive)


def capture() -> AbstractContextManager[Captured]:
    """Record what aftercommit dispatched inside the block (recorded rows, committed or not)."""
    return _listening(Captured())


def commit(using: str = "default") -> AbstractContextManager[list[Any]]:
    """Run, when the block ends, the on-commit hooks it registered on ``using``, as a commit would.

    Built on Django's ``TestCase.captureOnCommitCallbacks(execute=True)``, so it works where
    ``on_commit`` never fires by itself (inside ``TestCase``). Committed messages are the relay's
    to send (a worker's, if one runs); use :func:`drain` to run them in this process instead.
    """
    from django.test import TestCase

    return TestCase.captureOnCommitCallbacks(using=using, execute=True)


def drain(using: str | None = None) -> list[Any]:
    """Run every pending outbox message now, in this process, oldest first, and mark it sent.

    Each runs with ``task.apply(args, kwargs, task_id=<message id>)`` (Celery's local, synchronous
    execution, as in ``task_always_eager``); nothing goes to the broker. Returns the ``EagerResult``
    of each. Only messages whose transaction committed (or, under ``TestCase``, that this test
    recorded) are visible.
    """
    from .dispatch import decode_arguments, decode_options
    from .models import OutboxMessage, Status
    from .operations import celery_app
    from .relay import outbox_aliases

    app = celery_app()
    results = []
    for alias in [using] if using else outbox_aliases():
        pending = list(
            OutboxMessage.objects.using(alias).filter(status=Status.PENDING).order_by("id")
        )
        for message in pending:
            args, kwargs = decode_arguments(message, app)
            options = decode_options(message)
            task = app.tasks[message.task_name]
            results.append(
                task.apply(args, kwargs, task_id=message.task_id, headers=options.get("headers"))
            )
            OutboxMessage.objects.using(alias).mark_sent([message.id])
    return results


def guard(mode: str) -> AbstractContextManager[None]:
    """Force the guard to ``"off"``, ``"warn"`` or ``"raise"`` inside the block (this thread)."""
    from . import guard as guard_module

    return guard_module.forced(mode)


class AftercommitTestMixin:
    """For ``unittest``/Django ``TestCase``: every test captures what it dispatched.

    ``self.aftercommit`` is a :class:`Captured`; ``assertDispatched``/``assertNotDispatched``
    check it; ``self.commit()`` and ``self.drainOutbox()`` are :func:`commit` and :func:`drain`.
    """

    aftercommit: Captured

    def setUp(self) -> None:
        super().setUp()  # type: ignore[misc]
        manager = capture()
        self.aftercommit = manager.__enter__()
        self.addCleanup(manager.__exit__, None, None, None)  # type: ignore[attr-defined]

    def assertDispatched(
        self,
        task: Any,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        count: int | None = None,
    ) -> None:
        self.aftercommit.assert_dispatched(task, args, kwargs, count=count)

    def assertNotDispatched(self, task: Any) -> None:
        self.aftercommit.assert_not_dispatched(task)

    def commit(self, using: str = "default") -> AbstractContextManager[list[Any]]:
        return commit(using)

    def drainOutbox(self, using: str | None = None) -> list[Any]:
        return drain(using)


class AftercommitFixture(Captured):
    """The ``aftercommit`` fixture: a :class:`Captured` for the whole test, plus the helpers."""

    commit = staticmethod(commit)
    drain = staticmethod(drain)
    guard = staticmethod(guard)


def pytest_configure(config: Any) -> None:
    # The guard raises in tests: an unsafe publish fails the test that wrote it. An explicit
    # settings.AFTERCOMMIT["GUARD"] still wins (see guard.mode()).
    from . import guard as guard_module

    guard_module.session_default = "raise"


def _aftercommit_fixture() -> Iterator[Captured]:
    """Captures what the test dispatched; ``.assert_dispatched``, ``.commit()``, ``.drain()``..."""
    with _listening(AftercommitFixture()) as captured:
        yield captured


if pytest is not None:
    aftercommit = pytest.fixture(name="aftercommit")(_aftercommit_fixture)
