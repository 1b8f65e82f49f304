"""An opt-in health endpoint for load balancers and Kubernetes probes. It shows figures, never
payloads: ``path("aftercommit/", include("aftercommit.urls"))``."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from . import operations


@never_cache
@require_safe
def health(request: HttpRequest) -> JsonResponse:
    try:
        report = operations.status(None)
    except Exception as exc:  # the database is down: that is the answer, not a 500
        return JsonResponse({"healthy": False, "error": f"{type(exc).__name__}: {exc}"}, status=503)
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
    ok = operations.healthy(report)
    return JsonResponse({"healthy": ok, "databases": databases}, status=200 if ok else 503)
