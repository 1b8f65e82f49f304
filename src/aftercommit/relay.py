"""The relay: sends what the in-process publisher did not (the process died, the broker was down).

It claims due rows in one short transaction, publishes them outside it through the shared publisher
path, then marks them in another. A broker outage hands the rows back untouched; a message that
fails on its own is retried with capped exponential backoff and jitter, then dead-lettered.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from types import FrameType
from typing import Any

from celery import Celery
from django.db import connections, router
from django.utils import timezone

from . import signals
from .conf import settings
from .models import Lease, OutboxMessage
from .publisher import Channel, mark_sent, send

logger = logging.getLogger("aftercommit.relay")

CLAIM_LEASE = "claim"  # the single-claimer lease on databases without SKIP LOCKED
HEARTBEAT_PREFIX = "relay:"
HEARTBEAT_EVERY = 5.0


def outbox_aliases() -> list[str]:
    """The databases that hold an outbox: the setting, else every alias the routers allow."""
    configured = settings.DATABASES
    if configured is not None:
        return list(configured)
    return [alias for alias in connections if router.allow_migrate_model(alias, OutboxMessage)]


def backoff(attempts: int) -> float:
    """Seconds before attempt ``attempts + 1``: doubling from BACKOFF_BASE, capped, jittered."""
    ceiling = min(settings.BACKOFF_MAX, settings.BACKOFF_BASE * 2 ** max(attempts - 1, 0))
    return random.uniform(ceiling / 2, ceiling)


class Relay:
    def __init__(
        self,
        app: Celery,
        *,
        aliases: Sequence[str] | None = None,
        batch_size: int | None = None,
    ) -> None:
        self.app = app
        self.aliases = list(aliases) if aliases else outbox_aliases()
        self.batch_size = batch_size
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.channel = Channel(app)
        self.stopping = threading.Event()
        self._broker_failures = 0
        self._last_heartbeat: dict[str, float] = {}
        self._last_purge = 0.0

    # The loop -----------------------------------------------------------------------------

    def run(self, *, once: bool = False) -> None:
        """Relay until SIGTERM/SIGINT (or, with ``once``, until nothing is due)."""
        restore = self._install_signal_handlers()
        logger.info("relay %s started on %s", self.holder, ", ".join(self.aliases))
        try:
            while not self.stopping.is_set():
                busy = False
                for alias in self.aliases:
                    if self.stopping.is_set():
                        break
                    busy = self._step(alias) or busy
                if once and not busy:
                    break
                if not busy:
                    self.stopping.wait(self._idle_wait())
        finally:
            self._shutdown()
            restore()
            logger.info("relay %s stopped", self.holder)

    def stop(self, *_: Any) -> None:
        self.stopping.set()

    def _idle_wait(self) -> float:
        if self._broker_failures:
            return min(settings.BROKER_BACKOFF_MAX, 0.5 * 2**self._broker_failures)
        return float(settings.POLL_INTERVAL)

    def _step(self, alias: str) -> bool:
        """One batch on one database; True when it had work. Database errors never end the loop."""
        try:
            self._heartbeat(alias)
            self._maybe_purge(alias)
            return self.run_batch(alias) > 0
        except Exception:
            logger.exception("relay batch on %r failed; reconnecting", alias)
            connections[alias].close()
            self.stopping.wait(min(settings.POLL_INTERVAL, 1.0))
            return False

    # One batch -----------------------------------------------------------------------------

    def run_batch(self, alias: str) -> int:
        """Claim, publish, settle. Returns how many messages were claimed."""
        now = timezone.now()
        lease = dt.timedelta(seconds=settings.LEASE)
        skip_locked = connections[alias].features.has_select_for_update_skip_locked
        if not skip_locked and not Lease.objects.using(alias).acquire(
            CLAIM_LEASE, self.holder, until=now + lease, now=now
        ):
            return 0
        messages = OutboxMessage.objects.using(alias).claim(
            limit=self.batch_size or settings.BATCH_SIZE, lease_until=now + lease, now=now
        )
        if not messages:
            return 0
        deadline = time.monotonic() + settings.LEASE * 0.8
        outcome = send(self.app, messages, self.channel)
        mark_sent(outcome.sent)
        for message, exc in outcome.failed:
            self._record_failure(alias, message, exc)
        if outcome.unsent:
            # Broker down: give the rows back as they were; an outage costs no attempt.
            self._broker_failures += 1
            pause = self._idle_wait()
            OutboxMessage.objects.using(alias).reschedule(
                [m.id for m in outcome.unsent], timezone.now() + dt.timedelta(seconds=pause)
            )
            error = f"broker unreachable: {outcome.broker_error}"
            for message in outcome.unsent:
                signals.send(
                    signals.retried,
                    message=message,
                    using=alias,
                    error=error,
                    attempts=message.attempts,
                )
            logger.warning(
                "broker unreachable (%s); %d message(s) wait, next try in %.1fs",
                outcome.broker_error,
                len(outcome.unsent),
                pause,
            )
        else:
            self._broker_failures = 0
        if time.monotonic() > deadline:
            logger.warning(
                "a batch of %d took longer than 80%% of the %ss lease; lower "
                "AFTERCOMMIT['BATCH_SIZE'] or raise AFTERCOMMIT['LEASE']",
                len(messages),
                settings.LEASE,
            )
        return len(messages)

    def _record_failure(self, alias: str, message: OutboxMessage, exc: BaseException) -> None:
        attempts = message.attempts + 1
        dead = attempts >= settings.MAX_ATTEMPTS
        error = f"{type(exc).__name__}: {exc}"
        OutboxMessage.objects.using(alias).record_failure(
            message.id,
            attempts=attempts,
            error=error,
            due_at=timezone.now() + dt.timedelta(seconds=backoff(attempts)),
            dead=dead,
        )
        if dead:
            logger.error("%s is a dead letter after %d attempts: %s", message, attempts, error)
        else:
            logger.warning("%s failed (attempt %d): %s", message, attempts, error)
        signals.send(
            signals.dead if dead else signals.retried,
            message=message,
            using=alias,
            error=error,
            attempts=attempts,
        )

    # Upkeep ----------------------------------------------------------------------------------

    def _heartbeat(self, alias: str) -> None:
        last = self._last_heartbeat.get(alias, 0.0)
        if time.monotonic() - last < HEARTBEAT_EVERY:
            return
        now = timezone.now()
        ttl = dt.timedelta(seconds=max(30.0, 3 * HEARTBEAT_EVERY, 3 * settings.POLL_INTERVAL))
        Lease.objects.using(alias).acquire(
            HEARTBEAT_PREFIX + self.holder, self.holder, until=now + ttl, now=now
        )
        self._last_heartbeat[alias] = time.monotonic()

    def _maybe_purge(self, alias: str) -> None:
        if time.monotonic() - self._last_purge < 300 or alias != self.aliases[-1]:
            return
        self._last_purge = time.monotonic()
        for each in self.aliases:
            purge(each)
            Lease.objects.using(each).filter(
                expires_at__lt=timezone.now() - dt.timedelta(days=1)
            ).delete()

    def _install_signal_handlers(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        logger.info("relay %s: signal %d, stopping after the batch in hand", self.holder, signum)
        self.stop()

    def close(self) -> None:
        """Close the broker connection; the relay can still run again later."""
        self.channel.reset()

    def _shutdown(self) -> None:
        self.close()
        for alias in self.aliases:
            try:
                Lease.objects.using(alias).release(CLAIM_LEASE, self.holder)
                Lease.objects.using(alias).filter(name=HEARTBEAT_PREFIX + self.holder).delete()
            except Exception:
                logger.debug("could not release leases on %r", alias, exc_info=True)


def purge(alias: str, *, older_than: float | None = None) -> int:
    """Delete sent messages older than the retention window; dead letters stay."""
    seconds = settings.RETENTION if older_than is None else older_than
    before = timezone.now() - dt.timedelta(seconds=seconds)
    return OutboxMessage.objects.using(alias).purge_sent(
        before=before, batch_size=settings.PURGE_BATCH_SIZE
    )


def status(alias: str) -> dict[str, Any]:
    now = timezone.now()
    summary: dict[str, Any] = OutboxMessage.objects.using(alias).summary(now)
    summary["relays"] = sorted(
        lease.holder for lease in Lease.objects.using(alias).alive(HEARTBEAT_PREFIX, now)
    )
    return summary
