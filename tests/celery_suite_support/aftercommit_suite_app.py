"""The Celery app the relay subprocess sends with: the broker and result backend of the suite
(TEST_BROKER / TEST_BACKEND, as Celery's t/integration/conftest.py reads them).

The test process imports it too: aftercommit's system check of the task class reads
AFTERCOMMIT["CELERY_APP"], and Celery's Django fixup runs the checks when a worker starts. So it
must not become the current app there (Celery's default): a test that starts a worker of its own
and then calls a shared task (start_worker's ping) would call it on this app instead."""

import os

from celery import Celery

app = Celery(
    "celery_suite",
    task_cls="aftercommit.celery:Task",
    broker=os.environ["TEST_BROKER"],
    backend=os.environ["TEST_BACKEND"],
    set_as_current=False,
)
app.conf.result_extended = True  # as the suite's celery_config
app.conf.task_create_missing_queues = False
