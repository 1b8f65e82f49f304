"""Replica-safe reads (``AFTERCOMMIT["REPLICAS"]``), against a real streaming replica that lags
300 ms (``make replica``; the test settings add it as ``replica`` when AFTERCOMMIT_TEST_REPLICA_URL
is set), and the pieces on their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from django.conf import settings
from django.core import checks as django_checks
from django.db import OperationalError, connections, transaction
from django.test import override_settings

from aftercommit import replicas
from aftercommit.checks import check_replicas
from aftercommit.exceptions import ImproperlyConfigured
from aftercommit.relay import outbox_aliases
from tests.conftest import REQUIRE_SERVICES, Broker, Process, _subprocess_env, wait_for
from tests.testapp.models import Item, TaskRun
from tests.testapp.tasks import read_replica_item

SAVES = int(os.environ.get("AFTERCOMMIT_REPLICA_SAVES", "100"))
REPLICA = "replica"


# The pieces, without a replica --------------------------------------------------------------------


def test_stamped__keeps_the_later_position_of_each_database() -> None:
    headers = {"custom": 1, replicas.HEADER: {"default": "0/20", "other": "1/0"}}

    out = replicas.stamped(headers, "default", "0/1A")
    assert out == {"custom": 1, replicas.HEADER: {"default": "0/20", "other": "1/0"}}
    out = replicas.stamped(out, "default", "1/0")
    assert out[replicas.HEADER] == {"default": "1/0", "other": "1/0"}
    assert replicas.stamped(None, "default", None) == {}


def test_lsn_text__round_trips_and_orders_numerically() -> None:
    assert replicas.parse("1/0") > replicas.parse("0/FFFFFFFF")
    assert replicas.format_lsn(replicas.parse("2C/EFD918")) == "2C/EFD918"


def test_carry__a_call_from_a_task_that_waited_needs_the_same_position() -> None:
    options: dict[str, object] = {"headers": {replicas.HEADER: {"default": "0/10"}}}
    replicas.carry(options)
    assert options == {"headers": {replicas.HEADER: {"default": "0/10"}}}  # no task: unchanged

    token = replicas._needed.set({"default": "0/30"})
    try:
        replicas.carry(options)
        plain: dict[str, object] = {}
        replicas.carry(plain)
    finally:
        replicas._needed.reset(token)
    assert options["headers"] == {replicas.HEADER: {"default": "0/30"}}
    assert plain == {"headers": {replicas.HEADER: {"default": "0/30"}}}


@pytest.mark.django_db
def test_a_call_from_a_task_that_waited__its_outbox_row_carries_the_position() -> None:
    from aftercommit.dispatch import decode_options
    from aftercommit.models import OutboxMessage

    token = replicas._needed.set({"default": "0/30"})
    try:
        with transaction.atomic():
            result = read_replica_item.apply_async(("carry", 1, 1), headers={"custom": "kept"})
    finally:
        replicas._needed.reset(token)
    headers = decode_options(OutboxMessage.objects.get(task_id=result.id))["headers"]
    assert headers == {"custom": "kept", replicas.HEADER: {"default": "0/30"}}


def test_router__sends_a_stale_replicas_reads_to_its_primary_only_inside_that_task() -> None:
    class Chosen:
        def db_for_read(self, model: type, **hints: object) -> str:
            return "other"

    router = replicas.ReplicaRouter()
    with override_settings(AFTERCOMMIT={"REPLICAS": ["other"]}):
        # Outside a task that waited, it says nothing: Django asks the next router, at no cost.
        assert router.db_for_read(Item) is None
        token = replicas._stale.set(frozenset({"other"}))
        try:
            with _routers(router, Chosen()):
                assert router.db_for_read(Item) == "default"
                assert replicas.read_alias("other") == "default"
                assert replicas.read_alias("default") == "default"
        finally:
            replicas._stale.reset(token)
        assert replicas.read_alias("other") == "other"


def test_router__keeps_listed_replicas_out_of_migrations_and_the_relay() -> None:
    router = replicas.ReplicaRouter()
    with override_settings(AFTERCOMMIT={"REPLICAS": ["other"]}):
        assert router.allow_migrate("other", "aftercommit") is False
        assert router.allow_migrate("default", "aftercommit") is None
        with _routers(router):
            # A replica's TEST["MIRROR"] keeps it out as well, listed or not.
            assert outbox_aliases() == [
                a for a in settings.DATABASES if a not in ("other", REPLICA)
            ]


def test_check__a_replica_on_another_vendor_is_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(connections["other"], "vendor", "mysql")
    with override_settings(AFTERCOMMIT={"REPLICAS": ["other"]}), _routers(replicas.ReplicaRouter()):
        errors = check_replicas()
        assert [e.id for e in errors] == ["aftercommit.E008"]
        assert "'other' is a mysql database" in errors[0].msg
        assert "PostgreSQL" in errors[0].msg
        with pytest.raises(ImproperlyConfigured, match="replica-safe reads need PostgreSQL"):
            replicas.position("default")


def test_check__an_unknown_alias_and_a_missing_router_are_errors() -> None:
    with override_settings(AFTERCOMMIT={"REPLICAS": ["nowhere"]}), _routers():
        errors = check_replicas()
    assert [e.id for e in errors] == ["aftercommit.E008", "aftercommit.E009"]
    assert "'nowhere', which is not in DATABASES" in errors[0].msg
    assert "aftercommit.replicas.ReplicaRouter" in errors[1].hint
    assert all(e.level == django_checks.ERROR for e in errors)


def test_wait__a_recent_answer_at_or_past_the_position_costs_no_query(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []

    def ask(alias: str) -> int:
        asked.append(alias)
        replicas.replayed.seen[alias] = (replicas.parse("0/100"), time.monotonic())
        return replicas.parse("0/100")

    monkeypatch.setattr(replicas.replayed, "ask", ask)
    monkeypatch.setattr(replicas.replayed, "seen", {})
    monkeypatch.setattr(replicas, "configuration_problem", lambda alias: None)
    with override_settings(AFTERCOMMIT={"REPLICAS": ["other"]}):
        assert replicas.wait({"default": "0/80"}) == frozenset()
        assert replicas.wait({"default": "0/100"}) == frozenset()
        assert asked == ["other"]  # the second one was answered from the first
        assert replicas.wait({"default": "0/101"}, timeout=0.05) == frozenset({"other"})
        assert replicas.wait({"nowhere": "0/101"}) == frozenset()  # no listed replica of it


def test_wait__a_replica_that_cannot_be_reached_is_stale_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def ask(alias: str) -> int:
        raise OperationalError("connection refused")

    monkeypatch.setattr(replicas.replayed, "ask", ask)
    monkeypatch.setattr(replicas.replayed, "seen", {})
    monkeypatch.setattr(replicas, "configuration_problem", lambda alias: None)
    with override_settings(AFTERCOMMIT={"REPLICAS": ["other"], "REPLICA_WAIT": 30.0}):
        started = time.monotonic()
        assert replicas.wait({"default": "0/80"}) == frozenset({"other"})
    assert time.monotonic() - started < 5


def test_prerun__a_header_that_is_not_a_position_reads_from_the_primaries() -> None:
    task = SimpleNamespace(name="t", request=SimpleNamespace(**{replicas.HEADER: {"default": "x"}}))
    with override_settings(AFTERCOMMIT={"REPLICAS": ["other"]}):
        replicas.on_task_prerun(task_id="1", task=task)
        try:
            assert replicas.stale_replicas() == frozenset({"other"})
        finally:
            replicas.on_task_postrun()
    assert replicas.stale_replicas() == frozenset()


@contextlib.contextmanager
def _routers(*routers: object) -> Iterator[None]:
    from django.db import router

    saved = router.__dict__.get("routers")
    router.routers = list(routers)
    try:
        yield
    finally:
        if saved is None:
            del router.__dict__["routers"]
        else:
            router.routers = saved


# With a real replica -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replica(django_db_setup: None, django_db_blocker) -> str:  # type: ignore[no-untyped-def]
    """The replica's recovery_min_apply_delay; skips (fails with REQUIRE_SERVICES=1) without one."""
    engine = settings.DATABASES["default"]["ENGINE"]
    if not engine.endswith("postgresql"):
        pytest.skip(f"replica-safe reads are PostgreSQL only; this setup runs on {engine}")
    if REPLICA not in settings.DATABASES:
        reason = "no replica: run `make replica` and set the AFTERCOMMIT_TEST_REPLICA_URL it prints"
        if REQUIRE_SERVICES:
            pytest.fail(f"REQUIRE_SERVICES=1 and {reason}")
        pytest.skip(reason)
    with django_db_blocker.unblock():
        connection = connections[REPLICA]
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_is_in_recovery(), current_setting('recovery_min_apply_delay')"
                )
                in_recovery, delay = cursor.fetchone()
        except Exception as exc:
            reason = f"the replica {settings.DATABASES[REPLICA]['HOST']} is unreachable ({exc})"
            if REQUIRE_SERVICES:
                pytest.fail(f"REQUIRE_SERVICES=1 and {reason}; run `make replica`")
            pytest.skip(reason)
        finally:
            connection.close()
    assert in_recovery, "AFTERCOMMIT_TEST_REPLICA_URL points at a server that is not a replica"
    return str(delay)


