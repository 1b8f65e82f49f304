"""Replica-safe reads: with ``AFTERCOMMIT["REPLICAS"]``, a task never reads older data from a
listed replica than the commit that dispatched it.

The relay stamps each message with a position in its database's write-ahead log, read when it
claims the message, after the commit (:func:`position`, :func:`stamped`). Before the task body runs,
the worker waits until every listed replica of that database has replayed the position, for at
most ``REPLICA_WAIT`` seconds (a ``task_prerun`` receiver). A replica that did not catch up in
time is stale for that task: :class:`ReplicaRouter`, first in ``DATABASE_ROUTERS``, sends the
reads your routers would send to it to its primary instead, and ``signals.replica_fallback``
counts it. Anything the task dispatches (a retry, the next step of a chain) carries the position
on (:func:`carry`). PostgreSQL only.

A replica belongs to the primary its ``TEST["MIRROR"]`` names (the setting Django's test runner
already uses for replicas), else to the ``default`` database.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any

from django.db import DEFAULT_DB_ALIAS, DatabaseError, connections, router
from django.db.backends.base.base import BaseDatabaseWrapper

from . import signals
from .conf import settings
from .exceptions import ImproperlyConfigured

logger = logging.getLogger("aftercommit.replicas")

#: The message header: ``{primary alias: "X/Y" log position}``.
HEADER = "aftercommit_lsn"
#: A replica's replayed position is reused this long before it is asked again. Replay only moves
#: forward, so a cached position at or past the one needed is proof enough; the bound only limits
#: how long an alias that was re-pointed at another server could be trusted from memory.
CACHE_SECONDS = 1.0
# The wait polls the replica, starting fast (a replica a few ms behind) and backing off.
_POLL_FIRST, _POLL_MAX = 0.002, 0.02
_PAGE = 8192

# The log position the running task needs ({primary: lsn}), and the replicas it must not read.
_needed: ContextVar[dict[str, str] | None] = ContextVar("aftercommit_lsn_needed", default=None)
_stale: ContextVar[frozenset[str]] = ContextVar("aftercommit_stale", default=frozenset())


# Configuration -----------------------------------------------------------------------------------


def primary_of(alias: str) -> str:
    """The database a replica copies: its ``TEST["MIRROR"]``, else ``default``."""
    test = connections.settings[alias].get("TEST") or {}
    return test.get("MIRROR") or DEFAULT_DB_ALIAS


def is_replica(alias: str) -> bool:
    """A listed replica, or an alias with a ``TEST["MIRROR"]`` (a replica by Django's own
    convention, listed or not): never migrated, never relayed from."""
    return alias in settings.REPLICAS or bool(
        (connections.settings[alias].get("TEST") or {}).get("MIRROR")
    )


def replicas_of(primary: str) -> list[str]:
    """The listed replicas of a database, checked: PostgreSQL on both sides."""
    found = [alias for alias in settings.REPLICAS if primary_of(alias) == primary]
    for alias in found:
        problem = configuration_problem(alias)
        if problem:
            raise ImproperlyConfigured(problem)
    return found


def configuration_problem(alias: Any) -> str | None:
    """Why ``alias`` cannot be a listed replica, or None."""
    fix = "AFTERCOMMIT['REPLICAS'] lists PostgreSQL streaming replicas only"
    if not isinstance(alias, str) or alias not in connections.settings:
        return f"AFTERCOMMIT['REPLICAS'] names {alias!r}, which is not in DATABASES; {fix}."
    primary = primary_of(alias)
    if primary not in connections.settings:
        return (
            f"The replica {alias!r} mirrors {primary!r} (its TEST['MIRROR']), which is not in "
            f"DATABASES."
        )
    if primary in settings.REPLICAS or primary == alias:
        return (
            f"The replica {alias!r} mirrors {primary!r}, itself a listed replica: set its "
            f"TEST['MIRROR'] to the primary database it replicates."
        )
    for name in (alias, primary):
        vendor = connections[name].vendor
        if vendor != "postgresql":
            what = "replica" if name == alias else f"primary of the replica {alias!r}"
            return (
                f"The {what} {name!r} is a {vendor} database: replica-safe reads need PostgreSQL "
                f"(they wait for pg_last_wal_replay_lsn()). Remove {alias!r} from "
                f"AFTERCOMMIT['REPLICAS'], or route its tasks' reads to the primary yourself."
            )
    return None


# The relay's side: a position at least the commit -----------------------------------------------


def position(alias: str) -> str | None:
    """The current write-ahead log position of ``alias``, when it has listed replicas, else None.

    Read after the commit of every row claimed with it, so at least each one's commit. The
    insert position covers a commit made with ``synchronous_commit = off`` too (its record may not
    be written out yet). One query, in the claim's connection.
    """
    if not settings.REPLICAS or not replicas_of(alias):
        return None
    with connections[alias].cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_insert_lsn()::text")
        (text,) = cursor.fetchone()
    lsn = parse(text)
    # At the very start of a page the insert position is past the page header, which the replica
    # never reports as replayed until a later record arrives: ask for the end of the last record.
    header = 40 if lsn % (16 * 1024 * 1024) == 40 else 24
    if lsn % _PAGE == header:
        lsn -= header
    return format_lsn(lsn)


def stamped(headers: Mapping[str, Any] | None, alias: str, lsn: str | None) -> dict[str, Any]:
    """Message headers that also require ``lsn`` on ``alias`` (the later one of any already
    there)."""
    out = dict(headers or {})
    if lsn is not None:
        out[HEADER] = merge(out.get(HEADER), {alias: lsn})
    return out


def merge(*positions: Mapping[str, str] | None) -> dict[str, str]:
    """The later position of each database."""
    out: dict[str, str] = {}
    for found in positions:
        for alias, lsn in (found or {}).items():
            if alias not in out or parse(lsn) > parse(out[alias]):
                out[alias] = lsn
    return out


def parse(lsn: str) -> int:
    high, _, low = lsn.partition("/")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def carry(options: dict[str, Any]) -> None:
    """Inside a task that needed a position, what it dispatches (a retry, a chain's next step, any
    call) needs it too: merge it into the call's headers. Free when no task needs one."""
    needed = _needed.get()
    if needed:
        headers = dict(options.get("headers") or {})
        headers[HEADER] = merge(headers.get(HEADER), needed)
        options["headers"] = headers


