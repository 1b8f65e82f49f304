"""A process with OpenTelemetry and Sentry set up as a user's app would, recording to local files
only: the tracing tests' worker (``celery -A tests.tracing_app worker``) and their sender
(``python -m tests.tracing_app``, which plays two web requests and a sending thread, or a relay
process publishing what they stored).

Both SDKs patch Celery for the whole process and OpenTelemetry's provider can be set once, so they
run here, in subprocesses, and never in the pytest process. Nothing leaves the machine: spans go
to JSON-lines files under TRACING_OUT, Sentry's envelopes too, through a transport that writes a
file (the DSN's port 9 is never contacted).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import threading
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()

import sentry_sdk  # noqa: E402
from opentelemetry import trace  # noqa: E402
from opentelemetry.instrumentation.celery import CeleryInstrumentor  # noqa: E402
from opentelemetry.sdk.resources import Resource  # noqa: E402
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import (  # noqa: E402
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from sentry_sdk.envelope import Envelope  # noqa: E402
from sentry_sdk.integrations.celery import CeleryIntegration  # noqa: E402
from sentry_sdk.transport import Transport  # noqa: E402

from aftercommit import tracing  # noqa: E402
from tests.celery_app import app  # noqa: E402

TASK = "tests.tracing_app.traced"
OUT = Path(os.environ.get("TRACING_OUT", "."))
_write_lock = threading.Lock()


def _append(name: str, record: dict[str, Any]) -> None:
    with _write_lock, open(OUT / name, "a") as out:
        out.write(json.dumps(record, default=str) + "\n")


class JsonLinesExporter(SpanExporter):
    """OpenTelemetry spans, one JSON object a line."""

    def __init__(self, role: str) -> None:
        self.name = f"otel-{role}-{os.getpid()}.jsonl"

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        for span in spans:
            context = span.get_span_context()
            assert context is not None
            _append(
                self.name,
                {
                    "name": span.name,
                    "kind": span.kind.name,
                    "trace_id": f"{context.trace_id:032x}",
                    "span_id": f"{context.span_id:016x}",
                    "parent_span_id": f"{span.parent.span_id:016x}" if span.parent else None,
                    "attributes": dict(span.attributes or {}),
                },
            )
        return SpanExportResult.SUCCESS


class FileTransport(Transport):
    """Sentry's transactions and events, one JSON object a line, instead of an HTTP request."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.name = f"sentry-{role}-{os.getpid()}.jsonl"

    def capture_envelope(self, envelope: Envelope) -> None:
        for item in envelope.items:
            payload = item.payload.json
            if item.type not in ("transaction", "event") or payload is None:
                continue
            trace_context = payload.get("contexts", {}).get("trace", {})
            _append(
                self.name,
                {
                    "type": item.type,
                    "transaction": payload.get("transaction"),
                    "op": trace_context.get("op"),
                    "trace_id": trace_context.get("trace_id"),
                    "span_id": trace_context.get("span_id"),
                    "parent_span_id": trace_context.get("parent_span_id"),
                    "tags": payload.get("tags", {}),
                    "spans": [
                        {k: span.get(k) for k in ("op", "span_id", "parent_span_id")}
                        for span in payload.get("spans", [])
                    ],
                },
            )


def set_up_tracers(role: str) -> None:
    """What a user does at startup: both SDKs, with Celery's integrations."""
    provider = TracerProvider(resource=Resource.create({"service.name": f"tracing-{role}"}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(role)))
    trace.set_tracer_provider(provider)
    CeleryInstrumentor().instrument()
    sentry_sdk.init(
        dsn="http://public@127.0.0.1:9/1",
        transport=FileTransport(role),
        traces_sample_rate=1.0,
        integrations=[CeleryIntegration()],
        auto_enabling_integrations=False,  # Django's, Redis'...: spans these tests don't need
    )


@app.task(name=TASK)
def traced(label: str) -> str:
    return label


