"""pytest plugin that tests/celery_suite.py loads into Celery's integration suite
(``-p aftercommit_suite_plugin``).

It changes nothing in Celery's files. CELERY_SUITE_MODE=aftercommit sets Django up and gives the
suite's apps (the session app its worker runs, and each test's app) aftercommit's task class
through the ``celery_parameters`` fixture of ``celery.contrib.pytest``; "plain" leaves them alone.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit

import pytest

MODE = os.environ.get("CELERY_SUITE_MODE", "plain")
TASK_CLS = "aftercommit.celery:Task"


def pytest_load_initial_conftests(early_config: pytest.Config) -> None:
    # The conftest of t/integration is imported right after this hook, before pytest_configure.
    if MODE == "aftercommit":
        # Before any app exists: aftercommit's task class imports Django models.
        import django

        django.setup()
    _suite_redis_on_backend_db()


def pytest_collection_modifyitems(items: list[pytest.Item], config: pytest.Config) -> None:
    """--timeout caps every test, also those the suite marks with a longer one (5 minutes): a test
    that waits on a result never sent would otherwise hold the run that long."""
    cap = config.getoption("timeout", None)
    if not cap:
        return
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is not None and (marker.kwargs.get("timeout") or marker.args[0]) > cap:
            item.add_marker(pytest.mark.timeout(cap), append=False)


def _suite_redis_on_backend_db() -> None:
    """The suite's own Redis client (t.integration.tasks.get_redis_connection) uses db 0; the
    Redis server is shared here, so point it at the result backend's db, where upstream (which
    runs everything on db 0) has it too. The conftest imports the function by name, so this runs
    before the conftest is imported, and the test and the worker use the same db."""
    import t.integration.tasks as tasks
    from redis import StrictRedis

    url = urlsplit(os.environ["TEST_BACKEND"])
    db = int(url.path.strip("/") or 0)

    def get_redis_connection() -> StrictRedis:
        return StrictRedis(host=url.hostname, port=url.port or 6379, db=db, socket_timeout=None)

    tasks.get_redis_connection = get_redis_connection


@pytest.fixture(scope="session")
def celery_parameters() -> dict[str, Any]:
    return {"task_cls": TASK_CLS} if MODE == "aftercommit" else {}


@pytest.fixture(scope="session", autouse=True)
def _task_class_is_the_one_asked_for(celery_session_app: Any) -> None:
    """Fail the run at once if the override did not reach the apps (a fixture shadowed it)."""
    from celery import Task

    base = celery_session_app.Task
    if MODE == "aftercommit":
        from aftercommit.celery import Task as AftercommitTask

        assert issubclass(base, AftercommitTask), f"the suite's app uses {base.__mro__}"
    else:
        assert base.__mro__[1] is Task, f"the suite's app uses {base.__mro__}"
