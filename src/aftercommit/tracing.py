"""Keeps a task in the trace of the request that dispatched it, although another thread or process
publishes it later.

A tracer's Celery integration links the task to the trace that is current when the message is
published. The relay publishes long after the request, elsewhere, so the dispatch captures the
context and the relay restores it around each message's publish::

    # at dispatch, in the caller's thread: 0.2 µs with no tracer SDK imported, 2 µs with one
    # imported but not configured (benchmarks/tracing_cost.py)
    row.trace_context = tracing.capture()          # "" or compact JSON: {"otel": {...}, ...}

    # in the sender, around everything one message's publish does: Celery's
    # before_task_publish signal, the broker write, after_task_publish
    with tracing.restore(row.trace_context):
        app.amqp.send_task_message(producer, name, message, **options)

Inside ``restore()`` the tracers see the dispatching request's context, so the publish span and
the headers their integrations put on the message continue its trace. Each ``restore()`` starts
from a clean context, also when nothing was captured, so no trace leaks from one message to the
next. A broken tracer never breaks a dispatch or a publish: its error is logged once and the
message goes out without its context. ``restore()`` lets the publish's own exceptions through.

Built in, each active only when its SDK is imported and configured in the process at the time:

- ``otel``: OpenTelemetry, with a TracerProvider set (``opentelemetry-instrumentation-celery``
  starts the ``apply_async/<task>`` PRODUCER span under the restored context and injects
  ``traceparent`` into the message).
- ``sentry``: sentry-sdk 2.x with an active client. Each ``restore()`` runs in its own isolation
  scope that continues the captured trace. Sentry's Celery integration adds its ``sentry-trace``
  and ``baggage`` headers in ``Task.apply_async`` and ``Celery.send_task`` only, so when the
  sender publishes through ``app.amqp.send_task_message`` (or kombu) a ``before_task_publish``
  receiver adds them here, from the captured context, where Sentry's worker looks for them; a
  header already present is left alone. The worker's task transaction is then a child of the span
  that was current at dispatch.

Another tracer plugs in with :func:`register`::

    class MyTracer:
        name = "mytracer"   # the key of its carrier in the captured JSON: keep it stable

        def capture(self) -> dict[str, str] | None:
            # the caller's thread; None when there is nothing to propagate. Keep it cheap.
            return {"my-trace": current_trace_header()} if tracing_is_on() else None

        def restore(self, carrier: dict[str, str]) -> AbstractContextManager[None]:
            # the sender's thread, around one message's publish; carrier is {} when nothing was
            # captured (start clean then). Its exit is always called without the exception.
            return activate(carrier)

    tracing.register(MyTracer())

``tracing.unregister("otel")`` (or ``"sentry"``) turns a built-in off. A tracer whose Celery
integration does not hook Celery's publish signals can connect its own ``before_task_publish``
receiver and add its headers to the message there, as ``sentry`` does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from contextvars import ContextVar
from typing import Any, Protocol

logger = logging.getLogger(__name__)

__all__ = ["Tracer", "capture", "register", "restore", "unregister"]


class Tracer(Protocol):
    """What a tracer provides to have its context carried from dispatch to publish."""

    #: The tracer's key in the captured JSON; a restore finds its carrier by it.
    name: str

    def capture(self) -> dict[str, str] | None:
        """The current context as text headers, or None when there is none to propagate."""

    def restore(self, carrier: dict[str, str]) -> AbstractContextManager[None]:
        """Make ``carrier`` the current context while the block runs (``{}``: a clean one)."""


# Replaced, never changed in place: capture() and restore() iterate it in other threads.
_tracers: tuple[Tracer, ...] = ()
_reported: set[tuple[str, str]] = set()


def register(tracer: Tracer) -> None:
    """Add ``tracer``, or replace the one registered under the same name."""
    global _tracers
    _tracers = (*(t for t in _tracers if t.name != tracer.name), tracer)


def unregister(name: str) -> None:
    """Remove the tracer registered as ``name``, if any."""
    global _tracers
    _tracers = tuple(t for t in _tracers if t.name != name)


def capture() -> str:
    """The trace context of every active tracer as compact JSON; "" when there is none.

    Never raises: a tracer that fails is logged and left out.
    """
    carriers: dict[str, dict[str, str]] | None = None
    for tracer in _tracers:
        try:
            carrier = tracer.capture()
        except Exception:
            _report(tracer, "capture")
            continue
        if carrier:
            if carriers is None:
                carriers = {}
            carriers[tracer.name] = carrier
    if carriers is None:
        return ""
    return json.dumps(carriers, separators=(",", ":"))


@contextlib.contextmanager
def restore(captured: str) -> Iterator[None]:
    """Run the block in the context ``capture()`` returned, for every registered tracer.

    Tracers' own failures are logged and skipped; the block's exceptions propagate.
    """
    carriers = _parse(captured)
    entered: list[tuple[Tracer, AbstractContextManager[None]]] = []
    for tracer in _tracers:
        try:
            manager = tracer.restore(carriers.get(tracer.name) or {})
            manager.__enter__()
        except Exception:
            _report(tracer, "restore")
            continue
        entered.append((tracer, manager))
    try:
        yield
    finally:
        for tracer, manager in reversed(entered):
            try:
                manager.__exit__(None, None, None)
            except Exception:
                _report(tracer, "restore's exit")


def _parse(captured: str) -> dict[str, dict[str, str]]:
    if not captured:
        return {}
    try:
        carriers = json.loads(captured)
    except (TypeError, ValueError):
        carriers = None
    if not isinstance(carriers, dict):
        logger.warning(
            "aftercommit: ignored a stored trace context that is not the JSON object "
            "tracing.capture() returns: %.200r; the message is published without it",
            captured,
        )
        return {}
    return {k: v for k, v in carriers.items() if isinstance(v, dict)}


def _report(tracer: Tracer, phase: str) -> None:
    """Log a tracer's failure with its traceback once, then quietly: it may fail per message."""
    key = (getattr(tracer, "name", repr(tracer)), phase)
    first = key not in _reported
    _reported.add(key)
    logger.log(
        logging.WARNING if first else logging.DEBUG,
        "aftercommit: tracer %r failed in %s and was skipped (the task is sent without its "
        "trace context); fix or unregister it: aftercommit.tracing.unregister(%r)",
        key[0],
        phase,
        key[0],
        exc_info=first,
    )