# The sender -----------------------------------------------------------------------------------


def publish(task_id: str, label: str, queue_name: str, via: str) -> None:
    if via == "send_task":  # what aftercommit 0.1's publisher thread called
        app.send_task(TASK, args=(label,), task_id=task_id, queue=queue_name)
        return
    # what the relay calls: Celery's message and publish, with its publish signals
    with app.producer_or_acquire() as producer:
        message = app.amqp.create_task_message(task_id, TASK, (label,), {})
        app.amqp.send_task_message(producer, TASK, message, queue=queue_name)


def new_task_id(label: str) -> str:
    return str(uuid.uuid4())


def play_requests(
    requests: int,
    dispatched: Any = None,
    first_dispatch: Any = None,
    dispatch: Any = new_task_id,
) -> dict[str, Any]:
    """Play ``requests`` web requests that each dispatch one task, then one dispatch outside any
    request (a management command, say). ``dispatch(label)`` runs inside the request and returns
    the task id; ``dispatched(task_id, label, captured)`` after it, as a commit hook would;
    ``first_dispatch()`` inside the first request."""
    tracer = trace.get_tracer("tests.tracing_app")
    seen = []
    for n in range(1, requests + 1):
        label = f"request-{n}"
        with (
            sentry_sdk.isolation_scope(),  # as Sentry's WSGI middleware does per request
            sentry_sdk.start_transaction(op="http.server", name=f"GET /{label}") as transaction,
            tracer.start_as_current_span(f"GET /{label}", kind=trace.SpanKind.SERVER) as span,
        ):
            captured = tracing.capture()
            task_id = dispatch(label)
            if n == 1 and first_dispatch is not None:
                first_dispatch()
            context = span.get_span_context()
            seen.append(
                {
                    "label": label,
                    "task_id": task_id,
                    "captured": captured,
                    "otel_trace_id": f"{context.trace_id:032x}",
                    "otel_span_id": f"{context.span_id:016x}",
                    "sentry_trace_id": transaction.trace_id,
                    "sentry_span_id": transaction.span_id,
                }
            )
        if dispatched is not None:
            dispatched(task_id, label, captured)  # after the request: after its commit
    # Sent right after the last request's: it must not land in that trace.
    outside = {"label": "outside", "captured": tracing.capture(), "task_id": dispatch("outside")}
    if dispatched is not None:
        dispatched(outside["task_id"], outside["label"], outside["captured"])
    return {"requests": seen, "outside": outside}


def through_aftercommit(queue_name: str) -> Any:
    """A dispatch as the user writes it: the task called inside the request's transaction."""
    from django.db import transaction

    def dispatch(label: str) -> str:
        with transaction.atomic():
            return str(traced.apply_async((label,), queue=queue_name).id)

    return dispatch


def send(queue_name: str, via: str, restored: bool, requests: int) -> dict[str, Any]:
    """The requests' tasks sent from one long-lived thread started inside the first request (as
    aftercommit 0.1's publisher was): with ``restored``, each publish runs inside
    ``tracing.restore()`` of the context its request captured."""
    outbox: queue.Queue[tuple[str, str, str] | None] = queue.Queue()
    errors: list[BaseException] = []

    def sender() -> None:
        while (item := outbox.get()) is not None:
            task_id, label, captured = item
            try:
                with tracing.restore(captured) if restored else contextlib.nullcontext():
                    publish(task_id, label, queue_name, via)
            except BaseException as exc:
                errors.append(exc)
            finally:
                outbox.task_done()

    def dispatched(task_id: str, label: str, captured: str) -> None:
        outbox.put((task_id, label, captured))
        outbox.join()

    thread = threading.Thread(target=sender, daemon=True)
    result = play_requests(requests, dispatched, first_dispatch=thread.start)
    outbox.put(None)
    if errors:
        raise errors[0]
    return result


