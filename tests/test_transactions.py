"""Django's on_commit semantics, as a dispatched task sees them: with a real worker and broker."""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections import Counter

import pytest
from celery.result import AsyncResult
from django.db import connections, transaction

from aftercommit import AmbiguousDatabaseError, DispatchError
from aftercommit.models import OutboxMessage, Status
from tests.support import from_another_connection, wait_for
from tests.testapp.models import Item, TaskRun
from tests.testapp.tasks import read_item, read_now

pytestmark = [
    pytest.mark.services,
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("worker"),
]


def runs(token: str) -> list[TaskRun]:
    return list(TaskRun.objects.filter(token=token).order_by("started_at"))


def ran(token: str, count: int = 1, timeout: float = 20) -> list[TaskRun]:
    wait_for(lambda: TaskRun.objects.filter(token=token).count() >= count, timeout=timeout)
    return runs(token)


def ran_seen_from_another_connection(token: str, count: int = 1) -> None:
    """Like ran(), for use inside an open transaction whose snapshot may hide the worker's rows."""

    wait_for(lambda: from_another_connection(TaskRun.objects.filter(token=token).count) >= count)


def settle(token: str) -> None:
    """Wait until the worker has run everything sent before now: a sentinel sent last has run."""
    sentinel = f"{token}-sentinel"
    read_item.delay(sentinel)
    ran(sentinel)

    time.sleep(0.3)


def test_delay_inside_atomic__not_sent_before_commit(token: str) -> None:
    item = Item.objects.create(name="a")
    with transaction.atomic():
        item.version = 1
        item.save()
        result = read_item.delay(token, item.pk, 1)
        time.sleep(0.5)
        assert runs(token) == [], "the worker ran the task before the commit"
        committed = time.time()
    (run,) = ran(token)
    assert run.seen_version == 1
    assert run.started_at >= committed
    assert isinstance(result, AsyncResult)
    assert run.task_id == result.id
    wait_for(lambda: OutboxMessage.objects.get(task_id=result.id).status == Status.SENT)


def test_delay_outside_transaction__recorded_and_sent_at_once(token: str) -> None:
    result = read_item.delay(token)
    message = OutboxMessage.objects.get(task_id=result.id)
    assert message.task_name == read_item.name
    (run,) = ran(token)
    assert run.task_id == result.id
    wait_for(lambda: OutboxMessage.objects.get(task_id=result.id).status == Status.SENT)


def test_nested_atomics__sent_when_the_outermost_commits(token: str) -> None:
    with transaction.atomic():
        with transaction.atomic():
            read_item.delay(token, None, 1)
        time.sleep(0.4)
        assert runs(token) == [], "sent when the inner block exited, before the real commit"
        read_item.delay(token, None, 2)
    assert sorted(r.expected_version for r in ran(token, 2)) == [1, 2]


def test_savepoint_rolled_back__its_task_is_discarded(token: str) -> None:
    with transaction.atomic():
        read_item.delay(token, None, 1)
        with pytest.raises(ZeroDivisionError), transaction.atomic():
            read_item.delay(token, None, 2)
            raise ZeroDivisionError
    settle(token)
    assert [r.expected_version for r in runs(token)] == [1]
    assert OutboxMessage.objects.count() == 2  # the kept call and the sentinel


def test_outer_rolled_back_after_inner_commit__nothing_sent(token: str) -> None:
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        with transaction.atomic():
            read_item.delay(token, None, 1)
        raise ZeroDivisionError
    settle(token)
    assert runs(token) == []
    assert (
        not OutboxMessage.objects.filter(task_name=read_item.name)
        .exclude(payload__contains="sentinel")
        .exists()
    )


def test_failure_inside_atomic_without_savepoint__whole_transaction_discarded(token: str) -> None:
    with transaction.atomic():
        read_item.delay(token, None, 1)
        try:
            with transaction.atomic(savepoint=False):
                read_item.delay(token, None, 2)
                raise ZeroDivisionError
        except ZeroDivisionError:
            pass  # the outer block is now marked for rollback and rolls back on exit
    settle(token)
    assert runs(token) == []


def test_dispatch_from_an_on_commit_hook__sent(token: str) -> None:
    with transaction.atomic():
        transaction.on_commit(lambda: read_item.delay(token, None, 7))
    (run,) = ran(token)
    assert run.expected_version == 7


def test_autocommit_off__clear_error_and_nothing_stored(token: str) -> None:
    transaction.set_autocommit(False)
    try:
        with pytest.raises(DispatchError, match="autocommit is off on database 'default'"):
            read_item.delay(token)
        assert not OutboxMessage.objects.exists()
    finally:
        transaction.rollback()
        transaction.set_autocommit(True)


