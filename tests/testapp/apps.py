import os

from django.apps import AppConfig
from django.db.backends.signals import connection_created


def _sqlite_wal(sender, connection, **kwargs):  # type: ignore[no-untyped-def]
    # Readers (the worker) must not block behind a writer (the test): the race needs real reads.
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")


def _cut_own_connection_every(every: int):  # type: ignore[no-untyped-def]
    """The fault suite's hook: after every ``every``-th publish, the publishing thread's database
    connection is terminated by the server, between the publish and the mark that follows it."""
    count = 0

    def cut(sender=None, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal count
        count += 1
        if count % every:
            return
        from django.db import DatabaseError, connections

        try:
            with connections["default"].cursor() as cursor:
                cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        except DatabaseError:
            pass  # the server ended the connection as asked; the relay finds out when it marks

    return cut


class TestappConfig(AppConfig):
    name = "tests.testapp"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        connection_created.connect(_sqlite_wal)
        every = os.environ.get("AFTERCOMMIT_TEST_CUT_AFTER_PUBLISH")
        if every:
            from celery.signals import after_task_publish

            after_task_publish.connect(_cut_own_connection_every(int(every)), weak=False)