def refused_publish(queue_name: str, restored: bool) -> dict[str, Any]:
    """A publish that fails between Celery's before_task_publish and after_task_publish signals
    (a broker outage): is the PRODUCER span OpenTelemetry started still current afterwards?"""
    with trace.get_tracer("tests.tracing_app").start_as_current_span("GET /refused"):
        captured = tracing.capture()

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("the broker refused the message")

    with app.producer_or_acquire() as producer:
        producer.publish = refuse
        message = app.amqp.create_task_message(str(uuid.uuid4()), TASK, ("refused",), {})
        with (
            contextlib.suppress(ConnectionError),
            tracing.restore(captured) if restored else contextlib.nullcontext(),
        ):
            app.amqp.send_task_message(producer, TASK, message, queue=queue_name, retry=False)
    return {"span_left_current": trace.get_current_span().get_span_context().is_valid}


def relay(outbox_path: Path, queue_name: str) -> None:
    """What the relay does in its own process: each stored message published inside restore()."""
    for task_id, label, captured in json.loads(outbox_path.read_text()):
        with tracing.restore(captured):
            publish(task_id, label, queue_name, "send_task_message")


def purge(queue_name: str) -> None:
    """Drop what an interrupted run left, so that what is read back is this run's."""
    with app.connection_for_write() as connection:
        simple = connection.SimpleQueue(queue_name)
        simple.clear()
        simple.close()


def read_back(queue_name: str, count: int) -> dict[str, Any]:
    """The messages as the broker holds them, keyed by task id."""
    headers = {}
    with app.connection_for_read() as connection:
        simple = connection.SimpleQueue(queue_name)
        try:
            for _ in range(count):
                message = simple.get(timeout=10)
                headers[message.headers["id"]] = message.headers
                message.ack()
        finally:
            simple.close()
    return headers


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queue", required=True)
    parser.add_argument("--via", choices=["send_task_message", "send_task"])
    parser.add_argument("--bare", action="store_true", help="publish without tracing.restore()")
    parser.add_argument("--requests", type=int, default=2)
    parser.add_argument("--read-back", action="store_true", help="consume the messages after")
    parser.add_argument(
        "--dispatch-to", type=Path, help="store the dispatches in this file, publish nothing"
    )
    parser.add_argument("--relay-from", type=Path, help="publish the dispatches stored there")
    parser.add_argument("--refused-publish", action="store_true", help="see refused_publish()")
    parser.add_argument(
        "--aftercommit", action="store_true", help="dispatch with apply_async(), publish nothing"
    )
    parser.add_argument(
        "--run-relay", action="store_true", help="run `manage.py aftercommit relay` until SIGTERM"
    )
    args = parser.parse_args(argv)
    if args.run_relay:
        from django.core.management import call_command

        set_up_tracers("relay")
        call_command("aftercommit", "relay")
        return
    if args.aftercommit:
        set_up_tracers("sender")
        result = play_requests(args.requests, dispatch=through_aftercommit(args.queue))
        (OUT / "sender-result.json").write_text(json.dumps(result))
        return
    if args.refused_publish:
        set_up_tracers("sender")
        result = refused_publish(args.queue, not args.bare)
        (OUT / "sender-result.json").write_text(json.dumps(result))
        return
    if args.relay_from:
        set_up_tracers("relay")
        relay(args.relay_from, args.queue)
        return
    set_up_tracers("sender")
    if args.dispatch_to:
        stored: list[tuple[str, str, str]] = []
        result = play_requests(args.requests, lambda *row: stored.append(row))
        args.dispatch_to.write_text(json.dumps(stored))
    else:
        if args.read_back:
            purge(args.queue)
        result = send(args.queue, args.via, not args.bare, args.requests)
        if args.read_back:
            result["messages"] = read_back(args.queue, args.requests + 1)
    (OUT / "sender-result.json").write_text(json.dumps(result, default=str))


if os.environ.get("TRACING_ROLE") == "worker":
    set_up_tracers("worker")

if __name__ == "__main__":
    main()
