"""The seed's race, measured: admin-like saves that keep the transaction open after dispatching."""

from __future__ import annotations

import os
import time

import pytest
from django.db import transaction

from aftercommit.testing import guard
from tests.support import wait_for
from tests.testapp.models import Item, TaskRun
from tests.testapp.tasks import plain_read_item, read_item

pytestmark = [
    pytest.mark.services,
    pytest.mark.django_db(transaction=True, databases=["default", "other"]),
    pytest.mark.usefixtures("worker"),
]

SAVES = int(os.environ.get("AFTERCOMMIT_RACE_SAVES", "200"))
HOLD = 0.030  # seconds the transaction stays open after the dispatch, like the admin's log entry


def run_saves(task, token: str) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """SAVES saves of one item, each dispatching ``task``; returns (stale reads, tasks run)."""
    item = Item.objects.create(name=token)
    for _ in range(SAVES):
        with transaction.atomic():
            item.version += 1
            item.save()
            task.delay(token, item.pk, item.version)
            time.sleep(HOLD)
    wait_for(lambda: TaskRun.objects.filter(token=token).count() >= SAVES, timeout=120)
    runs = TaskRun.objects.filter(token=token)
    stale = sum(1 for r in runs if r.seen_version is None or r.seen_version < r.expected_version)
    return stale, runs.count()


def test_race__plain_celery_reads_stale_rows_aftercommit_never(
    token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with guard("off"):  # the unsafe way, on purpose: the guard would stop it at the call
        plain_stale, plain_runs = run_saves(plain_read_item, f"{token}-plain")
    ours_stale, ours_runs = run_saves(read_item, f"{token}-ours")
    with capsys.disabled():  # the figures belong in the CI log
        print(
            f"\nrace, {SAVES} saves holding the transaction {HOLD * 1000:.0f} ms after dispatch: "
            f"plain Celery {plain_stale}/{plain_runs} stale reads, "
            f"aftercommit {ours_stale}/{ours_runs} stale reads"
        )
    assert plain_stale > 0, "the unsafe way showed no race: this test could not have failed"
    assert ours_stale == 0
    assert ours_runs == SAVES
