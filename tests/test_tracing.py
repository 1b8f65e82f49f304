"""Traces stay whole: a task published later, by another thread or process, stays in the trace of
the request that dispatched it (issue 11, part 5).

The hook's contract runs here with stand-in tracers. The real SDKs (OpenTelemetry with its Celery
instrumentation, sentry-sdk with its Celery integration) run in subprocesses, tests/tracing_app.py:
both patch Celery for the whole process, and OpenTelemetry's provider can be set only once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aftercommit import tracing
from tests.conftest import ARTIFACTS, ROOT, Broker, Process, _subprocess_env, wait_for

# The hook, with stand-in tracers ------------------------------------------------------------------

_current: threading.local = threading.local()


class StandIn:
    """A tracer whose context is a thread-local value, like a real SDK's context variable."""

    def __init__(self, name: str = "standin") -> None:
        self.name = name
        self.restored: list[dict[str, str]] = []

    def capture(self) -> dict[str, str] | None:
        value = getattr(_current, self.name, None)
        return {"id": value} if value else None

    @contextlib.contextmanager
    def restore(self, carrier: dict[str, str]) -> Iterator[None]:
        self.restored.append(carrier)
        before = getattr(_current, self.name, None)
        setattr(_current, self.name, carrier.get("id"))
        try:
            yield
        finally:
            setattr(_current, self.name, before)


class Broken:
    def __init__(self, fail_in: str) -> None:
        self.name = f"broken-{fail_in}"
        self.fail_in = fail_in

    def capture(self) -> dict[str, str] | None:
        if self.fail_in == "capture":
            raise RuntimeError("capture failed")
        return {"x": "1"}

    @contextlib.contextmanager
    def restore(self, carrier: dict[str, str]) -> Iterator[None]:
        if self.fail_in == "restore":
            raise RuntimeError("restore failed")
        yield
        if self.fail_in == "exit":
            raise RuntimeError("exit failed")


@pytest.fixture
def registered() -> Iterator[Any]:
    names: list[str] = []

    def register(tracer: Any) -> Any:
        tracing.register(tracer)
        names.append(tracer.name)
        return tracer

    yield register
    for name in names:
        tracing.unregister(name)


def test_capture__no_tracer_active__empty() -> None:
    assert tracing.capture() == ""


def test_restore__in_another_thread__tracer_sees_the_captured_context(registered: Any) -> None:
    standin = registered(StandIn())
    _current.standin = "request-1"
    try:
        captured = tracing.capture()
    finally:
        _current.standin = None
    assert json.loads(captured) == {"standin": {"id": "request-1"}}

    seen = []

    def sender() -> None:
        for stored in (captured, "", captured):
            with tracing.restore(stored):
                seen.append(getattr(_current, "standin", None))
            seen.append(getattr(_current, "standin", None))

    thread = threading.Thread(target=sender)
    thread.start()
    thread.join()
    # Nothing captured: the tracer is still asked to restore, with {}, to start clean.
    assert standin.restored == [{"id": "request-1"}, {}, {"id": "request-1"}]
    assert seen == ["request-1", None, None, None, "request-1", None]


def test_register__same_name__replaces(registered: Any) -> None:
    first, second = registered(StandIn()), registered(StandIn())
    with tracing.restore(""):
        pass
    assert (first.restored, second.restored) == ([], [{}])


def test_a_batch_of_several_traces__each_publish_runs_in_its_own_rows_context(
    registered: Any,
) -> None:
    """The relay restores a context once for consecutive rows that share it; a row of another
    request, or of none, still publishes in its own."""
    from celery import Celery
    from celery.signals import before_task_publish

    from aftercommit.brokers import Sender
    from aftercommit.messages import Outgoing
    from aftercommit.models import OutboxMessage

    registered(StandIn())

    def captured(request: str) -> str:
        _current.standin = request
        try:
            return tracing.capture()
        finally:
            _current.standin = None

    traces = [captured("a"), captured("a"), "", captured("b"), captured("a")]
    app = Celery("traces", broker="memory://", set_as_current=False)
    seen: list[tuple[str, str | None]] = []

    def on_publish(headers: dict[str, Any], **_: Any) -> None:
        seen.append((headers["id"], getattr(_current, "standin", None)))

    items = [
        Outgoing(
            OutboxMessage(task_id=f"t{i}", trace=trace),
            "traces.task",
            app.amqp.create_task_message(f"t{i}", "traces.task", (), {}),
            app.amqp.router.route({}, "traces.task"),
        )
        for i, trace in enumerate(traces)
    ]
    before_task_publish.connect(on_publish, weak=False)
    try:
        outcome = Sender(app).send(items)
    finally:
        before_task_publish.disconnect(on_publish)
    assert len(outcome.sent) == 5
    assert seen == [("t0", "a"), ("t1", "a"), ("t2", None), ("t3", "b"), ("t4", "a")]
    assert getattr(_current, "standin", None) is None


