"""The health view: a verdict for probes, figures for those allowed, no error detail for anyone."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from unittest import mock

import pytest
from django.db import OperationalError, connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from aftercommit import views
from aftercommit.models import OutboxMessage

pytestmark = pytest.mark.django_db

HEALTH = "/aftercommit/health/"


@pytest.fixture(autouse=True)
def fresh_figures() -> Iterator[None]:
    views.forget()
    yield
    views.forget()


def message() -> OutboxMessage:
    now = timezone.now()
    return OutboxMessage.objects.create(
        task_id=str(uuid.uuid4()),
        task_name="tests.testapp.tasks.read_item",
        payload=json.dumps([["secret-argument"], {}]),
        content_type="application/json",
        content_encoding="utf-8",
        options="{}",
        created_at=now,
        due_at=now,
    )


def test_health_view__database_error__generic_body_and_the_detail_only_in_the_log(
    client, caplog
) -> None:  # type: ignore[no-untyped-def]
    secret = 'connection to server at "10.9.8.7", port 5432 failed: role "billing_rw" is locked'
    with mock.patch("aftercommit.operations.status", side_effect=OperationalError(secret)):
        response = client.get(HEALTH)
    assert response.status_code == 503
    assert response.json() == {"healthy": False, "error": "database unavailable"}
    body = response.content.decode()
    assert "10.9.8.7" not in body and "billing_rw" not in body and "OperationalError" not in body
    assert "billing_rw" in caplog.text  # the operator still learns what failed


def test_health_view__token_set__figures_need_it_probes_get_the_verdict(client, settings) -> None:  # type: ignore[no-untyped-def]
    settings.AFTERCOMMIT = {
        "DATABASES": ["default"],
        "HEALTH_REQUIRE_RELAY": False,
        "HEALTH_TOKEN": "probe-secret",
    }
    message()

    anonymous = client.get(HEALTH)
    assert anonymous.status_code == 200
    assert anonymous.json() == {"healthy": True}  # no figures

    bearer = client.get(HEALTH, HTTP_AUTHORIZATION="Bearer probe-secret")
    assert bearer.status_code == 200
    assert bearer.json()["databases"]["default"]["backlog"] == 1
    assert client.get(HEALTH, {"token": "probe-secret"}).json()["databases"]["default"]

    assert client.get(HEALTH, HTTP_AUTHORIZATION="Bearer guess").status_code == 403
    assert client.get(HEALTH, {"token": "guess"}).status_code == 403

    settings.AFTERCOMMIT = {**settings.AFTERCOMMIT, "HEALTH_MAX_BACKLOG": 0}
    unhealthy = client.get(HEALTH)
    assert unhealthy.status_code == 503  # the verdict still reaches a probe without the token
    assert unhealthy.json() == {"healthy": False}


def test_health_view__probes_within_the_cache_window__read_the_database_once(
    client, settings
) -> None:  # type: ignore[no-untyped-def]
    settings.AFTERCOMMIT = {"DATABASES": ["default"], "HEALTH_REQUIRE_RELAY": False}
    message()
    with CaptureQueriesContext(connection) as first:
        assert client.get(HEALTH).json()["databases"]["default"]["backlog"] == 1
    assert len(first) > 0

    message()
    with CaptureQueriesContext(connection) as second:
        again = client.get(HEALTH)
    assert len(second) == 0
    assert again.json()["databases"]["default"]["backlog"] == 1  # the cached figures

    later = time.monotonic() + 5.1  # HEALTH_CACHE_SECONDS defaults to 5
    with (
        mock.patch("aftercommit.views.time.monotonic", return_value=later),
        CaptureQueriesContext(connection) as third,
    ):
        assert client.get(HEALTH).json()["databases"]["default"]["backlog"] == 2
    assert len(third) > 0
