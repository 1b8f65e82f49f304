"""Prometheus metrics, when ``prometheus_client`` is installed (nothing happens otherwise).

Counters of messages recorded, sent, retried and dead (by task) and of replica fallbacks (by
replica), a histogram of commit-to-send latency, and the backlog per database, read from the outbox
when Prometheus scrapes (an index range, not a table scan). Exposed wherever the process already
serves prometheus_client's registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from . import signals

try:
    import prometheus_client
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # pragma: no cover - the optional dependency is absent
    prometheus_client = None  # type: ignore[assignment]

_installed: set[int] = set()


def install(registry: Any = None) -> bool:
    """Connect the metrics to the signals, once per registry (default: prometheus_client's global
    one). False when prometheus_client is not installed."""
    if prometheus_client is None:
        return False
    registry = registry or prometheus_client.REGISTRY
    if id(registry) in _installed:
        return True
    counter = prometheus_client.Counter
    recorded = counter(
        "aftercommit_messages_recorded", "Task calls recorded in the outbox", ["task"],
        registry=registry,
    )  # fmt: skip
    sent = counter("aftercommit_messages_sent", "Messages the broker took", ["task"],
                   registry=registry)  # fmt: skip
    retried = counter(
        "aftercommit_messages_retried", "Sends that failed and will be retried", ["task"],
        registry=registry,
    )  # fmt: skip
    dead = counter("aftercommit_messages_dead", "Messages that became dead letters", ["task"],
                   registry=registry)  # fmt: skip
    fallbacks = counter(
        "aftercommit_replica_fallbacks",
        "Tasks whose reads went to the primary: the replica had not caught up in REPLICA_WAIT",
        ["replica"], registry=registry,
    )  # fmt: skip
    latency_histogram = prometheus_client.Histogram(
        "aftercommit_commit_to_send_seconds",
        "Seconds from the commit (or, via the relay, from recording) to the broker",
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5, 10, 30, 60, 300),
        registry=registry,
    )

    # One child a label value, looked up once: labels() validates and locks on every call, and
    # recorded / sent are counted once a dispatch / a message. (Task names and replicas are few.)
    recorded_by, sent_by, retried_by, dead_by, fallbacks_by = (
        _children(recorded), _children(sent), _children(retried), _children(dead),
        _children(fallbacks),
    )  # fmt: skip

    def on_recorded(message: Any, **kwargs: Any) -> None:
        recorded_by(message.task_name).inc()

    def on_sent(message: Any, latency: float, **kwargs: Any) -> None:
        sent_by(message.task_name).inc()
        latency_histogram.observe(max(latency, 0.0))

    def on_retried(message: Any, **kwargs: Any) -> None:
        retried_by(message.task_name).inc()

    def on_dead(message: Any, **kwargs: Any) -> None:
        dead_by(message.task_name).inc()

    def on_replica_fallback(replica: str, **kwargs: Any) -> None:
        fallbacks_by(replica).inc()

    for signal, receiver in (
        (signals.replica_fallback, on_replica_fallback),
        (signals.recorded, on_recorded),
        (signals.sent, on_sent),
        (signals.retried, on_retried),
        (signals.dead, on_dead),
    ):
        uid = f"aftercommit.metrics.{receiver.__name__}.{id(registry)}"
        signal.connect(receiver, weak=False, dispatch_uid=uid)
    registry.register(BacklogCollector())
    _installed.add(id(registry))
    return True


def _children(metric: Any) -> Any:
    """``metric.labels(value)``, kept per value."""
    children: dict[str, Any] = {}

    def child(value: str) -> Any:
        found = children.get(value)
        if found is None:
            found = children[value] = metric.labels(value)
        return found

    return child


class BacklogCollector:
    """``aftercommit_backlog`` and ``aftercommit_dead_letters`` per database, at scrape time."""

    def describe(self) -> Iterator[Any]:
        # Registering asks for the metric names; answering without a query keeps the database
        # out of app start-up.
        yield GaugeMetricFamily("aftercommit_backlog", "", labels=["database"])
        yield GaugeMetricFamily("aftercommit_dead_letters", "", labels=["database"])

    def collect(self) -> Iterator[Any]:
        from .models import OutboxMessage
        from .relay import outbox_aliases

        backlog = GaugeMetricFamily(
            "aftercommit_backlog", "Messages waiting to be sent", labels=["database"]
        )
        dead = GaugeMetricFamily(
            "aftercommit_dead_letters", "Messages that became dead letters", labels=["database"]
        )
        for alias in outbox_aliases():
            try:
                summary = OutboxMessage.objects.using(alias).summary()
            except Exception:  # a database that is down has no figure, not a failed scrape
                continue
            backlog.add_metric([alias], summary["backlog"])
            dead.add_metric([alias], summary["dead"])
        yield backlog
        yield dead
