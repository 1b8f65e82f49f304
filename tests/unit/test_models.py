"""The outbox's SQL verbs on the suite's database (SQLite on a bare machine): claim, settle, purge,
and the single-claimer lease. Time passes by moving the stored times back, so nothing sleeps."""

from __future__ import annotations

import datetime as dt

import pytest
from django.db.models import F

from aftercommit import dispatch
from aftercommit.models import Lease, OutboxMessage, Status, database_now

pytestmark = pytest.mark.django_db


def add(n: int = 1) -> list[OutboxMessage]:
    content_type, encoding, payload = dispatch.encode_arguments("unit.task", [1], {}, "json")
    return [
        OutboxMessage.objects.insert(
            task_id=f"task-{i}",
            task_name="unit.task",
            payload=payload,
            content_type=content_type,
            content_encoding=encoding,
            options="{}",
        )
        for i in range(n)
    ]


def pass_time(seconds: float) -> None:
    delta = dt.timedelta(seconds=seconds)
    OutboxMessage.objects.update(due_at=F("due_at") - delta, created_at=F("created_at") - delta)
    OutboxMessage.objects.filter(sent_at__isnull=False).update(sent_at=F("sent_at") - delta)
    Lease.objects.update(expires_at=F("expires_at") - delta)


def test_insert__times_are_the_databases_and_the_row_is_due_at_once() -> None:
    (row,) = add()
    row.refresh_from_db()
    now = database_now("default")
    assert abs((row.created_at - now).total_seconds()) < 5
    assert row.due_at == row.created_at
    assert row.status == Status.PENDING
    assert OutboxMessage.objects.any_due()


def test_claim__due_rows_in_order_up_to_the_limit() -> None:
    rows = add(5)
    claimed = OutboxMessage.objects.claim(limit=3, lease=60)
    assert [r.id for r in claimed] == [r.id for r in rows[:3]]
    assert all(r.claimed_at is not None for r in claimed)


def test_claimed_rows__not_claimed_again_until_the_lease_ends() -> None:
    add(2)
    first = OutboxMessage.objects.claim(limit=10, lease=60)
    assert len(first) == 2
    assert OutboxMessage.objects.claim(limit=10, lease=60) == []
    assert not OutboxMessage.objects.any_due()
    pass_time(59)
    assert OutboxMessage.objects.claim(limit=10, lease=60) == []
    pass_time(2)
    assert {r.id for r in OutboxMessage.objects.claim(limit=10, lease=60)} == {r.id for r in first}


def test_mark_sent__only_pending_rows_a_dead_letter_stays_dead() -> None:
    sent, dead = add(2)
    OutboxMessage.objects.filter(pk=dead.pk).update(status=Status.DEAD)
    assert OutboxMessage.objects.mark_sent([sent.id, dead.id]) == 1
    assert OutboxMessage.objects.get(pk=sent.pk).status == Status.SENT
    assert OutboxMessage.objects.get(pk=sent.pk).sent_at is not None
    assert OutboxMessage.objects.get(pk=dead.pk).status == Status.DEAD
    assert OutboxMessage.objects.mark_sent([]) == 0


def test_sent_rows__never_claimed() -> None:
    (row,) = add()
    OutboxMessage.objects.mark_sent([row.id])
    pass_time(3600)
    assert OutboxMessage.objects.claim(limit=10, lease=60) == []


def test_reschedule__due_after_the_delay_no_attempt_used() -> None:
    (row,) = add()
    OutboxMessage.objects.claim(limit=10, lease=60)
    assert OutboxMessage.objects.reschedule([row.id], delay=5) == 1
    pass_time(4)
    assert OutboxMessage.objects.claim(limit=10, lease=60) == []
    pass_time(2)
    (again,) = OutboxMessage.objects.claim(limit=10, lease=60)
    assert again.attempts == 0


