"""The Celery app the relay subprocess sends with: the broker and result backend of the suite
(TEST_BROKER / TEST_BACKEND, as Celery's t/integration/conftest.py reads them)."""

import os

from celery import Celery

app = Celery(
    "celery_suite",
    task_cls="aftercommit.celery:Task",
    broker=os.environ["TEST_BROKER"],
    backend=os.environ["TEST_BACKEND"],
)
app.conf.result_extended = True  # as the suite's celery_config
app.conf.task_create_missing_queues = False
