"""A task call inside a transaction becomes an outbox row in that transaction; that is all the
caller's process does. Everything that can be wrong with the call is checked here, before anything
is stored.

The call reaches :func:`record` with what Celery's own ``Task.apply_async`` handed to
``app.send_task`` (argument checks, pydantic conversion, shadow name and the task's execution
options are Celery's code, so a Celery upgrade brings its changes along). The parts of
``send_task`` that depend on the caller (the default task id, the reply queue, the parent task,
the result backend's subscription, the returned result) are done here; building and publishing
the message is the relay's (see :mod:`aftercommit.messages`).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import inspect
import json
import math
import numbers
import os
import time
import uuid
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from celery.backends.base import BaseBackend
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from kombu import serialization
from kombu.exceptions import ContentDisallowed, DecodeError, EncodeError
from kombu.utils import json as kombu_json

from . import debounce as debouncing
from . import signals, tracing, wakeup
from .conf import settings
from .exceptions import AmbiguousDatabaseError, DispatchError
from .models import OutboxMessage, Status

if TYPE_CHECKING:
    from celery import Celery
    from celery import Task as CeleryTask
    from celery.result import AsyncResult

# Meaningful only in the calling process, so never stored: the relay brings its own producer, and
# its own retry policy (a failed send is the relay's to retry, with backoff). task_type and
# result_cls are the caller's objects; add_to_parent is done at the call.
LOCAL_OPTIONS = frozenset(
    {
        "producer", "connection", "publisher", "result_cls", "retry", "retry_policy",
        "add_to_parent", "task_type",
    }
)  # fmt: skip

# Ours, not Celery's: apply_async takes them beside Celery's options.
OWN_OPTIONS = frozenset({"using", "after_commit", "debounce", "debounce_key"})

BINARY = "binary"
# Stored with a call whose args were a list: Celery's argsrepr header shows the args as given.
ARGS_LIST = "aftercommit_args_list"
# Relative times and dates further away than this are mistakes (1e12 seconds is 31,700 years and
# overflows a datetime when the message is built).
MAX_SECONDS = 100 * 365.25 * 24 * 3600


def time_ordered_uuid() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): Unix milliseconds, then random bits.

    The default task id. A random (v4) id puts each new row on a random page of the task id index,
    which stops fitting in memory once millions of sent rows are kept: measured, one buffer miss
    and a full-page image (15x the WAL) per dispatch. Time-ordered ids land on the index's right
    edge, as the primary key does.
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


# Encoding and decoding ----------------------------------------------------------------------------


def encode_arguments(
    task_name: str, args: Any, kwargs: Any, serializer: str
) -> tuple[str, str, str]:
    """Encode (args, kwargs) the way the message body will, refusing what cannot be sent."""
    if not isinstance(args, (list, tuple)):
        # What Celery raises when it builds the message; a string would otherwise be sent as
        # its characters.
        raise TypeError(f"{task_name}: task args must be a list or tuple, got {args!r}.")
    if not isinstance(kwargs, Mapping):
        raise TypeError(f"{task_name}: task keyword arguments must be a mapping, got {kwargs!r}.")
    if serializer == "pickle":
        raise DispatchError(
            f"{task_name}: the pickle serializer is refused: a stored pickle runs code when it is "
            f"read back. Use serializer='json' (the default) and pass ids or plain data."
        )
    try:
        content_type, content_encoding, data = serialization.dumps(
            (list(args), dict(kwargs)), serializer
        )
    except (EncodeError, TypeError, ValueError) as exc:
        raise DispatchError(
            f"{task_name}: the arguments cannot be encoded with the {serializer!r} serializer "
            f"({exc}). Pass plain values (ids, strings, numbers, lists, dicts), e.g. obj.pk "
            f"instead of obj."
        ) from exc
    except (ContentDisallowed, serialization.SerializerNotInstalled) as exc:
        raise DispatchError(
            f"{task_name}: serializer {serializer!r} is not usable ({exc})."
        ) from exc
    if isinstance(data, bytes):
        if content_encoding == BINARY:
            data = base64.b64encode(data).decode("ascii")
        else:
            data = data.decode(content_encoding)
    return content_type, content_encoding, data


def allowed_content_types(app: Celery | None = None) -> frozenset[str]:
    """What a stored row may be decoded as: JSON, and the app's ``accept_content`` minus pickle.

    Fixed by the settings, never by the row: a row that says it is a pickle is refused, so a row
    planted in the table cannot run code when the relay, the admin or a test helper reads it.
    """
    accept = {"json"}
    if app is not None:
        accept.update(app.conf.accept_content or ())
    return _content_types(frozenset(accept))


@lru_cache(maxsize=16)
def _content_types(names: frozenset[str]) -> frozenset[str]:
    types = set(serialization.prepare_accept_content(sorted(names)))
    return frozenset(t for t in types if "pickle" not in t and "python-serialize" not in t)


def decode_arguments(
    message: OutboxMessage, app: Celery | None = None, *, accept: frozenset[str] | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """The row's (args, kwargs); ``ContentDisallowed`` for a content type outside the allow-list
    (``allowed_content_types(app)``, or ``accept`` when the caller already read it)."""
    data: str | bytes = message.payload
    if message.content_encoding == BINARY:
        try:
            data = base64.b64decode(data, validate=True)
        except ValueError as exc:  # binascii.Error
            raise DecodeError(f"the stored arguments are not base64: {exc}") from exc
    if accept is None:
        accept = allowed_content_types(app)
    if message.content_type not in accept:
        raise ContentDisallowed(
            f"refusing to decode content type {message.content_type!r}; allowed: "
            f"{', '.join(sorted(accept))} (AFTERCOMMIT never decodes pickle)"
        )
    try:
        args, kwargs = _loads(data, message.content_type, message.content_encoding, accept)
        return list(args), dict(kwargs)
    except (ValueError, TypeError) as exc:  # not an (args, kwargs) pair
        raise DecodeError(f"the stored arguments are not (args, kwargs): {exc}") from exc


_PLAIN_JSON = json.JSONDecoder()


def _loads(data: str | bytes, content_type: str, content_encoding: str, accept: Any) -> Any:
    """kombu's ``loads``. Its JSON decoder looks at every object for a ``__type__`` marker
    (kombu's encoding of dates, UUIDs, bytes...); a text without one, and without ``\\u``
    escapes that could spell one, decodes to the same values with the plain C decoder, at a
    fraction of the cost (the relay decodes every row it sends)."""
    if (
        content_type == "application/json"
        and content_encoding == "utf-8"
        and type(data) is str
        and data
        and "__type__" not in data
        and "\\u" not in data
        and serialization.registry._decoders.get(content_type) is kombu_json.loads
    ):
        try:
            return _PLAIN_JSON.decode(data)
        except ValueError as exc:  # as kombu reports it
            raise DecodeError(exc) from exc
    return serialization.loads(data, content_type, content_encoding, accept=accept)


def encode_options(task_name: str, options: dict[str, Any]) -> str:
    try:
        return kombu_json.dumps(options)
    except (TypeError, ValueError) as exc:
        raise DispatchError(
            f"{task_name}: a send option cannot be stored ({exc}). Options must be plain values, "
            f"datetimes or Celery signatures (a queue by its name, not a Queue object)."
        ) from exc


def decode_options(message: OutboxMessage) -> dict[str, Any]:
    return decode_options_text(message.options)


def decode_options_text(text: str) -> dict[str, Any]:
    options: dict[str, Any] = kombu_json.loads(text)
    return options


# The call's options -------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def accepted_options(app: Celery) -> frozenset[str]:
    """Every option Celery's own sending path names: ``send_task``, the protocol-2 message builder,
    ``send_task_message``, kombu's ``Producer.publish``, the AMQP message properties, and
    ``Task.apply`` (eager). Taken from Celery and kombu, so a new option in either is accepted.
    """
    from celery import Celery
    from celery import Task as CeleryTask
    from kombu import Producer

    names: set[str] = set()
    for function in (
        Celery.send_task,
        app.amqp.as_task_v2,
        app.amqp.send_task_message,
        Producer.publish,
        CeleryTask.apply,
        CeleryTask.apply_async,
    ):
        names.update(_named_parameters(function))
    try:
        from amqp.basic_message import Message
    except ImportError:  # pragma: no cover - py-amqp is kombu's dependency
        pass
    else:
        names.update(name for name, _ in Message.PROPERTIES)
    # A wrapper without the original's signature (sentry-sdk's around Producer.publish) would hide
    # these: kombu's publish options, named here as well.
    names.update(KOMBU_PUBLISH_OPTIONS)
    names.update({"stamped_headers", "stamps", "task_type", "route_name", "exchange_type"})
    # Celery's canvas copies an errback with ``sig.clone(immutable=True)``, which puts the
    # signature's flag among its send options (``group.link_error`` on Celery 5.4; a chord's
    # header errbacks with ``task_allow_error_cb_on_chord_header``); plain Celery publishes it as
    # a message property.
    names.add("immutable")
    names.discard("self")
    return frozenset(names)


KOMBU_PUBLISH_OPTIONS = frozenset(
    {
        "routing_key", "delivery_mode", "mandatory", "immediate", "priority", "content_type",
        "content_encoding", "serializer", "headers", "compression", "exchange", "retry",
        "retry_policy", "declare", "expiration", "timeout", "confirm_timeout",
    }
)  # fmt: skip


def _named_parameters(function: Any) -> set[str]:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a callable without a signature
        return set()
    return {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def check_options(app: Celery, task_name: str, options: dict[str, Any]) -> None:
    stamps = options.get("stamped_headers") or ()
    if isinstance(stamps, str):
        stamps = (stamps,)
    unknown = sorted(set(options) - accepted_options(app) - LOCAL_OPTIONS - set(stamps))
    if unknown:
        raise DispatchError(
            f"{task_name}: unknown option(s) {', '.join(unknown)}. apply_async() accepts Celery's "
            f"send options (countdown, eta, expires, queue, routing_key, priority, headers, ...), "
            f"stamps named in stamped_headers, and using=<database alias>."
        )
    countdown = options.get("countdown")
    if countdown is not None:
        _check_seconds(task_name, "countdown", countdown)
    eta = options.get("eta")
    if eta is not None:
        _check_date(task_name, "eta", eta)
    if countdown is not None and eta is not None:
        raise DispatchError(f"{task_name}: pass countdown or eta, not both.")
    expires = options.get("expires")
    if expires is not None:
        if isinstance(expires, numbers.Real) and not isinstance(expires, bool):
            _check_seconds(task_name, "expires", expires)
        else:
            _check_date(task_name, "expires", expires)
    priority = options.get("priority")
    if priority is not None and not (
        isinstance(priority, int) and not isinstance(priority, bool) and 0 <= priority <= 255
    ):
        raise DispatchError(
            f"{task_name}: priority must be an int from 0 to 255, got {priority!r}."
        )
    headers = options.get("headers")
    if headers is not None and not isinstance(headers, Mapping):
        raise DispatchError(f"{task_name}: headers must be a dict, got {headers!r}.")
    if options.get("router") is not None:
        raise DispatchError(
            f"{task_name}: router= is an object of the calling process and cannot be stored. "
            f"Route with queue=/routing_key=, or with the app's task_routes."
        )


def _check_seconds(task_name: str, what: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or abs(float(value)) > MAX_SECONDS
    ):
        raise DispatchError(
            f"{task_name}: {what} must be a finite number of seconds (at most 100 years), "
            f"got {value!r}."
        )


def _check_date(task_name: str, what: str, value: Any) -> None:
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise DispatchError(
                f"{task_name}: {what} must be a datetime or an ISO 8601 date and time "
                f"(e.g. '2030-01-01T12:00:00+00:00'), got {value!r}."
            ) from None
    if not isinstance(value, dt.datetime):
        raise DispatchError(
            f"{task_name}: {what} must be a datetime"
            + (" or a number of seconds" if what == "expires" else "")
            + f", got {value!r}."
        )


# Recording ---------------------------------------------------------------------------------


class _ProducerOnDemand:
    """The producer ``backend.on_task_call`` gets: acquired only if the backend uses it. The rpc://
    backend declares the caller's reply queue with it; Redis subscribes without it, so most web
    processes never open a broker connection."""

    def __init__(self, app: Celery) -> None:
        self._app = app
        self._context: Any = None
        self._producer: Any = None

    def __getattr__(self, name: str) -> Any:
        if self._producer is None:
            self._context = self._app.producer_or_acquire(None)
            self._producer = self._context.__enter__()
        return getattr(self._producer, name)

    def release(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)


def _cancel_subscription(backend: BaseBackend, task_id: str) -> None:
    """Undo ``on_task_call`` for a call that stored nothing: no result will ever come."""
    cancel = getattr(getattr(backend, "result_consumer", None), "cancel_for", None)
    if cancel is not None:
        with contextlib.suppress(Exception):  # the call's own error is the one to raise
            cancel(task_id)


def record(
    task: CeleryTask,
    args: Any,
    kwargs: Any,
    options: dict[str, Any],
    *,
    using: str | None,
    debounce: float | None = None,
    debounce_key: str | None = None,
) -> AsyncResult:
    """Validate the call, INSERT its row in the caller's transaction, return its result.

    ``options`` are the keyword arguments Celery's ``apply_async`` gave ``send_task``.
    ``debounce``: see :mod:`aftercommit.debounce`.
    """
    app = task._get_app()
    name = task.name
    if name not in app.tasks:
        raise DispatchError(
            f"{name}: no task of this name is registered in the Celery app {app.main!r}. "
            f"Import the module that defines it (or add it to the app's imports)."
        )
    args = () if args is None else args
    kwargs = {} if kwargs is None else kwargs
    check_options(app, name, options)
    debouncing.check(name, debounce, debounce_key)
    alias = resolve_alias(using, name)
    serializer = options.get("serializer") or task.serializer or app.conf.task_serializer
    content_type, content_encoding, payload = encode_arguments(name, args, kwargs, serializer)

    result_cls = options.get("result_cls") or app.AsyncResult
    add_to_parent = options.get("add_to_parent", True)
    # None values stay: Celery passes them on to the publish as well.
    call = {k: v for k, v in options.items() if k not in LOCAL_OPTIONS}
    task_id = call.pop("task_id", None)
    task_id = str(task_id) if task_id else str(time_ordered_uuid())
    if len(task_id) > 255 or "\x00" in task_id:
        raise DispatchError(
            f"{name}: task_id must be at most 255 characters, without NUL, got {task_id[:40]!r}"
            f"{'...' if len(task_id) > 40 else ''} ({len(task_id)} characters)."
        )
    # What send_task would take from the calling thread, kept for the relay's thread.
    call["reply_to"] = call.get("reply_to") or app.thread_oid
    parent = app.current_worker_task
    if parent is not None:
        if not call.get("root_id"):
            call["root_id"] = parent.request.root_id or parent.request.id
        if not call.get("parent_id"):
            call["parent_id"] = parent.request.id
        if app.conf.task_inherit_parent_priority and call.get("priority") is None:
            call["priority"] = (parent.request.delivery_info or {}).get("priority")
    if isinstance(args, list):  # the body cannot tell; the argsrepr header can
        call[ARGS_LIST] = True
    ignore_result = bool(call.get("ignore_result", False))
    encoded_options = encode_options(name, call)
    limit = settings.MAX_PAYLOAD_BYTES
    size = len(payload) + len(encoded_options)
    if size > limit:
        raise DispatchError(
            f"{name}: the encoded arguments and options are {size} bytes, over the limit of "
            f"{limit}. Store large data in the database or a file and pass its id, or raise "
            f"AFTERCOMMIT['MAX_PAYLOAD_BYTES']."
        )

    values: dict[str, Any] = {
        "task_id": task_id,
        "task_name": name,
        "payload": payload,
        "content_type": content_type,
        "content_encoding": content_encoding,
        "options": encoded_options,
        "trace": tracing.capture(),
        "status": Status.PENDING,
    }
    if debounce is not None:
        values["debounce_key"] = debouncing.key(name, debounce_key, content_type, payload)

    # Celery's send_task tells the result backend of the call before it publishes (Redis
    # subscribes to the result channel, rpc:// declares the caller's reply queue); the row is the
    # publish here, so it is written last. Outside a transaction it commits at once, and the relay
    # may send the task, and a worker run it, before this function returns. Most backends do
    # nothing at the call (the base class's no-op): then no producer stand-in either.
    backend = app.backend
    told = not ignore_result and type(backend).on_task_call is not BaseBackend.on_task_call
    if told:
        producer = _ProducerOnDemand(app)
        try:
            backend.on_task_call(producer, task_id)
        finally:
            producer.release()
    try:
        if debounce is None:
            message = OutboxMessage.objects.using(alias).insert(**values)
        else:
            message = debouncing.insert(alias, float(debounce), values)
    except BaseException:
        if told:
            _cancel_subscription(backend, task_id)
        raise
    signals.send(signals.recorded, message=message, using=alias)
    wakeup.after_commit(alias)

    result: AsyncResult = result_cls(task_id)
    result.ignored = ignore_result
    if add_to_parent and parent is not None:
        parent.add_trail(result)
    return result


def recorded_eagerly(task: CeleryTask, args: Any, kwargs: Any, options: dict[str, Any]) -> None:
    """Under ``task_always_eager`` nothing is stored, but test helpers still hear of the call."""
    if not signals.recorded.has_listeners():
        return
    serializer = options.get("serializer") or task.serializer or "json"
    content_type, content_encoding, payload = encode_arguments(task.name, args, kwargs, serializer)
    message = OutboxMessage(
        task_id=str(options.get("task_id") or ""),
        task_name=task.name,
        payload=payload,
        content_type=content_type,
        content_encoding=content_encoding,
        options="{}",
    )
    signals.send(signals.recorded, message=message, using=None)
