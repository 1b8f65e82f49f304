"""The relay inside every Celery worker: a worker bootstep, Celery's public extension point.

Added to each app that uses aftercommit's task class (``Task.on_bound``), so ``celery worker`` is
all a deployment runs. The relay is a thread of the worker's main process, started after the pool
has forked its children; the workers share the work through the claim. Turn it off with
``AFTERCOMMIT["RELAY_IN_WORKER"] = False`` and run ``manage.py aftercommit relay`` instead.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, bootsteps

logger = logging.getLogger("aftercommit.worker")

#: Seconds the worker's shutdown waits for the relay to finish the batch in hand.
STOP_TIMEOUT = 30.0


class RelayStep(bootsteps.StartStopStep):  # type: ignore[misc]
    label = "aftercommit relay"
    # After the pool: a prefork pool forks its children before the relay's thread exists.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.relay: Any = None
        self.thread: threading.Thread | None = None

    def start(self, worker: Any) -> None:
        from django.apps import apps

        if not apps.ready:
            logger.warning(
                "aftercommit: Django is not set up in this worker, so it relays nothing. Load "
                "Django in the Celery app module (app.config_from_object('django.conf:settings', "
                "namespace='CELERY')) or run `manage.py aftercommit relay`."
            )
            return
        from .conf import settings
        from .relay import Relay

        if not settings.RELAY_IN_WORKER:
            return
        self.relay = Relay(worker.app)
        self.thread = threading.Thread(target=self.relay.run, name="aftercommit-relay", daemon=True)
        self.thread.start()

    def stop(self, worker: Any) -> None:
        relay, thread = self.relay, self.thread
        self.relay = self.thread = None
        if relay is None or thread is None:
            return
        relay.stop()
        thread.join(STOP_TIMEOUT)
        if thread.is_alive():
            logger.warning("aftercommit relay did not stop within %ss", STOP_TIMEOUT)

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)

    def terminate(self, worker: Any) -> None:
        self.stop(worker)


def add_relay_step(app: Celery) -> None:
    app.steps["worker"].add(RelayStep)
