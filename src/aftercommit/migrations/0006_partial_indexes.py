"""PostgreSQL: the outbox's indexes leave out the rows they are never asked for.

Every sent row is updated twice (claimed, then marked sent), and PostgreSQL writes a new entry in
every index for each update that changes an indexed column, which both of these do. Partial
indexes skip the entries no query reads:

- the claim index (``aftercommit_claim``) leaves out sent rows: a claim, the backlog figures, dead
  letters and superseded rows never look for them, and they are most of a retained outbox;
- ``aftercommit_sent_at`` holds only rows that have a ``sent_at``, and ``aftercommit_debounce``
  only rows that have a ``debounce_key``.

Measured draining 20,000 due rows in batches of 500 (the statements alone): a claim 28 to 22
µs a row, a mark 18 to 13.5. The claim index also stops growing with the sent rows kept for
``RETENTION``.

MariaDB/MySQL have no partial indexes (Django would leave the index out altogether), so the model
keeps the full definitions, which every other database uses; on PostgreSQL the same names are
rebuilt as partial indexes here, without locking out writers (``CONCURRENTLY``).
"""

from django.db import migrations

TABLE = "aftercommit_outboxmessage"
PARTIAL = {
    "aftercommit_claim": "(status, due_at, id) WHERE status <> 1",
    "aftercommit_sent_at": "(sent_at) WHERE sent_at IS NOT NULL",
    "aftercommit_debounce": "(debounce_key, id) WHERE debounce_key IS NOT NULL",
}
FULL = {
    "aftercommit_claim": "(status, due_at, id)",
    "aftercommit_sent_at": "(sent_at)",
    "aftercommit_debounce": "(debounce_key, id)",
}


def _rebuild(definitions: dict[str, str]):  # type: ignore[no-untyped-def]
    def run(apps, schema_editor):  # type: ignore[no-untyped-def]
        if schema_editor.connection.vendor != "postgresql":
            return
        for name, definition in definitions.items():
            # A build that failed half way leaves an invalid index: start from none.
            schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}_rebuilt")
            schema_editor.execute(
                f"CREATE INDEX CONCURRENTLY {name}_rebuilt ON {TABLE} {definition}"
            )
            schema_editor.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
            schema_editor.execute(f"ALTER INDEX {name}_rebuilt RENAME TO {name}")

    return run


class Migration(migrations.Migration):
    atomic = False  # CREATE/DROP INDEX CONCURRENTLY cannot run inside a transaction

    dependencies = [("aftercommit", "0005_claim_token")]

    operations = [migrations.RunPython(_rebuild(PARTIAL), _rebuild(FULL))]