def test_record_failure__counts_the_attempt_and_waits_the_backoff() -> None:
    (row,) = add()
    OutboxMessage.objects.record_failure(row.id, attempts=1, error="x" * 5000, delay=10, dead=False)
    row.refresh_from_db()
    assert (row.attempts, row.status, len(row.last_error)) == (1, Status.PENDING, 4000)
    pass_time(9)
    assert OutboxMessage.objects.claim(limit=10, lease=60) == []
    pass_time(2)
    assert len(OutboxMessage.objects.claim(limit=10, lease=60)) == 1


def test_record_failure_dead__a_dead_letter_never_claimed_until_retried() -> None:
    (row,) = add()
    OutboxMessage.objects.record_failure(row.id, attempts=3, error="boom", delay=0, dead=True)
    pass_time(3600)
    assert OutboxMessage.objects.claim(limit=10, lease=60) == []
    assert OutboxMessage.objects.retry_dead() == 1
    (again,) = OutboxMessage.objects.claim(limit=10, lease=60)
    assert again.attempts == 0


def test_purge_sent_batch__bounded_and_only_old_sent_rows() -> None:
    rows = add(5)
    OutboxMessage.objects.mark_sent([r.id for r in rows[:4]])
    pass_time(100)
    assert OutboxMessage.objects.purge_sent_batch(older_than=50, batch_size=3) == 3
    assert OutboxMessage.objects.purge_sent_batch(older_than=50, batch_size=3) == 1
    assert OutboxMessage.objects.purge_sent_batch(older_than=50, batch_size=3) == 0
    assert list(OutboxMessage.objects.values_list("id", flat=True)) == [rows[4].id]


def test_summary__backlog_retrying_dead_and_oldest_age() -> None:
    rows = add(4)
    OutboxMessage.objects.mark_sent([rows[0].id])
    OutboxMessage.objects.record_failure(rows[1].id, attempts=1, error="", delay=0, dead=False)
    OutboxMessage.objects.record_failure(rows[2].id, attempts=9, error="", delay=0, dead=True)
    pass_time(30)
    summary = OutboxMessage.objects.summary()
    assert (summary["backlog"], summary["retrying"], summary["dead"]) == (2, 1, 1)
    assert summary["sent_last_minute"] == 1
    assert summary["oldest_pending_age"] >= 29


def test_lease__one_holder_until_it_expires() -> None:
    assert Lease.objects.acquire("claim", "a", seconds=10)
    assert not Lease.objects.acquire("claim", "b", seconds=10)
    assert Lease.objects.acquire("claim", "a", seconds=10)  # renewed by its holder
    pass_time(11)
    assert Lease.objects.acquire("claim", "b", seconds=10)
    assert not Lease.objects.acquire("claim", "a", seconds=10)


def test_lease_release__another_holder_takes_it_at_once() -> None:
    Lease.objects.acquire("claim", "a", seconds=60)
    Lease.objects.release("claim", "a")
    assert Lease.objects.acquire("claim", "b", seconds=60)


def test_sender_past_its_lease_hands_a_row_back__the_new_holders_lease_stands() -> None:
    (row,) = add()
    (a,) = OutboxMessage.objects.claim(limit=1, lease=60)  # sender A
    pass_time(61)  # A is slow: past its lease, so the protocol lets another take the row
    (b,) = OutboxMessage.objects.claim(limit=1, lease=60)  # sender B, now the row's holder
    assert a.claim_token != b.claim_token
    # A found the broker down, and hands back what it claimed: not B's claim.
    assert OutboxMessage.objects.reschedule([row.id], delay=0, claim_token=a.claim_token) == 0
    assert (
        OutboxMessage.objects.record_failure(
            row.id, attempts=9, error="late", delay=0, dead=True, claim_token=a.claim_token
        )
        == 0
    )
    assert OutboxMessage.objects.claim(limit=1, lease=60) == [], "taken while B holds it"
    assert OutboxMessage.objects.reschedule([row.id], delay=0, claim_token=b.claim_token) == 1
