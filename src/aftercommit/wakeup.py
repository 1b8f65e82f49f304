"""How a relay learns there is something to send, the moment a transaction commits.

- PostgreSQL: a trigger NOTIFYs ``aftercommit`` inside the transaction that inserted messages;
  PostgreSQL delivers it when that transaction commits, and never if it rolls back. The relay
  LISTENs on its own connection and waits on the socket, so it wakes within a fraction of a
  millisecond of the commit, whichever process committed.
- MariaDB/MySQL and SQLite have no notifications: the relay looks at the claim index every
  ``PROBE_INTERVAL`` seconds (one read-only index probe; it claims only when something is due).
- A relay in the same process as the commit (a Celery worker whose task dispatched) is woken
  directly by the commit hook, on every database.
- ``POLL_INTERVAL`` is the safety net under all of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
from typing import Any

from django.db import connections

logger = logging.getLogger("aftercommit.wakeup")

CHANNEL = "aftercommit"

# Relays running in this process, woken directly by a commit here.
_local: set[Waiter] = set()
_local_lock = threading.Lock()


def after_commit(alias: str) -> None:
    """Called for each recorded message: wake this process's relays when it commits."""
    if not _local:
        return
    connections[alias].on_commit(_wake_local, robust=True)


def _wake_local() -> None:
    for waiter in list(_local):
        waiter.wake()


class _Listener:
    """LISTEN on one PostgreSQL alias, on the relay thread's own Django connection."""

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.raw: Any = None
        self.pending = False

    def ensure(self) -> Any:
        connection = connections[self.alias]
        connection.ensure_connection()
        raw = connection.connection
        if raw is not self.raw:
            with connection.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
            if hasattr(raw, "add_notify_handler"):  # psycopg 3: notices read during a query
                raw.add_notify_handler(self._heard)
            self.raw = raw
        return raw

    def _heard(self, notify: Any) -> None:
        self.pending = True

    def take_pending(self) -> bool:
        """True if a notification arrived while the connection ran a query (claim, mark)."""
        notifies = getattr(self.raw, "notifies", None)
        if isinstance(notifies, list) and notifies:  # psycopg 2 keeps them in a list
            notifies.clear()
            self.pending = True
        pending, self.pending = self.pending, False
        return pending

    def fileno(self) -> int:
        return int(self.raw.fileno())

    def consume(self) -> None:
        """Read what woke the socket, so it does not wake the next wait too."""
        raw = self.raw
        pgconn = getattr(raw, "pgconn", None)
        if pgconn is not None:  # psycopg 3
            pgconn.consume_input()
            while pgconn.notifies() is not None:
                pass
        else:  # psycopg 2
            raw.poll()
            raw.notifies.clear()


class Waiter:
    """Waits for the first of: a commit's notification, a wake-up from this process, a timeout."""

    def __init__(self, aliases: list[str]) -> None:
        self.listeners = [
            _Listener(alias) for alias in aliases if connections[alias].vendor == "postgresql"
        ]
        self.notified = {listener.alias for listener in self.listeners}
        self._read, self._write = socket.socketpair()
        self._read.setblocking(False)
        self._write.setblocking(False)
        with _local_lock:
            _local.add(self)

    def notifies(self, alias: str) -> bool:
        """Whether commits on ``alias`` wake this waiter (else it must probe)."""
        return alias in self.notified

    def listen(self) -> None:
        """(Re)subscribe each PostgreSQL connection; call before each wait."""
        for listener in self.listeners:
            try:
                listener.ensure()
            except Exception:
                logger.warning("cannot LISTEN on %r; polling it", listener.alias, exc_info=True)
                connections[listener.alias].close()
                listener.raw = None

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):  # already awake, or closing
            self._write.send(b"\0")

    def wait(self, timeout: float) -> set[str] | None:
        """Block until woken or ``timeout``. Returns the PostgreSQL aliases whose commits woke it,
        or None when woken from this process (or a connection broke): look everywhere."""
        pending = {listener.alias for listener in self.listeners if listener.take_pending()}
        if pending:
            return pending
        sockets: list[Any] = [self._read]
        for listener in self.listeners:
            if listener.raw is None:
                continue
            try:
                listener.fileno()
            except Exception:  # the server dropped the connection: claim (and reconnect) now
                self._lost(listener)
                return None
            sockets.append(listener)
        try:
            ready, _, _ = select.select(sockets, [], [], max(timeout, 0.0))
        except (OSError, ValueError):  # a connection closed under us: look again at once
            return None
        woken: set[str] | None = set()
        for item in ready:
            if item is self._read:
                with contextlib.suppress(BlockingIOError, OSError):
                    while self._read.recv(4096):
                        pass
                woken = None
                continue
            try:
                item.consume()
            except Exception:  # the server went away; the next claim reconnects
                self._lost(item)
            if woken is not None:
                woken.add(item.alias)
        return woken

    @staticmethod
    def _lost(listener: _Listener) -> None:
        listener.raw = None
        with contextlib.suppress(Exception):
            connections[listener.alias].close()

    def close(self) -> None:
        with _local_lock:
            _local.discard(self)
        self._read.close()
        self._write.close()


def _reset_after_fork() -> None:
    # A forked child (a prefork pool process) runs none of its parent's relays, and the lock may
    # have been held by another thread at the fork.
    global _local_lock
    _local.clear()
    _local_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)
