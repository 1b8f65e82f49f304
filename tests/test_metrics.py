"""Signals for each step of a message's life, and the Prometheus metrics built on them."""

from __future__ import annotations

import time
import uuid

import pytest
from django.db import transaction
from django.utils import timezone
from prometheus_client import CollectorRegistry

from aftercommit import metrics, signals
from aftercommit.models import OutboxMessage, later
from aftercommit.relay import Relay
from tests.celery_app import app
from tests.testapp.tasks import read_item

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def heard():  # type: ignore[no-untyped-def]
    events: list[tuple[str, dict]] = []
    receivers = {}
    for name in ("recorded", "sent", "retried", "dead"):

        def receiver(sender, name=name, **kwargs):  # type: ignore[no-untyped-def]
            events.append((name, kwargs))

        receivers[name] = receiver
        getattr(signals, name).connect(receiver)
    yield events
    for name, receiver in receivers.items():
        getattr(signals, name).disconnect(receiver)


@pytest.mark.usefixtures("broker")
def test_recorded_and_sent__with_commit_to_send_latency(heard, request) -> None:  # type: ignore[no-untyped-def]
    with transaction.atomic():
        read_item.delay("metrics")
    assert [name for name, _ in heard] == ["recorded"]
    OutboxMessage.objects.update(created_at=later(-0.25))  # recorded a quarter second ago
    relay = Relay(app, aliases=["default"])
    request.addfinalizer(relay.close)
    assert relay.run_batch("default") == 1
    name, kwargs = heard[-1]
    assert name == "sent" and kwargs["using"] == "default"
    assert 0.25 <= kwargs["latency"] < 5


@pytest.mark.usefixtures("broker")
def test_retried_then_dead__and_prometheus_counts(heard, settings, request) -> None:  # type: ignore[no-untyped-def]
    registry = CollectorRegistry()
    assert metrics.install(registry)
    settings.AFTERCOMMIT = {"MAX_ATTEMPTS": 2, "BACKOFF_BASE": 0.01, "BACKOFF_MAX": 0.01}
    now = timezone.now()
    OutboxMessage.objects.create(
        task_id=str(uuid.uuid4()), task_name=read_item.name, payload="{not json",
        content_type="application/json", content_encoding="utf-8", options="{}",
        created_at=now, due_at=now,
    )  # fmt: skip
    with transaction.atomic():
        read_item.delay("metrics")  # recorded, and sent by the relay below
    OutboxMessage.objects.update(due_at=now)
    relay = Relay(app, aliases=["default"])
    request.addfinalizer(relay.close)
    relay.run_batch("default")
    time.sleep(0.05)
    relay.run_batch("default")
    names = [name for name, _ in heard]
    assert names.count("retried") == 1 and names.count("dead") == 1
    assert "DecodeError" in dict(heard)["dead"]["error"]

    def value(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    task = {"task": read_item.name}
    assert value("aftercommit_messages_recorded_total", **task) == 1
    assert value("aftercommit_messages_sent_total", **task) >= 1
    assert value("aftercommit_messages_retried_total", **task) == 1
    assert value("aftercommit_messages_dead_total", **task) == 1
    assert value("aftercommit_commit_to_send_seconds_count") >= 1
    assert value("aftercommit_dead_letters", database="default") == 1
    assert value("aftercommit_backlog", database="default") == 0
