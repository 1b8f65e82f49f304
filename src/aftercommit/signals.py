"""Django signals for each step of a message's life, for metrics and audit.

Every signal is sent with ``sender=OutboxMessage``; receivers get the keyword arguments below.
A receiver that raises is logged and ignored (``send_robust``): observing must not break sending.

- ``recorded(message, using)``: a call was stored in the caller's transaction (not yet committed).
- ``sent(message, using, latency)``: the broker took it; ``latency`` is seconds since the commit
  (or, for a message the relay sent, since it was recorded).
- ``retried(message, using, error, attempts)``: a send failed and will be tried again.
- ``dead(message, using, error, attempts)``: it failed ``MAX_ATTEMPTS`` times: a dead letter.
- ``replica_fallback(replica, primary, task_name, task_id, waited)``: a listed replica had not
  replayed a task's commit after ``REPLICA_WAIT`` seconds; that task reads from ``primary``.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from django.dispatch import Signal

logger = logging.getLogger("aftercommit.signals")

recorded = Signal()
sent = Signal()
retried = Signal()
dead = Signal()
replica_fallback = Signal()


@cache
def _sender() -> Any:
    from .models import OutboxMessage  # (this module is imported before the models can be)

    return OutboxMessage


def send(signal: Signal, **kwargs: Any) -> None:
    """Send without ever raising; the cost is one attribute check when nothing listens (Django's
    own, in ``send_robust``: ``has_listeners()`` would look the receivers up a second time)."""
    if not signal.receivers:
        return
    for receiver, result in signal.send_robust(_sender(), **kwargs):
        if isinstance(result, Exception):
            logger.error("signal receiver %r failed: %r", receiver, result)
