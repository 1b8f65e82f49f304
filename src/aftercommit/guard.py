"""The unsafe-dispatch guard: a Celery publish made while a database transaction is open, and not
through aftercommit (a plain task's ``.delay()``, ``send_task``, a third-party task), is reported.

``AFTERCOMMIT["GUARD"]``: ``"warn"`` (default) warns with :class:`UnsafeDispatchWarning`,
``"raise"`` raises :class:`UnsafeDispatchError` before anything is sent, ``"off"`` does nothing.

Celery's ``before_task_publish`` signal swallows what its receivers raise, so the guard wraps each
Celery app's ``amqp.send_task_message`` instead (the one function every publish goes through); the
user's tasks and task classes are not touched.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from django.conf import settings as django_settings
from django.db import connections

from .conf import settings
from .exceptions import UnsafeDispatchError, UnsafeDispatchWarning

# Set while aftercommit itself publishes (publisher, relay, the after_commit=False opt-out, a
# retry): those publishes are deliberate.
_exempt: ContextVar[bool] = ContextVar("aftercommit_guard_exempt", default=False)
# A mode forced for a block of code (``aftercommit.testing.guard("off")``).
_forced: ContextVar[str | None] = ContextVar("aftercommit_guard_forced", default=None)
# The pytest plugin's default for the session, used when settings.AFTERCOMMIT has no "GUARD".
session_default: str | None = None

# Frames from these packages are the machinery between the caller and the publish.
_INTERNAL = ("celery.", "kombu.", "aftercommit.", "django.", "amqp.", "redis.", "vine.")
_INTERNAL_EXACT = frozenset({"celery", "kombu", "aftercommit", "django", "contextlib"})

_INSTALLED = "_aftercommit_guarded"


@contextmanager
def exempt() -> Iterator[None]:
    """Publishes made inside this block are aftercommit's own and are never reported."""
    token = _exempt.set(True)
    try:
        yield
    finally:
        _exempt.reset(token)


@contextmanager
def forced(mode: str) -> Iterator[None]:
    if mode not in ("off", "warn", "raise"):
        raise ValueError(f"guard mode must be 'off', 'warn' or 'raise', got {mode!r}")
    token = _forced.set(mode)
    try:
        yield
    finally:
        _forced.reset(token)


def mode() -> str:
    """The mode in force: a forced block, else the setting, else the pytest session's default."""
    value = _forced.get()
    if value is not None:
        return value
    if session_default is not None and "GUARD" not in (
        getattr(django_settings, "AFTERCOMMIT", None) or {}
    ):
        return session_default
    return str(settings.GUARD)


def open_aliases() -> list[str]:
    """Aliases with an atomic block opened by code (not by Django's TestCase)."""
    # connections.all(initialized_only=True) reads the thread-local store twice an alias; once is
    # enough, and this runs on every publish.
    local = connections._connections  # type: ignore[attr-defined]
    opened = [
        c
        for c in (getattr(local, alias, None) for alias in connections.settings)
        if c is not None and c.in_atomic_block
    ]
    if not opened:
        return []
    from .dispatch import user_atomic_open  # here: this module is imported before Django is set up

    return [c.alias for c in opened if user_atomic_open(c)]


def _is_internal(module: str) -> bool:
    return module in _INTERNAL_EXACT or module.startswith(_INTERNAL)


def caller() -> tuple[str, int, dict[str, Any]]:
    """File, line and globals of the first frame outside Celery, kombu, aftercommit and Django."""
    frame = sys._getframe(1)
    last = frame
    while frame is not None:
        last = frame
        if not _is_internal(frame.f_globals.get("__name__", "")):
            break
        frame = frame.f_back  # type: ignore[assignment]
    return last.f_code.co_filename, last.f_lineno, last.f_globals


def check(task_name: str) -> None:
    """Report a publish of ``task_name`` if a transaction is open; when none is, the whole cost is
    a context-variable read and a look at the initialized connections."""
    # Cheapest test first: with no transaction open nothing else is read (not even the setting).
    if _exempt.get():
        return
    aliases = open_aliases()
    if not aliases:
        return
    current = mode()
    if current == "off":
        return
    filename, lineno, module_globals = caller()
    alias = aliases[0] if len(aliases) == 1 else ", ".join(sorted(aliases))
    message = (
        f"{task_name} was published by plain Celery at {filename}:{lineno} while a transaction is "
        f"open on database {alias!r}: a worker can run it before the commit and read the old rows "
        f"(or rows that are then rolled back). Fix: give the task aftercommit's class "
        f"(Celery(task_cls='aftercommit.celery:Task') or "
        f"@shared_task(base=aftercommit.celery.Task)) "
        f"so it is sent after the commit, or publish from transaction.on_commit(...). "
        f"A task that reads nothing from the database can opt out with after_commit=False."
    )
    if current == "raise":
        raise UnsafeDispatchError(message)
    registry = module_globals.setdefault("__warningregistry__", {})
    warnings.warn_explicit(
        message,
        UnsafeDispatchWarning,
        filename,
        lineno,
        module=module_globals.get("__name__"),
        registry=registry,
        module_globals=module_globals,
    )


def install(app: Any) -> None:
    """Wrap ``app.amqp.send_task_message`` once so every publish of this app is checked."""
    amqp = app.amqp
    if getattr(amqp, _INSTALLED, False):
        return
    original: Callable[..., Any] = amqp.send_task_message

    @functools.wraps(original)  # its signature stays Celery's (dispatch reads the options)
    def send_task_message(producer: Any, name: str, message: Any, *args: Any, **kwargs: Any) -> Any:
        check(name)
        return original(producer, name, message, *args, **kwargs)

    amqp.send_task_message = send_task_message
    setattr(amqp, _INSTALLED, True)


def install_all() -> None:
    """Guard every Celery app that exists now, and each one finalized later."""
    from celery import _state

    for app in list(_state._get_active_apps()):
        install(app)
    _state.connect_on_app_finalize(install)
