"""The relay publishes what plain Celery would: the same protocol-2 message (body, headers,
properties) and the same routing, for the same call and options.

The relay builds messages itself, in bulk, instead of calling ``send_task`` per message; this is
what keeps that honest. It runs on every Celery version the matrix installs, so a Celery upgrade
that changes the message format fails here first.
"""

from __future__ import annotations

import datetime as dt
from contextlib import contextmanager
from typing import Any

import celery
import pytest
from celery.utils.saferepr import saferepr
from django.db import transaction
from hypothesis import given, settings
from hypothesis import strategies as st
from kombu import serialization

from aftercommit.brokers import Sender
from aftercommit.messages import Builder, flat_repr
from aftercommit.models import OutboxMessage
from tests.celery_app import app
from tests.testapp.tasks import read_item

pytestmark = pytest.mark.django_db

# Not part of the message: kombu's own retrying of one publish (the relay retries itself, with
# backoff, across batches) and how long it may block.
NOT_COMPARED = {"retry", "retry_policy", "timeout", "confirm_timeout"}
# Times Celery computes from "now" when the message is built: compared within a tolerance.
TIMES = {"eta", "expires"}


class RecordingProducer:
    """Stands where kombu's producer would and keeps what Celery asks it to publish."""

    serializer = None

    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []
        self.connection = self
        self.channel = object()  # what queues to declare are bound to; never used

    @contextmanager
    def _reraise_as_library_errors(self) -> Any:
        yield

    def publish(self, body: Any, **kwargs: Any) -> None:
        self.published.append({"body": body, **kwargs})


def plain(args: tuple[Any, ...], **options: Any) -> dict[str, Any]:
    producer = RecordingProducer()
    celery.Task.apply_async(read_item, args, producer=producer, **options)
    (published,) = producer.published
    return published


def relayed(args: tuple[Any, ...], **options: Any) -> dict[str, Any]:
    with transaction.atomic():
        read_item.apply_async(args, **options)
        row = OutboxMessage.objects.order_by("-id")[0]
    producer = RecordingProducer()
    sender = Sender(app)
    sender._publish(producer, Builder(app).build(row))
    (published,) = producer.published
    return published


def comparable(published: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in published.items() if k not in NOT_COMPARED}
    body = out.pop("body")
    # The body as it goes on the wire: what the worker decodes.
    out["body"] = serialization.loads(*reversed(serialization.dumps(body, "json")))
    out["declare"] = sorted(q.name for q in out.get("declare") or ())
    exchange = out.get("exchange")
    out["exchange"] = getattr(exchange, "name", exchange)
    headers = dict(out.pop("headers"))
    for key in TIMES:
        headers[key] = _when(headers.get(key))
    out["headers"] = headers
    return out


def _when(value: Any) -> Any:
    if value is None:
        return None
    return dt.datetime.fromisoformat(value).timestamp()


