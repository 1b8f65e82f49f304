"""A model-based test of the outbox protocol: random interleavings of calls, transactions, senders
and faults against the real database, checked against the protocol's promises after every step.

Hypothesis draws the steps (``RuleBasedStateMachine``): dispatches inside real ``atomic()`` blocks
that commit, roll back or roll back a savepoint; senders driven by hand through the real queryset
verbs (``claim``, a publish through the real ``brokers.Sender``, then ``mark_sent``,
``reschedule``, ``record_failure``) and whole batches of the real ``Relay.run_batch``; a sender
crashing after any of those steps; the broker going down and up; connections dropped; the
database's time passing; the caller's clock jumping. The broker is a recording double behind the
real ``Sender``, so every publish is seen.

The promises checked (the model says which messages committed, rolled back, were in flight):
- every committed message is published at least once (at the end of each run, after the broker is
  back and every lease and backoff has passed, a drain leaves nothing pending);
- a rolled-back message, or one whose transaction is still open, is never published;
- a message is published twice only if a sender crashed (or outlived its lease) between publishing
  it and marking it sent;
- two live senders never hold the same message;
- no pending message waits longer than its lease or backoff allows, and arguments arrive intact.

The caller runs in the test's thread; every sender runs in one other thread with its own database
connection, as a relay process would. ``make soak`` runs many more examples
(AFTERCOMMIT_SOAK_EXAMPLES) and prints how many steps ran.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from unittest import mock

import pytest
from django.conf import settings as django_settings
from django.db import InterfaceError, connections, transaction
from django.db import OperationalError as DatabaseOperationalError
from django.db.models import F
from django.test import override_settings
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from kombu.exceptions import OperationalError as KombuOperationalError

from aftercommit import dispatch
from aftercommit.brokers import BrokerUnavailable, Outcome, Sender
from aftercommit.conf import settings as aftercommit_settings
from aftercommit.messages import Builder, Outgoing
from aftercommit.models import Lease, OutboxMessage, Status, database_now
from aftercommit.relay import CLAIM_LEASE, Relay, broker_backoff, message_backoff
from tests.celery_app import app
from tests.support import HYPOTHESIS_DIR
from tests.testapp.tasks import read_item

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "other"])

ALIAS = "default"
LEASE = 30.0
# No dead letters here: a message that fails on its own is retried until the run ends.
SETTINGS = {
    **django_settings.AFTERCOMMIT,
    "LEASE": LEASE,
    "MAX_ATTEMPTS": 1000,
    "BACKOFF_MAX": 1.0,
    "BROKER_BACKOFF_MAX": 1.0,
}
# A pending row is never due later than this after the database's now: a lease, or a backoff.
LONGEST_WAIT = max(LEASE, SETTINGS["BACKOFF_MAX"], SETTINGS["BROKER_BACKOFF_MAX"])
# The database's clock and the model's differ by the real time a run takes: leases are judged with
# this much slack (a claim this close to a lease's end is neither a violation nor excused).
SLACK = 2.0
# Senders driven a step at a time, as separate relay processes would be.
SENDER_NAMES = ("hand-1", "hand-2")
SENDERS = st.sampled_from(SENDER_NAMES)
OVERRUN = "a sender outlived its lease"
# Set to 1 once settling is fenced by the claim (see _overrun_gap): the model then judges those
# claims too.
# Settling is fenced by the claim (claim_token): a sender that outlived its lease cannot hand back
# a row another sender holds. AFTERCOMMIT_MODEL_FENCED_SETTLES=0 excuses that case again.
SETTLES_FENCED = os.environ.get("AFTERCOMMIT_MODEL_FENCED_SETTLES", "1") == "1"
SOAK_EXAMPLES = int(os.environ.get("AFTERCOMMIT_SOAK_EXAMPLES") or 0)
T = TypeVar("T")


# The broker double ------------------------------------------------------------------------------


class Crash(Exception):
    """A sender process dying: nothing after this point of its batch happens."""


class RecordingBroker:
    """What reached the broker, in order, and a switch to take it away."""

    def __init__(self) -> None:
        self.up = True
        self.published: list[tuple[str, list[Any], dict[str, Any]]] = []
        self.refuse_next = 0  # messages that fail on their own (not an outage)

    def counts(self) -> Counter[str]:
        return Counter(task_id for task_id, _, _ in self.published)


class RecordingProducer:
    """The kombu producer Celery's ``send_task_message`` publishes with."""

    def __init__(self, broker: RecordingBroker) -> None:
        self.broker = broker
        self.channel = object()  # what the queues to declare are bound to; never used

    def publish(self, body: Any, **kwargs: Any) -> None:
        if not self.broker.up:
            raise KombuOperationalError("the broker double is down")
        if self.broker.refuse_next > 0:
            self.broker.refuse_next -= 1
            raise ValueError("the broker double refuses this one message")
        args, kwargs_, _ = body
        self.broker.published.append((kwargs["headers"]["id"], list(args), dict(kwargs_)))


