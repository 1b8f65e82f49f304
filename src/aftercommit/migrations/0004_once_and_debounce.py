"""Issue 14: the table of ``once=True`` runs that committed, and debounced messages (a key, and the
status of a message a newer one superseded). The new index is built CONCURRENTLY on PostgreSQL, as
in 0002: a plain CREATE INDEX on the outbox would block every dispatch for the whole build."""

from importlib import import_module

from django.db import migrations, models

AddIndexOnline = import_module("aftercommit.migrations.0002_claim_index").AddIndexOnline


class Migration(migrations.Migration):
    atomic = False  # CREATE INDEX CONCURRENTLY cannot run in a transaction

    dependencies = [("aftercommit", "0003_one_sender")]

    operations = [
        migrations.CreateModel(
            name="OnceRecord",
            fields=[
                ("task_id", models.CharField(max_length=255, primary_key=True, serialize=False)),
                ("task_name", models.CharField(max_length=255)),
                (
                    "done_at",
                    models.DateTimeField(
                        db_index=True, help_text="Committed, by the database's clock."
                    ),
                ),
            ],
            options={"verbose_name": "once record"},
        ),
        migrations.AddField(
            model_name="outboxmessage",
            name="debounce_key",
            field=models.CharField(
                blank=True,
                help_text="Debounced calls: a hash of the task and its key; a newer pending "
                "message with the same key supersedes this one.",
                max_length=64,
                null=True,
            ),
        ),
        migrations.AlterField(
            model_name="outboxmessage",
            name="status",
            field=models.PositiveSmallIntegerField(
                choices=[(0, "pending"), (1, "sent"), (2, "dead"), (3, "superseded")], default=0
            ),
        ),
        AddIndexOnline(
            model_name="outboxmessage",
            index=models.Index(fields=["debounce_key", "id"], name="aftercommit_debounce"),
        ),
    ]
