"""The outbox in the Django admin: what waits, what failed and why."""

from __future__ import annotations

from django.contrib import admin

from .models import OutboxMessage


@admin.register(OutboxMessage)
class OutboxMessageAdmin(admin.ModelAdmin):
    list_display = ("message_id", "task_name", "status", "attempts", "created_at", "sent_at")
    list_filter = ("status",)
    search_fields = ("task_name", "=message_id")
    readonly_fields = [f.name for f in OutboxMessage._meta.fields]
    show_full_result_count = False

    def has_add_permission(self, request: object) -> bool:
        return False

    def has_change_permission(self, request: object, obj: object = None) -> bool:
        return False
