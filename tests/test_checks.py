"""Django system checks: each fires in one test and stays quiet in another."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from celery import Celery
from django.core import checks as django_checks
from django.db import OperationalError, connections
from django.utils import timezone

from aftercommit import checks
from aftercommit.models import Lease, OutboxMessage
from tests.celery_app import app

plain_app = Celery("plain-app", set_as_current=False)
ROOT = Path(__file__).resolve().parent.parent


def ids(messages: list[django_checks.CheckMessage]) -> list[str]:
    return [m.id for m in messages if m.id]


def test_task_class__fires_for_a_plain_app_quiet_for_aftercommits(settings) -> None:  # type: ignore[no-untyped-def]
    assert checks.check_task_class() == []
    settings.AFTERCOMMIT = {**settings.AFTERCOMMIT, "CELERY_APP": "tests.test_checks:plain_app"}
    found = checks.check_task_class()
    assert ids(found) == ["aftercommit.W001"]
    assert "task_cls='aftercommit.celery:Task'" in (found[0].hint or "")


def test_eager_outside_tests__fires(monkeypatch: pytest.MonkeyPatch) -> None:
    app.conf.task_always_eager = True
    try:
        assert checks.check_eager() == []  # pytest is running: a test run
        monkeypatch.setattr(checks, "running_tests", lambda: False)
        assert ids(checks.check_eager()) == ["aftercommit.W002"]
    finally:
        app.conf.task_always_eager = False
    assert checks.check_eager() == []


def test_database_checks__only_with_the_database_tag() -> None:
    registered = django_checks.registry.registry.get_checks(include_deployment_checks=False)
    database = [c for c in registered if "database" in getattr(c, "tags", ())]
    assert checks.check_database in database
    assert checks.check_task_class not in database


@pytest.mark.django_db
def test_database__quiet_when_all_is_well() -> None:
    assert checks.check_database(databases=["default"]) == []


@pytest.mark.django_db
def test_migration_not_applied__fires(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connections["default"].introspection, "table_names", lambda: [])
    found = checks.check_database(databases=["default"])
    assert ids(found) == ["aftercommit.W003"]
    assert "migrate aftercommit" in (found[0].hint or "")


def test_migrate_on_a_fresh_database__not_stopped_by_the_checks(tmp_path: Path) -> None:
    # `manage.py migrate` runs the database checks before migrating: the missing outbox they
    # report must not stop the command that creates it.
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        AFTERCOMMIT_TEST_STATE=str(tmp_path),  # a fresh SQLite file
        PYTHONPATH=str(ROOT),
    )
    argv = [sys.executable, "-m", "django", "migrate"]
    done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "aftercommit.W003" in done.stderr  # said, and migrated anyway
    assert "Applying aftercommit.0002_claim_index... OK" in done.stdout


@pytest.mark.django_db
def test_database_unreachable__a_warning_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> list[str]:
        raise OperationalError("connection refused")

    monkeypatch.setattr(connections["default"].introspection, "table_names", refuse)
    assert ids(checks.check_database(databases=["default"])) == ["aftercommit.W006"]


def _relay(holder: str) -> None:
    now = timezone.now()
    Lease.objects.create(name=f"relay:{holder}", holder=holder, expires_at=now + dt.timedelta(60))


@pytest.mark.django_db
def test_two_relays_without_skip_locked__fires(monkeypatch: pytest.MonkeyPatch) -> None:
    _relay("a")
    _relay("b")
    features = connections["default"].features
    monkeypatch.setattr(features, "has_select_for_update_skip_locked", True)
    assert checks.check_database(databases=["default"]) == []
    monkeypatch.setattr(features, "has_select_for_update_skip_locked", False)
    assert ids(checks.check_database(databases=["default"])) == ["aftercommit.W004"]


@pytest.mark.django_db
def test_messages_waiting_and_no_relay__fires_quiet_once_a_relay_is_seen() -> None:
    old = timezone.now() - dt.timedelta(minutes=10)
    OutboxMessage.objects.create(
        task_id=str(uuid.uuid4()),
        task_name="tests.testapp.tasks.read_item",
        payload="[[], {}]",
        content_type="application/json",
        content_encoding="utf-8",
        options="{}",
        created_at=old,
        due_at=old,
    )
    found = checks.check_database(databases=["default"])
    assert ids(found) == ["aftercommit.W005"]
    assert "aftercommit relay" in (found[0].hint or "")
    _relay("a")
    assert checks.check_database(databases=["default"]) == []