# OpenTelemetry ------------------------------------------------------------------------------------


class OpenTelemetry:
    """OpenTelemetry's global propagator (W3C traceparent and baggage by default)."""

    name = "otel"

    def _configured(self) -> Any:
        # Nobody configured OpenTelemetry if nobody imported it: skip importing it here too.
        trace = sys.modules.get("opentelemetry.trace")
        if trace is None:
            return None
        provider = trace.get_tracer_provider()
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return None
        return trace

    def capture(self) -> dict[str, str] | None:
        if self._configured() is None:
            return None
        from opentelemetry import propagate

        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier or None

    def restore(self, carrier: dict[str, str]) -> AbstractContextManager[None]:
        if self._configured() is None:
            return contextlib.nullcontext()
        return self._attached(carrier)

    @contextlib.contextmanager
    def _attached(self, carrier: dict[str, str]) -> Iterator[None]:
        from opentelemetry import context, propagate

        # Extracted onto an empty context, not the sender's: nothing of the thread's leaks in.
        token = context.attach(propagate.extract(carrier, context=context.Context()))
        try:
            yield
        finally:
            # Also undoes what an instrumentation left attached (its after_task_publish never
            # ran because the publish failed, or the task is not registered in this process).
            context.detach(token)


# Sentry -------------------------------------------------------------------------------------------