def test_second_database__joins_its_transaction(token: str) -> None:
    with transaction.atomic(using="other"):
        result = read_item.delay(token, None, 1)
        assert OutboxMessage.objects.using("other").filter(task_id=result.id).exists()
        assert not OutboxMessage.objects.using("default").exists()
        time.sleep(0.4)
        assert runs(token) == []
    ran(token)
    wait_for(
        lambda: OutboxMessage.objects.using("other").get(task_id=result.id).status == Status.SENT
    )


def test_second_database_rolled_back__nothing_sent(token: str) -> None:
    with pytest.raises(ZeroDivisionError), transaction.atomic(using="other"):
        read_item.delay(token, None, 1)
        raise ZeroDivisionError
    settle(token)
    assert runs(token) == []
    assert not OutboxMessage.objects.using("other").exists()


def test_atomic_open_on_two_databases__asks_for_using(token: str) -> None:
    with transaction.atomic(), transaction.atomic(using="other"):
        with pytest.raises(AmbiguousDatabaseError, match="Pass using="):
            read_item.delay(token)
        result = read_item.apply_async((token, None, 3), using="other")
    (run,) = ran(token)
    assert run.task_id == result.id
    assert OutboxMessage.objects.using("other").filter(task_id=result.id).exists()
    assert not OutboxMessage.objects.using("default").exists()


def test_send_now_opt_out__published_before_commit(token: str) -> None:
    with transaction.atomic():
        read_now.delay(token)
        ran_seen_from_another_connection(token)  # it did not wait for the commit
        read_item.apply_async((token,), after_commit=False)
        ran_seen_from_another_connection(token, 2)
    assert not OutboxMessage.objects.exists()


def test_countdown__counts_from_the_commit(token: str) -> None:
    with transaction.atomic():
        dispatched = time.time()
        read_item.apply_async((token,), countdown=2)
        time.sleep(1.5)
        committed = time.time()
    (run,) = ran(token, timeout=30)
    assert run.started_at >= committed + 2 - 0.1, (
        f"started {run.started_at - committed:.2f}s after commit, "
        f"{run.started_at - dispatched:.2f}s after dispatch"
    )


def test_send_options__honoured(token: str) -> None:
    with transaction.atomic():
        read_item.apply_async(
            (token,),
            queue="other",
            priority=5,
            headers={"custom": "x"},
            retry=True,  # the call site's publish policy: accepted, the relay owns retries
            retry_policy={"max_retries": 1},
        )
    (run,) = ran(token)
    assert run.queue == "other"
    assert '"custom": "x"' in run.headers


def test_expires__counts_from_the_commit(token: str) -> None:
    with transaction.atomic():
        read_item.apply_async((token, None, 1), expires=0.5, countdown=1.5)  # expired on arrival
        read_item.apply_async((token, None, 2), expires=30)
        time.sleep(1)
    settle(token)
    assert [r.expected_version for r in runs(token)] == [2]


def test_task_id__is_the_message_id(token: str) -> None:
    wanted = str(uuid.uuid4())
    with transaction.atomic():
        result = read_item.apply_async((token,), task_id=wanted)
    assert result.id == wanted
    (run,) = ran(token)
    assert run.task_id == wanted
    assert str(OutboxMessage.objects.get().task_id) == wanted


def test_task_id__any_string_celery_accepts(token: str) -> None:
    # Celery takes any string as a task id; "brand-42-sync" style ids are common for looking
    # results up. 0.1 refused anything but a UUID.
    wanted = f"brand-42-sync-{token}"
    with transaction.atomic():
        result = read_item.apply_async((token,), task_id=wanted)
    assert result.id == wanted
    (run,) = ran(token)
    assert run.task_id == wanted


def test_task_id_reused__a_new_send_as_in_celery(token: str) -> None:
    # Celery reuses a task id for replace() and for a re-applied frozen signature: each is a
    # legitimate new send. The outbox's own key is its row id, not the task id.
    wanted = str(uuid.uuid4())
    read_item.apply_async((token, None, 1), task_id=wanted)
    with transaction.atomic():
        read_item.apply_async((token, None, 2), task_id=wanted)
    assert sorted(r.expected_version for r in ran(token, 2)) == [1, 2]
    assert OutboxMessage.objects.filter(task_id=wanted).count() == 2


def test_message_ids__time_ordered_uuids(token: str) -> None:
    # Each new row lands at the right edge of the message_id index, not on a random page of it
    # (benchmarks/big_outbox.py measures what a random id costs an outbox of millions of rows).
    ids = []
    for _ in range(3):
        with transaction.atomic():
            ids.append(uuid.UUID(read_item.delay(token).id))
        time.sleep(0.002)
    assert [i.version for i in ids] == [7, 7, 7]
    assert ids == sorted(ids)
    assert {r.task_id for r in ran(token, 3)} == {str(i) for i in ids}


