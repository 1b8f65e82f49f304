"""The relay becomes the only sender: any string as a task id (the outbox's own key is ``id``), the
caller's trace context, what a relay reports about itself, and the commit's wake-up on PostgreSQL."""

from django.db import migrations, models

# A NOTIFY inside the transaction that inserted messages is delivered when it commits, and never if
# it rolls back: the relays LISTENing on the channel wake exactly when there is something to send.
# Statement-level, so a transaction that records many messages still notifies once per INSERT, and
# PostgreSQL folds identical notifications of one transaction into one.
NOTIFY_SQL = """
CREATE OR REPLACE FUNCTION aftercommit_notify() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('aftercommit', '');
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER aftercommit_notify AFTER INSERT ON aftercommit_outboxmessage
    FOR EACH STATEMENT EXECUTE FUNCTION aftercommit_notify();
"""
DROP_NOTIFY_SQL = """
DROP TRIGGER IF EXISTS aftercommit_notify ON aftercommit_outboxmessage;
DROP FUNCTION IF EXISTS aftercommit_notify();
"""


def _on_postgresql(sql: str):  # type: ignore[no-untyped-def]
    def run(apps, schema_editor):  # type: ignore[no-untyped-def]
        if schema_editor.connection.vendor == "postgresql":
            schema_editor.execute(sql)

    return run


class Migration(migrations.Migration):
    dependencies = [("aftercommit", "0002_claim_index")]

    operations = [
        migrations.RenameField("outboxmessage", "message_id", "task_id"),
        migrations.AlterField(
            model_name="outboxmessage",
            name="task_id",
            field=models.CharField(
                db_index=True,
                help_text="The Celery task id. Celery may reuse one (replace(), a re-applied signature).",
                max_length=255,
            ),
        ),
        migrations.AddField(
            model_name="outboxmessage",
            name="trace",
            field=models.TextField(
                blank=True,
                default="",
                help_text="The caller's trace context, restored when sending.",
            ),
        ),
        migrations.AlterField(
            model_name="outboxmessage",
            name="created_at",
            field=models.DateTimeField(help_text="Recorded, by the database's clock."),
        ),
        migrations.AlterField(
            model_name="outboxmessage",
            name="due_at",
            field=models.DateTimeField(
                help_text="When a sender may take this message: at once, lease end or next retry."
            ),
        ),
        migrations.AddField(
            model_name="lease",
            name="detail",
            field=models.TextField(
                blank=True, default="", help_text="What the holder reports, e.g. a setup error."
            ),
        ),
        migrations.RunPython(_on_postgresql(NOTIFY_SQL), _on_postgresql(DROP_NOTIFY_SQL)),
    ]
