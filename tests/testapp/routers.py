"""What the worker records lives in the second database: on SQLite the worker's writes would
otherwise queue behind the test's write lock and hide the very race the tests measure."""

from typing import Any


class TaskRunRouter:
    def db_for_read(self, model: type, **hints: Any) -> str | None:
        return "other" if model.__name__ == "TaskRun" else None

    db_for_write = db_for_read


class ReplicaReadRouter:
    """The replica tests' reads: ``ReplicaItem`` is read from the replica when there is one."""

    def db_for_read(self, model: type, **hints: Any) -> str | None:
        from django.conf import settings

        if model.__name__ == "ReplicaItem" and "replica" in settings.DATABASES:
            return "replica"
        return None
