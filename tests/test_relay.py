"""The relay, run apart (``manage.py aftercommit relay``) or driven batch by batch: everything
committed goes out once, whatever happened to the process that recorded it or to the broker."""

from __future__ import annotations

import datetime as dt
import io
import json
import signal
import threading
import time
import uuid
from collections import Counter

import pytest
from django.core.management import call_command
from django.db import connection, connections, transaction
from django.utils import timezone

from aftercommit.models import Lease, OutboxMessage, Status
from aftercommit.relay import Relay, backoff, message_backoff
from tests.celery_app import app
from tests.support import relay_argv, wait_for
from tests.testapp.models import Item, TaskRun
from tests.testapp.tasks import read_item

pytestmark = [
    pytest.mark.services,
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("worker"),
]


# This module's worker only runs tasks: the relays under test are the only senders.
WORKER_RELAYS = False


def delivered(token: str) -> Counter[str]:
    return Counter(TaskRun.objects.filter(token=token).values_list("task_id", flat=True))


def assert_each_sent_and_run_once(token: str, ids: list[str]) -> None:
    """Every message of ``ids`` is marked sent, and its task ran exactly once."""
    assert OutboxMessage.objects.filter(task_id__in=ids, status=Status.SENT).count() == len(ids)
    wait_for(lambda: set(delivered(token)) == set(ids))
    assert max(delivered(token).values()) == 1


def test_committed_with_no_sender_running__relay_delivers_each_once(token, spawn) -> None:  # type: ignore[no-untyped-def]
    with transaction.atomic():
        ids = {read_item.delay(token, None, i).id for i in range(50)}
    with transaction.atomic(using="other"):
        ids.add(read_item.delay(token, None, 50).id)
    spawn("relay", relay_argv())
    wait_for(lambda: sum(delivered(token).values()) >= 51, timeout=60)
    counts = delivered(token)
    assert set(counts) == ids
    assert max(counts.values()) == 1
    wait_for(lambda: not OutboxMessage.objects.pending().exists())
    assert not OutboxMessage.objects.using("other").pending().exists()


def test_broker_down__callers_unharmed_rows_wait_relay_delivers(
    token, broker, spawn, capsys
) -> None:  # type: ignore[no-untyped-def]
    item = Item.objects.create(name="outage")
    broker.down()
    try:
        ids, caller_errors = set(), []
        for version in range(1, 31):
            try:
                with transaction.atomic():
                    item.version = version
                    item.save()
                    ids.add(read_item.delay(token, item.pk, version).id)
            except Exception as exc:  # counted, then asserted: none may reach the caller
                caller_errors.append(exc)
        assert caller_errors == []
        assert Item.objects.get(pk=item.pk).version == 30
        assert OutboxMessage.objects.pending().count() == 30
        relay = spawn("relay", relay_argv())
        # The relay is trying, and failing (its start-up takes a while on a busy machine).
        wait_for(lambda: "broker unreachable" in relay.output(), timeout=60)
        assert delivered(token) == Counter()
        assert OutboxMessage.objects.pending().count() == 30
    finally:
        broker.up()
    back = time.monotonic()
    wait_for(lambda: sum(delivered(token).values()) >= 30, timeout=60)
    recovered = time.monotonic() - back
    counts = delivered(token)
    with capsys.disabled():  # the figures belong in the CI log
        print(
            f"\nbroker outage: 30 saves, {len(caller_errors)} caller errors, {len(counts)}/30 "
            f"delivered "
            f"{recovered:.1f}s after the broker came back, "
            f"{sum(counts.values()) - len(counts)} duplicates"
        )
    assert set(counts) == ids
    assert max(counts.values()) == 1
    wait_for(lambda: not OutboxMessage.objects.pending().exists())
    assert set(OutboxMessage.objects.values_list("attempts", flat=True)) == {0}
    assert "broker unreachable" in relay.output()


def test_several_relays__never_send_a_message_twice(token, spawn) -> None:  # type: ignore[no-untyped-def]
    with transaction.atomic():
        ids = {read_item.delay(token, None, i).id for i in range(600)}
    for n in range(3):
        spawn(f"relay-{n}", relay_argv("--batch-size", "25"))
    wait_for(lambda: sum(delivered(token).values()) >= 600, timeout=120)
    time.sleep(1)
    counts = delivered(token)
    assert set(counts) == ids
    assert [k for k, v in counts.items() if v > 1] == []


