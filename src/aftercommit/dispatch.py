"""A task call inside a transaction becomes an outbox row in that transaction, handed to the
publisher after commit. Everything that can be wrong with the call is checked here, before anything
is stored.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone
from kombu import serialization
from kombu.exceptions import ContentDisallowed, EncodeError
from kombu.utils import json as kombu_json

from . import signals
from .conf import settings
from .exceptions import AmbiguousDatabaseError, DispatchError
from .models import OutboxMessage

if TYPE_CHECKING:
    from celery import Task as CeleryTask

# What Celery's apply_async and kombu's Producer.publish accept; anything else is a typo that plain
# Celery would silently put in the message headers.
SEND_OPTIONS = frozenset(
    {
        "add_to_parent", "chain", "chord", "compression", "content_encoding", "content_type",
        "countdown", "delivery_mode", "eta", "exchange", "exchange_type", "expires", "group_id",
        "group_index", "headers", "ignore_result", "immediate", "link", "link_error", "mandatory",
        "parent_id", "priority", "queue", "replaced_task_nesting", "reply_to", "retries", "retry",
        "retry_policy", "root_id", "route_name", "routing_key", "serializer", "shadow",
        "soft_time_limit", "stamped_headers", "stamps", "task_type", "time_limit", "timeout",
        "declare", "argsrepr", "kwargsrepr", "expiration", "user_id", "message_ttl",
    }
)  # fmt: skip

# Meaningful only in the calling process, so not stored: the publisher brings its own producer and
# its own retry policy (a failed send is the relay's to retry, with backoff).
LOCAL_OPTIONS = frozenset(
    {
        "producer", "connection", "publisher", "router", "result_cls", "retry", "retry_policy",
        "add_to_parent", "task_type",
    }
)  # fmt: skip

BINARY = "binary"


def time_ordered_uuid() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): Unix milliseconds, then random bits.

    The message id is the Celery task id and the outbox's unique key. A random (v4) id puts each
    new row on a random page of that index, which stops fitting in memory once millions of sent
    rows are kept: measured, one buffer miss and a full-page image (15x the WAL) per dispatch.
    Time-ordered ids land on the index's right edge, as the primary key does.
    """
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # RFC 9562 variant
    return uuid.UUID(int=value)


def user_atomic_open(connection: BaseDatabaseWrapper) -> bool:
    """An atomic block opened by code, not the one Django's TestCase wraps around each test."""
    return any(not getattr(block, "_from_testcase", False) for block in connection.atomic_blocks)


def resolve_alias(using: str | None, task_name: str) -> str:
    """The database whose transaction the message joins."""
    if using is not None:
        if using not in connections.settings:
            raise DispatchError(
                f"{task_name}: using={using!r} is not a database alias. "
                f"Configured aliases: {', '.join(connections.settings)}."
            )
        alias = using
    else:
        opened = [c for c in connections.all(initialized_only=True) if c.in_atomic_block]
        by_code = [c.alias for c in opened if user_atomic_open(c)]
        if len(by_code) > 1:
            raise AmbiguousDatabaseError(
                f"{task_name}: atomic blocks are open on several databases "
                f"({', '.join(sorted(by_code))}), so aftercommit cannot tell which commit should "
                f"send the task. Pass using='<alias>' to apply_async() to say which one."
            )
        if by_code:
            alias = by_code[0]
        elif any(c.alias == DEFAULT_DB_ALIAS for c in opened) or not opened:
            alias = DEFAULT_DB_ALIAS
        else:
            alias = opened[0].alias
    connection = connections[alias]
    if not connection.in_atomic_block and not connection.get_autocommit():
        raise DispatchError(
            f"{task_name}: autocommit is off on database {alias!r} and no atomic block is open, "
            f"so there is no commit aftercommit can wait for. Dispatch inside "
            f"transaction.atomic(using={alias!r}), or turn autocommit back on."
        )
    return alias


def encode_arguments(
    task: CeleryTask, args: tuple[Any, ...] | list[Any], kwargs: dict[str, Any], serializer: str
) -> tuple[str, str, str]:
    """Encode (args, kwargs) the way the message body will, refusing what cannot be sent."""
    if serializer == "pickle":
        raise DispatchError(
            f"{task.name}: the pickle serializer is refused: a stored pickle runs code when it is "
            f"read back. Use serializer='json' (the default) and pass ids or plain data."
        )
    try:
        content_type, content_encoding, data = serialization.dumps((args, kwargs), serializer)
    except (EncodeError, TypeError, ValueError) as exc:
        raise DispatchError(
            f"{task.name}: the arguments cannot be encoded with the {serializer!r} serializer "
            f"({exc}). Pass plain values (ids, strings, numbers, lists, dicts), e.g. obj.pk "
            f"instead of obj."
        ) from exc
    except (ContentDisallowed, serialization.SerializerNotInstalled) as exc:
        raise DispatchError(
            f"{task.name}: serializer {serializer!r} is not usable ({exc})."
        ) from exc
    if isinstance(data, bytes):
        if content_encoding == BINARY:
            data = base64.b64encode(data).decode("ascii")
        else:
            data = data.decode(content_encoding)
    limit = settings.MAX_PAYLOAD_BYTES
    if len(data) > limit:
        raise DispatchError(
            f"{task.name}: the encoded arguments are {len(data)} bytes, over the limit of {limit}. "
            f"Store large data in the database or a file and pass its id, or raise "
            f"AFTERCOMMIT['MAX_PAYLOAD_BYTES']."
        )
    return content_type, content_encoding, data


