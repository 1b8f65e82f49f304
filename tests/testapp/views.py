"""A view that does what the seed's admin did: a save and a dispatch in one transaction."""

from __future__ import annotations

from django.db import transaction
from django.http import HttpRequest, JsonResponse

from .models import Item
from .tasks import read_item


def save_and_dispatch(request: HttpRequest, token: str) -> JsonResponse:
    with transaction.atomic():
        item = Item.objects.create(name=token, version=1)
        result = read_item.delay(token, item.pk, 1)
    return JsonResponse({"task_id": result.id})
