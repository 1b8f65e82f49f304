# The claim reads due rows in (due_at, id) order: an index in that order lets it stop after a batch
# instead of sorting the whole backlog. The new index exists before the old one goes.

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("aftercommit", "0001_initial"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="outboxmessage",
            index=models.Index(fields=["status", "due_at", "id"], name="aftercommit_claim"),
        ),
        migrations.RemoveIndex(
            model_name="outboxmessage",
            name="aftercommit_status_due",
        ),
    ]