SIGNATURE = read_item.s("linked")
CASES: dict[str, dict[str, Any]] = {
    "plain": {},
    "countdown": {"countdown": 30},
    "eta": {"eta": dt.datetime(2030, 1, 1, 12, tzinfo=dt.timezone.utc)},
    "expires-seconds": {"expires": 600},
    "expires-datetime": {"expires": dt.datetime(2030, 1, 1, 12, tzinfo=dt.timezone.utc)},
    "queue": {"queue": "other"},
    "exchange-routing-key": {"exchange": "amq.direct", "routing_key": "elsewhere"},
    "priority": {"priority": 7},
    "headers": {"headers": {"custom": "yes", "n": 3}},
    "link": {"link": SIGNATURE, "link_error": read_item.s("failed")},
    "group": {"group_id": "group-1", "group_index": 2},
    "shadow": {"shadow": "nicer name"},
    "time-limits": {"time_limit": 30, "soft_time_limit": 20},
    "ignore-result": {"ignore_result": True},
    "reply-to": {"reply_to": "replies"},
    "stamps": {"stamped_headers": ["monitoring_id"], "monitoring_id": "m-1"},
    "app-id": {"app_id": "shop"},
    "parent": {"root_id": "root-1", "parent_id": "parent-1"},
    "argsrepr": {"argsrepr": "(secret,)", "kwargsrepr": "{}"},
    "serializer-compression": {"serializer": "json", "compression": "zlib"},
    # What Celery's canvas gives an errback it clones with clone(immutable=True) (group.link_error
    # on Celery 5.4): refused at the call as an unknown option, an old-style errback was never sent.
    "immutable-errback": {"immutable": True},
}


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_relay_publishes_what_plain_celery_publishes(options: dict[str, Any]) -> None:
    args = ("contract", None, 1)
    task_id = "contract-task-id"
    expected = comparable(plain(args, task_id=task_id, **options))
    got = comparable(relayed(args, task_id=task_id, **options))
    for key in TIMES:
        want, have = expected["headers"].pop(key), got["headers"].pop(key)
        assert (want is None) == (have is None), key
        if want is not None:
            assert abs(want - have) < 5, (key, want, have)
    want, have = expected.pop("expiration", None), got.pop("expiration", None)
    assert (want is None) == (have is None)
    if want is not None:
        assert abs(want - have) < 5
    assert got == expected


def test_contract_compares_something() -> None:
    """The comparison could fail: a different call is a different message."""
    args = ("contract", None, 1)
    expected = comparable(plain(args, task_id="x", priority=1))
    got = comparable(relayed(args, task_id="x", priority=2))
    assert got != expected


ARGS_CASES: dict[str, tuple[Any, ...]] = {
    "flat": ("contract", None, 1),
    "quotes-and-escapes": ('it\'s \\ "hi"', "é ✓\nnew line", 1.5),
    "nested": ({"a": [1, 2, {"b": None}]}, [["deep", ["deeper", ["deepest"]]]], 3),
    "longer-than-argsrepr": ("x " * 700, "y", 2),
}


@pytest.mark.parametrize("args", ARGS_CASES.values(), ids=ARGS_CASES.keys())
def test_one_builder_for_a_batch__every_message_what_plain_celery_publishes(
    args: tuple[Any, ...],
) -> None:
    """A batch's builder reads each kind of call's options once and shares them between rows
    of the same task and options; every message still comes out as plain Celery's, whatever
    its arguments (argsrepr included: Celery's saferepr, or the same text without it)."""
    calls = [(f"batch-{i}", name, opts) for i, (name, opts) in enumerate(CASES.items())]
    with transaction.atomic():
        for task_id, _, options in calls * 2:
            read_item.apply_async(args, task_id=task_id, **options)
    rows = list(OutboxMessage.objects.order_by("id"))
    builder = Builder(app)
    built = [builder.build(row) for row in rows]  # the second half from shared templates
    assert len({id(item.options) for item in built}) == len(built)  # each its own options
    sender = Sender(app)
    for item, (task_id, name, options) in zip(built, calls * 2, strict=True):
        producer = RecordingProducer()
        sender._publish(producer, item)
        (published,) = producer.published
        expected = comparable(plain(args, task_id=task_id, **options))
        got = comparable(published)
        for key in TIMES:
            want, have = expected["headers"].pop(key), got["headers"].pop(key)
            assert (want is None) == (have is None), (name, key)
            if want is not None:
                assert abs(want - have) < 5, (name, key)
        want, have = expected.pop("expiration", None), got.pop("expiration", None)
        assert (want is None) == (have is None), name
        if want is not None:
            assert abs(want - have) < 5, name
        assert got == expected, name


