import os
import threading

from django.apps import AppConfig
from django.db.backends.signals import connection_created


def _sqlite_wal(sender, connection, **kwargs):  # type: ignore[no-untyped-def]
    # Readers (the worker) must not block behind a writer (the test): the race needs real reads.
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("PRAGMA journal_mode=WAL")


def _cut_own_connection_every(every: int):  # type: ignore[no-untyped-def]
    """The fault suite's hook: after every ``every``-th publish, the server terminates the
    connection that marks the batch, between the publish and the mark. That is the publishing
    thread's own connection, or for a full batch the relay's database thread's: the other
    connection with this process's ``application_name`` (the fault test makes it unique), apart
    from the relay's LISTEN connection."""
    count = 0

    def cut(sender=None, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal count
        count += 1
        if count % every:
            return
        from django.db import DatabaseError, connections

        try:
            with connections["default"].cursor() as cursor:
                cursor.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = current_setting('application_name') "
                    "AND datname = current_database() AND pid <> pg_backend_pid() "
                    "AND query NOT LIKE 'LISTEN%%'"
                )
                if cursor.fetchall() or any(
                    t.name.startswith("aftercommit-relay-db") for t in threading.enumerate()
                ):
                    return  # the database thread marks this batch (its connection is cut)
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