def test_broker_refuses_a_batch__refused_rows_wait_then_go_once(token, settings, caplog) -> None:  # type: ignore[no-untyped-def]
    """A batch's publishes go out together and the broker's confirms are awaited once: what the
    broker refuses (RabbitMQ nacks publishes to a full queue) waits, like an outage: no attempt
    used, nothing lost; what it took in the same batch is sent, and not sent again."""
    if not settings.BROKER_URL.startswith("amqp"):
        pytest.skip("only RabbitMQ refuses a publish through its publisher confirms")
    name = f"aftercommit-full-{uuid.uuid4().hex[:8]}"

    def declare(**arguments: object) -> None:
        with app.connection_for_write() as conn:
            channel = conn.default_channel
            channel.queue_delete(name)
            channel.queue_declare(name, auto_delete=False, arguments=arguments)
            channel.queue_bind(name, "amq.direct", routing_key=name)

    def make_due() -> None:
        OutboxMessage.objects.update(due_at=timezone.now() - dt.timedelta(seconds=1))

    declare(**{"x-max-length": 0, "x-overflow": "reject-publish"})  # refuses every message
    relay = Relay(app)
    try:
        ids = {
            read_item.apply_async((token,), exchange="amq.direct", routing_key=name).id
            for _ in range(3)
        }
        make_due()
        assert relay.run_batch("default") == 3
        rows = list(OutboxMessage.objects.filter(task_id__in=ids))
        assert {(r.status, r.attempts) for r in rows} == {(Status.PENDING, 0)}
        assert all(r.due_at > timezone.now() for r in rows)  # handed back for later
        assert "broker unreachable" in caplog.text and "refused" in caplog.text

        declare(**{"x-max-length": 1, "x-overflow": "reject-publish"})  # room for one
        make_due()
        assert relay.run_batch("default") == 3
        statuses = Counter(OutboxMessage.objects.values_list("status", "attempts"))
        assert statuses == {(Status.SENT, 0): 1, (Status.PENDING, 0): 2}  # took one, refused two

        declare()  # room again (a new queue: the one message taken went with the old one)
        make_due()
        assert relay.run_batch("default") == 2  # only the refused ones: no duplicate
        assert set(OutboxMessage.objects.values_list("status", flat=True)) == {Status.SENT}
        with app.connection_for_write() as conn:
            assert conn.default_channel.queue_declare(name, passive=True).message_count == 2
    finally:
        relay.close()
        with app.connection_for_write() as conn:
            conn.default_channel.queue_delete(name)


def test_sigterm__relay_stops_cleanly(spawn) -> None:  # type: ignore[no-untyped-def]
    relay = spawn("relay", relay_argv())
    wait_for(lambda: Lease.objects.filter(name__startswith="relay:").exists(), timeout=30)
    relay.signal(signal.SIGTERM)
    assert relay.proc.wait(15) == 0
    assert not Lease.objects.filter(name__startswith="relay:").exists()


def _raw_message(payload: str = '[["x"], {}]', **fields) -> OutboxMessage:  # type: ignore[no-untyped-def]
    now = timezone.now()
    return OutboxMessage.objects.create(
        task_id=str(uuid.uuid4()),
        task_name=read_item.name,
        payload=payload,
        content_type="application/json",
        content_encoding="utf-8",
        options="{}",
        created_at=now,
        due_at=now,
        **fields,
    )


def test_poison_message__backs_off_then_dead_letter_without_blocking_others(  # type: ignore[no-untyped-def]
    token, settings, request
) -> None:
    settings.AFTERCOMMIT = {**settings.AFTERCOMMIT, "MAX_ATTEMPTS": 3, "BACKOFF_BASE": 0.05}
    poison = _raw_message("{not json")
    good = _raw_message(json.dumps([[token], {}]))
    relay = Relay(app, aliases=["default"])
    request.addfinalizer(relay.close)
    before = timezone.now()
    relay.run_batch("default")
    wait_for(lambda: delivered(token))
    assert OutboxMessage.objects.get(pk=good.pk).status == Status.SENT
    poison.refresh_from_db()
    assert (poison.status, poison.attempts) == (Status.PENDING, 1)
    assert poison.due_at > before  # pushed back by the backoff
    assert "JSONDecodeError" in poison.last_error or "DecodeError" in poison.last_error
    for _ in range(2):
        wait_for(lambda: OutboxMessage.objects.due().exists(), timeout=5)
        relay.run_batch("default")
    poison.refresh_from_db()
    assert (poison.status, poison.attempts) == (Status.DEAD, 3)

    out = io.StringIO()
    with pytest.raises(SystemExit):  # unhealthy: no relay is running
        call_command("aftercommit", "status", "--json", "--database", "default", stdout=out)
    assert json.loads(out.getvalue())["default"]["dead"] == 1

    call_command("aftercommit", "replay", "--database", "default", stdout=io.StringIO())
    poison.refresh_from_db()
    assert (poison.status, poison.attempts) == (Status.PENDING, 0)


def test_backoff__doubles_capped_and_jittered(settings) -> None:  # type: ignore[no-untyped-def]
    settings.AFTERCOMMIT = {"BACKOFF_BASE": 1.0, "BACKOFF_MAX": 10.0}
    assert 0.5 <= message_backoff(1) <= 1.0
    assert 2.0 <= message_backoff(3) <= 4.0
    assert all(5.0 <= message_backoff(20) <= 10.0 for _ in range(50))
    assert len({message_backoff(3) for _ in range(20)}) > 1
    assert 0.25 <= backoff(1, base=0.5, cap=30) <= 0.5  # the broker's pause: the same formula


