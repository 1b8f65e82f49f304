"""The relay: the only sender. It runs inside every Celery worker (see :mod:`aftercommit.worker`),
or apart as ``manage.py aftercommit relay``.

Woken by the commit (see :mod:`aftercommit.wakeup`), it claims due rows in one short transaction,
builds their Celery messages in bulk, publishes them outside any transaction, then marks them in
another. A broker outage hands the rows back untouched; a message that fails on its own is retried
with capped exponential backoff and jitter, then dead-lettered. SIGTERM (or the worker's shutdown)
stops it after the batch in hand.
"""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import FrameType
from typing import Any, TypeVar

from celery import Celery
from django.db import InterfaceError, OperationalError, connections, router
from django.db.backends.base.base import BaseDatabaseWrapper
from kombu.exceptions import ContentDisallowed

from . import debounce, replicas, signals
from .brokers import Sender
from .conf import settings
from .messages import Builder, Outgoing
from .models import Lease, OnceRecord, OutboxMessage, database_now
from .wakeup import Waiter

logger = logging.getLogger("aftercommit.relay")

CLAIM_LEASE = "claim"  # the single-claimer lease on databases without SKIP LOCKED
HEARTBEAT_PREFIX = "relay:"
HEARTBEAT_EVERY = 5.0
PURGE_EVERY = 300.0
PURGE_STEP_EVERY = 1.0
#: Seconds the relay in the loop waits before marking a batch that was not full as sent (see
#: ``Relay.run``), unless something wakes it sooner.
SETTLE_DELAY = 0.005
#: A backlog's batches being marked on the relay's database thread at once. With one, a batch is
#: marked while the next is claimed, built and published: at most two batches are out and not
#: marked, which bounds what a crash sends again.
MARKS_AHEAD = 1
T = TypeVar("T")


def outbox_aliases() -> list[str]:
    """The databases that hold an outbox: the setting, else every alias the routers allow."""
    configured = settings.DATABASES
    if configured is not None:
        return list(configured)
    # A test mirror (a read replica) is another name for a database that has its own alias.
    return [
        alias
        for alias in connections
        if not connections.settings[alias].get("TEST", {}).get("MIRROR")
        and router.allow_migrate_model(alias, OutboxMessage)
    ]


def backoff(failures: int, *, base: float, cap: float) -> float:
    """Seconds to wait after ``failures`` failures in a row: doubling from ``base``, capped at
    ``cap``, with full jitter over its upper half. The one formula for a message's own retries and
    for the pause while the broker is down."""
    # The exponent stops growing long past any cap: 2 ** 1025 would overflow a float.
    ceiling = min(cap, base * 2 ** min(max(failures - 1, 0), 64))
    return random.uniform(ceiling / 2, ceiling)


def message_backoff(attempts: int) -> float:
    return backoff(attempts, base=settings.BACKOFF_BASE, cap=settings.BACKOFF_MAX)


def broker_backoff(failures: int) -> float:
    return backoff(failures, base=0.5, cap=settings.BROKER_BACKOFF_MAX)


