"""What the worker records lives in the second database: on SQLite the worker's writes would
otherwise queue behind the test's write lock and hide the very race the tests measure."""

from typing import Any


class TaskRunRouter:
    def db_for_read(self, model: type, **hints: Any) -> str | None:
        return "other" if model.__name__ == "TaskRun" else None

    db_for_write = db_for_read
