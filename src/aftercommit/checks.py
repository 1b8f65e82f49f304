"""Django system checks for what would make aftercommit silently not do its job.

The checks that query the database are tagged ``database``: they run with
``manage.py check --database default`` (and before ``migrate``), never at every start-up.
"""

from __future__ import annotations

import sys
from typing import Any

from django.core import checks
from django.db import DatabaseError, connections

# A pending message older than this, past its due time, means nothing is relaying.
STALE_AFTER_SECONDS = 60.0


def register() -> None:
    checks.register(check_task_class, "aftercommit")
    checks.register(check_eager, "aftercommit")
    checks.register(check_replicas, "aftercommit")
    checks.register(check_database, "aftercommit", checks.Tags.database)


def _app() -> Any:
    from .operations import celery_app

    return celery_app()


def check_task_class(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from .celery import Task

    app = _app()
    task_cls = app.Task
    if isinstance(task_cls, type) and issubclass(task_cls, Task):
        return []
    name = f"{task_cls.__module__}.{task_cls.__qualname__}"
    return [
        checks.Warning(
            f"The Celery app {app.main!r} uses the task class {name}, not aftercommit's: its "
            f"tasks are published at the call, even inside a transaction.",
            hint="Create the app with Celery(..., task_cls='aftercommit.celery:Task') (a custom "
            "task class can subclass aftercommit.celery.Task), or set AFTERCOMMIT['CELERY_APP'] "
            "to the app that does.",
            id="aftercommit.W001",
        )
    ]


def running_tests() -> bool:
    """A test run: ``manage.py test`` or pytest is running."""
    return "pytest" in sys.modules or (len(sys.argv) > 1 and sys.argv[1] == "test")


def check_eager(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    app = _app()
    if not app.conf.task_always_eager or running_tests():
        return []
    return [
        checks.Warning(
            f"task_always_eager is on for the Celery app {app.main!r} outside tests: every task "
            f"runs in the web process, at commit, and nothing reaches the broker.",
            hint="Turn CELERY_TASK_ALWAYS_EAGER off outside tests.",
            id="aftercommit.W002",
        )
    ]


def check_replicas(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    from django.db import router

    from . import replicas
    from .conf import settings

    listed = settings.REPLICAS
    if not listed:
        return []
    messages: list[checks.CheckMessage] = []
    for alias in listed:
        problem = replicas.configuration_problem(alias)
        if problem:
            messages.append(
                checks.Error(
                    problem,
                    hint="List only aliases of PostgreSQL streaming replicas of a PostgreSQL "
                    "database; set each one's TEST['MIRROR'] to its primary (default: 'default').",
                    id="aftercommit.E008",
                )
            )
    name = "aftercommit.replicas.ReplicaRouter"
    if not router.routers or not isinstance(router.routers[0], replicas.ReplicaRouter):
        messages.append(
            checks.Error(
                f"AFTERCOMMIT['REPLICAS'] lists {', '.join(map(repr, listed))} but {name} is not "
                f"the first of DATABASE_ROUTERS: a task's reads would still go to a replica that "
                f"has not replayed the commit that dispatched it.",
                hint=f"DATABASE_ROUTERS = [{name!r}, *your_routers]; your routers still decide "
                f"where reads go.",
                id="aftercommit.E009",
            )
        )
    return messages


def check_database(
    app_configs: Any = None, databases: Any = None, **kwargs: Any
) -> list[checks.CheckMessage]:
    from .models import Lease, OutboxMessage, Status, later
    from .relay import HEARTBEAT_PREFIX, outbox_aliases

    messages: list[checks.CheckMessage] = []
    for alias in databases or ():
        if alias not in outbox_aliases():
            continue
        connection = connections[alias]
        try:
            tables = connection.introspection.table_names()
            if OutboxMessage._meta.db_table not in tables or Lease._meta.db_table not in tables:
                # A warning, not an error: `manage.py migrate` runs these checks before it
                # migrates, and an error would stop the very command that creates the tables.
                messages.append(
                    checks.Warning(
                        f"The outbox tables are missing on database {alias!r}: every task call "
                        f"will fail until it is migrated.",
                        hint=f"Run: python manage.py migrate aftercommit --database {alias}",
                        id="aftercommit.W003",
                    )
                )
                continue
            relays = list(Lease.objects.using(alias).alive(HEARTBEAT_PREFIX))
            for error in sorted({r.detail for r in relays if r.detail}):
                messages.append(
                    checks.Error(
                        f"A relay on database {alias!r} cannot send: {error}",
                        hint="Fix the broker setup named above; the messages wait meanwhile.",
                        id="aftercommit.E007",
                    )
                )
            skip_locked = connection.features.has_select_for_update_skip_locked
            if len(relays) > 1 and not skip_locked:
                holders = ", ".join(sorted(r.holder for r in relays))
                messages.append(
                    checks.Warning(
                        f"{len(relays)} relays run on database {alias!r} ({holders}), which has "
                        f"no SELECT ... FOR UPDATE SKIP LOCKED: only one can claim at a time, the "
                        f"others only wait for the lease.",
                        hint="Run a single relay for this database.",
                        id="aftercommit.W004",
                    )
                )
            waiting = (
                OutboxMessage.objects.using(alias)
                .filter(status=Status.PENDING, due_at__lt=later(-STALE_AFTER_SECONDS))
                .count()
            )
            if waiting and not relays:
                messages.append(
                    checks.Warning(
                        f"{waiting} message(s) on database {alias!r} have waited over "
                        f"{STALE_AFTER_SECONDS:.0f} s past their due time and no relay has been "
                        f"seen recently.",
                        hint="Start a Celery worker (it relays unless "
                        "AFTERCOMMIT['RELAY_IN_WORKER'] is False), or: "
                        f"python manage.py aftercommit relay --database {alias}",
                        id="aftercommit.W005",
                    )
                )
        except DatabaseError as exc:
            messages.append(
                checks.Warning(
                    f"Could not check the outbox on database {alias!r}: {exc}",
                    hint="Make sure the database is reachable, then run the checks again.",
                    id="aftercommit.W006",
                )
            )
    return messages