class DoubleSender(Sender):
    """The real Sender (chunking, outage and per-message error handling), on the double."""

    def __init__(self, broker: RecordingBroker) -> None:
        super().__init__(app)
        self.broker = broker

    def open(self) -> Any:
        if self.producer is None:
            if not self.broker.up:
                raise BrokerUnavailable("the broker double is down")
            self.producer = RecordingProducer(self.broker)
        return self.producer


class FaultySender:
    """Wraps the sender a Relay uses: sees the batch it was given, and fails at one point of it."""

    def __init__(self, inner: Sender, fault: str) -> None:
        self.inner, self.fault = inner, fault
        self.items: list[Outgoing] = []

    def send(self, items: list[Outgoing]) -> Outcome:
        self.items = list(items)
        if self.fault == "crash before publish":
            raise Crash(self.fault)
        outcome = self.inner.send(items)
        if self.fault == "crash after publish":
            raise Crash(self.fault)
        if self.fault == "connection dropped":  # between the publish and the mark
            drop_connection(ALIAS)
        return outcome

    def reset(self, **kwargs: Any) -> None:
        self.inner.reset(**kwargs)


# The sender's side: one thread with its own connection ------------------------------------------


class SenderThread:
    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model-sender")

    def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` there; on a connection the server dropped, reconnect and run it again once
        (as the relay does: its loop reconnects, and its writes after a publish are retried)."""
        return self.pool.submit(self._again_on_a_lost_connection, fn, *args, **kwargs).result(120)

    def raw(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self.pool.submit(fn, *args, **kwargs).result(timeout=120)

    @staticmethod
    def _again_on_a_lost_connection(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except (DatabaseOperationalError, InterfaceError):
            connections[ALIAS].close()
            return fn(*args, **kwargs)

    def close(self) -> None:
        self(connections.close_all)
        self.pool.shutdown()


def drop_connection(alias: str) -> None:
    """The database server drops this thread's connection (PostgreSQL: terminated by the server,
    as a restart or a failover does; SQLite has no server: the connection is closed)."""
    connection = connections[alias]
    if connection.vendor != "postgresql":
        connection.close()
        return
    connection.ensure_connection()
    raw: Any = connection.connection
    pid = raw.info.backend_pid if hasattr(raw, "info") else raw.get_backend_pid()
    with connections["other"].cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        for _ in range(100):  # gone, so the next statement on it fails
            cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
            if not cursor.fetchone()[0]:
                break
            time.sleep(0.01)


def pass_time(seconds: float) -> None:
    """The database's clock moves ``seconds`` on: every stored time moves back instead."""
    delta = dt.timedelta(seconds=seconds)
    OutboxMessage.objects.using(ALIAS).update(
        created_at=F("created_at") - delta, due_at=F("due_at") - delta
    )
    OutboxMessage.objects.using(ALIAS).filter(sent_at__isnull=False).update(
        sent_at=F("sent_at") - delta
    )
    Lease.objects.using(ALIAS).update(expires_at=F("expires_at") - delta)


# The model --------------------------------------------------------------------------------------


@dataclass
class Level:
    """One open atomic block (the outermost, or a savepoint) and the messages dispatched in it."""

    block: Any
    ids: list[str] = field(default_factory=list)


@dataclass
class HandSender:
    """A sender driven a step at a time: claim, publish, mark."""

    name: str
    holder: str
    sender: DoubleSender
    rows: list[OutboxMessage] = field(default_factory=list)
    outcome: Outcome | None = None

    @property
    def stage(self) -> str:
        if not self.rows:
            return "idle"
        return "claimed" if self.outcome is None else "published"


STATS: Counter[str] = Counter()


def counted(rule_fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(rule_fn)
    def step(self: ProtocolModel, *args: Any, **kwargs: Any) -> Any:
        STATS["steps"] += 1
        STATS[f"step: {rule_fn.__name__}"] += 1
        return rule_fn(self, *args, **kwargs)

    return step


class ProtocolModel(RuleBasedStateMachine):
    thread: SenderThread  # set by the test, shared by every run

    def __init__(self) -> None:
        super().__init__()
        STATS["examples"] += 1
        self.sqlite = connections[ALIAS].vendor == "sqlite"
        self.broker = RecordingBroker()
        self.token = uuid.uuid4().hex[:12]
        self.levels: list[Level] = []
        self.wrote = False  # the open transaction holds SQLite's write lock
        self.broken = False  # the open transaction lost its connection: it will not commit
        self.expected: dict[str, tuple[list[Any], dict[str, Any]]] = {}
        self.committed: set[str] = set()
        self.rolled_back: set[str] = set()
        # Messages a sender published and then died (or outlived its lease) before marking them:
        # the only ones that may be published twice, and why.
        self.excused: dict[str, str] = {}
        self.clock = 0.0  # seconds the database's time was moved on
        self.started = time.monotonic()
        self.holds: dict[str, tuple[str, float]] = {}  # task id -> (holder, lease end, model time)
        self.hand: dict[str, HandSender] = {}
        for name in SENDER_NAMES:
            self._start_sender(name)
        self.relay = self._new_relay()
        self.app_clock = 0.0
        self.clock_patch: contextlib.ExitStack | None = None
        self.serial = 0

    # Helpers -------------------------------------------------------------------------------------

    def now(self) -> float:
        """The database's time as the model knows it: real time plus the time passed by rules."""
        return self.clock + time.monotonic() - self.started

    def _new_relay(self) -> Relay:
        relay = Relay(app, aliases=[ALIAS], batch_size=5)
        relay.sender = DoubleSender(self.broker)
        return relay

    def _senders_may_run(self) -> bool:
        # SQLite has one writer: a sender would wait for the caller's open transaction (the
        # relay does; here the one test thread would wait for itself).
        return not (self.sqlite and self.wrote)

    def _took(self, holder: str, rows: list[OutboxMessage]) -> None:
        """A claim returned ``rows``: each must be committed and held by no live sender."""
        now = self.now()
        for row in rows:
            assert row.task_id in self.committed, (
                f"{row.task_id} was claimed but its transaction did not commit "
                f"({'rolled back' if row.task_id in self.rolled_back else 'still open'})"
            )
            held = self.holds.get(row.task_id)
            if held is not None and held[0] != holder and not self._overrun_gap(row.task_id):
                assert now >= held[1] - SLACK, (
                    f"{row.task_id} claimed by {holder} while {held[0]} holds it for another "
                    f"{held[1] - now:.1f}s"
                )
            self.holds[row.task_id] = (holder, now + LEASE)

    def _overrun_gap(self, task_id: str) -> bool:
        """Only with AFTERCOMMIT_MODEL_FENCED_SETTLES=0 (settling unfenced, as before the claim
        token): an overrun sender's hand-back is excused and its claims are not judged."""
        return not SETTLES_FENCED and self.excused.get(task_id) == OVERRUN

    def _released(self, holder: str, rows: list[OutboxMessage]) -> None:
        for row in rows:
            if self.holds.get(row.task_id, ("",))[0] == holder:
                del self.holds[row.task_id]

    def _excuse(self, task_ids: Iterator[str] | list[str], why: str) -> None:
        for task_id in task_ids:
            self.excused.setdefault(task_id, why)

    # The caller ----------------------------------------------------------------------------------

    @initialize(n=st.integers(0, 4))
    def backlog(self, n: int) -> None:
        """Messages committed before the run starts, so every run has something to send."""
        if n:
            self.dispatch(n=n, how="delay")

    @precondition(lambda self: len(self.levels) < 3)
    @rule()
    @counted
    def begin(self) -> None:
        block = transaction.atomic(using=ALIAS)
        block.__enter__()
        self.levels.append(Level(block))

    @rule(n=st.integers(1, 3), how=st.sampled_from(["delay", "record"]))
    @counted
    def dispatch(self, n: int, how: str) -> None:
        for _ in range(n):
            self.serial += 1
            args = [self.token, None]
            kwargs = {"expected": self.serial}
            if self.broken:  # the transaction lost its connection: the call must fail, not vanish
                with pytest.raises(Exception):  # noqa: B017 - Django's, per backend
                    read_item.apply_async(args, kwargs)
                continue
            if how == "delay":
                task_id = read_item.delay(*args, **kwargs).id
            else:
                task_id = dispatch.record(read_item, args, kwargs, {}, using=None).id
            self.expected[task_id] = (args, kwargs)
            if self.levels:
                self.levels[-1].ids.append(task_id)
                self.wrote = True
            else:
                self.committed.add(task_id)

    @precondition(lambda self: self.levels)
    @rule()
    @counted
    def commit(self) -> None:
        """Leave the innermost block normally: a savepoint is released, the outermost commits."""
        level = self.levels.pop()
        level.block.__exit__(None, None, None)
        if self.levels:
            self.levels[-1].ids.extend(level.ids)
            return
        if self.broken:
            self.rolled_back.update(level.ids)
        else:
            self.committed.update(level.ids)
        self._transaction_ended()

    @precondition(lambda self: self.levels)
    @rule()
    @counted
    def rollback(self) -> None:
        """Leave the innermost block with an exception: a savepoint or the whole transaction rolls
        back."""
        self._rollback()

    def _rollback(self) -> None:
        level = self.levels.pop()
        error = RuntimeError("rolled back by the model")
        level.block.__exit__(RuntimeError, error, None)
        self.rolled_back.update(level.ids)
        if not self.levels:
            self._transaction_ended()

    def _transaction_ended(self) -> None:
        self.wrote = False
        self.broken = False

    @rule(seconds=st.sampled_from([-60.0, 60.0]))
    @counted
    def jump_caller_clock(self, seconds: float) -> None:
        """The caller's clock jumps: the protocol reads the database's clock, so nothing changes."""
        if self.clock_patch is not None:
            self.clock_patch.close()
        self.app_clock += seconds
        offset = self.app_clock
        real_time, real_time_ns, real_now = time.time, time.time_ns, timezone.now
        stack = contextlib.ExitStack()
        stack.enter_context(mock.patch("time.time", lambda: real_time() + offset))
        stack.enter_context(mock.patch("time.time_ns", lambda: real_time_ns() + int(offset * 1e9)))
        stack.enter_context(
            mock.patch.object(timezone, "now", lambda: real_now() + dt.timedelta(seconds=offset))
        )
        self.clock_patch = stack

    # The broker and the database's clock ---------------------------------------------------------

    @rule(event=st.sampled_from(["down", "up", "refuses one message"]))
    @counted
    def broker(self, event: str) -> None:
        """The broker goes down or comes back (an outage: no attempt used), or the next publish
        fails on its own (that message's failure: retried with backoff)."""
        STATS[f"broker: {event}"] += 1
        if event == "refuses one message":
            self.broker.refuse_next += 1
        else:
            self.broker.up = event == "up"

    @precondition(lambda self: self._senders_may_run())
    @rule(seconds=st.sampled_from([0.5, 2.0, LEASE + SLACK]))
    @counted
    def time_passes(self, seconds: float) -> None:
        self.thread(pass_time, seconds)
        self.clock += seconds
        now = self.now()
        # A hand-driven sender that outlived its lease is presumed dead by the protocol: another
        # may send its messages, and it may still send them too.
        for hand in self.hand.values():
            if any(self.holds.get(r.task_id, ("", now))[1] <= now + SLACK for r in hand.rows):
                self._excuse((r.task_id for r in hand.rows), OVERRUN)

    @rule(side=st.sampled_from(["caller", "sender"]))
    @counted
    def drop_connection(self, side: str) -> None:
        """A connection is lost. The caller's, inside a transaction: that transaction is lost (the
        calls after it fail). A sender's: its next statement fails, and it reconnects."""
        STATS[f"connection dropped: {side}"] += 1
        if side == "sender":
            if self._senders_may_run():
                self.thread(drop_connection, ALIAS)
            return
        connections[ALIAS].close()
        if self.levels:
            self.broken = True
            for level in self.levels:
                self.rolled_back.update(level.ids)
                level.ids.clear()

    # Senders driven a step at a time -------------------------------------------------------------

    def _start_sender(self, name: str) -> None:
        holder = f"model:{name}:{uuid.uuid4().hex[:6]}"
        self.hand[name] = HandSender(name, holder, DoubleSender(self.broker))

    @precondition(lambda self: self._senders_may_run())
    @rule(
        name=SENDERS,
        limit=st.integers(1, 4),
        steps=st.integers(1, 3),
        crash=st.sampled_from([False, False, True]),
    )
    @counted
    def sender_step(self, name: str, limit: int, steps: int, crash: bool) -> None:
        """The sender's next ``steps`` steps (claim up to ``limit`` messages, publish them, mark
        them), stopping early when a claim finds nothing; then, with ``crash``, it dies."""
        hand = self.hand[name]
        for _ in range(steps):
            STATS[f"sender: {hand.stage}"] += 1
            if hand.stage == "idle":
                self._claim(hand, limit)
                if not hand.rows:
                    break
            elif hand.stage == "claimed":
                builder = Builder(app)
                items = [builder.build(r) for r in hand.rows]
                hand.outcome = self.thread(hand.sender.send, items)
            else:
                self._mark(hand)
        if crash:
            STATS[f"sender: crash when {hand.stage}"] += 1
            self._crash(name)

    def _claim(self, hand: HandSender, limit: int) -> None:
        def claim() -> list[OutboxMessage]:
            if self.sqlite and not Lease.objects.using(ALIAS).acquire(
                CLAIM_LEASE, hand.holder, seconds=LEASE
            ):
                return []
            return OutboxMessage.objects.using(ALIAS).claim(limit=limit, lease=LEASE)

        rows = self.thread(claim)
        self._took(hand.holder, rows)
        hand.rows = rows

    def _mark(self, hand: HandSender) -> None:
        """Settle a published batch the way the relay does."""
        outcome = hand.outcome
        assert outcome is not None

        def settle() -> None:
            outbox = OutboxMessage.objects.using(ALIAS)
            outbox.mark_sent([item.row.id for item in outcome.sent])
            for item, error in outcome.failed:
                attempts = item.row.attempts + 1
                outbox.record_failure(
                    item.row.id,
                    attempts=attempts,
                    error=str(error),
                    delay=message_backoff(attempts),
                    dead=attempts >= aftercommit_settings.MAX_ATTEMPTS,
                    claim_token=item.row.claim_token,
                )
            if outcome.unsent:
                outbox.reschedule(
                    [item.row.id for item in outcome.unsent],
                    delay=broker_backoff(1),
                    claim_token=outcome.unsent[0].row.claim_token,
                )

        self.thread(settle)
        self._released(hand.holder, hand.rows)
        hand.rows, hand.outcome = [], None

    def _crash(self, name: str) -> None:
        """The sender dies, and another starts in its place: what it claimed stays leased until
        the lease ends; what it published and did not mark may be published again."""
        hand = self.hand[name]
        if hand.outcome is not None:
            self._excuse((item.row.task_id for item in hand.outcome.sent), "a sender crashed")
        self._start_sender(name)

    # The real relay, a whole batch at once -------------------------------------------------------

    @precondition(lambda self: self._senders_may_run())
    @rule(
        fault=st.sampled_from(
            ["none", "none", "crash before publish", "crash after publish", "connection dropped"]
        )
    )
    @counted
    def relay_batch(self, fault: str) -> None:
        relay = self.relay
        sender = relay.sender
        faulty = FaultySender(sender, fault)
        relay.sender = faulty  # type: ignore[assignment]
        before = len(self.broker.published)
        try:
            self.thread.raw(relay.run_batch, ALIAS)
        except (DatabaseOperationalError, InterfaceError):
            # The connection was dropped before this batch: the relay's loop logs it, reconnects
            # and tries again later; nothing was claimed.
            STATS["relay: batch failed on a lost connection"] += 1
            assert len(self.broker.published) == before, "published, then failed to settle"
            self.thread.raw(connections[ALIAS].close)
            return
        except Crash:
            STATS[f"relay: {fault}"] += 1
            self._took(relay.holder, [item.row for item in faulty.items])
            sent = [task_id for task_id, _, _ in self.broker.published[before:]]
            self._excuse(sent, f"a relay crashed ({fault})")
            self.relay = self._new_relay()  # the crashed one is gone; its claim stays leased
            return
        finally:
            relay.sender = sender
        STATS[f"relay: {fault}"] += 1
        # The batch claimed and settled its rows within the step: judge its claim now.
        rows = [item.row for item in faulty.items]
        self._took(relay.holder, rows)
        self._released(relay.holder, rows)

    # Invariants ----------------------------------------------------------------------------------

    @invariant()
    def nothing_sent_that_did_not_commit(self) -> None:
        counts = self.broker.counts()
        for task_id, n in counts.items():
            assert task_id not in self.rolled_back, f"{task_id} was rolled back and published"
            assert task_id in self.committed, f"{task_id} was published before its commit"
            if n > 1:
                assert task_id in self.excused, (
                    f"{task_id} was published {n} times with no crash or lease overrun between "
                    f"its publish and its mark"
                )
        for task_id, args, kwargs in self.broker.published[-10:]:
            assert (args, kwargs) == self.expected[task_id], f"{task_id} arrived altered"

    @invariant()
    def nothing_stuck(self) -> None:
        if not self._senders_may_run():
            return

        def late() -> list[tuple[str, float]]:
            now = database_now(ALIAS)
            limit = now + dt.timedelta(seconds=LONGEST_WAIT + SLACK)
            rows = OutboxMessage.objects.using(ALIAS).filter(
                status=Status.PENDING, due_at__gt=limit
            )
            return [(r.task_id, (r.due_at - now).total_seconds()) for r in rows]

        assert self.thread(late) == [], "pending messages due later than any lease or backoff"

    # The end of a run: everything committed goes out ---------------------------------------------

    def teardown(self) -> None:
        try:
            if self.clock_patch is not None:
                self.clock_patch.close()
            while self.levels:
                self._rollback()
            for hand in self.hand.values():  # every sender still running dies
                if hand.outcome is not None:
                    self._excuse(
                        [item.row.task_id for item in hand.outcome.sent], "a sender crashed"
                    )
            self.broker.up = True
            self.broker.refuse_next = 0
            self.thread(pass_time, LEASE + LONGEST_WAIT + SLACK)
            self.clock += LEASE + LONGEST_WAIT + SLACK
            drain = self._new_relay()
            for _ in range(1000):
                if not self.thread(drain.run_batch, ALIAS):
                    break
            pending = self.thread(
                lambda: list(
                    OutboxMessage.objects.using(ALIAS)
                    .filter(status=Status.PENDING)
                    .values_list("task_id", flat=True)
                )
            )
            assert pending == [], f"{len(pending)} message(s) still pending after the drain"
            self.nothing_sent_that_did_not_commit()
            missing = self.committed - set(self.broker.counts())
            assert not missing, f"committed but never published: {sorted(missing)}"
            STATS["committed"] += len(self.committed)
            STATS["rolled back"] += len(self.rolled_back)
            STATS["publishes"] += len(self.broker.published)
            for task_id, n in self.broker.counts().items():
                if n > 1:
                    STATS[f"duplicates after: {self.excused[task_id]}"] += n - 1
        finally:
            self.thread(_clean)


def _clean() -> None:
    OutboxMessage.objects.using(ALIAS).all().delete()
    Lease.objects.using(ALIAS).all().delete()


def test_outbox_protocol__holds_under_random_interleavings_and_faults(capsys) -> None:  # type: ignore[no-untyped-def]
    examples = SOAK_EXAMPLES or 50
    ProtocolModel.thread = SenderThread()
    STATS.clear()
    started = time.monotonic()
    outcome = "FAILED"
    try:
        with override_settings(AFTERCOMMIT=SETTINGS):
            run_state_machine_as_test(
                ProtocolModel,
                settings=settings(
                    max_examples=examples,
                    stateful_step_count=50 if SOAK_EXAMPLES else 25,
                    deadline=None,
                    database=DirectoryBasedExampleDatabase(str(HYPOTHESIS_DIR / "examples")),
                    suppress_health_check=list(HealthCheck),
                    print_blob=True,
                ),
            )
        outcome = "held"
    finally:
        ProtocolModel.thread.close()
        connections.close_all()
        with capsys.disabled():
            print(summary(outcome, time.monotonic() - started))


def summary(outcome: str, seconds: float) -> str:
    parts = [
        f"\nprotocol model ({connections[ALIAS].vendor}): invariants {outcome} over "
        f"{STATS['examples']} examples, {STATS['steps']} steps in {seconds:.0f}s; "
        f"{STATS['committed']} committed and {STATS['rolled back']} rolled-back messages, "
        f"{STATS['publishes']} publishes"
    ]
    totals = {"examples", "steps", "committed", "rolled back", "publishes"}
    parts += [f"  {key}: {n}" for key, n in sorted(STATS.items()) if key not in totals]
    return "\n".join(parts)