def _setup_hint(error: BaseException) -> str:
    text = str(error)
    if "redis-py" in text:
        return "install a redis-py the transport accepts (kombu 5.7: pip install 'redis>=6.1')"
    if "No module named" in text:
        return "install the broker's client library (e.g. pip install 'celery[redis]')"
    return "check the Celery broker settings and the installed client libraries"


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
        self.sender = Sender(app)
        self.stopping = threading.Event()
        self.waiter: Waiter | None = None
        self.setup_error = ""
        self._broker_failures = 0
        self._paused_until = 0.0  # the broker is down: no claims before this (monotonic)
        self._last_heartbeat: dict[str, float] = {}
        self._last_purge = 0.0
        self._last_purge_step = 0.0
        # (thread, or "claiming", alias) -> the raw connection set up
        self._tuned: dict[tuple[Any, str], Any] = {}
        self._purging: list[str] = []
        self._unsettled: list[tuple[str, list[OutboxMessage]]] = []  # published, not yet marked
        # Draining a backlog (see run_batch): full batches are marked on a thread of their own,
        # with its own connections, while this one goes on.
        self._db: ThreadPoolExecutor | None = None
        self._marking: list[tuple[str, list[OutboxMessage], Future[int]]] = []
        # Draining a backlog on PostgreSQL: the next batch is claimed while this one is published,
        # on a connection of the relay's own (see _claim_ahead); its rows wait here.
        self._claiming: dict[str, BaseDatabaseWrapper] = {}
        self._claimed: dict[str, tuple[list[OutboxMessage], float]] = {}
        self._claiming_unsupported: set[str] = set()
        self._builder: Builder | None = None
        self._claiming_failed: set[str] = set()  # not ahead again until this drain is over

    # The loop -----------------------------------------------------------------------------

    def run(self, *, once: bool = False) -> None:
        """Relay until stopped (SIGTERM/SIGINT in the main thread, or ``stop()``); with ``once``,
        until nothing is due."""
        restore = self._install_signal_handlers()
        self.waiter = waiter = Waiter(self.aliases)
        logger.info("relay %s started on %s", self.holder, ", ".join(self.aliases))
        look = set(self.aliases)  # where something may be due: everywhere, at first
        last_look = dict.fromkeys(self.aliases, time.monotonic())
        try:
            while not self.stopping.is_set():
                waiter.listen()
                busy = False
                if time.monotonic() >= self._paused_until:
                    for alias in self.aliases:
                        if self.stopping.is_set() or alias not in look:
                            continue
                        last_look[alias] = time.monotonic()
                        if self._step(alias, in_loop=True) >= (
                            self.batch_size or settings.BATCH_SIZE
                        ):
                            busy = True  # a full batch: there may be more, look again at once
                        else:
                            look.discard(alias)
                if once and not busy and time.monotonic() >= self._paused_until:
                    break
                if self._unsettled and busy:  # draining another database: no pause
                    self._settle_published()
                elif self._unsettled:
                    woken = self._pause_then_settle(waiter)
                    if woken:  # something committed during the pause: claim it now
                        look |= woken
                        busy = True
                if not busy:  # a drain is over: the last marks' signals
                    self._collect_marks(wait=True)
                    self._close_claiming()
                self._upkeep(busy=busy)
                if not busy and not self.stopping.is_set():
                    look |= self._wait(waiter, last_look)
        finally:
            self._settle_published()
            self._shutdown()
            restore()
            logger.info("relay %s stopped", self.holder)

    def _wait(self, waiter: Waiter, last_look: dict[str, float]) -> set[str]:
        """Wait for work; the aliases to look at next. A notification names its database; the
        others are probed each time (no notifications there), or polled as the safety net."""
        try:
            woken = waiter.wait(self._idle_wait())
        except Exception:  # never the end of the relay: look again after a pause
            logger.exception("relay %s: waiting for work failed", self.holder)
            self.stopping.wait(min(settings.POLL_INTERVAL, 1.0))
            woken = None
        if woken is None:
            return set(self.aliases)
        now = time.monotonic()
        poll = float(settings.POLL_INTERVAL)
        return woken | {
            alias
            for alias in self.aliases
            if not self._notified(alias) or now - last_look[alias] >= poll
        }

    def stop(self, *_: Any) -> None:
        self.stopping.set()
        if self.waiter is not None:
            self.waiter.wake()

    def _idle_wait(self) -> float:
        wait = float(settings.POLL_INTERVAL)
        if any(not self._notified(alias) for alias in self.aliases):
            wait = min(wait, float(settings.PROBE_INTERVAL))
        paused = self._paused_until - time.monotonic()
        return max(wait, paused) if paused > 0 else wait

    def _notified(self, alias: str) -> bool:
        return self.waiter is not None and self.waiter.notifies(alias)

    def _step(self, alias: str, *, in_loop: bool = False) -> int:
        """One batch on one database: how many messages it claimed. Database errors never end
        the loop."""
        try:
            self._tune_session(alias)
            self._heartbeat(alias)
            if not self._notified(alias) and not OutboxMessage.objects.using(alias).any_due():
                return 0
            return self.run_batch(alias, in_loop=in_loop)
        except Exception:
            logger.exception("relay batch on %r failed; reconnecting", alias)
            connections[alias].close()
            self.stopping.wait(min(settings.POLL_INTERVAL, 1.0))
            return 0

    def _tune_session(self, alias: str, connection: BaseDatabaseWrapper | None = None) -> None:
        """PostgreSQL: the relay's own session claims with a plain index scan, never a bitmap
        scan. Every sent row leaves dead entries in the claim index's "due" range until vacuum
        runs (minutes, on a big table); a bitmap scan visits all of them on every claim (measured:
        32,600 entries, 4.5 ms for an empty claim, most of the time from a commit to its publish),
        while an index scan marks them dead as it passes, so the next claim skips them (0.4 ms).
        The planner picks the bitmap scan when its statistics are stale, which for a queue table
        is most of the time.

        The session also commits without waiting for the WAL to reach the disk
        (``synchronous_commit = off``; measured: 0.35 ms less from a commit to its publish). A
        database crash can then lose the relay's last claims or marks, never a caller's commit
        (their sessions are untouched): such a row is sent again, at least once as always."""
        # This thread's connection (the loop's, or the database thread's), or the one given.
        key: tuple[Any, str] = (threading.get_ident(), alias)
        if connection is None:
            connection = connections[alias]
        else:
            key = ("claiming", alias)
        if connection.vendor != "postgresql":
            return
        connection.ensure_connection()
        raw = connection.connection
        if self._tuned.get(key) is raw:
            return
        with connection.cursor() as cursor:
            cursor.execute("SET enable_bitmapscan TO off")
            cursor.execute("SET synchronous_commit TO off")
        self._tuned[key] = raw

    # One batch -----------------------------------------------------------------------------

    def run_batch(self, alias: str, *, in_loop: bool = False) -> int:
        """Claim, build, publish, settle. Returns how many messages were claimed.

        ``in_loop`` is the relay loop's own call. A batch that was not full is then marked sent
        by the next ``_settle_published()`` (the loop's, a few milliseconds later). A full batch
        means a backlog, and the database's work hides behind the publishing:

        - the batch is marked on the relay's database thread while this one claims, builds and
          publishes the next (measured: 5% less time per message);
        - on PostgreSQL the next batch is claimed while this one is published, on a connection
          of the relay's own (``_claim_ahead``; measured: a fifth less time per message). The
          claim is not moved to the database thread: its rows' loading there takes the
          interpreter's lock from the publishing and cost as much as it saved, measured.
        """
        lease = float(settings.LEASE)
        limit = self.batch_size or settings.BATCH_SIZE
        skip_locked = connections[alias].features.has_select_for_update_skip_locked
        claimed_ahead = self._claimed.pop(alias, None)
        if claimed_ahead is not None:
            rows, started = claimed_ahead
        else:
            started = time.monotonic()
            if not skip_locked and not Lease.objects.using(alias).acquire(
                CLAIM_LEASE, self.holder, seconds=lease
            ):
                return 0
            rows = OutboxMessage.objects.using(alias).claim(limit=limit, lease=lease)
        if not rows:
            return 0
        claimed = len(rows)
        # Debounce (issue 14): a row a newer pending one with the same key replaces is marked
        # superseded, not sent. No query for a batch without debounced rows.
        rows = debounce.drop_superseded(alias, rows)
        # Replica-safe reads (replicas.py, issue 14): read after the claim, so after every claimed
        # row's commit. One query, only when the alias has listed replicas.
        lsn = replicas.position(alias)
        deadline = started + lease * 0.8
        builder = self._builder
        if builder is None:
            # Celery's settings are read once a relay, as Celery's worker reads its own: a new
            # Builder a batch was a sixth of a woken message's path in a worker (0.16 ms).
            builder = self._builder = Builder(self.app)
        items: list[Outgoing] = []
        failed: list[tuple[OutboxMessage, BaseException]] = []
        for row in rows:
            try:
                items.append(builder.build(row))
            except Exception as exc:  # this row cannot become a message: its own failure
                failed.append((row, exc))
        if lsn is not None:  # replica-safe reads: each task waits for its replicas to replay this
            for item in items:
                item.options["headers"] = replicas.stamped(item.options.get("headers"), alias, lsn)
        backlog = in_loop and claimed >= limit and skip_locked  # (SQLite: one writer at a time)
        ahead = self._claim_ahead(alias, limit, lease) if backlog else None
        try:
            self._publish_and_settle(alias, items, failed, backlog=backlog, in_loop=in_loop)
        except BaseException:
            if ahead is not None:  # unread, uncommitted: closing its connection rolls it back
                self._close_claiming(alias)
            raise
        if ahead is not None:
            self._take_claimed_ahead(alias, *ahead)
        if time.monotonic() > deadline:
            logger.warning(
                "a batch of %d took longer than 80%% of the %ss lease; lower "
                "AFTERCOMMIT['BATCH_SIZE'] or raise AFTERCOMMIT['LEASE']",
                len(rows),
                settings.LEASE,
            )
        return claimed

    def _publish_and_settle(
        self,
        alias: str,
        items: list[Outgoing],
        failed: list[tuple[OutboxMessage, BaseException]],
        *,
        backlog: bool,
        in_loop: bool,
    ) -> None:
        """Publish a built batch, then mark what went, record each message's own failure, and
        hand back what an outage or a setup error kept from going."""
        outcome = self.sender.send(items)
        sent = [item.row for item in outcome.sent]
        if backlog:
            # The batch before this one was marked while this one was claimed, built and sent;
            # no further: published and not marked is what a crash sends again, and a mark that
            # waits (a lock, a slow database) must hold the relay back, not let it run ahead.
            self._collect_marks(wait=True, keep=MARKS_AHEAD - 1)
            self._marking.append((alias, sent, self._mark_on_database_thread(alias, sent)))
        elif in_loop:
            self._unsettled.append((alias, sent))
        else:
            self._mark_sent(alias, sent)
        self._collect_marks(wait=False)
        failed += [(item.row, error) for item, error in outcome.failed]
        for row, error in failed:
            self._record_failure(alias, row, error)
        unsent = [item.row for item in outcome.unsent]
        if unsent:
            self._hand_back(alias, unsent, outcome.setup_error or outcome.broker_error)
            if outcome.setup_error is not None:
                self._report_setup_error(outcome.setup_error)
        else:
            self._broker_failures = 0
            self._paused_until = 0.0
            if self.setup_error:
                logger.warning("relay %s: the broker setup works again", self.holder)
                self.setup_error = ""
                self._last_heartbeat.clear()  # report it at once

    # The next batch's claim, ahead (PostgreSQL) ------------------------------------------------

    def _claim_ahead(
        self, alias: str, limit: int, lease: float
    ) -> tuple[Callable[[], list[OutboxMessage]], float] | None:
        """Send the next batch's claim, to be read once this batch is published: PostgreSQL
        claims (locks, updates, returns) while the relay publishes. On a connection of the
        relay's own, which nothing else uses, so publish signal receivers that query the
        database are not caught up in it. ``None`` where it cannot be done (psycopg 2, another
        database, or the claim could not be sent: the next batch is then claimed as usual)."""
        if self.stopping.is_set() or alias in self._claiming_unsupported | self._claiming_failed:
            return None
        connection = self._claiming.get(alias)
        if connection is None:
            connection = self._claiming[alias] = connections.create_connection(alias)
        try:
            self._tune_session(alias, connection)
            read = OutboxMessage.objects.using(alias).claim_ahead(
                connection, limit=limit, lease=lease
            )
        except Exception:
            logger.warning(
                "relay %s: claiming the next batch ahead on %r failed; claiming as usual until "
                "this backlog is drained", self.holder, alias, exc_info=True,
            )  # fmt: skip
            self._close_claiming(alias)
            self._claiming_failed.add(alias)
            return None
        if read is None:
            self._claiming_unsupported.add(alias)
            self._close_claiming(alias)
            return None
        return read, time.monotonic()

    def _take_claimed_ahead(
        self, alias: str, read: Callable[[], list[OutboxMessage]], started: float
    ) -> None:
        """Read the rows claimed ahead: the next batch, unless the relay is stopping or the
        broker is down (then they are handed back at once, due when it looks again)."""
        try:
            rows = read()
        except Exception:
            # Whether the claim committed is unknown: if it did, its rows go after their lease.
            logger.warning(
                "relay %s: reading the batch claimed ahead on %r failed; if it was claimed, it "
                "is sent once its lease is over", self.holder, alias, exc_info=True,
            )  # fmt: skip
            self._close_claiming(alias)
            return
        pause = self._paused_until - time.monotonic()
        if rows and (pause > 0 or self.stopping.is_set()):
            self._release(alias, rows, delay=max(pause, 0.0))
            return
        self._claimed[alias] = (rows, started)

    def _release(self, alias: str, rows: list[OutboxMessage], *, delay: float) -> None:
        """Hand claimed rows that were never published back, due in ``delay`` seconds."""
        try:
            self._settle(
                alias,
                lambda: OutboxMessage.objects.using(alias).reschedule(
                    [r.id for r in rows], delay=delay, claim_token=rows[0].claim_token
                ),
            )
        except Exception:
            logger.exception(
                "relay %s: handing back %d claimed message(s) on %r failed; they are sent once "
                "their lease is over", self.holder, len(rows), alias,
            )  # fmt: skip

    def _close_claiming(self, alias: str | None = None) -> None:
        """Close the connection(s) the next batches were claimed on (reopened when needed); for
        every alias, a drain is over: a claim ahead that failed may be tried again."""
        if alias is None:
            self._claiming_failed.clear()
        for name in [alias] if alias else list(self._claiming):
            connection = self._claiming.pop(name, None)
            if connection is None:
                continue
            self._tuned.pop(("claiming", name), None)
            try:
                connection.close()
            except Exception:
                logger.debug("closing a claiming connection failed", exc_info=True)

    def _mark(self, alias: str, rows: list[OutboxMessage]) -> int:
        outbox = OutboxMessage.objects.using(alias)
        ids = [r.id for r in rows]

        def write() -> int:
            self._tune_session(alias)  # (the database thread's connection may be a new one)
            return outbox.mark_sent(ids)

        return self._settle(alias, write)

    # The database thread (a backlog's marks) -------------------------------------------------

    def _mark_on_database_thread(self, alias: str, rows: list[OutboxMessage]) -> Future[int]:
        """Mark ``rows`` on the relay's database thread, on that thread's own connection to
        ``alias``; one batch at a time, in order."""
        if self._db is None:
            self._db = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aftercommit-relay-db")

        def mark() -> int:
            try:
                return self._mark(alias, rows)
            except Exception:
                connections[alias].close()  # this thread's connection: a fresh one next time
                raise

        return self._db.submit(mark)

    def _collect_marks(self, *, wait: bool, keep: int = 0) -> None:
        """Send the ``sent`` signals of the batches the database thread has marked, in order
        (with ``wait``, of all of them but the last ``keep``). A mark that failed leaves its rows
        to be sent again."""
        while len(self._marking) > keep:
            alias, rows, marking = self._marking[0]
            if not wait and not marking.done():
                return
            self._marking.pop(0)
            try:
                marking.result()
            except Exception:
                self._log_mark_failed(alias, rows)
            else:
                self._signal_sent(alias, rows)

    def _stop_background(self) -> None:
        self._collect_marks(wait=True)
        db, self._db = self._db, None
        if db is not None:
            db.submit(connections.close_all).result()  # that thread's own connections
            db.shutdown(wait=True)

    def _mark_sent(self, alias: str, rows: list[OutboxMessage]) -> None:
        self._mark(alias, rows)
        self._signal_sent(alias, rows)

    def _pause_then_settle(self, waiter: Waiter) -> set[str]:
        """Mark what was just published, after a pause in which this thread holds no GIL: the
        worker this relay runs in picks the task up first, instead of waiting for the mark's
        Python (measured under load with the prefork pool: 1.3 ms off the median from a commit
        to its task's start). A wake-up ends the pause early; the aliases it names (all of them
        for a wake-up from this process) are returned."""
        try:
            woken = waiter.wait(SETTLE_DELAY)
        except Exception:  # waiting is only a pause here; _wait reports a broken waiter
            woken = set()
        self._settle_published()
        return set(self.aliases) if woken is None else woken

    def _settle_published(self) -> None:
        """Mark what was published and not marked yet. A database that stays unreachable past
        the lease leaves those rows to be sent again (at least once, as always)."""
        self._collect_marks(wait=True)
        unsettled, self._unsettled = self._unsettled, []
        for alias, rows in unsettled:
            try:
                self._mark_sent(alias, rows)
            except Exception:
                self._log_mark_failed(alias, rows)
                connections[alias].close()

    def _log_mark_failed(self, alias: str, rows: list[OutboxMessage]) -> None:
        logger.exception(
            "relay %s: marking %d sent message(s) on %r failed; they will be sent again",
            self.holder,
            len(rows),
            alias,
        )

    def _settle(self, alias: str, write: Callable[[], T]) -> T:
        """A write after a publish, tried again on a fresh connection until it succeeds or the
        claim's lease is nearly over: a connection the server dropped (or a database refusing
        connections for a moment) while the batch was out must not turn into a duplicate send.
        Past the lease another sender may take the rows, so it gives up then."""
        deadline = time.monotonic() + settings.LEASE * 0.8
        failures = 0
        while True:
            try:
                return write()
            except (OperationalError, InterfaceError):
                failures += 1
                if time.monotonic() >= deadline:
                    raise
                logger.warning(
                    "database %r unavailable after a publish (attempt %d); reconnecting",
                    alias,
                    failures,
                )
                connections[alias].close()
                time.sleep(min(backoff(failures, base=0.1, cap=2.0), deadline - time.monotonic()))

    def _hand_back(
        self, alias: str, rows: list[OutboxMessage], error: BaseException | None
    ) -> None:
        """Broker down, refusing, or set up wrong: the rows wait as they were, no attempt used."""
        self._broker_failures += 1
        pause = broker_backoff(self._broker_failures)
        self._paused_until = time.monotonic() + pause
        self._settle(
            alias,
            lambda: OutboxMessage.objects.using(alias).reschedule(
                [r.id for r in rows], delay=pause, claim_token=rows[0].claim_token
            ),
        )
        text = f"broker unreachable: {error}"
        for row in rows:
            signals.send(
                signals.retried, message=row, using=alias, error=text, attempts=row.attempts
            )
        logger.warning(
            "broker unreachable or refusing messages (%s); %d message(s) wait, next try in %.1fs",
            error,
            len(rows),
            pause,
        )

    def _report_setup_error(self, error: BaseException) -> None:
        text = (
            f"the broker cannot be used as configured: {error}. This is a setup problem, not an "
            f"outage: {_setup_hint(error)}. Messages wait; no attempts are used."
        )
        if text != self.setup_error:
            logger.error("relay %s: %s", self.holder, text)
            self.setup_error = text
            self._last_heartbeat.clear()  # report it in the heartbeat at once

    def _record_failure(self, alias: str, message: OutboxMessage, exc: BaseException) -> None:
        attempts = message.attempts + 1
        # A row that is not allowed to be decoded will never be: no point trying it again.
        dead = attempts >= settings.MAX_ATTEMPTS or isinstance(exc, ContentDisallowed)
        error = f"{type(exc).__name__}: {exc}"
        self._settle(
            alias,
            lambda: OutboxMessage.objects.using(alias).record_failure(
                message.id, attempts=attempts, error=error, delay=message_backoff(attempts),
                dead=dead, claim_token=message.claim_token,
            ),
        )  # fmt: skip
        if dead:
            logger.error("%s is a dead letter after %d attempt(s): %s", message, attempts, error)
        else:
            logger.warning("%s failed (attempt %d): %s", message, attempts, error)
        signals.send(
            signals.dead if dead else signals.retried,
            message=message,
            using=alias,
            error=error,
            attempts=attempts,
        )

    def _signal_sent(self, alias: str, rows: list[OutboxMessage]) -> None:
        if not rows or not signals.sent.has_listeners():
            return
        for row in rows:
            claimed = getattr(row, "claimed_at", None)
            latency = (claimed - row.created_at).total_seconds() if claimed else 0.0
            signals.send(signals.sent, message=row, using=alias, latency=max(latency, 0.0))

    # Upkeep ----------------------------------------------------------------------------------

    def _heartbeat(self, alias: str) -> None:
        last = self._last_heartbeat.get(alias, 0.0)
        if time.monotonic() - last < HEARTBEAT_EVERY:
            return
        ttl = max(30.0, 3 * HEARTBEAT_EVERY, 3 * settings.POLL_INTERVAL)
        Lease.objects.using(alias).acquire(
            HEARTBEAT_PREFIX + self.holder, self.holder, seconds=ttl, detail=self.setup_error
        )
        self._last_heartbeat[alias] = time.monotonic()

    def _upkeep(self, *, busy: bool) -> None:
        """Between batches: one bounded purge step at a time, so purging never delays a send by
        more than one short DELETE, and a stop is honoured between steps. A relay that is never
        idle still takes a step every PURGE_STEP_EVERY seconds."""
        now = time.monotonic()
        if not self._purging and now - self._last_purge >= PURGE_EVERY:
            self._last_purge = now
            self._purging = list(self.aliases)
        if not self._purging or (busy and now - self._last_purge_step < PURGE_STEP_EVERY):
            return
        self._last_purge_step = now
        alias = self._purging[0]
        try:
            batch = settings.PURGE_BATCH_SIZE
            deleted = OutboxMessage.objects.using(alias).purge_sent_batch(
                older_than=settings.RETENTION, batch_size=batch
            )
            # once=True tasks' records of what ran, kept as long as the messages that ran them.
            deleted_records = OnceRecord.objects.using(alias).purge_batch(
                older_than=settings.RETENTION, batch_size=batch
            )
            if deleted < batch and deleted_records < batch:
                self._purging.pop(0)
                Lease.objects.using(alias).expired_before(24 * 3600)
        except Exception:
            logger.exception("purging %r failed; trying again later", alias)
            connections[alias].close()
            self._purging.pop(0)

    def _install_signal_handlers(self) -> Callable[[], None]:
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
        self.sender.reset()

    def _shutdown(self) -> None:
        try:
            self._stop_background()
        except Exception:
            logger.exception("relay %s: stopping its database thread failed", self.holder)
        self.close()
        if self.waiter is not None:
            self.waiter.close()
            self.waiter = None
        claimed, self._claimed = self._claimed, {}
        for alias, (rows, _) in claimed.items():  # claimed ahead, never published: due now
            if rows:
                self._release(alias, rows, delay=0.0)
        self._close_claiming()
        for alias in self.aliases:
            try:
                Lease.objects.using(alias).release(CLAIM_LEASE, self.holder)
                Lease.objects.using(alias).filter(name=HEARTBEAT_PREFIX + self.holder).delete()
            except Exception:
                logger.debug("could not release leases on %r", alias, exc_info=True)
            connections[alias].close()


def purge(alias: str, *, older_than: float | None = None) -> int:
    """Delete sent messages older than the retention window, a batch at a time; dead letters
    stay."""
    seconds = settings.RETENTION if older_than is None else older_than
    total = 0
    while True:
        deleted = OutboxMessage.objects.using(alias).purge_sent_batch(
            older_than=seconds, batch_size=settings.PURGE_BATCH_SIZE
        )
        total += deleted
        if deleted < settings.PURGE_BATCH_SIZE:
            break
    return total


def status(alias: str) -> dict[str, Any]:
    summary: dict[str, Any] = OutboxMessage.objects.using(alias).summary()
    alive = list(Lease.objects.using(alias).alive(HEARTBEAT_PREFIX))
    summary["relays"] = sorted(lease.holder for lease in alive)
    summary["setup_errors"] = sorted({lease.detail for lease in alive if lease.detail})
    summary["database_time"] = database_now(alias).isoformat()
    return summary
