"""An opt-in health endpoint for load balancers and Kubernetes probes. It shows figures, never
payloads: ``path("aftercommit/", include("aftercommit.urls"))``."""

from __future__ import annotations

import hmac
import logging
import threading
import time
from typing import Any

from django.core.signals import setting_changed
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from . import operations
from .conf import settings

logger = logging.getLogger("aftercommit.health")

# The last figures per set of databases reported: (time.monotonic() when read, report).
_cache: dict[tuple[str, ...], tuple[float, dict[str, Any]]] = {}
# One request reads the figures while the others wait for them, instead of all counting at once.
_cache_lock = threading.Lock()


@never_cache
@require_safe
def health(request: HttpRequest) -> JsonResponse:
    access = _access(request)
    if access == "denied":
        return JsonResponse({"error": "wrong health token"}, status=403)
    try:
        report = _report()
    except Exception:  # the database is down: that is the answer, not a 500
        # The detail (server address, role name) is for the logs, not for whoever asks.
        logger.exception("aftercommit health: the outbox figures could not be read")
        return JsonResponse({"healthy": False, "error": "database unavailable"}, status=503)
    ok = operations.healthy(report)
    status = 200 if ok else 503
    if access == "verdict":
        return JsonResponse({"healthy": ok}, status=status)
    databases = {
        alias: {
            "backlog": figures["backlog"],
            "oldest_pending_age": figures["oldest_pending_age"],
            "retrying": figures["retrying"],
            "dead": figures["dead"],
            "relays": len(figures["relays"]),
            "problems": figures["problems"],
        }
        for alias, figures in report.items()
    }
    return JsonResponse({"healthy": ok, "databases": databases}, status=status)


def _access(request: HttpRequest) -> str:
    """What this request may see: ``figures``, ``verdict`` (no token given: the bare answer a
    probe needs) or ``denied`` (a wrong token)."""
    token = settings.HEALTH_TOKEN
    if not token:
        return "figures"
    authorization = request.headers.get("Authorization", "")
    given = (
        authorization[len("Bearer ") :].strip()
        if authorization.startswith("Bearer ")
        else request.GET.get("token", "")
    )
    if not given:
        return "verdict"
    return "figures" if hmac.compare_digest(given.encode(), token.encode()) else "denied"


def _report() -> dict[str, Any]:
    """``operations.status()``, read at most once per ``HEALTH_CACHE_SECONDS`` in this process: a
    probe every second would otherwise cost four COUNT queries a second on a big outbox."""
    key = tuple(settings.DATABASES or ())
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < settings.HEALTH_CACHE_SECONDS:
            return cached[1]
        report = operations.status(None)
        _cache[key] = (time.monotonic(), report)
        return report


def forget() -> None:
    """Drop the cached figures (the settings changed, or a test wants fresh ones)."""
    with _cache_lock:
        _cache.clear()


def _on_setting_changed(setting: str, **kwargs: Any) -> None:
    if setting in ("AFTERCOMMIT", "DATABASES"):
        forget()


setting_changed.connect(_on_setting_changed)
