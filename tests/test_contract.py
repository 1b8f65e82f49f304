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
from django.db import transaction
from kombu import serialization

from aftercommit.brokers import Sender
from aftercommit.messages import Builder
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
