"""Debounce: ``apply_async(..., debounce=2.0)`` is sent once, ``debounce`` seconds after the commit
of the last dispatch with the same key; the earlier ones are superseded and never sent."""

from __future__ import annotations

import datetime as dt
import math
import time

import pytest
from django.db import transaction
from django.db.models.functions import Now
from django.test import override_settings

from aftercommit import DispatchError, debounce
from aftercommit.models import OutboxMessage, Status, database_now
from tests.conftest import wait_for
from tests.testapp.models import Item, TaskRun
from tests.testapp.tasks import read_item, read_now, slow_read

pytestmark = [pytest.mark.django_db(transaction=True, databases=["default", "other"])]


def runs(token: str) -> list[TaskRun]:
    return list(TaskRun.objects.filter(token=token).order_by("started_at"))


# At the call --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"debounce": 0}, "positive, finite number"),
        ({"debounce": -1.0}, "positive, finite number"),
        ({"debounce": math.inf}, "positive, finite number"),
        ({"debounce": math.nan}, "positive, finite number"),
        ({"debounce": True}, "positive, finite number"),
        ({"debounce": "2"}, "positive, finite number"),
        ({"debounce": 2.0, "debounce_key": ""}, "non-empty string"),
        ({"debounce": 2.0, "debounce_key": "k" * 256}, "at most 255"),
        ({"debounce": 2.0, "debounce_key": 5}, "non-empty string"),
        ({"debounce_key": "brand-1"}, "without debounce"),
    ],
)
def test_bad_debounce__refused_at_the_call_nothing_stored(token, options, error) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DispatchError, match=error), transaction.atomic():
        read_item.apply_async((token,), **options)
    assert not OutboxMessage.objects.exists()


def test_debounce_on_a_call_published_at_once__refused(token) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(DispatchError, match="debounce needs the outbox"):
        read_now.apply_async((token,), debounce=1.0)
    with pytest.raises(DispatchError, match="debounce needs the outbox"):
        read_item.apply_async((token,), debounce=1.0, after_commit=False)


def test_default_key__task_and_arguments_not_options(token) -> None:  # type: ignore[no-untyped-def]
    with transaction.atomic():
        a = read_item.apply_async((token, 1), debounce=5)
        b = read_item.apply_async((token, 1), debounce=5, queue="other", priority=3)
        c = read_item.apply_async((token, 2), debounce=5)
        d = slow_read.apply_async((token, 1), debounce=5)
        e = read_item.apply_async((token, 1))
    keys = dict(OutboxMessage.objects.values_list("task_id", "debounce_key"))
    assert keys[a.id] == keys[b.id]
    assert len({keys[a.id], keys[c.id], keys[d.id]}) == 3
    assert keys[e.id] is None


def test_explicit_key__scoped_to_the_task(token) -> None:  # type: ignore[no-untyped-def]
    with transaction.atomic():
        a = read_item.apply_async((token, 1), debounce=5, debounce_key="brand-1")
        b = read_item.apply_async((token, 2), debounce=5, debounce_key="brand-1")
        c = slow_read.apply_async((token, 1), debounce=5, debounce_key="brand-1")
    keys = dict(OutboxMessage.objects.values_list("task_id", "debounce_key"))
    assert keys[a.id] == keys[b.id] != keys[c.id]


def test_due_time__counted_from_the_commit(token) -> None:  # type: ignore[no-untyped-def]
    with transaction.atomic():
        result = read_item.apply_async((token,), debounce=3.0)
        row = OutboxMessage.objects.get(task_id=result.id)
        inserted = database_now("default")
        assert row.due_at >= inserted + dt.timedelta(seconds=2.9)  # never due before the commit
        time.sleep(1.0)  # a transaction held open
    committed = database_now("default")
    row.refresh_from_db()
    assert row.due_at >= committed + dt.timedelta(seconds=2.9)


def test_dispatch_outside_a_transaction__due_after_debounce(token) -> None:  # type: ignore[no-untyped-def]
    result = read_item.apply_async((token,), debounce=3.0)
    row = OutboxMessage.objects.get(task_id=result.id)
    assert row.due_at >= database_now("default") + dt.timedelta(seconds=2.5)


# The relay's step ---------------------------------------------------------------------------------


def _claimed(*results) -> list[OutboxMessage]:  # type: ignore[no-untyped-def]
    return list(OutboxMessage.objects.filter(task_id__in=[r.id for r in results]).order_by("id"))


def test_newer_pending_row__older_superseded(token) -> None:  # type: ignore[no-untyped-def]
    first = read_item.apply_async((token,), debounce=5)
    second = read_item.apply_async((token,), debounce=5)
    other = read_item.apply_async((token, 1), debounce=5)
    plain = read_item.apply_async((token,))
    rows = _claimed(first, second, other, plain)
    kept = debounce.drop_superseded("default", rows)
    assert [r.task_id for r in kept] == [second.id, other.id, plain.id]
    assert OutboxMessage.objects.get(task_id=first.id).status == Status.SUPERSEDED


