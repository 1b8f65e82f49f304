"""aftercommit: Celery tasks dispatched inside a Django transaction are sent after it commits, and
are never lost."""

from importlib.metadata import PackageNotFoundError, version

from .exceptions import (
    AftercommitError,
    AmbiguousDatabaseError,
    DispatchError,
    ImproperlyConfigured,
    UnsafeDispatchError,
    UnsafeDispatchWarning,
)

try:
    __version__ = version(__name__)
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "AftercommitError",
    "AmbiguousDatabaseError",
    "DispatchError",
    "ImproperlyConfigured",
    "UnsafeDispatchError",
    "UnsafeDispatchWarning",
    "__version__",
]