@pytest.mark.parametrize("fail_in", ["capture", "restore", "exit"])
def test_broken_tracer__logged_and_skipped__others_and_the_publish_unaffected(
    registered: Any, fail_in: str, caplog: pytest.LogCaptureFixture
) -> None:
    registered(Broken(fail_in))
    standin = registered(StandIn())
    _current.standin = "request-1"
    try:
        captured = tracing.capture()
    finally:
        _current.standin = None
    assert json.loads(captured)["standin"] == {"id": "request-1"}
    published = []
    with tracing.restore(captured):
        published.append(getattr(_current, "standin", None))
    assert published == ["request-1"]
    assert standin.restored == [{"id": "request-1"}]
    failure = [r for r in caplog.records if f"'broken-{fail_in}'" in r.getMessage()]
    assert failure, caplog.text
    assert failure[0].levelno == logging.WARNING
    assert "unregister('broken-" in failure[0].getMessage()


def test_restore__the_publish_raises__propagates_and_context_restored(registered: Any) -> None:
    registered(StandIn())
    captured = json.dumps({"standin": {"id": "request-1"}})
    with pytest.raises(ConnectionError), tracing.restore(captured):
        raise ConnectionError("broker down")
    assert getattr(_current, "standin", None) is None


@pytest.mark.parametrize("stored", ["not json", "[1]", '{"standin": "x"}', 42])
def test_restore__not_what_capture_returns__warns_and_publishes_without_context(
    registered: Any, caplog: pytest.LogCaptureFixture, stored: Any
) -> None:
    standin = registered(StandIn())
    ran = False
    with tracing.restore(stored):
        ran = True
    assert ran
    assert standin.restored == [{}]
    if stored != '{"standin": "x"}':  # valid JSON, only its carrier is unusable
        assert "not the JSON object tracing.capture() returns" in caplog.text


# The real SDKs ------------------------------------------------------------------------------------


# Fixed names: a broker keeps every queue declared, so a name per run would pile up.
READ_BACK_QUEUE = "aftercommit-tracing-read-back"


def _env(broker: Broker, out: Path, **extra: str) -> dict[str, str]:
    """A test subprocess's environment: the test databases, the broker, where to record."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**_subprocess_env(broker), **broker.env, "TRACING_OUT": str(out), **extra}
    if "TRACING_ROLE" not in extra:
        env.pop("TRACING_ROLE", None)
    return env


def _run_sender(broker: Broker, out: Path, queue: str, *args: str) -> dict[str, Any]:
    """tests/tracing_app.py's sender: two requests, one sending thread started in the first."""
    _run_app(broker, out, queue, *args)
    return json.loads((out / "sender-result.json").read_text())  # type: ignore[no-any-return]


def _run_app(broker: Broker, out: Path, queue: str, *args: str) -> None:
    # -W error: the SDKs must not warn under the suite's filterwarnings = error either.
    argv = [sys.executable, "-W", "error", "-m", "tests.tracing_app", "--queue", queue, *args]
    done = subprocess.run(
        argv, cwd=ROOT, env=_env(broker, out), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _records(out: Path, pattern: str) -> list[dict[str, Any]]:
    records = []
    for path in out.glob(pattern):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):  # a line the worker is still writing
                records.append(json.loads(line))
    return records


def _message_id(span: dict[str, Any]) -> str | None:
    attributes = span["attributes"]
    # the attribute's name before OpenTelemetry's semantic conventions 1.21
    return attributes.get("messaging.message.id") or attributes.get("messaging.message_id")


