"""The fault suite's "relay SIGKILLed mid-batch" scenario with ``once=True`` tasks: the relays'
duplicates are delivered, and have no second effect.

Deliveries are counted before the body, in the other database (outside the once-transaction);
effects are the Item rows the body writes in the default database, inside it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from django.conf import settings as django_settings
from django.db import connections, transaction

from aftercommit.models import OutboxMessage, Status
from tests.conftest import FAULT_ROWS, Broker, Process, _subprocess_env, wait_for
from tests.support import kill_between_publish_and_mark
from tests.testapp.models import Item, TaskRun
from tests.testapp.tasks import once_effect

pytestmark = [
    pytest.mark.faults,
    pytest.mark.services,
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("worker"),
]

# The relays this test starts and kills are the only senders.
WORKER_RELAYS = False

LONG = os.environ.get("AFTERCOMMIT_FAULTS") == "long"
BACKLOG = 5000 if LONG else 2000
KILLS = 10 if LONG else 3
LEASE = 2
SHORT_LEASE = json.dumps({"LEASE": LEASE})  # a killed relay's claims come back quickly


@pytest.fixture(autouse=True)
def _postgresql_only() -> None:
    if connections["default"].vendor != "postgresql":
        pytest.skip("the fault suite runs on PostgreSQL")


@pytest.fixture
def spawn(broker: Broker) -> Iterator[Callable[..., Process]]:
    started: list[Process] = []

    def start(name: str, argv: list[str], **env: str) -> Process:
        proc = Process(name, argv, {**_subprocess_env(broker), **broker.env, **env})
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def relay_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "django", "aftercommit", "relay", *args]


def test_relay_killed_mid_batch_with_once__duplicate_deliveries_no_duplicate_effects(  # type: ignore[no-untyped-def]
    token, spawn
) -> None:
    with transaction.atomic():
        ids = {once_effect.delay(token, i).id for i in range(BACKLOG)}
    for n in range(KILLS):
        name = f"once-relay-{n}-{os.getpid()}"
        relay = spawn(
            f"relay-{n}",
            relay_argv("--batch-size", "100"),
            AFTERCOMMIT_TEST_SETTINGS=SHORT_LEASE,
            AFTERCOMMIT_TEST_APP_NAME=name,
        )
        kill_between_publish_and_mark(relay, name)
        started = time.monotonic()  # the fault's end is the last kill
        time.sleep(LEASE + 0.5)  # the killed relay's claims are due again: in_flight is empty
    spawn("relay-last", relay_argv(), AFTERCOMMIT_TEST_SETTINGS=SHORT_LEASE)
    pending = OutboxMessage.objects.filter(task_id__in=ids, status=Status.PENDING)
    wait_for(lambda: not pending.exists(), timeout=120, interval=0.1)
    recovered = time.monotonic() - started
    applied = Item.objects.filter(name=token)
    wait_for(lambda: applied.count() >= BACKLOG, timeout=180, interval=0.5)
    # Let the last duplicates be delivered (and skipped) before counting.
    delivered: Counter[str] = Counter()
    for _ in range(30):
        time.sleep(1)
        now = Counter(TaskRun.objects.filter(token=token).values_list("task_id", flat=True))
        if now == delivered:
            break
        delivered = now
    effects = Counter(applied.values_list("version", flat=True))
    duplicate_deliveries = sum(n - 1 for n in delivered.values())
    duplicate_effects = sum(n - 1 for n in effects.values())
    scheme = django_settings.BROKER_URL.split(":")[0]
    FAULT_ROWS.append(
        {
            "setup": f"postgresql+{'rabbitmq' if 'amqp' in scheme else scheme}",
            "scenario": f"relay SIGKILLed mid-batch, x{KILLS}, once=True "
            f"({duplicate_deliveries} duplicate deliveries)",
            "messages": len(ids),
            "lost": len(ids - set(delivered)),
            "duplicated": duplicate_effects,
            "caller errors": 0,
            "time to recover (s)": round(recovered, 1),
        }
    )
    print(f"once=True: {duplicate_deliveries} duplicate deliveries, {duplicate_effects} effects")
    assert set(delivered) >= ids
    assert sorted(effects) == list(range(BACKLOG))
    assert duplicate_deliveries > 0, "no relay was killed mid-batch: nothing was tested"
    assert duplicate_effects == 0
