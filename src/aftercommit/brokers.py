"""Built messages to the broker, a batch at once, and what became of each.

One held connection and producer per relay. Where the transport can, a chunk goes out together:
one pipelined write on Redis (kombu 5.7's ``Producer.batch``); on AMQP every publish goes out, then
the publisher confirms are awaited once (py-amqp's public ``confirm_select``, the acks heard as
channel events). Each message still goes through Celery's ``send_task_message``, inside the
caller's restored trace context.

What can go wrong, and whose it is:
- the broker is unreachable (a connection error): nothing is known sent; the batch waits and no
  attempt is used;
- the broker refused a message (an AMQP nack: a full ``reject-publish`` queue): it waits like an
  outage; the rest of its chunk is sent;
- one message cannot go (it cannot be built, or AMQP closes the channel over it: an exchange that
  does not exist, access refused): that message's failure, retried with backoff, then a dead letter;
  an exchange named in a message's options is looked up (a passive declare, on a channel of its
  own) before the chunk goes, once a connection: when the channel closes over a publish, RabbitMQ
  has routed the publishes before it but need not have confirmed them yet (a persistent message
  to a durable queue is confirmed once written), so sending them again would duplicate them;
- the setup is wrong (a transport that cannot load, a client library too old): a setup error,
  reported loudly by the relay, status, the health view and the system check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.common import Broadcast

from . import guard, tracing
from .messages import Outgoing

try:
    from kombu.exceptions import BatchPublishError
except ImportError:  # kombu < 5.7 has no publish batches: every publish is its own write

    class BatchPublishError(Exception):  # type: ignore[no-redef]
        pass


logger = logging.getLogger("aftercommit.brokers")

#: Messages written to the broker at once (one pipelined write on Redis), and the most commands
#: such a write may hold (a queue with x-expires adds one per priority step to each message).
CHUNK_SIZE = 500
BATCH_MAX_COMMANDS = CHUNK_SIZE * 16
#: Seconds to wait, in all, for the broker to confirm a chunk (AMQP).
CONFIRM_TIMEOUT = 30.0


class BrokerUnavailable(Exception):
    """The broker could not be reached; the messages themselves are fine."""


class SetupError(Exception):
    """The broker cannot be used as configured (a transport that does not load, a client library
    the transport refuses). No message is at fault; someone must change the setup."""


@dataclass
class Outcome:
    """What became of a batch: sent, failed on their own, or not sent (outage or refusal)."""

    sent: list[Outgoing] = field(default_factory=list)
    failed: list[tuple[Outgoing, BaseException]] = field(default_factory=list)
    unsent: list[Outgoing] = field(default_factory=list)
    broker_error: BaseException | None = None
    setup_error: BaseException | None = None


class _Refused(Exception):
    """The broker answered every publish of a chunk and refused some (AMQP nacks)."""

    def __init__(self, taken: list[Outgoing], refused: list[Outgoing]) -> None:
        super().__init__(f"the broker refused {len(refused)} message(s) (a full queue?)")
        self.taken = taken
        self.refused = refused


class _ChannelClosed(Exception):
    """AMQP closed the channel during a chunk; the acks before it are known."""

    def __init__(self, taken: list[Outgoing], error: BaseException) -> None:
        super().__init__(str(error))
        self.taken = taken
        self.error = error


class _EventsApart:
    """The ``task-sent`` event goes on its own producer, never the confirmed channel, so every
    delivery tag there is a task's (with ``task_send_sent_event`` the event would otherwise take
    a tag of its own, and its ack could be counted for a task the broker refused)."""

    def __init__(self, app: Celery, connection: Connection) -> None:
        self.dispatcher = app.events.Dispatcher(enabled=False)
        self.connection = connection
        self.producer: Any = None

    def publish(self, type: str, fields: dict[str, Any], producer: Any, **kwargs: Any) -> Any:
        if self.producer is None:
            self.producer = self.connection.Producer()
        return self.dispatcher.publish(type, fields, self.producer, **kwargs)


class Sender:
    """One broker connection and producer, held across batches, owned by one thread."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.connection: Connection | None = None
        self.producer: Any = None
        self.amqp_confirms = False
        self.events: _EventsApart | None = None
        self._tags = 0  # AMQP: publishes on the current confirmed channel, i.e. its last tag
        self._bound: dict[tuple[int, str], Queue] = {}
        self._exchanges: set[str] = set()  # AMQP: exchanges known to exist on this connection
        self._lookup: Any = None  # AMQP: the channel that looks them up
        from kombu.exceptions import OperationalError

        # Widened with the transport's own error classes when the connection opens.
        self.outage_errors: tuple[type[BaseException], ...] = (
            OperationalError, ConnectionError, TimeoutError, OSError, BatchPublishError,
        )  # fmt: skip
        self.channel_errors: tuple[type[BaseException], ...] = ()

    # The connection ------------------------------------------------------------------------

    def open(self) -> Any:
        if self.producer is not None:
            return self.producer
        try:
            connection = self.app.connection_for_write()
            transport = connection.transport
        except Exception as exc:  # the transport cannot even load: not an outage
            raise SetupError(f"{type(exc).__name__}: {exc}") from exc
        # kombu raises its OperationalError when ensure_connection gives up: an outage too.
        errors = (*self.outage_errors, *connection.connection_errors)
        try:
            connection.ensure_connection(max_retries=1)
            producer = self.app.amqp.Producer(connection, auto_declare=False)
        except errors as exc:
            self._discard(connection, broken=True)
            raise BrokerUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except Exception as exc:
            self._discard(connection, broken=True)
            raise SetupError(f"{type(exc).__name__}: {exc}") from exc
        self.outage_errors = tuple({*self.outage_errors, *connection.connection_errors})
        self.channel_errors = tuple(connection.channel_errors)
        self.amqp_confirms = transport.driver_type == "amqp"
        if self.amqp_confirms:
            # Without confirms a publish on a connection the broker already dropped "succeeds"
            # into the socket buffer and the message is lost; we would mark it sent.
            producer.channel.confirm_select()
            self._tags = 0
        self.connection = connection
        self.producer = producer
        self.events = _EventsApart(self.app, connection.clone())
        return producer

    def reset(self, *, broken: bool = False) -> None:
        connection, self.connection, self.producer = self.connection, None, None
        self._bound.clear()
        self._exchanges.clear()
        self._lookup = None
        events, self.events = self.events, None
        self._tags = 0
        if events is not None:
            self._discard(events.connection, broken=broken)
        if connection is not None:
            self._discard(connection, broken=broken)

    close = reset

    @staticmethod
    def _discard(connection: Connection, *, broken: bool) -> None:
        try:
            if broken:  # no goodbye on a dead socket: just release it
                connection.collect()
            else:
                connection.close()
        except Exception:  # it is gone either way
            logger.debug("closing a broker connection failed", exc_info=True)

    # Sending ---------------------------------------------------------------------------------

    def send(self, items: Sequence[Outgoing]) -> Outcome:
        """Publish ``items`` in order, a chunk at a time. Stops at the first outage."""
        outcome = Outcome()
        pending = list(items)
        retried_connection = False
        while pending:
            try:
                producer = self.open()
            except BrokerUnavailable as exc:
                outcome.broker_error = exc
                break
            except SetupError as exc:
                outcome.setup_error = exc
                break
            chunk, pending = pending[:CHUNK_SIZE], pending[CHUNK_SIZE:]
            try:
                if self.amqp_confirms:
                    self._send_confirmed(producer, chunk, outcome)
                else:
                    self._send_batched(producer, chunk, outcome)
            except _Refused as exc:
                # The broker answered for every message: what it took is sent, what it refused
                # waits (like an outage: no attempt used). Trying again at once would be refused.
                outcome.sent.extend(exc.taken)
                pending = exc.refused + pending
                outcome.broker_error = exc
                break
            except _ChannelClosed as exc:
                outcome.sent.extend(exc.taken)
                rest = [m for m in chunk if m not in exc.taken and not _failed(outcome, m)]
                self.reset(broken=True)
                self._one_by_one(rest, outcome)
                if outcome.broker_error is not None:
                    break
            except (*self.outage_errors, *self.channel_errors) as exc:
                # (AMQP's channel errors became _ChannelClosed above; another transport's, such
                # as a Redis out of memory, are the broker's trouble, not a message's.)
                self.reset(broken=True)
                rest = [m for m in chunk if not _failed(outcome, m)]
                pending = rest + pending
                if retried_connection:
                    outcome.broker_error = exc
                    break
                retried_connection = True  # a held connection may have gone stale: one fresh try
                continue
            retried_connection = False
        outcome.unsent.extend(m for m in pending if m not in outcome.unsent)
        return outcome

    def _publish(
        self, producer: Any, item: Outgoing, send: Callable[..., Any] | None = None
    ) -> None:
        if send is None:
            send = guard.unguarded(self.app.amqp)
        options = item.options
        queue = options.get("queue")
        if options.get("declare") is None and isinstance(queue, Queue):
            # What send_task_message would declare, bound to this channel once: kombu binds (a
            # copy) an unbound queue on every publish before it finds it already declared.
            options = {**options, "declare": self._declarable(queue, producer)}
        send(
            producer,
            item.name,
            item.message,
            event_dispatcher=self.events,
            retry=False,
            **options,
        )

    def _declarable(self, queue: Queue, producer: Any) -> list[Queue]:
        if isinstance(queue, Broadcast):
            return []
        channel = producer.channel
        key = (id(channel), queue.name)
        bound = self._bound.get(key)
        if bound is None:
            bound = self._bound[key] = queue(channel)
        return [bound]

    def _publish_each(
        self, producer: Any, chunk: list[Outgoing], outcome: Outcome, published: list[Outgoing]
    ) -> None:
        hard = (*self.outage_errors, *self.channel_errors)
        # Celery's sender; the relay's publishes are exempt from the unsafe-dispatch guard, so
        # not through the guard's wrapper (anyone else's wrapper stays).
        send = guard.unguarded(self.app.amqp)
        # Each publish runs in its caller's restored trace context (the publish signals see it);
        # consecutive messages of one context (a request's tasks, a backlog without traces)
        # share one restore.
        with guard.exempt():
            for trace, items in groupby(chunk, key=lambda item: item.row.trace):
                with tracing.restore(trace):
                    for item in items:
                        try:
                            self._publish(producer, item, send)
                        except hard:
                            raise
                        except Exception as exc:  # this message cannot be sent: its own failure
                            outcome.failed.append((item, exc))
                        else:
                            published.append(item)

    def _send_batched(self, producer: Any, chunk: list[Outgoing], outcome: Outcome) -> None:
        published: list[Outgoing] = []
        if getattr(producer, "supports_batch_publish", False):
            # Redis: nothing of the chunk is known to have arrived until the pipeline's write.
            with producer.batch(max_size=BATCH_MAX_COMMANDS):
                self._publish_each(producer, chunk, outcome, published)
            outcome.sent.extend(published)
            return
        try:
            self._publish_each(producer, chunk, outcome, published)
        finally:  # each publish before an error went out on its own
            outcome.sent.extend(published)
            chunk[:] = [m for m in chunk if m not in published]

    # AMQP publisher confirms ----------------------------------------------------------------

    def _send_confirmed(self, producer: Any, chunk: list[Outgoing], outcome: Outcome) -> None:
        chunk = self._without_missing_exchanges(chunk, outcome)
        channel = producer.channel
        with self._confirms(channel) as answers:
            published: list[Outgoing] = []
            by_tag: dict[int, Outgoing] = {}
            first = self._tags + 1
            try:
                try:
                    self._publish_each(producer, chunk, outcome, published)
                finally:  # each publish that went out took the channel's next delivery tag
                    for item in published:
                        self._tags += 1
                        by_tag[self._tags] = item
                self._await(channel, range(first, self._tags + 1), answers)
            except self.channel_errors as exc:
                taken = [by_tag[t] for t in sorted(by_tag) if answers.get(t) is True]
                raise _ChannelClosed(taken, exc) from exc
        taken = [by_tag[t] for t in sorted(by_tag) if answers[t]]
        refused = [by_tag[t] for t in sorted(by_tag) if not answers[t]]
        if refused:
            raise _Refused(taken, refused)
        outcome.sent.extend(taken)

    def _without_missing_exchanges(self, chunk: list[Outgoing], outcome: Outcome) -> list[Outgoing]:
        """``chunk`` less the messages to an exchange that does not exist (each one failed).

        Found before publishing, so the channel that carries the chunk is not closed over one:
        after such a close, the publishes before it are routed but may be unconfirmed, and would
        go twice. An exchange the message's own declarations create (its queue's, which Celery
        declares with the publish) is not looked up. Each exchange is looked up once a
        connection; one deleted since, or a publish refused for another reason (write access, a
        queue declared with other arguments), still closes the channel: at least once, then."""
        names = {self._named_exchange(item) for item in chunk} - self._exchanges - {""}
        if not names:
            return chunk
        missing: dict[str, BaseException] = {}
        for name in sorted(names):
            try:
                self._look_up(name)
            except self.channel_errors as exc:  # NOT_FOUND (or ACCESS_REFUSED)
                missing[name] = exc
            else:
                self._exchanges.add(name)
        if not missing:
            return chunk
        kept = []
        for item in chunk:
            error = missing.get(self._named_exchange(item))
            if error is None:
                kept.append(item)
            else:
                outcome.failed.append((item, error))
        return kept

    def _look_up(self, name: str) -> None:
        """A passive declare of exchange ``name`` on a channel of its own, waited for at most
        ``CONFIRM_TIMEOUT`` (a half-open connection is an outage, as for the confirms). py-amqp
        opens a channel again after the broker closed it over an error: it is kept."""
        if self._lookup is None or not self._lookup.is_open:
            assert self.connection is not None
            self._lookup = self.connection.channel()
        channel = self._lookup
        if not hasattr(channel, "send_method"):  # not py-amqp: its own wait
            channel.exchange_declare(name, "direct", passive=True)
            return
        from amqp import spec

        channel.send_method(
            spec.Exchange.Declare,
            "BssbbbbbF",  # py-amqp's exchange_declare, with the reply waited for below
            (0, name, "direct", True, False, False, False, False, None),
        )
        channel.wait(spec.Exchange.DeclareOk, timeout=CONFIRM_TIMEOUT)

    def _named_exchange(self, item: Outgoing) -> str:
        """The exchange a message's options name, unless its own declarations create it (the
        queue Celery declares with the publish declares that queue's exchange); else ``""``."""
        options = item.options
        exchange = options.get("exchange")
        if not exchange:
            return ""
        name = str(getattr(exchange, "name", exchange) or "")
        declare = options.get("declare")
        if declare is None:  # what send_task_message declares: the message's queue
            queue = options.get("queue")
            if isinstance(queue, str):
                queue = self.app.amqp.queues.get(queue)
            declare = (
                [queue] if isinstance(queue, Queue) and not isinstance(queue, Broadcast) else []
            )
        for entity in declare:
            created = entity if isinstance(entity, Exchange) else getattr(entity, "exchange", None)
            if (
                created is not None
                and created.name == name
                and not getattr(entity, "no_declare", False)
                and not created.no_declare
            ):
                return ""
        return name

    @contextmanager
    def _confirms(self, channel: Any) -> Iterator[dict[int, bool]]:
        answers: dict[int, bool] = {}  # delivery tag -> taken (ack) or refused (nack)
        first = self._tags + 1

        def answer(taken: bool) -> Callable[[int, bool], None]:
            def record(delivery_tag: int, multiple: bool) -> None:
                tags = range(first, delivery_tag + 1) if multiple else (delivery_tag,)
                for tag in tags:  # "multiple" answers every tag up to it not answered yet
                    answers.setdefault(tag, taken)

            return record

        on_ack, on_nack = answer(True), answer(False)
        channel.events["basic_ack"].add(on_ack)
        channel.events["basic_nack"].add(on_nack)
        try:
            yield answers
        finally:
            channel.events["basic_ack"].discard(on_ack)
            channel.events["basic_nack"].discard(on_nack)

    @staticmethod
    def _await(channel: Any, tags: range, answers: dict[int, bool]) -> None:
        deadline = time.monotonic() + CONFIRM_TIMEOUT
        while any(tag not in answers for tag in tags):
            remaining = deadline - time.monotonic()
            if remaining <= 0:  # a broker problem: the chunk is handed back, like an outage
                raise TimeoutError(f"no publisher confirms within {CONFIRM_TIMEOUT}s")
            channel.connection.drain_events(timeout=remaining)

    def _one_by_one(self, items: list[Outgoing], outcome: Outcome) -> None:
        """After AMQP closed a channel mid-chunk: each message alone, to find the one at fault."""
        for index, item in enumerate(items):
            try:
                producer = self.open()
                self._send_confirmed(producer, [item], outcome)
            except _Refused as exc:
                outcome.broker_error = exc
                outcome.unsent.extend(items[index:])
                return
            except _ChannelClosed as exc:
                outcome.failed.append((item, exc.error))
                self.reset(broken=True)
            except SetupError as exc:
                outcome.setup_error = exc
                outcome.unsent.extend(items[index:])
                return
            except Exception as exc:
                if not isinstance(exc, (BrokerUnavailable, *self.outage_errors)):
                    raise
                self.reset(broken=True)
                outcome.broker_error = exc
                outcome.unsent.extend(items[index:])
                return


def _failed(outcome: Outcome, item: Outgoing) -> bool:
    return any(failed is item for failed, _ in outcome.failed)