#: The sentry-trace and baggage headers for the message being published in this context.
_sentry_headers: ContextVar[dict[str, str] | None] = ContextVar(
    "aftercommit_sentry_headers", default=None
)
_sentry_receiver_connected = False


class Sentry:
    """sentry-sdk 2.x: its ``sentry-trace`` and ``baggage`` headers."""

    name = "sentry"

    def _client(self) -> Any:
        sentry_sdk = sys.modules.get("sentry_sdk")
        if sentry_sdk is None:
            return None
        client = sentry_sdk.get_client()
        return client if client.is_active() else None

    def capture(self) -> dict[str, str] | None:
        if self._client() is None:
            return None
        import sentry_sdk

        carrier = {}
        traceparent = sentry_sdk.get_traceparent()
        if traceparent:
            carrier["sentry-trace"] = traceparent
            baggage = sentry_sdk.get_baggage()
            if baggage:
                carrier["baggage"] = baggage
        return carrier or None

    def restore(self, carrier: dict[str, str]) -> AbstractContextManager[None]:
        client = self._client()
        if client is None:
            return contextlib.nullcontext()
        return self._continued(client, carrier)

    @contextlib.contextmanager
    def _continued(self, client: Any, carrier: dict[str, str]) -> Iterator[None]:
        import sentry_sdk
        from sentry_sdk.scope import Scope

        _connect_sentry_receiver()
        with sentry_sdk.isolation_scope() as isolation:
            # Both scopes are forks of the sender thread's: drop its span and trace (a thread
            # started inside a request inherits that request's) and take the captured one.
            # An empty carrier starts a new trace.
            current = Scope.get_current_scope()  # sentry_sdk.get_current_scope() is 2.2+
            current.span = isolation.span = None
            isolation.generate_propagation_context(carrier)
            if current.get_active_propagation_context() is not (
                isolation.get_active_propagation_context()
            ):  # rare, and it would win: parsing the carrier again costs half a restore
                current.generate_propagation_context(carrier)
            headers = carrier if carrier and _sentry_propagates(client) else None
            token = _sentry_headers.set(headers)
            try:
                yield
            finally:
                _sentry_headers.reset(token)


def _sentry_propagates(client: Any) -> bool:
    """Whether Sentry's Celery integration is on and propagates traces."""
    try:
        from sentry_sdk.integrations.celery import CeleryIntegration
    except Exception:  # its module raises DidNotEnable when Celery is missing
        return False
    integration = client.get_integration(CeleryIntegration)
    return integration is not None and bool(integration.propagate_traces)


def _connect_sentry_receiver() -> None:
    global _sentry_receiver_connected
    if not _sentry_receiver_connected:
        from celery.signals import before_task_publish

        before_task_publish.connect(
            _add_sentry_headers, weak=False, dispatch_uid="aftercommit.tracing.sentry"
        )
        _sentry_receiver_connected = True


def _add_sentry_headers(headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Put the restored trace where Sentry's Celery integration puts it and its worker reads it.

    Its worker reads the message's inner ``headers`` dict (celery#4875). ``sentry-trace`` goes on
    top too, as Sentry's own hook does; ``baggage`` does not, where OpenTelemetry's W3C baggage
    would read it.
    """
    carrier = _sentry_headers.get()
    if carrier is None or headers is None:
        return
    if not headers.pop("sentry-propagate-traces", True):  # Sentry's own per-call opt-out
        return
    inner = headers.get("headers")
    if not isinstance(inner, dict):
        inner = headers["headers"] = {}
    for key, value in carrier.items():
        inner.setdefault(key, value)
    if "sentry-trace" in carrier:
        headers.setdefault("sentry-trace", carrier["sentry-trace"])
    # Sentry's worker computes the queue latency from it, as for its own publishes.
    inner.setdefault("sentry-task-enqueued-time", time.time())


register(OpenTelemetry())
register(Sentry())