def _trace_ids(requests: list[dict[str, Any]]) -> set[str]:
    """Every trace the requests started, OpenTelemetry's and Sentry's."""
    return {r["otel_trace_id"] for r in requests} | {r["sentry_trace_id"] for r in requests}


def _trace_id(traceparent: str) -> str:
    return traceparent.split("-")[1]  # W3C: version-traceid-spanid-flags


@pytest.fixture
def out(request: pytest.FixtureRequest) -> Path:
    return ARTIFACTS / "tracing" / f"{request.node.name[:60]}-{uuid.uuid4().hex[:8]}"


@pytest.mark.services
@pytest.mark.parametrize("via", ["send_task_message", "send_task"])
def test_publish_in_another_thread_inside_restore__message_and_span_in_the_requests_trace(
    broker: Broker, out: Path, via: str
) -> None:
    result = _run_sender(broker, out, READ_BACK_QUEUE, "--via", via, "--read-back")
    requests, messages = result["requests"], result["messages"]
    producer_spans = {
        _message_id(span): span
        for span in _records(out, "otel-sender-*.jsonl")
        if span["kind"] == "PRODUCER"
    }
    assert len(requests) == 2
    for request in requests:
        headers = messages[request["task_id"]]
        # OpenTelemetry: the PRODUCER span is the request span's child, and the message says so.
        span = producer_spans[request["task_id"]]
        assert span["name"] == "apply_async/tests.tracing_app.traced"
        assert (span["trace_id"], span["parent_span_id"]) == (
            request["otel_trace_id"],
            request["otel_span_id"],
        )
        assert headers["traceparent"].split("-")[1:3] == [span["trace_id"], span["span_id"]]
        # Sentry: the worker continues from the message's inner headers (celery#4875).
        sentry_trace = headers["headers"]["sentry-trace"]
        assert sentry_trace.split("-")[0] == request["sentry_trace_id"], request["label"]
        assert f"sentry-trace_id={request['sentry_trace_id']}" in headers["headers"]["baggage"]
        if via == "send_task_message":  # from the captured context: the dispatching span
            assert sentry_trace.split("-")[1] == request["sentry_span_id"]
    # Dispatched outside any request, sent right after request 2's message by the same thread.
    outside = result["outside"]
    headers = messages[outside["task_id"]]
    span = producer_spans[outside["task_id"]]
    assert "otel" not in json.loads(outside["captured"])
    assert span["parent_span_id"] is None
    request_traces = _trace_ids(requests)
    assert span["trace_id"] not in request_traces
    assert headers["headers"]["sentry-trace"].split("-")[0] not in request_traces


@pytest.mark.services
@pytest.mark.parametrize("via", ["send_task_message", "send_task"])
def test_publish_in_another_thread_without_restore__trace_broken(
    broker: Broker, out: Path, via: str
) -> None:
    """The bug restore() fixes, as aftercommit 0.1's publisher thread had it: this is what the
    test above would see without restore()."""
    result = _run_sender(broker, out, READ_BACK_QUEUE, "--via", via, "--bare", "--read-back")
    first, second = result["requests"]
    for request in (first, second):
        headers = result["messages"][request["task_id"]]
        # OpenTelemetry: the sending thread has no context, every task starts a new trace.
        assert _trace_id(headers["traceparent"]) != request["otel_trace_id"]
    inner = [result["messages"][r["task_id"]].get("headers") or {} for r in (first, second)]
    if via == "send_task":
        # Sentry: the thread kept the first request's scope (sentry-sdk 2.75; 2.0 sends no
        # header from there): the second request's task is not in its trace.
        assert inner[1].get("sentry-trace", "-").split("-")[0] != second["sentry_trace_id"]
    else:
        # Sentry adds its headers in apply_async/send_task only: nothing links the task at all.
        assert [h.get("sentry-trace") for h in inner] == [None, None]


@pytest.mark.services
@pytest.mark.parametrize("restored", [True, False], ids=["restore", "bare"])
def test_publish_refused_inside_restore__its_span_does_not_stay_current(
    broker: Broker, out: Path, restored: bool
) -> None:
    """OpenTelemetry's instrumentation leaves its PRODUCER span current in the sending thread
    when the publish fails (after_task_publish never comes), so the relay's next messages would
    become its children; restore() puts the thread's context back. Bare: the leak itself."""
    args = ["--refused-publish"] + ([] if restored else ["--bare"])
    result = _run_sender(broker, out, READ_BACK_QUEUE, *args)
    assert result["span_left_current"] is not restored