# The worker's side: wait, or read from the primary -----------------------------------------------


class _Replayed:
    """Each replica's last seen replay position in this process, and one checking connection per
    thread (Celery's Django fixup closes Django's own connections around every task)."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[int, float]] = {}
        self.local = threading.local()
        self.lock = threading.Lock()

    def cached(self, alias: str, needed: int) -> bool:
        seen = self.seen.get(alias)
        return seen is not None and seen[0] >= needed and time.monotonic() - seen[1] < CACHE_SECONDS

    def ask(self, alias: str) -> int:
        connection = self._connection(alias)
        try:
            with connection.cursor() as cursor:
                # Not in recovery (a promoted replica): it holds everything it has, say "now".
                cursor.execute(
                    "SELECT COALESCE(pg_last_wal_replay_lsn(), pg_current_wal_lsn())::text"
                )
                (text,) = cursor.fetchone()
        except DatabaseError:
            connection.close()
            raise
        value = parse(text)
        with self.lock:
            previous = self.seen.get(alias)
            if previous is None or value >= previous[0]:
                self.seen[alias] = (value, time.monotonic())
        return value

    def _connection(self, alias: str) -> BaseDatabaseWrapper:
        mine: dict[str, BaseDatabaseWrapper] = self.local.__dict__.setdefault("connections", {})
        pid = self.local.__dict__.setdefault("pid", os.getpid())
        if pid != os.getpid():  # a forked child: never share the parent's socket
            mine.clear()
            self.local.pid = os.getpid()
        connection = mine.get(alias)
        if connection is None:
            template = connections[alias]
            options = dict(template.settings_dict.get("OPTIONS") or {})
            # A replica that does not answer must cost a task about REPLICA_WAIT, not the
            # system's TCP timeout (minutes).
            options.setdefault("connect_timeout", max(1, math.ceil(settings.REPLICA_WAIT)))
            settings_dict = {**template.settings_dict, "OPTIONS": options}
            connection = type(template)(settings_dict, alias)
            mine[alias] = connection
        return connection

    def close(self) -> None:
        for connection in self.local.__dict__.get("connections", {}).values():
            connection.close()
        self.seen.clear()


replayed = _Replayed()


def wait(needed: Mapping[str, str], timeout: float | None = None) -> frozenset[str]:
    """Wait until every listed replica of each database in ``needed`` has replayed its position,
    for at most ``timeout`` seconds (``REPLICA_WAIT``). Returns the replicas that did not."""
    targets = [
        (replica, parse(lsn)) for primary, lsn in needed.items() for replica in replicas_of(primary)
    ]
    if not targets:
        return frozenset()
    pending = [(alias, lsn) for alias, lsn in targets if not replayed.cached(alias, lsn)]
    if not pending:
        return frozenset()
    deadline = time.monotonic() + (settings.REPLICA_WAIT if timeout is None else timeout)
    pause = _POLL_FIRST
    unreachable: set[str] = set()  # no point waiting for these: stale for this task
    while True:
        still = []
        for alias, lsn in pending:
            try:
                if replayed.ask(alias) >= lsn:
                    continue
            except DatabaseError as exc:
                logger.warning(
                    "replica %r cannot be checked (%s); this task reads from its primary", alias,
                    exc,
                )  # fmt: skip
                unreachable.add(alias)
                continue
            still.append((alias, lsn))
        pending = still
        left = deadline - time.monotonic()
        if not pending or left <= 0:
            return frozenset(unreachable | {alias for alias, _ in pending})
        time.sleep(min(pause, left))
        pause = min(pause * 2, _POLL_MAX)


def stale_replicas() -> frozenset[str]:
    """The replicas the running task must not read from (empty outside such a task)."""
    return _stale.get()


def read_alias(alias: str) -> str:
    """For code that picks a database by hand: ``alias``, or its primary when ``alias`` is a
    replica that has not caught up with the running task's commit."""
    return primary_of(alias) if alias in _stale.get() else alias


