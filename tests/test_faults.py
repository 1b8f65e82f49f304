"""The fault suite: real processes killed by signal, the broker and the database cut, on cue.

Each scenario adds a row (messages, lost, duplicated, caller errors, time to recover) to the table
conftest prints at the end of the run (and appends as markdown to AFTERCOMMIT_FAULTS_REPORT).
AFTERCOMMIT_FAULTS=long runs the sizes the issue asks for; the default short form runs in CI.
"Time to recover" runs from the end of the fault (the last kill; the broker or the database back)
until every message was sent (the outbox says so); where the fault lasts the whole run (a cut on
every batch), from its start; for relays racing writers, from the last writer's commit. The
worker's own speed at running them is not part of it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import uuid
from collections import Counter

import pytest
from django.conf import settings as django_settings
from django.db import connections, transaction
from django.utils import timezone

from aftercommit.models import OutboxMessage, Status
from tests.conftest import FAULT_ROWS as ROWS
from tests.support import kill_between_publish_and_mark, relay_argv, wait_for
from tests.testapp.models import Item, TaskRun
from tests.testapp.tasks import read_item, slow_read

pytestmark = [
    pytest.mark.faults,
    pytest.mark.services,
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("worker"),
]

# The module's worker only runs tasks: the relays each scenario starts (and kills) are the senders.
WORKER_RELAYS = False

LONG = os.environ.get("AFTERCOMMIT_FAULTS") == "long"
SIZE = {
    "web_kills": 20 if LONG else 4,
    "per_kill": 10 if LONG else 5,
    "outage_seconds": 30 if LONG else 5,
    "outage_saves": 1000 if LONG else 200,
    "relay_kills": 10 if LONG else 3,
    "relay_backlog": 5000 if LONG else 2000,
    "writers": 8 if LONG else 4,
    "per_writer": 250 if LONG else 50,
    "relays": 4 if LONG else 2,
}


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connections["default"].vendor != "postgresql":
        pytest.skip("the fault suite runs on PostgreSQL (it cuts database connections)")


def delivered(token: str) -> Counter[str]:
    return Counter(TaskRun.objects.filter(token=token).values_list("task_id", flat=True))


BROKERS = {"amqp": "rabbitmq", "pyamqp": "rabbitmq"}


def row(scenario: str, ids: set[str], counts: Counter[str], errors: int, recover: float) -> None:
    scheme = django_settings.BROKER_URL.split(":")[0]
    lost = len(ids - set(counts))
    duplicated = sum(n - 1 for key, n in counts.items() if key in ids)
    ROWS.append(
        {
            "setup": f"{connections['default'].vendor}+{BROKERS.get(scheme, scheme)}",
            "scenario": scenario,
            "messages": len(ids),
            "lost": lost,
            "duplicated": duplicated,
            "caller errors": errors,
            "time to recover (s)": round(recover, 1),
        }
    )


def wait_delivered(token: str, ids: set[str], timeout: float, since: float | None = None) -> float:
    """Seconds until every message was sent (marked so in the outbox), from ``since`` (else from
    now); then waits until the worker ran them all, for the lost/duplicated counts. The worker's own
    speed is not ours to report."""
    started = time.monotonic() if since is None else since
    pending = OutboxMessage.objects.filter(task_id__in=ids, status=Status.PENDING)
    wait_for(lambda: not pending.exists(), timeout=timeout, interval=0.1)
    sent = time.monotonic() - started
    wait_for(lambda: set(delivered(token)) >= ids, timeout=timeout, interval=0.2)
    return sent


def writer_argv(token: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "tests.fault_writer", "--token", token, *args]


SHORT_LEASE = json.dumps({"LEASE": 2})


def test_web_process_killed_after_commit__relay_delivers_everything(token, spawn) -> None:  # type: ignore[no-untyped-def]
    ids: set[str] = set()
    for n in range(SIZE["web_kills"]):
        writer = spawn(
            f"writer-{n}",
            writer_argv(token, "--die", "--per-transaction", str(SIZE["per_kill"])),
        )
        assert writer.proc.wait(60) == -signal.SIGKILL
        ids |= writer.printed_ids()
    assert len(ids) == SIZE["web_kills"] * SIZE["per_kill"]
    time.sleep(1)
    assert not set(delivered(token)) & ids, "the killed process sent before dying"
    spawn("relay", relay_argv())
    recover = wait_delivered(token, ids, timeout=60)
    row(
        f"web process SIGKILLed after commit, x{SIZE['web_kills']}",
        ids,
        delivered(token),
        0,
        recover,
    )
    assert set(delivered(token)) >= ids


def test_broker_down_during_saves__nothing_lost_no_attempts_used(token, broker, spawn) -> None:  # type: ignore[no-untyped-def]
    spawn("relay", relay_argv())
    item = Item.objects.create(name="outage")
    ids: set[str] = set()
    errors: list[BaseException] = []
    broker.down()
    deadline = time.monotonic() + SIZE["outage_seconds"]
    pause = SIZE["outage_seconds"] / SIZE["outage_saves"]
    try:
        for version in range(SIZE["outage_saves"]):
            try:
                with transaction.atomic():
                    item.version = version
                    item.save()
                    ids.add(read_item.delay(token, item.pk, version).id)
            except Exception as exc:
                errors.append(exc)
            time.sleep(max(0.0, min(pause, deadline - time.monotonic())))
        time.sleep(max(0.0, deadline - time.monotonic()))
    finally:
        broker.up()
    recover = wait_delivered(token, ids, timeout=120)
    counts = delivered(token)
    row(
        f"broker down {SIZE['outage_seconds']}s during {SIZE['outage_saves']} saves",
        ids,
        counts,
        len(errors),
        recover,
    )
    assert errors == []
    wait_for(lambda: not OutboxMessage.objects.pending().exists(), timeout=30)
    assert set(OutboxMessage.objects.values_list("attempts", flat=True)) == {0}


def test_relay_killed_mid_batch__nothing_lost_duplicates_counted(token, settings, spawn) -> None:  # type: ignore[no-untyped-def]
    with transaction.atomic():
        ids = {read_item.delay(token, None, i).id for i in range(SIZE["relay_backlog"])}
    started = time.monotonic()
    for n in range(SIZE["relay_kills"]):
        name = f"aftercommit-killed-{n}-{os.getpid()}"
        relay = spawn(
            f"relay-{n}",
            relay_argv("--batch-size", "100"),
            AFTERCOMMIT_TEST_SETTINGS=SHORT_LEASE,
            AFTERCOMMIT_TEST_APP_NAME=name,
        )
        kill_between_publish_and_mark(relay, name)
        started = time.monotonic()  # the fault's end: the last kill
        time.sleep(2.5)  # (SHORT_LEASE) the killed relay's claims are due again
    spawn("relay-last", relay_argv(), AFTERCOMMIT_TEST_SETTINGS=SHORT_LEASE)
    recovered = wait_delivered(token, ids, timeout=120, since=started)
    time.sleep(1)
    counts = delivered(token)
    row(f"relay SIGKILLed mid-batch, x{SIZE['relay_kills']}", ids, counts, 0, recovered)
    assert set(counts) >= ids
    # Each kill came between a publish and its mark: that batch went again.
    assert sum(n - 1 for n in counts.values()) >= SIZE["relay_kills"]


def test_relay_connection_terminated_between_publish_and_mark__nothing_lost_nothing_twice(  # type: ignore[no-untyped-def]
    token, spawn
) -> None:
    with transaction.atomic():
        ids = {read_item.delay(token, None, i).id for i in range(SIZE["relay_backlog"] // 2)}
    started = time.monotonic()
    # Full batches: each is marked on the relay's database thread; the hook finds its connection
    # by the relay's own application name.
    relay = spawn(
        "relay",
        relay_argv("--batch-size", "50"),
        AFTERCOMMIT_TEST_CUT_AFTER_PUBLISH="50",
        AFTERCOMMIT_TEST_APP_NAME=f"aftercommit-cut-{os.getpid()}",
    )
    recovered = wait_delivered(token, ids, timeout=120, since=started)
    time.sleep(1)
    counts = delivered(token)
    row(
        "relay's database connection terminated between publish and mark, each batch",
        ids,
        counts,
        0,
        recovered,
    )
    assert set(counts) >= ids
    assert "unavailable after a publish" in relay.output()  # the fault really happened
    # The mark is tried again on a fresh connection while the claim's lease lasts.
    assert max(counts.values()) == 1


def worker_argv(queue: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "-P", "threads",
        "-c", "1", "-Q", queue, "-l", "info", "--without-heartbeat", "--without-gossip",
        "--without-mingle", "-n", f"faults-{uuid.uuid4().hex[:6]}@%h",
    ]  # fmt: skip


def test_relaying_worker_killed_mid_batch__nothing_lost_duplicates_counted(token, spawn) -> None:  # type: ignore[no-untyped-def]
    # Workers whose only job here is their relay (they consume a queue nothing is sent to); the
    # module's worker runs the tasks, so a kill can only interrupt sending.
    relaying = json.dumps({"LEASE": 2, "BATCH_SIZE": 50, "RELAY_IN_WORKER": True})
    with transaction.atomic():
        ids = {read_item.delay(token, None, i).id for i in range(SIZE["relay_backlog"])}
    started = time.monotonic()
    for n in range(SIZE["relay_kills"]):
        name = f"aftercommit-killed-worker-{n}-{os.getpid()}"
        doomed = spawn(
            f"worker-relay-{n}",
            worker_argv("relay-only"),
            AFTERCOMMIT_TEST_SETTINGS=relaying,
            AFTERCOMMIT_TEST_APP_NAME=name,
        )
        kill_between_publish_and_mark(doomed, name)
        started = time.monotonic()  # the fault's end: the last kill
        time.sleep(2.5)  # (its LEASE) the killed worker's claims are due again
    spawn("worker-relay-last", worker_argv("relay-only"), AFTERCOMMIT_TEST_SETTINGS=relaying)
    recovered = wait_delivered(token, ids, timeout=120, since=started)
    time.sleep(1)
    counts = delivered(token)
    row(f"worker (relaying) SIGKILLed mid-batch, x{SIZE['relay_kills']}", ids, counts, 0, recovered)
    assert set(counts) >= ids
    # Each kill came between a publish and its mark: that batch went again.
    assert sum(n - 1 for n in counts.values()) >= SIZE["relay_kills"]


def test_many_relays_and_writers__nothing_lost_nothing_twice(token, spawn) -> None:  # type: ignore[no-untyped-def]
    for n in range(SIZE["relays"]):
        spawn(f"relay-{n}", relay_argv("--batch-size", "50"))
    writers = [
        spawn(
            f"writer-{n}",
            writer_argv(token, "--count", str(SIZE["per_writer"])),
        )
        for n in range(SIZE["writers"])
    ]
    for writer in writers:
        assert writer.proc.wait(120) == 0
    ids = {i for writer in writers for i in writer.printed_ids()}
    assert len(ids) == SIZE["writers"] * SIZE["per_writer"]
    started = time.monotonic()
    recovered = wait_delivered(token, ids, timeout=120, since=started)
    time.sleep(1)
    counts = delivered(token)
    row(
        f"{SIZE['relays']} relays and {SIZE['writers']} writers at once",
        ids,
        counts,
        0,
        recovered,
    )
    assert max(counts.values()) == 1


def test_worker_killed_mid_task_with_acks_late__task_runs_again(token, broker, spawn) -> None:  # type: ignore[no-untyped-def]
    argv = [
        sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "-P", "threads",
        "-c", "1", "-Q", "faults", "-l", "info", "--without-heartbeat", "--without-gossip",
        "--without-mingle", "-n", f"faults-{uuid.uuid4().hex[:6]}@%h",
    ]  # fmt: skip
    env = {"AFTERCOMMIT_TEST_VISIBILITY": "3"}
    doomed = spawn("worker-faults", argv, **env)
    wait_for(lambda: "ready." in doomed.output(), timeout=60)
    result = slow_read.apply_async((token, 30), queue="faults")
    wait_for(lambda: delivered(token), timeout=30)
    doomed.signal(signal.SIGKILL)
    doomed.proc.wait(10)
    killed = time.monotonic()
    spawn("worker-faults-2", argv, **env)
    wait_for(lambda: delivered(token)[result.id] >= 2, timeout=90, interval=0.2)
    row("worker SIGKILLed mid-task (acks_late)", {result.id}, Counter({result.id: 1}), 0,
        time.monotonic() - killed)  # fmt: skip
    assert delivered(token)[result.id] == 2


def test_poison_message__dead_letter_never_blocks_the_rest(token, spawn) -> None:  # type: ignore[no-untyped-def]
    now = timezone.now()
    poison = OutboxMessage.objects.create(
        task_id=str(uuid.uuid4()),
        task_name=read_item.name,
        payload="{not json",
        content_type="application/json",
        content_encoding="utf-8",
        options="{}",
        created_at=now,
        due_at=now,
    )
    with transaction.atomic():
        ids = {read_item.delay(token, None, i).id for i in range(20)}
    settings_json = json.dumps({"MAX_ATTEMPTS": 3, "BACKOFF_BASE": 0.1, "BACKOFF_MAX": 0.2})
    spawn("relay", relay_argv(), AFTERCOMMIT_TEST_SETTINGS=settings_json)
    started = time.monotonic()
    wait_delivered(token, ids, timeout=60)
    wait_for(lambda: OutboxMessage.objects.get(pk=poison.pk).status == Status.DEAD, timeout=30)
    row("poison message among 20", ids, delivered(token), 0, time.monotonic() - started)
    assert OutboxMessage.objects.get(pk=poison.pk).attempts == 3


def test_database_connection_cut_and_database_unavailable__relay_recovers(
    token, settings, spawn
) -> None:  # type: ignore[no-untyped-def]
    with transaction.atomic():
        ids = {read_item.delay(token, None, i).id for i in range(SIZE["relay_backlog"])}
    # Named for this run alone: another setup's relay (make test runs two at once) keeps its own.
    app_name = f"aftercommit-relay-{os.getpid()}"
    relay = spawn("relay", relay_argv("--batch-size", "20"), AFTERCOMMIT_TEST_APP_NAME=app_name)
    database = connections["default"].settings_dict["NAME"]
    wait_for(lambda: delivered(token), timeout=60)

    def cut() -> None:
        with connections["default"].cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                [app_name],
            )

    for _ in range(3):  # connections dropped mid-batch
        cut()
        time.sleep(0.3)
    # "Restart": no new connections for 3 s (set from the maintenance database; a database
    # cannot refuse connections to itself from inside).
    import psycopg

    params = connections["default"].get_connection_params()
    params.pop("cursor_factory", None)
    params.pop("context", None)
    with psycopg.connect(**{**params, "dbname": "postgres"}, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false')
        try:
            cut()
            time.sleep(3)
        finally:
            admin.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
    recovered = wait_delivered(token, ids, timeout=120)  # from the database's return
    row("database connections cut, then refused for 3s", ids, delivered(token), 0, recovered)
    assert relay.proc.poll() is None, "the relay died instead of recovering"
    # It saw the cut and reconnected: in a claim ("relay batch … failed; reconnecting") or in
    # the mark after a publish ("… unavailable after a publish …; reconnecting").
    assert "; reconnecting" in relay.output()


def test_bad_input__clear_error_nothing_stored_transaction_usable(token) -> None:  # type: ignore[no-untyped-def]
    from aftercommit import DispatchError

    errors = 0
    with transaction.atomic():
        item = Item.objects.create(name="kept")
        for bad in (
            lambda: read_item.delay(token, object()),
            lambda: read_item.apply_async((token,), queueue="x"),
            lambda: read_item.delay("x" * 300_000),
            lambda: read_item.apply_async((token,), countdown="soon"),
        ):
            with pytest.raises(DispatchError):
                bad()
            errors += 1
        item.save()
    assert not OutboxMessage.objects.exists()
    row("bad input at the call site (4 kinds)", set(), Counter(), errors, 0.0)
