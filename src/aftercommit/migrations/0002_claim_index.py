# The claim reads due rows in (due_at, id) order: an index in that order lets it stop after a batch
# instead of sorting the whole backlog. The new index exists before the old one goes. On PostgreSQL
# both are built and dropped CONCURRENTLY: an outbox keeps millions of sent rows, and a plain
# CREATE INDEX would block every dispatch (an INSERT) for the whole build.

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from django.db import migrations, models


@contextmanager
def concurrently(schema_editor: Any) -> Iterator[None]:
    """On PostgreSQL, the index DDL the operation runs is CONCURRENTLY; elsewhere unchanged."""
    if schema_editor.connection.vendor != "postgresql":
        yield
        return
    schema_editor.add_index = partial(schema_editor.add_index, concurrently=True)
    schema_editor.remove_index = partial(schema_editor.remove_index, concurrently=True)
    try:
        yield
    finally:
        del schema_editor.add_index, schema_editor.remove_index


class Online:
    def database_forwards(self, app_label: str, schema_editor: Any, *states: Any) -> None:
        with concurrently(schema_editor):
            super().database_forwards(app_label, schema_editor, *states)  # type: ignore[misc]

    def database_backwards(self, app_label: str, schema_editor: Any, *states: Any) -> None:
        with concurrently(schema_editor):
            super().database_backwards(app_label, schema_editor, *states)  # type: ignore[misc]


class AddIndexOnline(Online, migrations.AddIndex):
    pass


class RemoveIndexOnline(Online, migrations.RemoveIndex):
    pass


class Migration(migrations.Migration):
    atomic = False  # CREATE/DROP INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [
        ("aftercommit", "0001_initial"),
    ]

    operations = [
        AddIndexOnline(
            model_name="outboxmessage",
            index=models.Index(fields=["status", "due_at", "id"], name="aftercommit_claim"),
        ),
        RemoveIndexOnline(
            model_name="outboxmessage",
            name="aftercommit_status_due",
        ),
    ]
