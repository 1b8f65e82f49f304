"""Under ``task_always_eager`` nothing is stored, but the test helpers still see each dispatch: a
suite that runs eagerly can assert what it dispatched (0.1 sent no ``recorded`` signal there, so
``capture()`` and the ``aftercommit`` fixture saw nothing)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import transaction

from aftercommit.models import OutboxMessage
from aftercommit.testing import capture, commit
from tests.celery_app import app
from tests.testapp.models import TaskRun
from tests.testapp.tasks import plain_read_item, read_item

pytestmark = pytest.mark.django_db(databases=["default", "other"])


@pytest.fixture
def eager() -> Iterator[None]:
    previous = app.conf.task_always_eager
    app.conf.task_always_eager = True
    try:
        yield
    finally:
        app.conf.task_always_eager = previous


def test_eager__capture_sees_the_dispatch(eager, token) -> None:  # type: ignore[no-untyped-def]
    with capture() as captured, commit(), transaction.atomic():
        read_item.delay(token, None, 7)
    captured.assert_dispatched(read_item, [token, None, 7], count=1)
    captured.assert_not_dispatched(plain_read_item)
    assert TaskRun.objects.filter(token=token).count() == 1  # it ran, at the commit
    assert not OutboxMessage.objects.exists()  # and nothing was stored


def test_eager__fixture_asserts_dispatched(eager, aftercommit, token) -> None:  # type: ignore[no-untyped-def]
    with commit():
        read_item.apply_async((token,), {"expected": 1})
    aftercommit.assert_dispatched(read_item, [token], {"expected": 1})
    assert aftercommit.calls() == [(read_item.name, [token], {"expected": 1})]
