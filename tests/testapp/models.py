from django.db import models


class Item(models.Model):
    """What a task reads back: the version the caller saved."""

    name = models.CharField(max_length=100)
    version = models.IntegerField(default=0)


class ReplicaItem(Item):
    """The same rows, read through a router that prefers the replica (tests/test_replicas.py)."""

    class Meta:
        proxy = True


class TaskRun(models.Model):
    """What the worker saw when the task ran."""

    token = models.CharField(max_length=100, db_index=True)
    task_id = models.CharField(max_length=100)
    item_id = models.BigIntegerField(null=True)
    expected_version = models.IntegerField(null=True)
    seen_version = models.IntegerField(null=True)  # None: the row did not exist yet
    started_at = models.FloatField()
    eta = models.CharField(max_length=64, blank=True)
    queue = models.CharField(max_length=100, blank=True)
    priority = models.IntegerField(null=True)
    headers = models.TextField(blank=True)