class Unencodable:
    pass


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda t: read_item.delay(t, Unencodable()), "cannot be encoded with the 'json'"),
        (lambda t: read_item.apply_async((t,), queueue="x"), "unknown option(s) queueue"),
        (
            lambda t: read_item.apply_async((t,), serializer="pickle"),
            "pickle serializer is refused",
        ),
        (lambda t: read_item.delay("x" * 300_000), "over the limit"),
        (lambda t: read_item.apply_async((t,), countdown="soon"), "countdown must be a finite"),
        # Accepted by 0.1 at the call, then failing in the relay or misbehaving:
        (lambda t: read_item.apply_async((t,), countdown=float("nan")), "countdown must be"),
        (lambda t: read_item.apply_async((t,), countdown=1e12), "countdown must be"),
        (lambda t: read_item.apply_async((t,), countdown=True), "countdown must be"),
        (lambda t: read_item.apply_async((t,), expires=float("inf")), "expires must be"),
        (lambda t: read_item.apply_async((t,), expires="soon"), "expires must be a datetime"),
        (lambda t: read_item.apply_async((t,), eta="tomorrow"), "eta must be a datetime"),
        (lambda t: read_item.apply_async("ab"), "args must be a list or tuple"),
        (
            lambda t: read_item.apply_async((t,), headers={"x": "y" * 5_000_000}),
            "over the limit",
        ),
        (lambda t: read_item.apply_async((t,), using="nope"), "'nope' is not a database alias"),
        (lambda t: read_item.delay(t, 1, 2, 3, 4), "takes from 2 to 4 positional arguments"),
    ],
    ids=[
        "unencodable",
        "unknown-option",
        "pickle",
        "oversized",
        "bad-countdown",
        "countdown-nan",
        "countdown-huge",
        "countdown-bool",
        "expires-inf",
        "expires-text",
        "eta-text",
        "args-string",
        "huge-headers",
        "bad-alias",
        "bad-signature",
    ],
)
def test_bad_input__clear_error_nothing_stored_transaction_usable(token, call, message):  # type: ignore[no-untyped-def]
    with transaction.atomic():
        item = Item.objects.create(name="kept")
        with pytest.raises((DispatchError, TypeError)) as excinfo:
            call(token)
        assert message in str(excinfo.value)
        assert "tests.testapp.tasks.read_item" in str(excinfo.value) or isinstance(
            excinfo.value, TypeError
        )
        item.version = 2
        item.save()  # the caller's transaction is still usable
    assert Item.objects.get(pk=item.pk).version == 2
    assert not OutboxMessage.objects.exists()


def test_unregistered_task__refused(token: str) -> None:
    from tests.celery_app import app

    name = read_item.name
    task = app.tasks[name]
    del app.tasks[name]
    try:
        with pytest.raises(DispatchError, match="no task of this name is registered"):
            task.delay(token)
    finally:
        app.tasks[name] = task
    assert not OutboxMessage.objects.exists()
    assert connections["default"].get_autocommit()


def test_transaction_held_12s_with_50_tasks__each_runs_once(token: str) -> None:
    # 0.1 set each row due "created + GRACE_PERIOD" by the app server's clock, and its publisher did
    # not claim what it sent: a transaction open longer than the grace period committed rows that
    # were already due, and a relay poll sent them a second time (300 of 300, measured). Now a row
    # is invisible until the commit and owned by whoever claims it.
    with transaction.atomic():
        ids = {read_item.delay(token, None, i).id for i in range(50)}
        time.sleep(12)
    ran(token, 50, timeout=60)
    time.sleep(2)  # a second send would have arrived by now
    runs_by_id = Counter(r.task_id for r in runs(token))
    assert set(runs_by_id) == ids
    assert max(runs_by_id.values()) == 1


@pytest.mark.parametrize("skew", [60.0, -60.0], ids=["ahead", "behind"])
def test_web_server_clock_60s_off__sent_at_once_and_once(
    token: str, skew: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every time the outbox compares is the database's: the caller's clock decides nothing.
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + skew)
    from django.utils import timezone

    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + dt.timedelta(seconds=skew))
    with transaction.atomic():
        ids = {read_item.delay(token, None, i).id for i in range(10)}
    monkeypatch.undo()
    committed = time.time()
    done = ran(token, 10, timeout=30)
    assert max(r.started_at for r in done) - committed < 10  # not held back by the skew
    time.sleep(2)
    runs_by_id = Counter(r.task_id for r in runs(token))
    assert set(runs_by_id) == ids
    assert max(runs_by_id.values()) == 1