@contextlib.contextmanager
def worker_with(broker: Broker, overrides: dict[str, object], name: str) -> Iterator[Process]:
    """A Celery worker that relays, with these AFTERCOMMIT settings on top of the tests'."""
    env = {**_subprocess_env(broker), **broker.env}
    merged = json.loads(env.get("AFTERCOMMIT_TEST_SETTINGS", "{}"))
    env["AFTERCOMMIT_TEST_SETTINGS"] = json.dumps({**merged, **overrides})
    argv = [sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "-P", "threads",
            "-c", "4", "-l", "info", "--without-heartbeat", "--without-gossip",
            "--without-mingle", "-n", f"replicas-{os.getpid()}@%h"]  # fmt: skip
    proc = Process(f"worker-{name}", argv, env)
    try:
        wait_for(lambda: "ready." in proc.output() or proc.proc.poll() is not None, timeout=60)
        if proc.proc.poll() is not None:
            raise RuntimeError(f"the worker exited:\n{proc.output()[-3000:]}")
        yield proc
    finally:
        proc.stop()


COMMITTED: dict[tuple[str, int], float] = {}  # (token, version) -> when its save committed


def admin_saves(token: str, *, retry: bool = False, saves: int = SAVES) -> list[TaskRun]:
    """Admin-like saves of one item, each dispatching a task that reads it back through the
    routers (which prefer the replica); the transaction stays open 0-10 ms after the call."""
    item = Item.objects.create(name=token)
    for _ in range(saves):
        with transaction.atomic():
            item.version += 1
            item.save()
            read_replica_item.delay(token, item.pk, item.version, retry)
            time.sleep(random.uniform(0, 0.010))
        COMMITTED[token, item.version] = time.time()
    # Generous: on a machine shared with other test runs the tasks have taken minutes.
    with contextlib.suppress(AssertionError):
        wait_for(lambda: TaskRun.objects.filter(token=token).count() >= saves, timeout=300)
    runs = list(TaskRun.objects.filter(token=token))
    assert len(runs) == saves, f"{len(runs)} of {saves} tasks ran within 300 s"
    return runs


