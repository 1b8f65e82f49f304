"""brokers.Sender on a fake kombu connection and producer: what becomes of each message of a batch
when the broker is healthy, unreachable, drops the connection midway, refuses one message, nacks,
or closes the channel over one (AMQP), and when the transport cannot even load."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery

from aftercommit import brokers, dispatch
from aftercommit.brokers import BatchPublishError, BrokerUnavailable, Sender, SetupError
from aftercommit.messages import Builder, Outgoing
from aftercommit.models import OutboxMessage


class FakeConnectionError(Exception):
    """A transport's own connection error (not an OSError): the Sender learns it from the
    connection."""


class FakeChannelError(Exception):
    """AMQP closing the channel over one message (NotFound, AccessRefused)."""


class FakeBroker:
    def __init__(self, driver_type: str = "redis", *, batches: bool = False) -> None:
        self.driver_type = driver_type
        self.batches = batches
        self.reachable = True
        self.published: list[str] = []
        self.fail: set[str] = set()  # ids refused on their own (a ValueError at publish)
        self.channel_error: set[str] = set()  # ids AMQP closes the channel over
        self.nack: set[str] = set()  # ids the broker nacks (a full reject-publish queue)
        self.drop_after: int | None = None  # the connection drops after this many publishes
        self.stays_down = True  # after the drop, the broker stays unreachable
        self.connections = 0


class FakeChannel:
    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.events: dict[str, set[Any]] = {"basic_ack": set(), "basic_nack": set()}
        self.confirming = False
        self.tag = 0
        self.unanswered: list[tuple[int, bool]] = []
        self.connection = self  # drain_events lives on the connection in py-amqp

    def confirm_select(self) -> None:
        self.confirming = True

    def drain_events(self, timeout: float | None = None) -> None:
        for tag, taken in self.unanswered:
            for handler in list(self.events["basic_ack" if taken else "basic_nack"]):
                handler(tag, False)
        self.unanswered.clear()


class FakeProducer:
    def __init__(self, connection: FakeConnection, **kwargs: Any) -> None:
        self.broker = connection.broker
        self.channel = FakeChannel(self.broker)
        self.supports_batch_publish = self.broker.batches
        self._buffer: list[str] | None = None

    def publish(self, body: Any, **kwargs: Any) -> None:
        broker = self.broker
        task_id = kwargs["headers"]["id"]
        if not broker.reachable:
            raise FakeConnectionError("connection reset by peer")
        if broker.drop_after is not None and len(broker.published) >= broker.drop_after:
            broker.drop_after = None
            broker.reachable = not broker.stays_down
            raise FakeConnectionError("connection reset by peer")
        if task_id in broker.fail:
            raise ValueError(f"{task_id} cannot be published")
        if task_id in broker.channel_error:
            raise FakeChannelError(f"NOT_FOUND - no exchange for {task_id}")
        if self._buffer is not None:
            self._buffer.append(task_id)
            return
        broker.published.append(task_id)
        if self.channel.confirming:
            self.channel.tag += 1
            self.channel.unanswered.append((self.channel.tag, task_id not in broker.nack))

    @contextlib.contextmanager
    def batch(self, max_size: int) -> Iterator[None]:
        """Redis-like: the chunk is one pipelined write at the end, or nothing."""
        self._buffer = []
        try:
            yield
            if not self.broker.reachable:
                raise BatchPublishError("the pipeline's write failed")
            self.broker.published.extend(self._buffer)
        finally:
            self._buffer = None


class FakeConnection:
    connection_errors = (FakeConnectionError,)
    channel_errors = (FakeChannelError,)

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.transport = SimpleNamespace(driver_type=broker.driver_type)

    def ensure_connection(self, max_retries: int = 1) -> None:
        if not self.broker.reachable:
            raise FakeConnectionError("connection refused")
        self.broker.connections += 1

    def clone(self) -> FakeConnection:
        return FakeConnection(self.broker)

    def close(self) -> None:
        pass

    collect = close


def sender_on(broker: FakeBroker, monkeypatch: pytest.MonkeyPatch) -> Sender:
    app = Celery("unit-brokers", set_as_current=False)
    monkeypatch.setattr(app, "connection_for_write", lambda: FakeConnection(broker))
    monkeypatch.setattr(app.amqp, "Producer", FakeProducer)
    return Sender(app)


def items(sender: Sender, n: int) -> list[Outgoing]:
    content_type, encoding, payload = dispatch.encode_arguments("unit.task", [1], {}, "json")
    builder = Builder(sender.app)
    return [
        builder.build(
            OutboxMessage(
                id=i,
                task_id=f"task-{i}",
                task_name="unit.task",
                payload=payload,
                content_type=content_type,
                content_encoding=encoding,
                options="{}",
            )
        )
        for i in range(n)
    ]


def ids(outgoing: list[Outgoing]) -> list[str]:
    return [item.row.task_id for item in outgoing]


@pytest.mark.parametrize("batches", [False, True], ids=["one write each", "pipelined"])
def test_healthy_broker__every_message_sent_in_order(batches: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    broker = FakeBroker(batches=batches)
    sender = sender_on(broker, monkeypatch)
    outcome = sender.send(items(sender, 5))
    assert ids(outcome.sent) == broker.published == [f"task-{i}" for i in range(5)]
    assert (outcome.failed, outcome.unsent, outcome.broker_error) == ([], [], None)


def test_connection_held__across_batches(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    broker = FakeBroker()
    sender = sender_on(broker, monkeypatch)
    sender.send(items(sender, 2))
    sender.send(items(sender, 2))
    assert broker.connections == 1


def test_broker_unreachable__nothing_sent_every_message_waits(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    broker = FakeBroker()
    broker.reachable = False
    sender = sender_on(broker, monkeypatch)
    outcome = sender.send(items(sender, 3))
    assert ids(outcome.unsent) == ["task-0", "task-1", "task-2"]
    assert outcome.sent == outcome.failed == []
    assert isinstance(outcome.broker_error, BrokerUnavailable)
    assert outcome.setup_error is None


def test_connection_lost_midway__published_ones_sent_the_rest_wait(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    broker = FakeBroker()
    broker.drop_after = 2
    sender = sender_on(broker, monkeypatch)
    outcome = sender.send(items(sender, 5))
    assert ids(outcome.sent) == ["task-0", "task-1"]
    assert ids(outcome.unsent) == ["task-2", "task-3", "task-4"]
    assert outcome.failed == []
    assert outcome.broker_error is not None


def test_stale_connection__one_fresh_try_sends_the_rest(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    broker = FakeBroker()
    broker.drop_after, broker.stays_down = 2, False
    sender = sender_on(broker, monkeypatch)
    outcome = sender.send(items(sender, 5))
    assert ids(outcome.sent) == broker.published == [f"task-{i}" for i in range(5)]
    assert outcome.unsent == [] and outcome.broker_error is None
    assert broker.connections == 2


def test_pipelined_write_fails__the_whole_chunk_waits(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    broker = FakeBroker(batches=True)
    sender = sender_on(broker, monkeypatch)
    sender.open()
    broker.reachable = False  # the held connection's write will fail, and so will a new one
    outcome = sender.send(items(sender, 3))
    assert outcome.sent == [] and broker.published == []
    assert ids(outcome.unsent) == ["task-0", "task-1", "task-2"]


def test_chunks__an_outage_in_a_later_chunk_keeps_the_earlier_ones_sent(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(brokers, "CHUNK_SIZE", 2)
    broker = FakeBroker(batches=True)
    broker.drop_after = 2
    sender = sender_on(broker, monkeypatch)
    outcome = sender.send(items(sender, 5))
    assert ids(outcome.sent) == ["task-0", "task-1"]
    assert ids(outcome.unsent) == ["task-2", "task-3", "task-4"]


def test_one_message_fails_on_its_own__it_alone_failed_the_rest_sent(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    broker = FakeBroker()
    broker.fail = {"task-1"}
    sender = sender_on(broker, monkeypatch)
    outcome = sender.send(items(sender, 3))
    assert ids(outcome.sent) == ["task-0", "task-2"]
    assert [(item.row.task_id, type(error)) for item, error in outcome.failed] == [
        ("task-1", ValueError)
    ]
    assert outcome.unsent == [] and outcome.broker_error is None


def test_transport_cannot_load__a_setup_error_not_an_outage(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    broker = FakeBroker()
    sender = sender_on(broker, monkeypatch)
    batch = items(sender, 2)

    def broken() -> None:
        raise ImportError("kombu 5.7's Redis transport needs redis-py >= 6.1")

    monkeypatch.setattr(sender.app, "connection_for_write", broken)
    outcome = sender.send(batch)
    assert isinstance(outcome.setup_error, SetupError)
    assert "redis-py" in str(outcome.setup_error)
    assert ids(outcome.unsent) == ["task-0", "task-1"]
    assert outcome.broker_error is None


# AMQP: publisher confirms -------------------------------------------------------------------------


def test_amqp_every_publish_acked__all_sent_confirms_on(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    broker = FakeBroker("amqp")
    sender = sender_on(broker, monkeypatch)
    outcome = sender.send(items(sender, 4))
    assert sender.amqp_confirms and sender.producer.channel.confirming
    assert ids(outcome.sent) == ["task-0", "task-1", "task-2", "task-3"]


def test_amqp_nack__the_refused_message_waits_the_acked_ones_sent(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    broker = FakeBroker("amqp")
    broker.nack = {"task-1"}
    sender = sender_on(broker, monkeypatch)
    outcome = sender.send(items(sender, 3))
    assert ids(outcome.sent) == ["task-0", "task-2"]
    assert ids(outcome.unsent) == ["task-1"]
    assert outcome.failed == []
    assert outcome.broker_error is not None  # waits like an outage: no attempt used


def test_amqp_delivery_tags__counted_across_batches_on_one_channel(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    broker = FakeBroker("amqp")
    sender = sender_on(broker, monkeypatch)
    sender.send(items(sender, 3))
    broker.nack = {"task-0"}
    outcome = sender.send(items(sender, 2))
    assert ids(outcome.sent) == ["task-1"]
    assert ids(outcome.unsent) == ["task-0"]


def test_amqp_channel_closed_over_one_message__it_failed_the_rest_sent(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    broker = FakeBroker("amqp")
    broker.channel_error = {"task-2"}
    sender = sender_on(broker, monkeypatch)
    outcome = sender.send(items(sender, 4))
    assert sorted(ids(outcome.sent)) == ["task-0", "task-1", "task-3"]
    assert [(item.row.task_id, type(error)) for item, error in outcome.failed] == [
        ("task-2", FakeChannelError)
    ]
    assert outcome.unsent == [] and outcome.broker_error is None
    assert set(broker.published) == {"task-0", "task-1", "task-3"}
