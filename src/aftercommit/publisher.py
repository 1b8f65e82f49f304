"""Outbox rows to Celery messages to the broker, then marked sent: the one path both the in-process
publisher (right after commit) and the relay (later, for what the publisher could not send) use.
"""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from amqp.exceptions import MessageNacked
from celery import Celery
from django.db import connections
from django.utils import timezone
from kombu import Connection

from . import guard, signals
from .conf import settings
from .dispatch import decode_arguments, decode_options
from .models import OutboxMessage

try:
    from kombu.exceptions import BatchPublishError
except ImportError:  # kombu < 5.7 has no publish batches: every publish is its own write

    class BatchPublishError(Exception):  # type: ignore[no-redef]
        pass


logger = logging.getLogger("aftercommit.publisher")

#: Messages written to the broker at once (one pipelined write on Redis), and the most commands
#: such a write may hold (a queue with x-expires adds one per priority step to each message).
CHUNK_SIZE = 500
BATCH_MAX_COMMANDS = CHUNK_SIZE * 16
#: Seconds to wait, in all, for the broker to confirm a batch (AMQP).
CONFIRM_TIMEOUT = 30.0


class BrokerUnavailable(Exception):
    """The broker could not be reached; the messages themselves are fine."""


class BatchRefused(MessageNacked):  # type: ignore[misc]
    """The broker refused some of a batch (AMQP nack, e.g. a full queue); it took the others."""

    def __init__(self, taken: list[Any]) -> None:
        super().__init__("the broker refused part of a batch (a full queue?)")
        self.taken = taken  # the messages it took


@dataclass
class Outcome:
    """What became of a batch: sent, failed on their own, or not tried (the broker was down)."""

    sent: list[OutboxMessage] = field(default_factory=list)
    failed: list[tuple[OutboxMessage, BaseException]] = field(default_factory=list)
    unsent: list[OutboxMessage] = field(default_factory=list)
    broker_error: BaseException | None = None


