"""Outbox rows to Celery messages: what ``app.send_task`` does after the call's front half, in bulk.

The caller's process stored what Celery's ``apply_async`` handed to ``send_task``
(:mod:`aftercommit.dispatch`). Here the relay routes each call and builds its protocol-2 message
with Celery's own ``amqp.create_task_message``, to be published with Celery's own
``amqp.send_task_message`` (so ``before_task_publish`` and ``after_task_publish`` fire with the
headers Celery gives). What ``send_task`` would look up for every message (settings, the node name,
the argument reprs' limits) is read once per batch. A contract test compares the result with what
plain ``apply_async`` publishes for the same call, on every supported Celery version.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from celery.utils.functional import maybe_list
from celery.utils.nodenames import anon_nodename
from celery.utils.saferepr import saferepr
from celery.utils.time import maybe_make_aware
from dateutil.parser import isoparse
from kombu import Exchange

from .dispatch import ARGS_LIST, allowed_content_types, decode_arguments, decode_options

if TYPE_CHECKING:
    from celery import Celery

    from .models import OutboxMessage

try:  # Celery 5.5+: native delayed delivery on quorum queues, and an AMQP expiration
    from celery.utils.quorum_queues import detect_quorum_queues
    from celery.utils.time import subtract_datetimes
    from kombu.transport.native_delayed_delivery import calculate_routing_key
except ImportError:  # pragma: no cover - Celery 5.4
    detect_quorum_queues = None  # type: ignore[assignment]
    calculate_routing_key = None  # type: ignore[assignment]
    subtract_datetimes = None  # type: ignore[assignment]

# The arguments send_task passes to create_task_message by position or by name; the rest of a
# call's options go to the message builder and the publisher as they are.
_CALL_ARGUMENTS = (
    "countdown", "eta", "expires", "group_id", "group_index", "retries", "chord", "link",
    "link_error", "reply_to", "time_limit", "soft_time_limit", "root_id", "parent_id",
    "route_name", "shadow", "chain", "replaced_task_nesting", "ignore_result",
)  # fmt: skip


@dataclass
class Outgoing:
    """One row, built: Celery's ``(headers, properties, body, sent_event)``, publish options."""

    row: OutboxMessage
    name: str
    message: Any
    options: dict[str, Any]


class Builder:
    """Builds the messages of one batch; Celery's settings are read once, here."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.amqp = app.amqp
        conf = app.conf
        self.send_sent_event = bool(conf.task_send_sent_event)
        # Celery 5.5+ limits the reprs' depth too; 5.4 has no such setting.
        levels = conf.get("task_repr_maxlevels")
        self.repr_depth = {} if levels is None else {"maxlevels": levels}
        self.argsrepr_maxsize = self.amqp.argsrepr_maxsize
        self.kwargsrepr_maxsize = self.amqp.kwargsrepr_maxsize
        self.origin = anon_nodename()
        self.accept = allowed_content_types(app)
        self._quorum: bool | None = None

    def build(self, row: OutboxMessage) -> Outgoing:
        app = self.app
        name = row.task_name
        decoded, kwargs = decode_arguments(row, accept=self.accept)
        options = decode_options(row)
        call = {key: options.pop(key, None) for key in _CALL_ARGUMENTS}
        # As the caller gave them: delay() and most calls give a tuple, which JSON cannot tell.
        args: tuple[Any, ...] | list[Any] = (
            decoded if options.pop(ARGS_LIST, False) else tuple(decoded)
        )
        task_type = app.tasks.get(name)
        options = self.amqp.router.route(
            options, call["route_name"] or name, args, kwargs, task_type
        )
        countdown, eta, expires = call["countdown"], call["eta"], call["expires"]
        if (eta or countdown) and self._native_delayed_delivery():
            self._delay_natively(options, countdown, eta)
        if expires is not None:  # an AMQP expiration too, in seconds
            options["expiration"] = self._expiration(expires)
        # Computed here, once per batch's settings, unless the call gave them (then they stay in
        # the options, which Celery also passes on to the publish).
        reprs = {}
        if options.get("argsrepr") is None:
            reprs["argsrepr"] = saferepr(args, self.argsrepr_maxsize, **self.repr_depth)
        if options.get("kwargsrepr") is None:
            reprs["kwargsrepr"] = saferepr(kwargs, self.kwargsrepr_maxsize, **self.repr_depth)
        message = self.amqp.create_task_message(
            row.task_id, name, args, kwargs, countdown, eta, call["group_id"],
            call["group_index"], expires, call["retries"] or 0, call["chord"],
            maybe_list(call["link"]), maybe_list(call["link_error"]), call["reply_to"],
            call["time_limit"], call["soft_time_limit"], self.send_sent_event, call["root_id"],
            call["parent_id"], call["shadow"], call["chain"],
            ignore_result=bool(call["ignore_result"]),
            replaced_task_nesting=call["replaced_task_nesting"] or 0,
            origin=self.origin, **reprs, **options,
        )  # fmt: skip
        for stamp in options.pop("stamped_headers", None) or ():
            options.pop(stamp, None)
        return Outgoing(row, name, message, options)

    # What send_task does for quorum queues and expiring messages (Celery 5.5+) ------------------

    def _native_delayed_delivery(self) -> bool:
        if detect_quorum_queues is None:
            return False
        if self._quorum is None:
            driver_type = self.app.producer_pool.connections.connection.transport.driver_type
            self._quorum = bool(detect_quorum_queues(self.app, driver_type)[0])
        return self._quorum

    def _delay_natively(self, options: dict[str, Any], countdown: Any, eta: Any) -> None:
        queue = options.get("queue")
        exchange_type = queue.exchange.type if queue else options["exchange_type"]
        routing_key = queue.routing_key if queue else options["routing_key"]
        if exchange_type == "direct":
            return  # Celery warns and lets the worker hold the message until its ETA
        if eta:
            if isinstance(eta, str):
                eta = isoparse(eta)
            countdown = subtract_datetimes(eta, self.app.now()).total_seconds()
        if countdown and countdown > 0:
            options.pop("queue", None)
            options["routing_key"] = calculate_routing_key(int(countdown), routing_key)
            options["exchange"] = Exchange("celery_delayed_27", type="topic")

    def _expiration(self, expires: Any) -> Any:
        if isinstance(expires, str):
            expires = isoparse(expires)
        if isinstance(expires, dt.datetime):
            expires = (maybe_make_aware(expires) - self.app.now()).total_seconds()
        return max(expires, 0)  # Celery sends an expiry already past as 0
