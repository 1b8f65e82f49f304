"""aftercommit.testing: capture, commit, drain, the unittest mixin, and the proof that the plugin
catches the seed's bug where it is written."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from celery.result import EagerResult
from django.db import transaction
from django.test import TestCase

from aftercommit.models import OutboxMessage, Status
from aftercommit.testing import AftercommitTestMixin, capture, commit, drain
from tests.celery_app import app
from tests.testapp.models import Item, TaskRun
from tests.testapp.tasks import plain_read_item, read_item

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.django_db
def test_capture__asserts_what_was_dispatched_with_arguments() -> None:
    with capture() as captured:
        read_item.delay("cap", 1, expected=2)
    captured.assert_dispatched(read_item)
    captured.assert_dispatched("tests.testapp.tasks.read_item", ["cap", 1], {"expected": 2})
    captured.assert_dispatched(read_item, count=1)
    captured.assert_not_dispatched(plain_read_item)
    with pytest.raises(AssertionError, match=r"not dispatched with args=\['cap', 9\]"):
        captured.assert_dispatched(read_item, ["cap", 9])
    with pytest.raises(AssertionError, match="dispatched 1 time"):
        captured.assert_not_dispatched(read_item)


@pytest.mark.django_db
def test_fixture__captures_the_test(aftercommit) -> None:  # type: ignore[no-untyped-def]
    read_item.delay("fixture")
    aftercommit.assert_dispatched(read_item, ["fixture"])
    assert aftercommit.calls() == [("tests.testapp.tasks.read_item", ["fixture"], {})]


@pytest.mark.django_db
def test_commit__runs_hooks_under_testcase() -> None:
    ran: list[int] = []
    with commit() as callbacks:
        transaction.on_commit(lambda: ran.append(1))
        assert ran == []
    assert ran == [1] and len(callbacks) == 1


@pytest.mark.django_db(databases=["default", "other"])
def test_eager__aftercommit_task_runs_at_commit_not_at_the_call(token: str) -> None:
    app.conf.task_always_eager = True
    try:
        item = Item.objects.create(name=token)
        with commit():
            with transaction.atomic():
                read_item.delay(token, item.pk, 0)
            assert not TaskRun.objects.filter(token=token).exists()
    finally:
        app.conf.task_always_eager = False
    assert TaskRun.objects.get(token=token).seen_version == 0


@pytest.mark.django_db(databases=["default", "other"])
def test_drain__runs_pending_messages_here_and_marks_them_sent(token: str) -> None:
    item = Item.objects.create(name=token, version=3)
    read_item.delay(token, item.pk, 3)  # under TestCase the on_commit hook never fires
    results = drain()
    assert len(results) == 1 and results[0].successful()
    assert TaskRun.objects.get(token=token).seen_version == 3
    assert OutboxMessage.objects.get(task_name=read_item.name).status == Status.SENT


class MixinTests(AftercommitTestMixin, TestCase):
    databases = {"default", "other"}

    def test_assertions(self) -> None:
        read_item.delay("mixin")
        self.assertDispatched(read_item, ["mixin"])
        self.assertNotDispatched(plain_read_item)
        with self.assertRaises(AssertionError):
            self.assertNotDispatched(read_item)
        self.assertEqual(len(self.drainOutbox()), 1)


SEED_TEST = """
import pytest
from django.db import transaction

from tests.testapp.models import Item
from tests.testapp.tasks import {task}


def seed_save(self, **kwargs):
    is_existing_object = self.pk is not None
    ORIGINAL_SAVE(self, **kwargs)
    if is_existing_object:
        {task}.delay("seed", self.pk, self.version)


ORIGINAL_SAVE = Item.save


@pytest.mark.django_db
def test_admin_edits_an_item(monkeypatch):
    monkeypatch.setattr(Item, "save", seed_save)
    item = Item.objects.create(name="seed")
    item.version = 2
    with transaction.atomic():  # what the admin's changeform_view wraps around save_model()
        item.save()
"""


@pytest.mark.parametrize(
    ("task", "outcome"), [("plain_read_item", "fails"), ("read_item", "passes")]
)
def test_proof__the_seeds_code_fails_under_the_plugin_and_passes_with_aftercommit(
    pytester: pytest.Pytester, task: str, outcome: str
) -> None:
    pytester.makepyfile(test_seed=textwrap.dedent(SEED_TEST.format(task=task)))
    state = pytester.path / "state"
    env = {
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "DATABASE_URL": "",  # its own SQLite file and filesystem broker: no shared service
        "BROKER_URL": "",
        "AFTERCOMMIT_TEST_STATE": str(state),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    if outcome == "fails":
        result.assert_outcomes(failed=1)
        result.stdout.fnmatch_lines(
            [
                "*UnsafeDispatchError: tests.testapp.tasks.plain_read_item was published by plain "
                "Celery at *test_seed.py:12 while a transaction is open on database 'default'*"
            ]
        )
    else:
        result.assert_outcomes(passed=1)


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_eager_outside_a_transaction__returns_celerys_eager_result(token: str) -> None:
    # Celery's own integration suite (test_eager_chain_inside_task) calls .get() on it: an
    # AsyncResult there waited on a result backend that eager mode never writes.
    app.conf.task_always_eager = True
    try:
        result = read_item.delay(token, None, 0)
    finally:
        app.conf.task_always_eager = False
    assert isinstance(result, EagerResult)
    assert result.get(timeout=1) is None
    assert TaskRun.objects.filter(token=token).exists()