class Channel:
    """One held broker connection and producer, owned by one thread."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.connection: Connection | None = None
        self.producer: Any = None
        self.confirms = False
        self._published = 0  # the last AMQP delivery tag on the current channel
        self.current: Any = None  # the message being published, set by send()

    def open(self) -> Any:
        if self.producer is None:
            connection = self.app.connection_for_write()
            self.confirms = connection.transport.driver_type == "amqp"
            if self.confirms:
                # Without confirms a publish on a connection the broker already dropped "succeeds"
                # into the socket buffer and the message is lost; we would mark it sent.
                connection = self.app.connection_for_write(
                    transport_options={"confirm_publish": True}
                )
            try:
                connection.ensure_connection(max_retries=1)
            except Exception as exc:
                self._discard(connection, broken=True)
                raise BrokerUnavailable(str(exc)) from exc
            self.connection = connection
            self.producer = self.app.amqp.Producer(connection, auto_declare=False)
        return self.producer

    @contextmanager
    def batch(self) -> Iterator[bool]:
        """Publishes inside go to the broker together; yields whether they really do.

        Redis (kombu 5.7+): one pipelined write at the end. AMQP with publisher confirms: every
        publish goes out at once and the broker's acks are awaited once, at the end, instead of
        one round trip a message. Anything else publishes one by one (yields False).
        """
        producer = self.producer
        if hasattr(producer, "batch") and getattr(producer, "supports_batch_publish", False):
            with producer.batch(max_size=BATCH_MAX_COMMANDS):
                yield True
        elif self.confirms:
            with self._confirmed_together(producer.channel):
                yield True
        else:
            yield False

    @contextmanager
    def _confirmed_together(self, channel: Any) -> Iterator[None]:
        if not channel._confirm_selected:
            channel._confirm_selected = True
            channel.confirm_select()
        # Delivery tags number this channel's publishes from 1; only this class publishes on it.
        # Acks are listened to as events: one may arrive while kombu waits for something else
        # (a queue declaration) in the middle of the batch.
        first = self._published + 1
        answers: dict[int, bool] = {}  # delivery tag -> taken (ack) or refused (nack)
        in_order: list[Any] = []  # what each publish of the batch carried, by tag - first

        def answer(taken: bool) -> Callable[[int, bool], None]:
            def record(delivery_tag: int, multiple: bool) -> None:
                tags = range(first, delivery_tag + 1) if multiple else (delivery_tag,)
                for tag in tags:  # "multiple" answers every tag up to it not answered yet
                    answers.setdefault(tag, taken)

            return record

        on_ack, on_nack = answer(True), answer(False)

        def publish_now(*args: Any, **kwargs: Any) -> Any:
            kwargs.pop("confirm_timeout", None)
            result = channel._basic_publish(*args, **kwargs)
            self._published += 1
            in_order.append(self.current)
            return result

        confirm_each = channel.basic_publish  # py-amqp's confirm-mode publish waits each time
        channel.basic_publish = publish_now
        channel.events["basic_ack"].add(on_ack)
        channel.events["basic_nack"].add(on_nack)
        try:
            yield
            tags = range(first, self._published + 1)
            deadline = time.monotonic() + CONFIRM_TIMEOUT
            while any(tag not in answers for tag in tags):
                remaining = deadline - time.monotonic()
                if remaining <= 0:  # a broker error: the batch is handed back, like an outage
                    raise TimeoutError(f"no publisher confirms within {CONFIRM_TIMEOUT}s")
                channel.connection.drain_events(timeout=remaining)
            if not all(answers[tag] for tag in tags):
                raise BatchRefused([in_order[tag - first] for tag in tags if answers[tag]])
        finally:
            channel.basic_publish = confirm_each
            channel.events["basic_ack"].discard(on_ack)
            channel.events["basic_nack"].discard(on_nack)

    def reset(self, *, broken: bool = False) -> None:
        connection, self.connection, self.producer = self.connection, None, None
        self._published = 0
        if connection is not None:
            self._discard(connection, broken=broken)

    @staticmethod
    def _discard(connection: Connection, *, broken: bool) -> None:
        try:
            if broken:  # no goodbye on a dead socket: just release it
                connection.collect()
            else:
                connection.close()
        except Exception:  # it is gone either way
            logger.debug("closing a broker connection failed", exc_info=True)

    def broker_errors(self) -> tuple[type[BaseException], ...]:
        connection = self.connection or self.app.connection_for_write()
        from kombu.exceptions import OperationalError

        return (
            OperationalError,
            ConnectionError,
            TimeoutError,
            OSError,
            *connection.connection_errors,
            *connection.channel_errors,
        )


def _send_time_options(message: OutboxMessage, options: dict[str, Any]) -> dict[str, Any]:
    """Relative times count from the commit (or, for the relay, the row's creation)."""
    base_ts = getattr(message, "committed_at", None)
    base = (
        dt.datetime.fromtimestamp(base_ts, tz=dt.timezone.utc)
        if base_ts is not None
        else _aware(message.created_at)
    )
    countdown = options.pop("countdown", None)
    if countdown:
        options["eta"] = base + dt.timedelta(seconds=countdown)
    expires = options.get("expires")
    if isinstance(expires, (int, float)) and not isinstance(expires, bool):
        options["expires"] = base + dt.timedelta(seconds=expires)
    return options


def _aware(value: dt.datetime) -> dt.datetime:
    if timezone.is_naive(value):
        return timezone.make_aware(value, dt.timezone.utc)
    return value


def send(app: Celery, messages: Sequence[OutboxMessage], channel: Channel) -> Outcome:
    """Publish ``messages`` in order with one producer. Stops at the first broker error.

    Where the transport can, each chunk of messages goes to the broker together (see
    ``Channel.batch``: one pipelined write on Redis, one wait for confirms on AMQP) instead of one
    round trip a message. A chunk whose write fails or is refused has an uncertain outcome, so it
    counts as unsent: sending it again may duplicate a message, never lose one.
    """
    outcome = Outcome()
    errors = channel.broker_errors()
    pending = deque(messages)
    reconnected = False
    while pending:
        try:
            producer = channel.open()
        except BrokerUnavailable as exc:
            outcome.broker_error = exc
            break
        chunk = [pending.popleft() for _ in range(min(CHUNK_SIZE, len(pending)))]
        published: list[OutboxMessage] = []
        batched = True  # until the batch says otherwise, nothing of the chunk is known sent
        try:
            with channel.batch() as batched:
                for message in chunk:
                    channel.current = message
                    try:
                        _publish(app, producer, message)
                    except (*errors, BatchPublishError, MessageNacked):
                        raise
                    except Exception as exc:  # this message cannot be sent: its own failure
                        outcome.failed.append((message, exc))
                    else:
                        published.append(message)
        except BatchRefused as exc:
            # The broker answered for every message: what it took is sent, what it refused waits
            # (like an outage: no attempt used). Trying again at once would be refused again.
            taken = exc.taken
            outcome.sent.extend(taken)
            done = {id(m) for m in taken} | {id(m) for m, _ in outcome.failed}
            pending.extendleft(reversed([m for m in chunk if id(m) not in done]))
            outcome.broker_error = exc
            break
        except (*errors, BatchPublishError, MessageNacked) as exc:
            channel.reset(broken=True)
            failed = {id(m) for m, _ in outcome.failed}
            if batched:  # nothing of the chunk is known to have arrived
                retry = [m for m in chunk if id(m) not in failed]
            else:  # each publish before the error went out on its own
                outcome.sent.extend(published)
                done = {id(m) for m in published} | failed
                retry = [m for m in chunk if id(m) not in done]
            pending.extendleft(reversed(retry))
            if reconnected:
                outcome.broker_error = exc
                break
            reconnected = True  # a held connection may have gone stale: one fresh try
            continue
        reconnected = False
        outcome.sent.extend(published)
    outcome.unsent.extend(pending)
    return outcome


def _publish(app: Celery, producer: Any, message: OutboxMessage) -> None:
    """One row through Celery's own message building, with the row's id as the task id."""
    args, kwargs = decode_arguments(message)
    options = _send_time_options(message, decode_options(message))
    with guard.exempt():  # committed rows: never an unsafe publish
        app.send_task(
            message.task_name,
            args,
            kwargs,
            task_id=str(message.message_id),
            producer=producer,
            task_type=app.tasks.get(message.task_name),
            add_to_parent=False,
            retry=False,
            **options,
        )


def mark_sent(messages: Iterable[OutboxMessage]) -> None:
    """One UPDATE per database for the whole batch."""
    by_alias: dict[str, list[OutboxMessage]] = {}
    for message in messages:
        by_alias.setdefault(message._state.db or "default", []).append(message)
    now = timezone.now()
    for alias, batch in by_alias.items():
        OutboxMessage.objects.using(alias).mark_sent([m.id for m in batch], now)
        if signals.sent.has_listeners():
            for message in batch:
                committed = getattr(message, "committed_at", None)
                since = committed if committed is not None else message.created_at.timestamp()
                latency = time.time() - since
                signals.send(signals.sent, message=message, using=alias, latency=latency)


class Publisher:
    """A background thread that sends what this process committed, in batches, as soon as it can.

    It only ever speeds delivery up: whatever it fails to send (broker down, process killed) is
    still a pending row that the relay sends after the grace period.
    """

    def __init__(self) -> None:
        self._init_state()
        atexit.register(self.close)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(
                before=self._before_fork,
                after_in_parent=self._after_fork_in_parent,
                after_in_child=self._init_state,
            )

    def _init_state(self) -> None:
        # After fork the parent's thread is gone and its lock may be held: start afresh. The
        # parent's queued messages are the parent's to send.
        self._pid = os.getpid()
        self._cond = threading.Condition()
        self._queue: deque[tuple[Celery, OutboxMessage]] = deque()
        self._busy = False
        self._thread: threading.Thread | None = None
        self._closing = False
        self._paused_until = 0.0
        self._failures = 0

    def _before_fork(self) -> None:
        # Fork only while the thread is idle: forked in the middle of a send (Celery imports lazily
        # on that path), the child would inherit half-imported modules. Holding the lock across the
        # fork keeps the thread from starting another batch; bounded, a stuck send cannot block it.
        self._cond.acquire()
        deadline = time.monotonic() + 2.0
        while self._busy and (remaining := deadline - time.monotonic()) > 0:
            self._cond.wait(remaining)

    def _after_fork_in_parent(self) -> None:
        self._cond.release()

    def submit(self, app: Celery, message: OutboxMessage) -> None:
        if not settings.PUBLISHER:
            return
        with self._cond:
            if self._closing:
                return
            if time.monotonic() < self._paused_until:
                return  # the broker was down a moment ago: leave it to the relay
            self._queue.append((app, message))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="aftercommit-publisher", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far was handled; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> None:
        """Send what is held (bounded by EXIT_FLUSH_TIMEOUT), then stop the thread."""
        if self._pid != os.getpid() or self._thread is None:
            return
        try:
            timeout = settings.EXIT_FLUSH_TIMEOUT
        except Exception:
            timeout = 5.0
        self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        thread.join(timeout)
        with self._cond:
            self._closing = False  # a later submit starts a new thread
            self._thread = None

    def _run(self) -> None:
        channels: dict[int, Channel] = {}
        try:
            while True:
                with self._cond:
                    while not self._queue and not self._closing:
                        self._cond.wait()
                    if not self._queue and self._closing:
                        return
                    batch = list(self._queue)
                    self._queue.clear()
                    self._busy = True
                try:
                    by_app: dict[int, list[OutboxMessage]] = {}
                    for app, message in batch:
                        if id(app) not in channels:
                            channels[id(app)] = Channel(app)
                        by_app.setdefault(id(app), []).append(message)
                    for key, messages in by_app.items():
                        channel = channels[key]
                        self._send(channel.app, messages, channel)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
        finally:
            for channel in channels.values():
                channel.reset()
            for alias in connections:
                connections[alias].close()

    def _send(self, app: Celery, batch: list[OutboxMessage], channel: Channel) -> None:
        outcome = send(app, batch, channel)
        if outcome.broker_error is not None:
            self._failures += 1
            pause = min(settings.BROKER_BACKOFF_MAX, 0.5 * 2**self._failures)
            self._paused_until = time.monotonic() + pause
            logger.warning(
                "broker unreachable (%s); %d message(s) left to the relay, pausing the publisher "
                "%.1fs",
                outcome.broker_error,
                len(outcome.unsent),
                pause,
            )
        else:
            self._failures = 0
        for message, exc in outcome.failed:
            logger.warning("could not send %s, left to the relay: %r", message, exc)
        try:
            mark_sent(outcome.sent)
        except Exception:
            # The messages went out; the relay will send them again after the grace period.
            logger.exception("could not mark %d sent message(s)", len(outcome.sent))
            for alias in connections:
                connections[alias].close()


publisher = Publisher()