# End to end, with a worker ------------------------------------------------------------------------


def _start_worker(broker: Broker, queue: str, out: Path, relays: bool) -> Process:
    """A worker with both SDKs set up (tests/tracing_app.py) on ``queue``, relaying or not."""
    settings = json.dumps({"RELAY_IN_WORKER": relays})
    env = _env(broker, out, TRACING_ROLE="worker", AFTERCOMMIT_TEST_SETTINGS=settings)
    # Warnings are errors, as under the suite's filterwarnings = error, so an SDK deprecation
    # shows here; except Celery's about running as root, which CI containers do.
    env["PYTHONWARNINGS"] = "error,default:You're running the worker with superuser privileges"
    argv = [sys.executable, "-m", "celery", "-A", "tests.tracing_app", "worker", "-P", "threads"]
    argv += ["-c", "2", "-Q", queue, "-l", "info", "--without-heartbeat", "--without-gossip"]
    argv += ["--without-mingle", "-n", f"{queue}-{os.getpid()}@%h"]
    proc = Process(queue, argv, env)
    wait_for(lambda: "ready." in proc.output() or proc.proc.poll() is not None, timeout=60)
    if proc.proc.poll() is not None:
        raise RuntimeError(f"the tracing worker exited:\n{proc.output()[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def tracing_worker(
    broker: Broker, django_db_setup: None, django_db_blocker: Any
) -> Iterator[tuple[Process, str, Path]]:
    """A worker that does not relay, for the tests that publish by other means."""
    queue = "aftercommit-tracing"
    out = ARTIFACTS / "tracing" / f"worker-{uuid.uuid4().hex[:8]}"
    proc = _start_worker(broker, queue, out, relays=False)
    try:
        yield proc, queue, out
    finally:
        proc.stop()


def _worker_runs(worker_out: Path, requests: list[dict[str, Any]]) -> tuple[dict, dict]:
    """Each task's OpenTelemetry CONSUMER span and Sentry transaction, once the worker ran all."""
    task_ids = {r["task_id"] for r in requests}

    def collect() -> tuple[dict, dict] | None:
        otel = {
            _message_id(s): s
            for s in _records(worker_out, "otel-worker-*.jsonl")
            if s["kind"] == "CONSUMER"
        }
        sentry = {
            t["tags"].get("celery_task_id"): t
            for t in _records(worker_out, "sentry-worker-*.jsonl")
            if t["type"] == "transaction"
        }
        return (otel, sentry) if task_ids <= otel.keys() and task_ids <= sentry.keys() else None

    found = wait_for(collect, timeout=30)
    assert isinstance(found, tuple)
    return found


def _assert_in_the_requests_traces(
    result: dict[str, Any],
    otel: dict[str, Any],
    sentry: dict[str, Any],
    producers: dict[str, Any],
    sender_out: Path,
) -> None:
    """Each request's task: published under the request span, run in the request's trace (for
    Sentry, as the child of the span current at dispatch); the one dispatched outside any request,
    sent right after them, in none of their traces."""
    requests, outside = result["requests"], result["outside"]
    # Sentry's own apply_async hook runs at an aftercommit dispatch too (the task goes through
    # Celery's apply_async), and its headers are stored with the row: the task's parent is then
    # that hook's queue.submit.celery span, in the request's transaction, as with plain Celery.
    submit_spans = {
        span["span_id"]: span["parent_span_id"]
        for record in _records(sender_out, "sentry-sender-*.jsonl")
        for span in record["spans"]
        if span["op"] == "queue.submit.celery"
    }
    for request in requests:
        task_id, label = request["task_id"], request["label"]
        assert producers[task_id]["parent_span_id"] == request["otel_span_id"], label
        run = otel[task_id]
        assert run["name"] == "run/tests.tracing_app.traced"
        assert run["trace_id"] == request["otel_trace_id"], label
        transaction = sentry[task_id]
        assert transaction["op"] == "queue.task.celery"
        assert transaction["trace_id"] == request["sentry_trace_id"], label
        parent = transaction["parent_span_id"]
        assert request["sentry_span_id"] in (parent, submit_spans.get(parent)), label
    request_traces = _trace_ids(requests)
    assert otel[outside["task_id"]]["trace_id"] not in request_traces
    assert sentry[outside["task_id"]]["trace_id"] not in request_traces


