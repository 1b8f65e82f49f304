"""Result-backend subscriptions of a long-running sender (issue 15).

Celery's Redis result backend subscribes to a task's result channel when the message is published
with results kept, and lets go only when someone waits for that result. A sender publishing on
behalf of others never waits, so each message it sends would cost one subscription for as long as
the process lives.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import redis
from django.conf import settings
from django.db import transaction

from tests.celery_app import app
from tests.support import relay_argv, wait_for
from tests.testapp.tasks import keeps_result

pytestmark = [
    pytest.mark.services,
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
]

MESSAGES = 200
#: Subscriptions a sender may hold however many messages it sent: a few connections' worth.
BOUND = 10


def local_ports(pid: int) -> set[int]:
    """The local TCP ports of a process's sockets, from /proc (Linux)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def subscriptions(client: redis.Redis, pids: list[int]) -> int:
    """Channels and patterns the processes' Redis connections are subscribed to."""
    ports = set().union(*(local_ports(pid) for pid in pids))
    held = 0
    for entry in client.client_list():
        if int(entry["addr"].rsplit(":", 1)[1]) in ports:
            held += int(entry.get("sub", 0)) + int(entry.get("psub", 0))
    return held


def test_long_running_sender__holds_a_bounded_number_of_result_subscriptions(worker, spawn) -> None:  # type: ignore[no-untyped-def]
    if not settings.BROKER_URL.startswith("redis"):
        pytest.skip("the Redis result backend is the one that subscribes (tests/settings.py)")
    if not Path("/proc/self/net/tcp").exists():
        pytest.skip("finds a process's connections through /proc (Linux)")
    relay = spawn("relay", relay_argv())
    with transaction.atomic():
        ids = [keeps_result.delay(i).id for i in range(MESSAGES)]
    wait_for(lambda: all(app.AsyncResult(i).state == "SUCCESS" for i in ids), 120, interval=0.5)

    client = redis.Redis.from_url(settings.CELERY_RESULT_BACKEND)
    try:
        # The senders: the relay, and the worker (where the relay also runs inside it).
        held = subscriptions(client, [relay.proc.pid, worker.proc.pid])
    finally:
        client.close()
    assert held <= BOUND, (
        f"after sending {MESSAGES} messages whose results all arrived, the senders still hold "
        f"{held} result subscriptions: one a message sent, for the life of the process"
    )
