"""Operating it: the admin, status thresholds and the health view. No worker needed."""

from __future__ import annotations

import datetime as dt
import io
import json
import uuid

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.utils import timezone

from aftercommit.models import Lease, OutboxMessage, Status

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/aftercommit/outboxmessage/"


def message(status: int = Status.PENDING, **fields) -> OutboxMessage:  # type: ignore[no-untyped-def]
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
        status=status,
        **fields,
    )


@pytest.fixture
def staff(django_user_model):  # type: ignore[no-untyped-def]
    def make(*codenames: str):  # type: ignore[no-untyped-def]
        user = django_user_model.objects.create_user(
            f"staff-{uuid.uuid4().hex[:6]}", password="pw", is_staff=True
        )
        user.user_permissions.set(Permission.objects.filter(codename__in=codenames))
        return user

    return make


def relay_alive() -> None:
    Lease.objects.create(
        name="relay:test", holder="test", expires_at=timezone.now() + dt.timedelta(minutes=1)
    )


def test_admin__summary_filters_and_search(admin_client) -> None:  # type: ignore[no-untyped-def]
    message()
    message(attempts=2)
    dead = message(Status.DEAD, attempts=10, last_error="DecodeError: boom")
    message(Status.SENT, sent_at=timezone.now())

    page = admin_client.get(CHANGELIST).content.decode()
    assert 'id="outbox-summary"' in page
    assert "sent in the last minute" in page

    dead_page = admin_client.get(CHANGELIST, {"state": "dead"}).content.decode()
    assert str(dead.task_id) in dead_page and "DecodeError: boom" in dead_page
    retrying = admin_client.get(CHANGELIST, {"state": "retrying"})
    assert retrying.context["cl"].result_count == 1
    found = admin_client.get(CHANGELIST, {"q": str(dead.task_id)})
    assert found.context["cl"].result_count == 1
    by_task = admin_client.get(CHANGELIST, {"task": "tests.testapp.tasks.read_item"})
    assert by_task.context["cl"].result_count == 4


def test_admin__staff_without_permissions_sees_nothing(client, staff) -> None:  # type: ignore[no-untyped-def]
    client.force_login(staff())
    assert client.get(CHANGELIST).status_code == 403
    assert "outboxmessage" not in client.get("/admin/").content.decode()


def test_admin__payload_needs_its_own_permission(client, staff) -> None:  # type: ignore[no-untyped-def]
    row = message()
    client.force_login(staff("view_outboxmessage"))
    detail = client.get(f"{CHANGELIST}{row.pk}/change/")
    assert detail.status_code == 200
    assert "secret-argument" not in detail.content.decode()
    assert client.get(f"{CHANGELIST}{row.pk}/change/payload/").status_code == 403

    client.force_login(staff("view_outboxmessage", "view_payload"))
    payload = client.get(f"{CHANGELIST}{row.pk}/change/payload/")
    assert payload.status_code == 200
    assert payload.json()["args"] == ["secret-argument"]


def test_admin__actions_need_their_permissions_and_are_logged(client, staff) -> None:  # type: ignore[no-untyped-def]
    dead = message(Status.DEAD, attempts=10)
    form = {"action": "retry_dead_letters", "_selected_action": [dead.pk]}

    client.force_login(staff("view_outboxmessage"))
    assert client.post(CHANGELIST, form).status_code == 403
    discard = {"action": "discard_dead_letters", "_selected_action": [dead.pk]}
    assert client.post(CHANGELIST, discard).status_code == 403
    dead.refresh_from_db()
    assert dead.status == Status.DEAD

    user = staff("view_outboxmessage", "retry_outboxmessage")
    client.force_login(user)
    assert client.post(CHANGELIST, form).status_code == 302
    dead.refresh_from_db()
    assert (dead.status, dead.attempts) == (Status.PENDING, 0)
    assert LogEntry.objects.filter(user=user, object_id=str(dead.pk)).exists()

    other = message(Status.DEAD)
    user = staff("view_outboxmessage", "discard_outboxmessage")
    client.force_login(user)
    discard = {"action": "discard_dead_letters", "_selected_action": [other.pk]}
    assert client.post(CHANGELIST, discard).status_code == 302
    assert not OutboxMessage.objects.filter(pk=other.pk).exists()
    assert LogEntry.objects.filter(user=user, object_id=str(other.pk)).exists()


def test_status__exit_code_follows_thresholds(settings) -> None:  # type: ignore[no-untyped-def]
    relay_alive()
    message()
    call_command("aftercommit", "status", "--database", "default", stdout=io.StringIO())

    settings.AFTERCOMMIT = {"HEALTH_MAX_BACKLOG": 0}
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_:
        call_command("aftercommit", "status", "--database", "default", stdout=out)
    assert exit_.value.code == 1
    assert "backlog 1 over HEALTH_MAX_BACKLOG 0" in out.getvalue()

    settings.AFTERCOMMIT = {"HEALTH_MAX_AGE": 60}
    OutboxMessage.objects.update(created_at=timezone.now() - dt.timedelta(minutes=5))
    with pytest.raises(SystemExit):
        call_command("aftercommit", "status", "--database", "default", stdout=io.StringIO())


def test_health_view__no_payloads_503_when_unhealthy(client, settings) -> None:  # type: ignore[no-untyped-def]
    # No cached figures: the relay's heartbeat below must show at once.
    settings.AFTERCOMMIT = {"DATABASES": ["default"], "HEALTH_CACHE_SECONDS": 0}
    message()
    response = client.get("/aftercommit/health/")
    assert response.status_code == 503  # no relay heartbeat
    assert "secret-argument" not in response.content.decode()
    assert "no relay heartbeat" in response.json()["databases"]["default"]["problems"][0]

    relay_alive()
    response = client.get("/aftercommit/health/")
    assert response.status_code == 200
    assert response.json()["healthy"] is True
    assert response.json()["databases"]["default"]["backlog"] == 1


def test_admin__large_outbox_lists_without_counting_every_row(admin_client) -> None:  # type: ignore[no-untyped-def]
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    if connection.vendor != "postgresql":
        pytest.skip("the planner's row estimate is PostgreSQL's")
    now = timezone.now()
    OutboxMessage.objects.bulk_create(
        [
            OutboxMessage(
                task_id=str(uuid.uuid4()), task_name="t", payload="[[], {}]",
                content_type="application/json", content_encoding="utf-8", options="{}",
                created_at=now, due_at=now, status=Status.SENT, sent_at=now,
            )
            for _ in range(12_000)
        ],
        batch_size=2000,
    )  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {OutboxMessage._meta.db_table}")
    with CaptureQueriesContext(connection) as queries:
        page = admin_client.get(CHANGELIST)
    assert page.status_code == 200
    whole_table_counts = [
        q["sql"] for q in queries if "COUNT(*)" in q["sql"].upper() and "WHERE" not in q["sql"]
    ]
    assert whole_table_counts == []
    assert page.context["cl"].result_count >= 10_000  # the estimate still pages the list