def _producers(out: Path, role: str) -> dict[str | None, dict[str, Any]]:
    spans = _records(out, f"otel-{role}-*.jsonl")
    return {_message_id(s): s for s in spans if s["kind"] == "PRODUCER"}


@pytest.mark.services
@pytest.mark.django_db(transaction=True, databases=["default", "other"])  # the outbox
def test_task_dispatched_in_a_request__the_workers_relay_sends_it__runs_in_the_requests_trace(
    broker: Broker, tracing_worker: Any, out: Path
) -> None:
    """The default deployment: the relay is a thread of the worker (its bootstep)."""
    queue = "aftercommit-tracing-relayed"
    worker_out = out / "relaying-worker"
    worker = _start_worker(broker, queue, worker_out, relays=True)
    try:
        result = _run_sender(broker, out, queue, "--aftercommit")
        otel, sentry = _worker_runs(worker_out, [*result["requests"], result["outside"]])
    finally:
        worker.stop()
    _assert_in_the_requests_traces(result, otel, sentry, _producers(worker_out, "worker"), out)


@pytest.mark.services
@pytest.mark.django_db(transaction=True, databases=["default", "other"])  # the outbox
def test_task_dispatched_in_a_request__relay_command_sends_it__runs_in_the_requests_trace(
    broker: Broker, tracing_worker: tuple[Process, str, Path], out: Path
) -> None:
    """`manage.py aftercommit relay`, with the SDKs set up in its process; the worker does not
    relay."""
    _, queue, worker_out = tracing_worker
    argv = [sys.executable, "-m", "tests.tracing_app", "--queue", queue, "--run-relay"]
    relay = Process("tracing-relay", argv, _env(broker, out))
    try:
        result = _run_sender(broker, out, queue, "--aftercommit")
        otel, sentry = _worker_runs(worker_out, [*result["requests"], result["outside"]])
    finally:
        relay.stop()
    _assert_in_the_requests_traces(result, otel, sentry, _producers(out, "relay"), out)


@pytest.mark.services
def test_task_sent_from_another_thread_inside_restore__runs_in_the_requests_trace(
    broker: Broker, tracing_worker: tuple[Process, str, Path], out: Path
) -> None:
    """restore() itself, around a plain Celery publish from a thread of the dispatching
    process."""
    _, queue, worker_out = tracing_worker
    result = _run_sender(broker, out, queue, "--via", "send_task_message")
    otel, sentry = _worker_runs(worker_out, [*result["requests"], result["outside"]])
    _assert_in_the_requests_traces(result, otel, sentry, _producers(out, "sender"), out)


@pytest.mark.services
def test_task_relayed_by_another_process__runs_in_the_requests_trace(
    broker: Broker, tracing_worker: tuple[Process, str, Path], out: Path
) -> None:
    """restore() itself in a process other than the dispatching one: the captured text carries
    everything."""
    _, queue, worker_out = tracing_worker
    outbox = out / "outbox.json"
    result = _run_sender(broker, out, queue, "--dispatch-to", str(outbox))
    _run_app(broker, out, queue, "--relay-from", str(outbox))
    otel, sentry = _worker_runs(worker_out, [*result["requests"], result["outside"]])
    _assert_in_the_requests_traces(result, otel, sentry, _producers(out, "relay"), out)


@pytest.mark.services
def test_task_sent_from_another_thread_without_restore__runs_in_a_wrong_trace(
    broker: Broker, tracing_worker: tuple[Process, str, Path], out: Path
) -> None:
    """The bug, end to end, as aftercommit 0.1's publisher thread (send_task) had it."""
    _, queue, worker_out = tracing_worker
    result = _run_sender(broker, out, queue, "--via", "send_task", "--bare")
    otel, sentry = _worker_runs(worker_out, result["requests"])
    first, second = result["requests"]
    for request in (first, second):
        assert otel[request["task_id"]]["trace_id"] != request["otel_trace_id"]
    # In the first request's trace with sentry-sdk 2.75, a trace of its own with 2.0.
    assert sentry[second["task_id"]]["trace_id"] != second["sentry_trace_id"]
