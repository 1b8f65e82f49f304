"""The unsafe-dispatch guard: a Celery publish made while a database transaction is open, and not
through aftercommit (a plain task's ``.delay()``, ``send_task``, a third-party task), is reported.

``AFTERCOMMIT["GUARD"]``: ``"warn"`` (default) warns with :class:`UnsafeDispatchWarning`,
``"raise"`` raises :class:`UnsafeDispatchError` before anything is sent, ``"off"`` does nothing.

Celery's ``before_task_publish`` signal swallows what its receivers raise, so the guard wraps each
Celery app's ``amqp.send_task_message`` instead (the one function every publish goes through); the
user's tasks and task classes are not touched.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import linecache
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import FrameType
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

# Frames in these packages' files are the machinery between the caller and the publish. Files, not
# module names: ``manage.py shell -c`` runs the user's code with the globals of Django's shell.
_INTERNAL_PACKAGES = ("celery", "kombu", "aftercommit", "django", "amqp", "redis", "vine")

_INSTALLED = "_aftercommit_guarded"

logger = logging.getLogger("aftercommit.guard")


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


@functools.cache
def _internal_prefixes() -> tuple[str, ...]:
    prefixes = [os.path.dirname(contextlib.__file__) + os.sep + "contextlib.py"]
    for name in _INTERNAL_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is not None and spec.submodule_search_locations:
            prefixes.extend(os.path.join(d, "") for d in spec.submodule_search_locations)
    return tuple(prefixes)


def _is_launcher(frame: FrameType) -> bool:
    """A project's ``manage.py``: it only hands off to Django, the user's line is further in."""
    return (
        os.path.basename(frame.f_code.co_filename) == "manage.py"
        and frame.f_globals.get("__name__") == "__main__"
    )


def caller() -> tuple[str, int, dict[str, Any]]:
    """File, line and globals of the user's code: the first frame outside Celery, kombu,
    aftercommit and Django (a ``<string>`` or ``<stdin>`` one too), skipping ``manage.py``."""
    internal = _internal_prefixes()
    frame: FrameType | None = sys._getframe(1)
    launcher = outermost = None
    while frame is not None:
        if not frame.f_code.co_filename.startswith(internal):
            if not _is_launcher(frame):
                return frame.f_code.co_filename, frame.f_lineno, frame.f_globals
            launcher = launcher or frame
        outermost = frame
        frame = frame.f_back
    found = launcher or outermost
    assert found is not None  # this function's caller is a frame
    return found.f_code.co_filename, found.f_lineno, found.f_globals


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
    _warn(message, filename, lineno, module_globals)


def _warn(message: str, filename: str, lineno: int, module_globals: dict[str, Any]) -> None:
    """Warn at the user's line. Never raises into the caller, except the warning itself when the
    user made warnings errors (``-W error``, ``filterwarnings``).

    ``warn_explicit(module_globals=...)`` asks the module's loader for the source and lets its
    ImportError out when ``__main__`` cannot be served that way (``python -c``, ``python -``,
    ``python -m``): the source line is only a nicety, so linecache is offered the loader and
    reads the file itself, catching what the loader raises.
    """
    try:
        linecache.lazycache(filename, module_globals)
        warnings.warn_explicit(
            message,
            UnsafeDispatchWarning,
            filename,
            lineno,
            module=module_globals.get("__name__"),
            registry=module_globals.setdefault("__warningregistry__", {}),
        )
    except Warning:
        raise
    except Exception:
        logger.warning("%s", message, exc_info=True)


def install(app: Any) -> None:
    """Wrap ``app.amqp.send_task_message`` once so every publish of this app is checked."""
    amqp = app.amqp
    if getattr(amqp, _INSTALLED, False):
        return
    try:
        original: Callable[..., Any] = amqp.send_task_message
    except Exception:
        # Building Celery's sender loads the broker transport: one that cannot load must not stop
        # Django from starting. Nothing can be published then; the relay reports the setup error.
        logger.warning("the unsafe-dispatch guard is off for %r: its broker cannot load", app.main)
        return

    @functools.wraps(original)  # its signature stays Celery's (dispatch reads the options)
    def send_task_message(producer: Any, name: str, message: Any, *args: Any, **kwargs: Any) -> Any:
        check(name)
        return original(producer, name, message, *args, **kwargs)

    amqp.send_task_message = send_task_message
    amqp._aftercommit_guard = (send_task_message, original)
    setattr(amqp, _INSTALLED, True)


def unguarded(amqp: Any) -> Callable[..., Any]:
    """``amqp.send_task_message`` without the guard's check, for publishes that are exempt
    anyway (the relay's). Only the guard's own wrapper is left out: another library's wrapper
    around it (a tracer's) is what is returned."""
    send: Callable[..., Any] = amqp.send_task_message
    wrapper, original = getattr(amqp, "_aftercommit_guard", (None, send))
    unwrapped: Callable[..., Any] = original if send is wrapper else send
    return unwrapped  # (by identity: functools.wraps copies a wrapper's attributes)


def install_all() -> None:
    """Guard every Celery app that exists now, and each one finalized later."""
    from celery import _state

    for app in list(_state._get_active_apps()):
        install(app)
    _state.connect_on_app_finalize(install)