def on_task_prerun(sender: Any = None, task_id: str | None = None, task: Any = None,
                   **kwargs: Any) -> None:  # fmt: skip
    """Before the body of a task whose message needs a position: wait for the replicas."""
    request = getattr(task, "request", None)
    needed = getattr(request, HEADER, None) if request is not None else None
    if not needed or not isinstance(needed, Mapping):
        if _needed.get() is not None or _stale.get():
            _needed.set(None)
            _stale.set(frozenset())
        return
    started = time.monotonic()
    try:
        stale = wait(needed)
    except (ImproperlyConfigured, ValueError, TypeError, AttributeError) as exc:
        # A worker configured apart from its relay (which refuses to stamp on such a setup), or a
        # header that is not a position: read from the primaries rather than risk the replicas.
        logger.error("task %s: cannot check the replicas, reading from the primaries: %s",
                     task_id, exc)  # fmt: skip
        stale = frozenset(settings.REPLICAS)
    _needed.set(dict(needed))
    _stale.set(stale)
    for alias in sorted(stale):
        logger.info(
            "replica %r had not replayed %s after %.3fs: task %s %s reads from %r",
            alias, needed.get(primary_of(alias)), time.monotonic() - started,
            getattr(task, "name", sender), task_id, primary_of(alias),
        )  # fmt: skip
        signals.send(
            signals.replica_fallback,
            replica=alias,
            primary=primary_of(alias),
            task_name=getattr(task, "name", None),
            task_id=task_id,
            waited=time.monotonic() - started,
        )


def on_task_postrun(**kwargs: Any) -> None:
    if _needed.get() is not None or _stale.get():
        _needed.set(None)
        _stale.set(frozenset())


def install() -> None:
    """Connect the worker's side to Celery's signals (every process; it costs one attribute read
    per task whose message carries no position)."""
    from celery import signals as celery_signals

    celery_signals.task_prerun.connect(on_task_prerun, weak=False, dispatch_uid=__name__ + ".pre")
    celery_signals.task_postrun.connect(
        on_task_postrun, weak=False, dispatch_uid=__name__ + ".post"
    )


class ReplicaRouter:
    """Put it first in ``DATABASE_ROUTERS``; your routers follow and decide as before.

    Outside a task that waited for replicas it answers nothing, and Django asks the next router.
    Inside one, it asks the routers after it where a read goes; when that is a replica that did not
    catch up in time, it answers that replica's primary. It also keeps listed replicas (and any
    alias with a ``TEST["MIRROR"]``) out of migrations, and so out of the relay's databases.
    """

    def db_for_read(self, model: type, **hints: Any) -> str | None:
        stale = _stale.get()
        if not stale:
            return None
        chosen = self._others("db_for_read", model, hints)
        if chosen is None:
            instance = hints.get("instance")
            chosen = getattr(getattr(instance, "_state", None), "db", None)
        if chosen in stale:
            return primary_of(chosen)
        return chosen

    def allow_migrate(self, db: str, app_label: str, **hints: Any) -> bool | None:
        return False if is_replica(db) else None

    def _others(self, method: str, model: type, hints: dict[str, Any]) -> str | None:
        for other in _after(self, router.routers):
            chooser = getattr(other, method, None)
            if chooser is None:
                continue
            chosen: str | None = chooser(model, **hints)
            if chosen:
                return chosen
        return None


def _after(me: object, routers: Iterable[object]) -> list[object]:
    routers = list(routers)
    for index, candidate in enumerate(routers):
        if candidate is me or isinstance(candidate, ReplicaRouter):
            return routers[index + 1 :]
    return routers