def test_a_builder_kept_for_a_relay_s_life__keeps_a_bounded_number_of_templates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A relay keeps one builder; calls with ever new options (a countdown each) do not make
    it grow past its bound, and each message is still its own call's."""
    from aftercommit import messages

    monkeypatch.setattr(messages, "TEMPLATES_MAX", 3)
    with transaction.atomic():
        for seconds in range(10):
            read_item.apply_async(("region", None, seconds), countdown=100 + seconds)
    builder = Builder(app)
    built = [builder.build(row) for row in OutboxMessage.objects.order_by("id")]
    assert len(builder._templates) <= 3
    etas = [item.message.headers["eta"] for item in built]
    assert etas == sorted(etas) and len(set(etas)) == 10


def test_a_router_that_reads_the_arguments__routes_each_message() -> None:
    """Routes by name are looked up once a batch; a router function sees every message's own
    arguments, as it would with plain Celery."""

    def by_region(name: str, args: Any, kwargs: Any, options: Any, **kw: Any) -> Any:
        return {"queue": f"region-{args[0]}"} if name == read_item.name else None

    previous = app.conf.task_routes
    app.conf.task_routes = (by_region,)
    app.amqp.flush_routes()
    app.amqp.__dict__.pop("router", None)
    try:
        with transaction.atomic():
            for region in ("eu", "us", "eu"):
                read_item.apply_async((region, None, 1))
        builder = Builder(app)
        rows = OutboxMessage.objects.order_by("id")
        queues = [builder.build(row).options["queue"].name for row in rows]
        assert queues == ["region-eu", "region-us", "region-eu"]
    finally:
        app.conf.task_routes = previous
        app.amqp.flush_routes()
        app.amqp.__dict__.pop("router", None)


_scalars = (
    st.text(max_size=30) | st.integers() | st.floats() | st.booleans() | st.none()
)  # fmt: skip


@settings(max_examples=400, deadline=None, database=None)
@given(
    value=st.tuples(_scalars, _scalars)
    | st.lists(_scalars, max_size=8).map(tuple)
    | st.lists(_scalars, max_size=8)
    | st.dictionaries(st.text(max_size=10) | st.integers(), _scalars, max_size=6)
    | st.lists(st.lists(_scalars, max_size=2), max_size=3),  # nested: never the shortcut
    maxsize=st.sampled_from([1, 5, 20, 60, 1024]),
)
def test_flat_repr__what_celery_saferepr_gives__or_nothing(value: Any, maxsize: int) -> None:
    """The builder's shortcut for the common flat arguments gives Celery's ``saferepr`` text
    exactly, or steps aside (cut short, nested, other types): argsrepr is the same either way."""
    depth = Builder(app).repr_depth
    shortcut = flat_repr(value, maxsize)
    if shortcut is not None:
        assert shortcut == saferepr(value, maxsize, **depth)


def test_flat_repr__used_for_plain_arguments() -> None:
    """(The property above could pass with a shortcut that always steps aside.)"""
    assert flat_repr(("it's", 1, None, 2.5, True), 1024) == "('it\\'s', 1, None, 2.5, True)"
    assert flat_repr({"k": [1]}, 1024) is None
    assert flat_repr(("x" * 30,), 20) is None
    assert Builder(app).flat_reprs


def test_rows_of_one_kind_of_call__options_read_once_a_batch(monkeypatch: Any) -> None:
    """What makes a batch cheap: rows of one task with the same plain options (a queue, a
    countdown) share what their options make, read and routed once; signatures are read for
    every row (each message gets its own)."""
    from aftercommit import messages

    reads: list[str] = []
    real = messages.decode_options_text
    monkeypatch.setattr(
        messages, "decode_options_text", lambda text: reads.append(text) or real(text)
    )
    with transaction.atomic():
        for i in range(3):
            read_item.apply_async(("shared", None, i), queue="other", countdown=30)
        for i in range(2):
            read_item.apply_async(("own", None, i), link=SIGNATURE)
    builder = Builder(app)
    for row in OutboxMessage.objects.order_by("id"):
        builder.build(row)
    assert len(reads) == 1 + 2
