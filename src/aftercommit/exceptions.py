"""The package's exceptions: one base, configuration errors are Django's ImproperlyConfigured."""

from __future__ import annotations

from django.core import exceptions as django_exceptions


class AftercommitError(Exception):
    """Base class of every error aftercommit raises."""


class ImproperlyConfigured(AftercommitError, django_exceptions.ImproperlyConfigured):
    """The settings or the Celery app are not set up the way aftercommit needs."""


class DispatchError(AftercommitError, ValueError):
    """A task call was refused at the call site; nothing was recorded."""


class AmbiguousDatabaseError(DispatchError):
    """Atomic blocks are open on several databases and the call did not say which one to join."""


class UnsafeDispatchWarning(UserWarning):
    """Plain Celery published a task while a database transaction was open (see the guard)."""


class UnsafeDispatchError(AftercommitError):
    """Raised instead of the warning when ``AFTERCOMMIT["GUARD"]`` is ``"raise"``."""