def decode_arguments(message: OutboxMessage) -> tuple[list[Any], dict[str, Any]]:
    data: str | bytes = message.payload
    if message.content_encoding == BINARY:
        data = base64.b64decode(data)
    args, kwargs = serialization.loads(
        data,
        message.content_type,
        message.content_encoding,
        accept=[message.content_type],
    )
    return args, kwargs


def encode_options(task_name: str, options: dict[str, Any]) -> str:
    try:
        return kombu_json.dumps(options)
    except (TypeError, ValueError) as exc:
        raise DispatchError(
            f"{task_name}: a send option cannot be stored ({exc}). Options must be plain values, "
            f"datetimes or Celery signatures."
        ) from exc


def decode_options(message: OutboxMessage) -> dict[str, Any]:
    options: dict[str, Any] = kombu_json.loads(message.options)
    return options


def check_options(task_name: str, options: dict[str, Any]) -> None:
    unknown = sorted(set(options) - SEND_OPTIONS - LOCAL_OPTIONS)
    if unknown:
        raise DispatchError(
            f"{task_name}: unknown option(s) {', '.join(unknown)}. apply_async() accepts "
            f"{', '.join(sorted(SEND_OPTIONS))} and using=<database alias>."
        )
    countdown = options.get("countdown")
    if countdown is not None and not isinstance(countdown, (int, float)):
        raise DispatchError(
            f"{task_name}: countdown must be a number of seconds, got {countdown!r}."
        )
    eta = options.get("eta")
    if eta is not None and not isinstance(eta, (dt.datetime, str)):
        raise DispatchError(f"{task_name}: eta must be a datetime, got {eta!r}.")
    if countdown is not None and eta is not None:
        raise DispatchError(f"{task_name}: pass countdown or eta, not both.")
    expires = options.get("expires")
    if expires is not None and not isinstance(expires, (int, float, dt.datetime, str)):
        raise DispatchError(f"{task_name}: expires must be seconds or a datetime, got {expires!r}.")
    priority = options.get("priority")
    if priority is not None and not (isinstance(priority, int) and 0 <= priority <= 255):
        raise DispatchError(
            f"{task_name}: priority must be an int from 0 to 255, got {priority!r}."
        )


def record(
    task: CeleryTask,
    args: tuple[Any, ...] | list[Any],
    kwargs: dict[str, Any],
    options: dict[str, Any],
    *,
    task_id: str | None,
    using: str | None,
    on_commit: Callable[[OutboxMessage], None],
) -> OutboxMessage:
    """Validate, insert the row in the caller's transaction, call ``on_commit(row)`` after commit.

    ``options`` are the send options already merged the way Celery's apply_async merges them.
    """
    app = task._get_app()
    name = task.name
    if name not in app.tasks:
        raise DispatchError(
            f"{name}: no task of this name is registered in the Celery app {app.main!r}. "
            f"Import the module that defines it (or add it to the app's imports)."
        )
    check_options(name, options)
    alias = resolve_alias(using, name)
    serializer = options.get("serializer") or task.serializer or app.conf.task_serializer
    content_type, content_encoding, payload = encode_arguments(task, args, kwargs, serializer)
    for local in LOCAL_OPTIONS:
        options.pop(local, None)
    if task_id is not None:
        try:
            message_id = uuid.UUID(str(task_id))
        except ValueError as exc:
            raise DispatchError(f"{name}: task_id must be a UUID, got {task_id!r}.") from exc
        # Checked first (only for a caller's own id) so the mistake is a clear error and the
        # caller's transaction stays usable; the unique index still guards a race.
        if OutboxMessage.objects.using(alias).filter(message_id=message_id).exists():
            raise DispatchError(
                f"{name}: task_id {task_id} is already the id of another message in the outbox. "
                f"Task ids must be unique: pass a new one, or none to get one."
            )
    else:
        message_id = time_ordered_uuid()
    encoded_options = encode_options(name, options)

    now = timezone.now()
    message = OutboxMessage.objects.using(alias).insert(
        message_id=message_id,
        task_name=name,
        payload=payload,
        content_type=content_type,
        content_encoding=content_encoding,
        options=encoded_options,
        created_at=now,
        due_at=now + dt.timedelta(seconds=settings.GRACE_PERIOD),
    )

    signals.send(signals.recorded, message=message, using=alias)

    def hand_over() -> None:
        on_commit(message)

    # One hook per message: Django drops the hooks of a rolled-back savepoint for us, and a hook
    # registered outside a transaction runs at once. Robust: nothing raises into the caller after
    # the data was committed.
    connections[alias].on_commit(hand_over, robust=True)
    return message