def test_key_waiting_past_max_wait__newest_due_row_sent(token) -> None:  # type: ignore[no-untyped-def]
    first = read_item.apply_async((token,), debounce=5)
    second = read_item.apply_async((token,), debounce=5)
    OutboxMessage.objects.filter(task_id=first.id).update(
        created_at=Now() - dt.timedelta(seconds=120)
    )
    rows = _claimed(first)
    with override_settings(AFTERCOMMIT={"DEBOUNCE_MAX_WAIT": 600}):
        assert debounce.drop_superseded("default", rows) == []
    OutboxMessage.objects.filter(task_id=first.id).update(status=Status.PENDING)
    with override_settings(AFTERCOMMIT={"DEBOUNCE_MAX_WAIT": 60}):
        assert debounce.drop_superseded("default", rows) == rows  # waited 120 s: sent
    assert OutboxMessage.objects.get(task_id=second.id).status == Status.PENDING


def test_max_wait__counts_from_the_first_message_since_the_last_send(token) -> None:  # type: ignore[no-untyped-def]
    old = read_item.apply_async((token,), debounce=5)
    middle = read_item.apply_async((token,), debounce=5)
    newest = read_item.apply_async((token,), debounce=5)
    OutboxMessage.objects.filter(task_id=old.id).update(
        status=Status.SUPERSEDED, created_at=Now() - dt.timedelta(seconds=120)
    )
    rows = _claimed(middle)
    with override_settings(AFTERCOMMIT={"DEBOUNCE_MAX_WAIT": 60}):
        assert debounce.drop_superseded("default", rows) == rows  # the burst began 120 s ago
    OutboxMessage.objects.filter(task_id=old.id).update(status=Status.SENT)
    with override_settings(AFTERCOMMIT={"DEBOUNCE_MAX_WAIT": 60}):
        assert debounce.drop_superseded("default", rows) == []  # a new burst: superseded
    assert OutboxMessage.objects.get(task_id=newest.id).status == Status.PENDING


def test_superseded_rows__purged_with_sent_ones(token) -> None:  # type: ignore[no-untyped-def]
    first = read_item.apply_async((token,), debounce=5)
    read_item.apply_async((token,), debounce=5)
    debounce.drop_superseded("default", _claimed(first))
    outbox = OutboxMessage.objects
    assert outbox.purge_sent_batch(older_than=3600, batch_size=10) == 0
    time.sleep(0.05)
    assert outbox.purge_sent_batch(older_than=0, batch_size=10) == 1
    assert not outbox.filter(status=Status.SUPERSEDED).exists()


# With a worker (which relays) ---------------------------------------------------------------------


@pytest.mark.services
@pytest.mark.usefixtures("worker")
def test_five_saves_of_one_item__one_run_after_the_last_commit_seeing_the_final_version(  # type: ignore[no-untyped-def]
    token,
) -> None:
    item = Item.objects.create(name="brand", version=0)
    other = Item.objects.create(name="other brand", version=0)
    other_token = f"{token}-other"
    for version in range(1, 6):
        with transaction.atomic():
            Item.objects.filter(pk=item.pk).update(version=version)
            read_item.apply_async((token, item.pk), debounce=2.0)
        last_commit = time.time()
        if version == 2:  # another item's dispatch, in between
            with transaction.atomic():
                Item.objects.filter(pk=other.pk).update(version=1)
                read_item.apply_async((other_token, other.pk), debounce=2.0)
            other_commit = time.time()
        if version < 5:
            time.sleep(0.3)
    wait_for(lambda: runs(token) and runs(other_token), timeout=30)
    time.sleep(3.0)  # nothing else comes
    (run,) = runs(token)
    (other_run,) = runs(other_token)
    started_after = run.started_at - last_commit
    print(f"debounce=2.0: the run started {started_after:.2f}s after the last commit")
    assert 2.0 <= started_after <= 4.0
    assert run.seen_version == 5
    assert 2.0 <= other_run.started_at - other_commit <= 4.0
    assert other_run.seen_version == 1
    statuses = sorted(
        OutboxMessage.objects.filter(payload__contains=token)
        .exclude(payload__contains=other_token)
        .values_list("status", flat=True)
    )
    assert statuses == [Status.SENT] + [Status.SUPERSEDED] * 4


@pytest.mark.services
@pytest.mark.usefixtures("worker")
def test_rolled_back_dispatch__supersedes_nothing(token) -> None:  # type: ignore[no-untyped-def]
    read_item.apply_async((token,), debounce=1.0)
    with pytest.raises(RuntimeError), transaction.atomic():
        read_item.apply_async((token,), debounce=1.0)
        raise RuntimeError("rolled back")
    wait_for(lambda: runs(token), timeout=20)
    time.sleep(1.5)
    assert len(runs(token)) == 1
    assert OutboxMessage.objects.get(payload__contains=token).status == Status.SENT


def test_admin_state_filter__lists_superseded_messages(token, admin_client) -> None:  # type: ignore[no-untyped-def]
    first = read_item.apply_async((token,), debounce=5)
    second = read_item.apply_async((token,), debounce=5)
    debounce.drop_superseded("default", _claimed(first))
    page = admin_client.get("/admin/aftercommit/outboxmessage/", {"state": "superseded"})
    assert page.status_code == 200
    text = page.content.decode()
    assert first.id in text
    assert second.id not in text
    assert "superseded" in text


@pytest.mark.services
@pytest.mark.usefixtures("worker")
def test_dispatch_outside_a_transaction__not_sent_before_debounce(token) -> None:  # type: ignore[no-untyped-def]
    """Outside a transaction the row and its due time commit together: a relay woken by the
    INSERT never finds it due at once."""
    dispatched = time.time()
    read_item.apply_async((token,), debounce=1.5)
    wait_for(lambda: runs(token), timeout=20)
    assert runs(token)[0].started_at - dispatched >= 1.5
