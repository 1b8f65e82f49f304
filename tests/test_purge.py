"""Purging old sent rows never holds up sending or stopping: the relay deletes one bounded batch
at a time between its batches. (0.1 purged everything inline before its next batch: with 100k
expired rows the first send waited 2.6 s for it, and SIGTERM waited too.)"""

from __future__ import annotations

import signal
import time

import pytest
from django.db import connection, transaction

from aftercommit.models import OutboxMessage, Status
from tests.conftest import wait_for
from tests.support import relay_argv
from tests.testapp.tasks import read_item

pytestmark = [
    pytest.mark.services,
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("worker"),
]

# This module's worker only runs tasks: the relay under test is the only sender.
WORKER_RELAYS = False

EXPIRED = 100_000
COLUMNS = (
    "task_id, task_name, payload, content_type, content_encoding, options, trace, status, "
    "created_at, due_at, sent_at, attempts, last_error"
)


def insert_expired_sent_rows(count: int = EXPIRED) -> None:
    """``count`` rows sent 30 days ago (past the 7-day retention), in one statement."""
    table = OutboxMessage._meta.db_table
    values = (
        "'expired-' || {n}, 'tests.testapp.tasks.read_item', '[[], {{}}]', 'application/json', "
        "'utf-8', '{{}}', '', 1, {ago}, {ago}, {ago}, 0, ''"
    )
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            row = values.format(n="n", ago="now() - interval '30 days'")
            cursor.execute(
                f"INSERT INTO {table} ({COLUMNS}) SELECT {row} FROM generate_series(1, %s) n",
                [count],
            )
        elif connection.vendor == "sqlite":
            ago = "strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-30 days')"
            row = values.format(n="n", ago=ago)
            cursor.execute(
                f"WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < %s) "
                f"INSERT INTO {table} ({COLUMNS}) SELECT {row} FROM s",
                [count],
            )
        else:
            pytest.skip("the fast bulk insert is written for PostgreSQL and SQLite")
    assert expired_left() == count


def expired_left() -> int:
    return OutboxMessage.objects.filter(status=Status.SENT, task_id__startswith="expired-").count()


def test_purge_in_progress__a_new_message_is_sent_at_once(token, spawn, capsys) -> None:  # type: ignore[no-untyped-def]
    insert_expired_sent_rows()
    spawn("relay", relay_argv())
    wait_for(lambda: expired_left() < EXPIRED, timeout=60, interval=0.01)  # purging began
    start = time.monotonic()
    with transaction.atomic():
        task_id = read_item.delay(token).id
    wait_for(
        lambda: OutboxMessage.objects.filter(task_id=task_id, status=Status.SENT).exists(),
        timeout=30,
        interval=0.01,
    )
    first_send = time.monotonic() - start
    left = expired_left()
    with capsys.disabled():
        print(f"\npurging {EXPIRED} rows: first send {first_send:.3f}s, {left} rows still to purge")
    assert left > 0  # the purge is still going on
    assert first_send < 1.5  # one bounded purge step at most, not the whole purge (0.1: 2.6 s)


def test_sigterm_while_purging__relay_stops_at_once(spawn) -> None:  # type: ignore[no-untyped-def]
    insert_expired_sent_rows()
    relay = spawn("relay", relay_argv())
    wait_for(lambda: expired_left() < EXPIRED, timeout=60, interval=0.01)
    start = time.monotonic()
    relay.signal(signal.SIGTERM)
    assert relay.proc.wait(15) == 0
    stopped = time.monotonic() - start
    assert expired_left() > 0  # it did not finish the purge first
    assert stopped < 2.0