def test_status_and_purge(token) -> None:  # type: ignore[no-untyped-def]
    old = timezone.now() - dt.timedelta(days=30)
    sent_old = _raw_message(status=Status.SENT, sent_at=old)
    OutboxMessage.objects.filter(pk=sent_old.pk).update(due_at=old, created_at=old, sent_at=old)
    sent_new = _raw_message(status=Status.SENT, sent_at=timezone.now())
    dead = _raw_message(status=Status.DEAD, attempts=10)
    OutboxMessage.objects.filter(pk=dead.pk).update(due_at=old, created_at=old)
    pending = _raw_message(attempts=2)
    OutboxMessage.objects.filter(pk=pending.pk).update(
        created_at=old, due_at=timezone.now() + dt.timedelta(hours=1)
    )

    out = io.StringIO()
    with pytest.raises(SystemExit):  # unhealthy: no relay is running
        call_command("aftercommit", "status", "--json", "--database", "default", stdout=out)
    report = json.loads(out.getvalue())["default"]
    assert report["backlog"] == 1
    assert report["retrying"] == 1
    assert report["dead"] == 1
    assert report["oldest_pending_age"] >= 30 * 24 * 3600 - 5

    out = io.StringIO()
    with pytest.raises(SystemExit):
        call_command("aftercommit", "status", stdout=out)
    assert "backlog" in out.getvalue() and "default" in out.getvalue()
    assert "no relay heartbeat seen recently" in out.getvalue()

    call_command("aftercommit", "purge", "--database", "default", stdout=io.StringIO())
    left = set(OutboxMessage.objects.values_list("pk", flat=True))
    assert left == {sent_new.pk, dead.pk, pending.pk}


def test_unknown_database__command_error() -> None:
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="unknown database alias"):
        call_command("aftercommit", "status", "--database", "nope")


def _prepared_statements() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM pg_prepared_statements")
        return {name for (name,) in cursor.fetchall()}


