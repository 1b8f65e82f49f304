"""The outbox in the Django admin: what waits, what failed and why, and what to do about it.

Reading arguments, sending dead letters again and discarding them each need their own permission:
task arguments can hold personal data, and replaying a task is an operation, not a view.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.contrib.contenttypes.models import ContentType
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import Q, QuerySet
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import path
from django.utils import timezone
from django.utils.functional import cached_property
from django.utils.html import format_html

from .dispatch import decode_arguments, decode_options
from .models import OutboxMessage, Status

PAYLOAD_PERMISSION = "aftercommit.view_payload"
# What the view permission alone must not reveal: the arguments, the send options, the trace.
PRIVATE_FIELDS = ("payload", "options", "trace")
PROTECTED_ACTIONS = {"retry_dead_letters": "retry", "discard_dead_letters": "discard"}
# What a task name looks like (``app.tasks.sync_brand``); a task id rarely does.
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")


def _age(since: dt.datetime | None) -> str:
    if since is None:
        return "-"
    seconds = (timezone.now() - since).total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


class StateFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [(state, state) for state in ("pending", "retrying", "sent", "dead", "superseded")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value == "pending":
            return queryset.filter(status=Status.PENDING)
        if value == "retrying":
            return queryset.filter(status=Status.PENDING, attempts__gt=0)
        if value == "sent":
            return queryset.filter(status=Status.SENT)
        if value == "dead":
            return queryset.filter(status=Status.DEAD)
        if value == "superseded":
            return queryset.filter(status=Status.SUPERSEDED)
        return queryset


class TaskFilter(admin.SimpleListFilter):
    """Choices from the Celery app's registry and the unsent rows (an index range): a DISTINCT over
    millions of sent rows would be slow."""

    title = "task"
    parameter_name = "task"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        from .operations import celery_app

        names = {n for n in celery_app().tasks if not n.startswith("celery.")}
        unsent = model_admin.get_queryset(request).filter(status__in=[Status.PENDING, Status.DEAD])
        names.update(unsent.values_list("task_name", flat=True).distinct()[:500])
        return [(name, name) for name in sorted(names)]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        return queryset.filter(task_name=value) if value else queryset


class BoundedCountPaginator(Paginator):
    """Counts that stay cheap at millions of rows. The unfiltered list on PostgreSQL counts from the
    planner's statistics; any other list counts at most ``COUNT_LIMIT + 1`` rows (a LIMIT
    subquery) and shows "10000+" past that, instead of a COUNT(*) over every sent row."""

    COUNT_LIMIT = 10_000

    #: True when the list holds more than ``COUNT_LIMIT`` rows and ``count`` stopped there.
    count_capped = False

    @cached_property
    def count(self) -> int:  # type: ignore[override]
        queryset = self.object_list
        if not isinstance(queryset, QuerySet):
            return super().count  # type: ignore[no-any-return]
        if not queryset.query.where:
            estimate = self._estimate(queryset)
            if estimate is not None:
                return estimate
        # Counted in a subquery with a LIMIT: the database stops after COUNT_LIMIT + 1 rows.
        counted = queryset.order_by().values("pk")[: self.COUNT_LIMIT + 1].count()
        self.count_capped = counted > self.COUNT_LIMIT
        return counted

    @staticmethod
    def _estimate(queryset: QuerySet[Any]) -> int | None:
        connection = connections[queryset.db]
        if connection.vendor != "postgresql":
            return None
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass",
                [OutboxMessage._meta.db_table],
            )
            row = cursor.fetchone()
        estimate = int(row[0]) if row else -1
        return estimate if estimate > 10_000 else None


@admin.register(OutboxMessage)
class OutboxMessageAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    change_list_template = "admin/aftercommit/outboxmessage/change_list.html"
    list_display = ("task_id", "task_name", "state", "attempts", "age", "sent", "error")
    list_filter = (StateFilter, TaskFilter)
    # Shown as the search box's fields; get_search_results() does the search, by exact values.
    search_fields = ("task_id", "task_name")
    search_help_text = "An exact task id, or an exact task name."
    ordering = ("-id",)
    show_full_result_count = False
    paginator = BoundedCountPaginator
    if hasattr(admin, "ShowFacets"):  # Django 5.0+: ?_facets=1 would COUNT every filter choice
        show_facets = admin.ShowFacets.NEVER
    actions = ["retry_dead_letters", "discard_dead_letters"]
    list_per_page = 50

    # What everyone with the view permission sees; the payload and options need their own.
    public_fields = (
        "task_id", "task_name", "status", "attempts", "last_error", "created_at", "due_at",
        "sent_at", "content_type",
    )  # fmt: skip

    def get_queryset(self, request: HttpRequest) -> QuerySet[Any]:
        # The list and the change view show none of them; the payload view loads them itself.
        return super().get_queryset(request).defer(*PRIVATE_FIELDS)

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Any], search_term: str
    ) -> tuple[QuerySet[Any], bool]:
        """Exact lookups on the parsed term, never ``UPPER(...) = UPPER(...)`` or ``icontains``
        (a sequential scan over millions of rows): a registered task's name finds its messages;
        anything else is a task id (an index lookup), or, shaped like a dotted name (a task whose
        module this process has not imported), either."""
        term = search_term.strip()
        if not term:
            return queryset, False
        from .operations import celery_app

        if term in celery_app().tasks:
            return queryset.filter(task_name=term), False
        if _DOTTED_NAME.fullmatch(term):
            return queryset.filter(Q(task_id=term) | Q(task_name=term)), False
        return queryset.filter(task_id=term), False

    def lookup_allowed(self, lookup: str, value: str, request: HttpRequest | None = None) -> bool:
        """Only the list's own filters. Any other lookup in the query string
        (``?payload__contains=...``, ``?options__regex=...``) would let a user without the payload
        permission learn the arguments from the row count. (``request`` is new in Django 5.0.)"""
        filters = self.get_list_filter(request) if request is not None else self.list_filter
        return lookup in {getattr(f, "parameter_name", None) for f in filters}

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("aftercommit.retry_outboxmessage"))

    def has_discard_permission(self, request: HttpRequest) -> bool:
        return bool(request.user.has_perm("aftercommit.discard_outboxmessage"))

    def get_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:  # type: ignore[override]
        fields = list(self.public_fields)
        if request.user.has_perm(PAYLOAD_PERMISSION):
            fields.append("payload_link")
        return fields

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> list[str]:
        return self.get_fields(request, obj)

    @admin.display(description="state")
    def state(self, obj: OutboxMessage) -> str:
        if obj.status == Status.PENDING and obj.attempts:
            return "retrying"
        return Status(obj.status).label

    @admin.display(description="age", ordering="created_at")
    def age(self, obj: OutboxMessage) -> str:
        return _age(obj.created_at)

    @admin.display(description="sent", ordering="sent_at")
    def sent(self, obj: OutboxMessage) -> str:
        return f"{_age(obj.sent_at)} ago" if obj.sent_at else "-"

    @admin.display(description="last error")
    def error(self, obj: OutboxMessage) -> str:
        return obj.last_error[:120]

    @admin.display(description="payload")
    def payload_link(self, obj: OutboxMessage) -> str:
        return format_html('<a href="{}">arguments and options (JSON)</a>', "payload/")

    # The payload view ---------------------------------------------------------------------

    def get_urls(self) -> list[Any]:
        return [
            path(
                "<int:object_id>/change/payload/",
                self.admin_site.admin_view(self.payload_view),
                name="aftercommit_outboxmessage_payload",
            ),
            *super().get_urls(),
        ]

    def payload_view(self, request: HttpRequest, object_id: int) -> HttpResponse:
        if not request.user.has_perm(PAYLOAD_PERMISSION):
            raise PermissionDenied
        message = get_object_or_404(self.get_queryset(request).defer(None), pk=object_id)
        try:
            from .operations import celery_app

            args, kwargs = decode_arguments(message, celery_app())
            options = decode_options(message)
        except Exception as exc:  # a poison message: show what is stored and why it fails
            return JsonResponse({"error": f"{type(exc).__name__}: {exc}", "raw": message.payload})
        options = json.loads(json.dumps(options, default=str))  # datetimes as text
        return JsonResponse({"args": args, "kwargs": kwargs, "options": options})

    # Actions ------------------------------------------------------------------------------

    def changelist_view(self, request: HttpRequest, extra_context: Any = None) -> HttpResponse:
        action = request.POST.get("action") if request.method == "POST" else None
        permission = PROTECTED_ACTIONS.get(action or "")
        if permission and not getattr(self, f"has_{permission}_permission")(request):
            raise PermissionDenied
        queryset = self.get_queryset(request)
        context = {
            **(extra_context or {}),
            "outbox_summary": OutboxMessage.objects.using(queryset.db).summary(),
        }
        return super().changelist_view(request, extra_context=context)

    @admin.action(description="Send selected dead letters again", permissions=["retry"])
    def retry_dead_letters(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        dead = list(queryset.filter(status=Status.DEAD))
        OutboxMessage.objects.using(queryset.db).filter(pk__in=[m.pk for m in dead]).retry_dead()
        self._log(request, dead, CHANGE, "Sent again from the dead letters")
        self.message_user(request, f"{len(dead)} dead letter(s) will be sent again.")

    @admin.action(description="Discard selected dead letters", permissions=["discard"])
    def discard_dead_letters(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        dead = list(queryset.filter(status=Status.DEAD))
        self._log(request, dead, DELETION, "Discarded dead letter")
        OutboxMessage.objects.using(queryset.db).filter(pk__in=[m.pk for m in dead]).discard_dead()
        self.message_user(request, f"{len(dead)} dead letter(s) discarded.", messages.WARNING)

    def _log(self, request: HttpRequest, rows: list[OutboxMessage], flag: int, text: str) -> None:
        content_type = ContentType.objects.get_for_model(OutboxMessage)
        LogEntry.objects.bulk_create(
            [
                LogEntry(
                    user_id=request.user.pk,  # type: ignore[misc]
                    content_type=content_type,
                    object_id=str(row.pk),
                    object_repr=str(row)[:200],
                    action_flag=flag,
                    change_message=text,
                )
                for row in rows
            ]
        )
