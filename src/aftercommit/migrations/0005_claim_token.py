"""A claim writes a token; a sender settles only the rows it still holds under it."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("aftercommit", "0004_once_and_debounce"),
    ]

    operations = [
        migrations.AddField(
            model_name="outboxmessage",
            name="claim_token",
            field=models.CharField(
                blank=True,
                null=True,
                help_text="The batch that claimed it last: a sender settles only rows it still holds.",
                max_length=16,
            ),
        ),
    ]