def start_p50_ms(token: str, runs: list[TaskRun]) -> float:
    """Median commit-to-start of these runs, in ms."""
    delays = sorted(r.started_at - COMMITTED[token, r.expected_version or 0] for r in runs)
    return 1000 * delays[len(delays) // 2]


def figures(runs: list[TaskRun]) -> tuple[int, int]:
    """(stale reads, reads served by the replica)."""
    stale = sum(1 for r in runs if r.seen_version is None or r.seen_version < r.expected_version)
    served = sum(1 for r in runs if json.loads(r.headers)["read_from"] == REPLICA)
    return stale, served


@pytest.mark.services
@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_lagging_replica__tasks_read_stale_rows_without_replicas_none_with_it(
    replica: str, broker: Broker, token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with worker_with(broker, {}, "replicas-off"):
        plain_runs = admin_saves(f"{token}-plain")
    with worker_with(broker, {"REPLICAS": [REPLICA]}, "replicas-on"):
        runs = admin_saves(f"{token}-replicas")
    plain_stale, plain_served = figures(plain_runs)
    stale, served = figures(runs)
    with capsys.disabled():  # the figures belong in the CI log
        print(
            f"\nreplica lagging {replica}, {SAVES} admin-like saves: without REPLICAS "
            f"{plain_stale}/{len(plain_runs)} stale reads ({plain_served} from the replica); "
            f"with REPLICAS {stale}/{len(runs)} stale, {served} read from the replica; "
            f"commit to start p50 {start_p50_ms(f'{token}-plain', plain_runs):.0f} ms without, "
            f"{start_p50_ms(f'{token}-replicas', runs):.0f} ms with"
        )
    assert plain_served == len(plain_runs)  # the router did send them to the replica
    assert plain_stale > 0, "the replica showed no lag: this test could not have failed"
    assert len(runs) == SAVES
    assert stale == 0
    assert served >= 0.9 * SAVES, f"only {served} of {SAVES} reads were served by the replica"


@pytest.mark.services
@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_lagging_replica__a_retry_and_a_chain_step_carry_the_position(
    replica: str, broker: Broker, token: str
) -> None:
    chained = f"{token}-chain"
    with worker_with(broker, {"REPLICAS": [REPLICA]}, "replicas-retry"):
        runs = admin_saves(token, retry=True, saves=10)
        item = Item.objects.create(name=chained)
        with transaction.atomic():
            item.version = 1
            item.save()
            step = read_replica_item.si(chained, item.pk, 1)
            (step | step.clone()).delay()
        wait_for(lambda: TaskRun.objects.filter(token=chained).count() >= 2, timeout=120)
    stale, _ = figures(runs)
    assert stale == 0
    assert len(runs) == 10
    for run in runs:
        assert run.priority == 1  # recorded by the retry
        assert json.loads(run.headers)["lsn"]["default"]  # the retry kept the position
    steps = sorted(TaskRun.objects.filter(token=chained), key=lambda r: r.started_at)
    first, second = (json.loads(r.headers)["lsn"]["default"] for r in steps)
    assert replicas.parse(second) >= replicas.parse(first)  # the next step needs at least as much
    assert [r.seen_version for r in steps] == [1, 1]