def test_claim_and_mark__prepared_once_per_session__unprepared_behind_a_pooler(token) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL plans a statement each time it is sent as text: most of an empty claim's time.
    The relay's session prepares its claim and mark once; a session that loses them (PgBouncer
    in transaction mode hands each transaction another server connection) runs them unprepared
    from then on, with the same results."""
    if connection.vendor != "postgresql":
        pytest.skip("prepared statements are the PostgreSQL path")
    connection.close()  # a fresh session, as a relay starts with
    with transaction.atomic():
        for i in range(3):
            read_item.delay(token, i, 1)
    outbox = OutboxMessage.objects
    first = outbox.claim(limit=2, lease=60)
    assert len(first) == 2
    assert _prepared_statements() == {"aftercommit_claim"}
    assert outbox.mark_sent([r.id for r in first]) == 2
    assert _prepared_statements() == {"aftercommit_claim", "aftercommit_mark_sent"}

    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")  # what a pooler's next server connection looks like
    rest = outbox.claim(limit=2, lease=60)
    assert [r.task_id for r in rest] == list(
        OutboxMessage.objects.filter(status=Status.PENDING).values_list("task_id", flat=True)
    )
    assert outbox.mark_sent([r.id for r in rest]) == 1
    assert _prepared_statements() == set()  # not prepared again on this connection
    assert outbox.filter(status=Status.SENT).count() == 3
    assert outbox.claim(limit=2, lease=60) == []


def test_loop__a_batch_not_full_is_marked_after_a_pause__a_stopped_relay_marks_all(  # type: ignore[no-untyped-def]
    token, monkeypatch
) -> None:
    """In its loop the relay marks a batch that was not full a few milliseconds after publishing
    it, so a worker it runs in takes the task up without waiting for the mark (a full batch, a
    backlog, is marked on the relay's database thread: see the next test). Whatever it
    published is marked before it stops."""
    from aftercommit import relay as relay_module
    from aftercommit.brokers import Sender
    from aftercommit.models import OutboxMessageQuerySet

    events: list[tuple[str, float, int]] = []
    publish, mark = Sender.send, OutboxMessageQuerySet.mark_sent

    def recorded_publish(self, items):  # type: ignore[no-untyped-def]
        outcome = publish(self, items)
        events.append(("published", time.monotonic(), len(outcome.sent)))
        return outcome

    def recorded_mark(self, ids):  # type: ignore[no-untyped-def]
        events.append(("marked", time.monotonic(), len(ids)))
        return mark(self, ids)

    monkeypatch.setattr(Sender, "send", recorded_publish)
    monkeypatch.setattr(OutboxMessageQuerySet, "mark_sent", recorded_mark)
    with transaction.atomic():
        ids = [read_item.delay(token, None, i).id for i in range(3)]
    relay = Relay(app, aliases=["default"])
    thread = threading.Thread(target=relay.run)
    thread.start()
    try:
        sent = OutboxMessage.objects.filter(task_id__in=ids, status=Status.SENT)
        wait_for(lambda: sent.count() == 3)
    finally:
        relay.stop()
        thread.join(30)
    (published, at, count), (marked, marked_at, marked_count) = events[:2]
    assert (published, count, marked, marked_count) == ("published", 3, "marked", 3)
    assert marked_at - at >= relay_module.SETTLE_DELAY * 0.9

    # A relay that stops (here: --once, nothing more due) right after a batch still marks it.
    with transaction.atomic():
        more = [read_item.delay(token, None, i).id for i in range(3, 5)]
    Relay(app, aliases=["default"]).run(once=True)
    assert OutboxMessage.objects.filter(task_id__in=more, status=Status.SENT).count() == 2


def test_loop__a_backlog_is_marked_on_the_database_thread__signals_in_order(  # type: ignore[no-untyped-def]
    token, monkeypatch
) -> None:
    """Draining a backlog, the relay marks each full batch on a thread of its own (its own
    connection) while it claims and publishes the next; the ``sent`` signals still come from
    the relay's thread, once a message, in order, and the thread is gone when the relay stops."""
    from aftercommit import signals
    from aftercommit.models import OutboxMessageQuerySet

    marks: list[tuple[str, int]] = []
    mark = OutboxMessageQuerySet.mark_sent

    def recorded_mark(self, ids):  # type: ignore[no-untyped-def]
        marks.append((threading.current_thread().name, len(ids)))
        return mark(self, ids)

    monkeypatch.setattr(OutboxMessageQuerySet, "mark_sent", recorded_mark)
    heard: list[tuple[str, str]] = []

    def on_sent(message, **kwargs):  # type: ignore[no-untyped-def]
        heard.append((message.task_id, threading.current_thread().name))

    signals.sent.connect(on_sent)
    try:
        with transaction.atomic():
            ids = [read_item.delay(token, None, i).id for i in range(23)]
        Relay(app, aliases=["default"], batch_size=5).run(once=True)
    finally:
        signals.sent.disconnect(on_sent)
    assert OutboxMessage.objects.filter(task_id__in=ids, status=Status.SENT).count() == 23
    # Four full batches on the database thread, the last (3) on the relay's own. SQLite has one
    # writer at a time: all on the relay's own.
    apart = connection.features.has_select_for_update_skip_locked
    assert [(name.startswith("aftercommit-relay-db"), n) for name, n in marks] == [
        (apart, 5), (apart, 5), (apart, 5), (apart, 5), (False, 3),
    ]  # fmt: skip
    assert [task_id for task_id, _ in heard] == ids
    assert {name for _, name in heard} == {threading.current_thread().name}
    assert not [t for t in threading.enumerate() if t.name.startswith("aftercommit-relay-db")]
    wait_for(lambda: sorted(delivered(token)) == sorted(ids))


def test_loop__a_backlog_mark_that_fails__rows_sent_again_after_the_lease(  # type: ignore[no-untyped-def]
    token, settings, monkeypatch, caplog
) -> None:
    """A full batch's mark that cannot be written (the database thread's connection is gone
    past the lease) is reported; its rows were published, stay pending, and are sent again
    once the lease is over: at least once, never lost."""
    from django.db import OperationalError

    from aftercommit.models import OutboxMessageQuerySet

    settings.AFTERCOMMIT = {**settings.AFTERCOMMIT, "LEASE": 1.0}
    mark = OutboxMessageQuerySet.mark_sent

    def failing_on_the_database_thread(self, ids):  # type: ignore[no-untyped-def]
        if threading.current_thread().name.startswith("aftercommit-relay-db"):
            raise OperationalError("the server closed the connection")
        return mark(self, ids)

    if not connection.features.has_select_for_update_skip_locked:
        pytest.skip("SQLite marks every batch on the relay's own thread")
    monkeypatch.setattr(OutboxMessageQuerySet, "mark_sent", failing_on_the_database_thread)
    with transaction.atomic():
        ids = [read_item.delay(token, None, i).id for i in range(4)]
    Relay(app, aliases=["default"], batch_size=2).run(once=True)
    assert "they will be sent again" in caplog.text
    assert OutboxMessage.objects.filter(task_id__in=ids, status=Status.PENDING).count() == 4
    monkeypatch.setattr(OutboxMessageQuerySet, "mark_sent", mark)
    time.sleep(1.1)  # the lease
    Relay(app, aliases=["default"], batch_size=10).run(once=True)
    assert OutboxMessage.objects.filter(task_id__in=ids, status=Status.SENT).count() == 4
    wait_for(lambda: set(delivered(token)) == set(ids) and min(delivered(token).values()) == 2)


@pytest.mark.parametrize("ahead", ["bounded", "unbounded"])
def test_loop__a_mark_that_waits_holds_the_relay_back(token, monkeypatch, ahead) -> None:  # type: ignore[no-untyped-def]
    """A backlog's mark that waits (a row lock, a slow database) holds the relay back: at most two
    batches are published and not marked, which is all a crash then sends again. Unbounded (the
    unsafe way, run once to show it), the relay goes on and publishes the whole backlog."""
    from aftercommit import relay as relay_module
    from aftercommit.brokers import Sender
    from aftercommit.models import OutboxMessageQuerySet

    if not connection.features.has_select_for_update_skip_locked:
        pytest.skip("SQLite marks every batch on the relay's own thread")
    if ahead == "unbounded":
        monkeypatch.setattr(relay_module, "MARKS_AHEAD", 1000)
    release = threading.Event()
    mark = OutboxMessageQuerySet.mark_sent

    def held_mark(self, ids):  # type: ignore[no-untyped-def]
        if threading.current_thread().name.startswith("aftercommit-relay-db"):
            release.wait(30)
        return mark(self, ids)

    published: list[object] = []
    send = Sender.send

    def counted_send(self, items):  # type: ignore[no-untyped-def]
        outcome = send(self, items)
        published.extend(outcome.sent)
        return outcome

    monkeypatch.setattr(OutboxMessageQuerySet, "mark_sent", held_mark)
    monkeypatch.setattr(Sender, "send", counted_send)
    with transaction.atomic():
        ids = [read_item.delay(token, None, i).id for i in range(50)]
    relay = Relay(app, aliases=["default"], batch_size=5)
    thread = threading.Thread(target=relay.run, kwargs={"once": True})
    thread.start()
    try:
        wait_for(lambda: len(published) >= 10, timeout=30)
        time.sleep(0.5)  # as far as it goes while the first mark waits
        out = len(published)
    finally:
        release.set()
        thread.join(30)
    if ahead == "bounded":
        assert out == 10  # the batch being marked, and the one after it
    else:
        assert out == 50
    assert_each_sent_and_run_once(token, ids)


def _claimed_ahead_supported() -> bool:
    return connection.vendor == "postgresql" and connection.Database.__name__ == "psycopg"


@pytest.fixture
def backlog_alone() -> None:
    """The outbox holds only the test's own backlog: these tests count what each batch holds,
    and a row another module's processes left behind would take a place in a batch."""
    OutboxMessage.objects.all().delete()


def _ran_and_waits_for_its_sync(pid: int) -> bool:
    """The session ``pid`` has run what it was sent and waits for the client: a pipelined claim
    done, its transaction open until the claim is read."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT state, wait_event FROM pg_stat_activity WHERE pid = %s", [pid])
        return cursor.fetchone() == ("active", "ClientRead")


def _due_and_unlocked(ids: list[str]) -> int:
    """The messages of ``ids`` another sender could claim now (due, not locked by a claim)."""
    with transaction.atomic():
        due = OutboxMessage.objects.due().filter(task_id__in=ids)
        return len(due.select_for_update(skip_locked=True).values_list("id", flat=True))


@pytest.mark.parametrize("way", ["claimed ahead", "not ahead"])
@pytest.mark.usefixtures("backlog_alone")
def test_loop__a_backlog_batch_is_claimed_while_the_one_before_is_published(  # type: ignore[no-untyped-def]
    token, monkeypatch, way
) -> None:
    """Draining a backlog on PostgreSQL, the relay claims the next batch while it publishes
    this one, so the database's time hides behind the publishing. The next batch's rows are
    held (locked) during the publish; each message still goes once. Run once the old way (no
    claim ahead): nothing is held during the publish."""
    from aftercommit.brokers import Sender
    from aftercommit.models import OutboxMessageQuerySet

    if not _claimed_ahead_supported():
        pytest.skip("claims go ahead on PostgreSQL with psycopg 3 only")
    if way == "not ahead":
        monkeypatch.setattr(OutboxMessageQuerySet, "claim_ahead", lambda *a, **k: None)
    with transaction.atomic():
        ids = [read_item.delay(token, None, i).id for i in range(15)]
    claimable: list[int] = []  # at each publish: what another sender could still claim
    send = Sender.send
    relay = Relay(app, aliases=["default"], batch_size=5)

    def watched_send(self, items):  # type: ignore[no-untyped-def]
        claiming = relay._claiming.get("default")
        if claiming is not None and claiming.connection is not None:
            # The claim ahead is on its way: look once PostgreSQL has run it (and holds its
            # rows), else this look's own locks could make it skip them.
            pid = claiming.connection.info.backend_pid
            wait_for(lambda: _ran_and_waits_for_its_sync(pid), timeout=10)
        claimable.append(_due_and_unlocked(ids))
        return send(self, items)

    monkeypatch.setattr(Sender, "send", watched_send)
    relay.run(once=True)
    if way == "claimed ahead":
        # batch 1 out: batch 2 held; batch 2 out: batch 3 held; batch 3 out: the empty claim
        assert claimable == [5, 0, 0]
    else:
        assert claimable == [10, 5, 0]
    assert_each_sent_and_run_once(token, ids)


@pytest.mark.parametrize("way", ["handed back", "kept (unsafe)"])
@pytest.mark.usefixtures("backlog_alone")
def test_loop__stopping_hands_back_the_batch_claimed_ahead(token, monkeypatch, way) -> None:  # type: ignore[no-untyped-def]
    """A relay stopped while it publishes a backlog's batch hands the next batch, claimed ahead
    and never published, back at once: another sender takes it now, not after the lease. The
    unsafe way (kept) runs once and shows those rows leased for LEASE seconds."""
    from aftercommit.brokers import Sender

    if not _claimed_ahead_supported():
        pytest.skip("claims go ahead on PostgreSQL with psycopg 3 only")
    if way == "kept (unsafe)":
        monkeypatch.setattr(Relay, "_release", lambda self, alias, rows, delay: None)
    with transaction.atomic():
        ids = [read_item.delay(token, None, i).id for i in range(20)]
    relay = Relay(app, aliases=["default"], batch_size=5)
    send = Sender.send

    def stopping_send(self, items):  # type: ignore[no-untyped-def]
        relay.stop()  # (a SIGTERM during the first publish)
        return send(self, items)

    monkeypatch.setattr(Sender, "send", stopping_send)
    relay.run()
    assert OutboxMessage.objects.filter(task_id__in=ids, status=Status.SENT).count() == 5
    if way == "handed back":
        assert _due_and_unlocked(ids) == 15
    else:
        assert _due_and_unlocked(ids) == 10  # five wait for their lease
    wait_for(lambda: len(delivered(token)) == 5)
    assert max(delivered(token).values()) == 1


@pytest.mark.usefixtures("backlog_alone")
def test_loop__broker_down_hands_back_the_batch_claimed_ahead(token, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The broker is down while a backlog's batch goes out: the batch claimed ahead waits with
    it, due when the relay tries the broker again, not leased until its lease is over; no
    attempt is used. Then everything goes, once."""
    from aftercommit.brokers import BrokerUnavailable, Outcome, Sender

    if not _claimed_ahead_supported():
        pytest.skip("claims go ahead on PostgreSQL with psycopg 3 only")
    with transaction.atomic():
        ids = [read_item.delay(token, None, i).id for i in range(10)]
    send = Sender.send
    down = [True]

    def send_or_outage(self, items):  # type: ignore[no-untyped-def]
        if down.pop() if down else False:
            return Outcome(unsent=list(items), broker_error=BrokerUnavailable("down"))
        return send(self, items)

    monkeypatch.setattr(Sender, "send", send_or_outage)
    relay = Relay(app, aliases=["default"], batch_size=5)
    try:
        assert relay.run_batch("default", in_loop=True) == 5
        assert relay._claimed == {}
        pause = relay._paused_until - time.monotonic()
        soon = timezone.now() + dt.timedelta(seconds=pause + 1)
        rows = OutboxMessage.objects.filter(task_id__in=ids)
        assert rows.filter(claim_token__isnull=False).values("claim_token").distinct().count() == 2
        assert not rows.filter(due_at__gt=soon).exists()  # all ten due with the broker's retry
        assert set(rows.values_list("attempts", flat=True)) == {0}
    finally:
        relay._shutdown()
    OutboxMessage.objects.filter(task_id__in=ids).update(due_at=timezone.now())
    Relay(app, aliases=["default"], batch_size=5).run(once=True)
    wait_for(lambda: set(delivered(token)) == set(ids))
    assert max(delivered(token).values()) == 1


@pytest.mark.usefixtures("backlog_alone")
def test_loop__an_error_after_the_publish_rolls_the_claim_ahead_back(token, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Settling a backlog's batch fails (a database error marking it): the relay logs it and
    goes on, and the batch it had claimed ahead, unread, is rolled back, not left leased; every
    message goes once, well within the lease."""
    if not _claimed_ahead_supported():
        pytest.skip("claims go ahead on PostgreSQL with psycopg 3 only")
    with transaction.atomic():
        ids = [read_item.delay(token, None, i).id for i in range(20)]
    settle = Relay._publish_and_settle
    failures: list[int] = []

    def failing_once(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        settle(self, *args, **kwargs)
        if not failures:
            failures.append(1)
            raise RuntimeError("settling failed")

    monkeypatch.setattr(Relay, "_publish_and_settle", failing_once)
    Relay(app, aliases=["default"], batch_size=5).run(once=True)  # (it stops at the error)
    assert failures
    assert _due_and_unlocked(ids) == 15  # the claim ahead rolled back, not leased for 60 s
    Relay(app, aliases=["default"], batch_size=5).run(once=True)
    assert_each_sent_and_run_once(token, ids)


@pytest.mark.usefixtures("backlog_alone")
def test_loop__a_claim_ahead_that_cannot_be_sent__claimed_as_usual_one_warning(  # type: ignore[no-untyped-def]
    token, monkeypatch, caplog
) -> None:
    """The claim ahead cannot even be sent (the claiming connection is refused): the relay says
    so once for the backlog, not once a batch, and claims as usual; every message goes once."""
    from django.db import OperationalError

    from aftercommit.models import OutboxMessageQuerySet

    if not _claimed_ahead_supported():
        pytest.skip("claims go ahead on PostgreSQL with psycopg 3 only")

    def refused(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OperationalError("connection refused")

    monkeypatch.setattr(OutboxMessageQuerySet, "claim_ahead", refused)
    with transaction.atomic():
        ids = [read_item.delay(token, None, i).id for i in range(20)]
    with caplog.at_level("WARNING", logger="aftercommit.relay"):
        Relay(app, aliases=["default"], batch_size=5).run(once=True)
    assert caplog.text.count("claiming the next batch ahead") == 1
    assert_each_sent_and_run_once(token, ids)


@pytest.mark.usefixtures("backlog_alone")
def test_loop__the_claiming_connection_cut_mid_publish__nothing_lost_or_doubled(  # type: ignore[no-untyped-def]
    token, monkeypatch, caplog
) -> None:
    """The server drops the connection the next batch was claimed on while this batch is
    published (a failover, an idle timeout): the claim never committed, so its rows are claimed
    again as usual at once; the relay says what happened and every message goes once."""
    from aftercommit.brokers import Sender

    if not _claimed_ahead_supported():
        pytest.skip("claims go ahead on PostgreSQL with psycopg 3 only")
    with transaction.atomic():
        ids = [read_item.delay(token, None, i).id for i in range(20)]
    relay = Relay(app, aliases=["default"], batch_size=5)
    send = Sender.send
    cut: list[int] = []

    def cutting_send(self, items):  # type: ignore[no-untyped-def]
        claiming = relay._claiming.get("default")
        if not cut and claiming is not None and claiming.connection is not None:
            pid = claiming.connection.info.backend_pid
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
            cut.append(pid)
        return send(self, items)

    monkeypatch.setattr(Sender, "send", cutting_send)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="aftercommit.relay"):
        relay.run(once=True)
    assert cut
    assert "reading the batch claimed ahead" in caplog.text
    assert time.monotonic() - started < 10  # not after a lease (the lease is 60 s)
    assert_each_sent_and_run_once(token, ids)


@pytest.mark.parametrize(
    "database_time_zone, use_tz", [(None, True), ("America/Sao_Paulo", True), (None, False)]
)
@pytest.mark.parametrize("way", ["claim", "claim_ahead"])
def test_claim__rows_as_django_loads_them(token, settings, database_time_zone, use_tz, way) -> None:  # type: ignore[no-untyped-def]
    """The claim loads its rows' timestamps with the database driver's own loader where it can
    (psycopg 3's, in C), not Django's: the values, and their tzinfo (none without USE_TZ), are
    what the ORM gives, whatever time zone the connection has."""
    settings.USE_TZ = use_tz
    connection.close()
    saved = connection.settings_dict.get("TIME_ZONE")
    connection.settings_dict["TIME_ZONE"] = database_time_zone
    for cached in ("timezone", "timezone_name"):
        connection.__dict__.pop(cached, None)
    try:
        with transaction.atomic():
            read_item.delay(token, None, 1)
        OutboxMessage.objects.update(sent_at=timezone.now())  # a timestamp that is not null
        if way == "claim":
            (claimed,) = OutboxMessage.objects.claim(limit=5, lease=60)
        else:  # sent ahead on a connection of its own, read later
            if not _claimed_ahead_supported():
                pytest.skip("claims go ahead on PostgreSQL with psycopg 3 only")
            own = connections.create_connection("default")
            try:
                read = OutboxMessage.objects.claim_ahead(own, limit=5, lease=60)
                assert read is not None
                (claimed,) = read()
            finally:
                own.close()
        loaded = OutboxMessage.objects.get(pk=claimed.pk)
        for field in OutboxMessage._meta.concrete_fields:
            mine, django = getattr(claimed, field.attname), getattr(loaded, field.attname)
            if field.name != "due_at":  # (the claim's new one on PostgreSQL, elsewhere the old)
                assert mine == django, field.name
            assert getattr(mine, "tzinfo", None) is getattr(django, "tzinfo", None), field.name
        assert claimed.claimed_at.tzinfo is loaded.due_at.tzinfo
        assert abs(claimed.claimed_at + dt.timedelta(seconds=60) - loaded.due_at) < dt.timedelta(
            seconds=1
        )
    finally:
        connection.close()
        connection.settings_dict["TIME_ZONE"] = saved
        for cached in ("timezone", "timezone_name"):
            connection.__dict__.pop(cached, None)


@pytest.mark.usefixtures("backlog_alone")
def test_claim__finds_its_rows_by_primary_key_not_by_scanning_the_outbox(token) -> None:  # type: ignore[no-untyped-def]
    """PostgreSQL's claim reads the claim index, then finds each claimed row by primary key,
    whatever the table holds. The old form (``id IN (SELECT …)``), run once to show it, hashes a
    sequential scan of the whole outbox on a table of a few thousand kept rows whose statistics
    are stale (a queue table's, most of the time: here, taken during a backlog since drained):
    most of a woken claim's time."""
    from aftercommit.models import _claim_statement

    if connection.vendor != "postgresql":
        pytest.skip("the claim is one statement on PostgreSQL only")
    with transaction.atomic():
        read_item.delay(token, None, 0)
    outbox = OutboxMessage._meta.db_table
    table = "aftercommit_plan_copy"  # a copy: the statistics taken here stay with it
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TEMPORARY TABLE {table} (LIKE {outbox} INCLUDING ALL)")
        cursor.execute(f"INSERT INTO {table} SELECT * FROM {outbox}")
        cursor.execute(  # a backlog of 8,000, analyzed, then sent and kept (RETENTION)
            f"INSERT INTO {table} (id, task_id, task_name, payload, content_type,"
            " content_encoding, options, trace, status, created_at, due_at, attempts, last_error)"
            " SELECT t.id + g, t.task_id || '-' || g, t.task_name, t.payload, t.content_type,"
            " t.content_encoding, t.options, t.trace, t.status, t.created_at, t.due_at, 0, ''"
            f" FROM {outbox} t, generate_series(1, 8000) g"
        )
        cursor.execute(f"ANALYZE {table}")
        cursor.execute(
            f"UPDATE {table} SET status = %s, sent_at = now() WHERE task_id LIKE %s",
            [Status.SENT, "%-%-%-%-%-%"],
        )
        cursor.execute("SET enable_bitmapscan TO off")  # (as the relay's session)
        sql, _ = _claim_statement(OutboxMessage, connection)
        sql = sql.replace(connection.ops.quote_name(outbox), table)
        old = sql.replace("= ANY(ARRAY(", "IN (").replace("SKIP LOCKED))", "SKIP LOCKED)")
        plans = {}
        for form, statement in (("now", sql), ("old", old)):
            cursor.execute(
                "EXPLAIN " + statement, [dt.timedelta(seconds=60), "t", Status.PENDING, 500]
            )
            plans[form] = "\n".join(line for (line,) in cursor.fetchall())
        cursor.execute("RESET enable_bitmapscan")
        cursor.execute(f"DROP TABLE {table}")
    assert f"Seq Scan on {table}" not in plans["now"], plans["now"]
    assert f"Index Scan using {table}_pkey" in plans["now"], plans["now"]
    assert f"Seq Scan on {table}" in plans["old"], plans["old"]
    (claimed,) = OutboxMessage.objects.claim(limit=500, lease=60)
    assert claimed.task_id == OutboxMessage.objects.get(status=Status.PENDING).task_id


def test_migration_0006__partial_indexes_on_postgresql__and_back() -> None:
    """PostgreSQL's outbox indexes leave out what no query asks them for (sent rows from the
    claim index, rows without a sent_at or a debounce key from theirs); migrating back restores
    the full ones. The claim still reads the claim index."""
    if connection.vendor != "postgresql":
        pytest.skip("partial indexes are PostgreSQL's (MariaDB has none; SQLite keeps it simple)")

    def definitions() -> dict[str, str]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s",
                [OutboxMessage._meta.db_table],
            )
            return {name: definition for name, definition in cursor.fetchall()}

    partial = definitions()
    assert partial["aftercommit_claim"].endswith("(status, due_at, id) WHERE (status <> 1)")
    assert partial["aftercommit_sent_at"].endswith("(sent_at) WHERE (sent_at IS NOT NULL)")
    assert partial["aftercommit_debounce"].endswith(
        "(debounce_key, id) WHERE (debounce_key IS NOT NULL)"
    )
    call_command("migrate", "aftercommit", "0005", verbosity=0)
    try:
        full = definitions()
        assert full["aftercommit_claim"].endswith("(status, due_at, id)")
        assert "WHERE" not in " ".join(full.values())
    finally:
        call_command("migrate", "aftercommit", verbosity=0)
    assert definitions() == partial
    with connection.cursor() as cursor:
        # Whether the index can serve the claim, not whether a near-empty table's statistics
        # make a scan look cheaper (sequential scans are only penalized: one still shows when
        # no index fits the claim's predicate).
        cursor.execute("SET enable_bitmapscan TO off")
        cursor.execute("SET enable_seqscan TO off")
        cursor.execute(
            "EXPLAIN SELECT id FROM aftercommit_outboxmessage WHERE status = 0 "
            "AND due_at <= now() ORDER BY due_at, id LIMIT 500 FOR UPDATE SKIP LOCKED"
        )
        plan = " ".join(row[0] for row in cursor.fetchall())
        cursor.execute("RESET enable_bitmapscan")
        cursor.execute("RESET enable_seqscan")
    assert "aftercommit_claim" in plan
