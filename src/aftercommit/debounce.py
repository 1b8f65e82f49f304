"""Debounce: ``task.apply_async(args, debounce=2.0[, debounce_key="..."])`` is sent once,
``debounce`` seconds after the commit of the last dispatch with the same key; the earlier pending
ones are superseded and never sent.

Every debounced dispatch is an outbox row like any other, with a key (a hash of the task name and
either its encoded arguments or the explicit ``debounce_key``) and a ``due_at`` ``debounce`` seconds
ahead: set at the INSERT, and set again by the database's clock right after the commit, so a long
transaction does not shorten the wait. When a row comes due, the relay that claimed it looks for a
newer pending row with the same key: if there is one, this row is marked superseded instead of
sent. Only committed rows are visible, so a rolled-back dispatch supersedes nothing; the rows are
in the database, so dispatches from different processes coalesce.

Ordering is by the outbox's id (the order of the INSERTs). Two transactions with the same key that
commit in the opposite order of their INSERTs can each be sent, each after its own commit: never
fewer sends than needed, never one before its data is visible.

``AFTERCOMMIT["DEBOUNCE_MAX_WAIT"]`` bounds a burst: once a key has had a message waiting that
long, the newest due one is sent even though newer ones keep coming.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import numbers
from collections.abc import Sequence
from typing import Any

from django.db import connections, transaction
from django.db.models import Max
from django.db.models.functions import Now

from .conf import settings
from .exceptions import DispatchError
from .models import OutboxMessage, Status, later

logger = logging.getLogger("aftercommit.debounce")

MAX_KEY_LENGTH = 255
MAX_DEBOUNCE = 100 * 365.25 * 24 * 3600


def check(task_name: str, debounce: Any, debounce_key: Any) -> None:
    """Refuse a bad ``debounce``/``debounce_key`` at the call, before anything is stored."""
    if debounce is None:
        if debounce_key is not None:
            raise DispatchError(
                f"{task_name}: debounce_key={debounce_key!r} without debounce. Pass "
                f"debounce=<seconds> too, e.g. apply_async(args, debounce=2.0, "
                f"debounce_key={debounce_key!r})."
            )
        return
    if (
        isinstance(debounce, bool)
        or not isinstance(debounce, numbers.Real)
        or not math.isfinite(debounce)
        or not 0 < float(debounce) <= MAX_DEBOUNCE
    ):
        raise DispatchError(
            f"{task_name}: debounce must be a positive, finite number of seconds, got {debounce!r}."
        )
    if debounce_key is not None and (
        not isinstance(debounce_key, str) or not debounce_key or len(debounce_key) > MAX_KEY_LENGTH
    ):
        raise DispatchError(
            f"{task_name}: debounce_key must be a non-empty string of at most {MAX_KEY_LENGTH} "
            f"characters, got {debounce_key!r}. Leave it out to debounce calls with equal "
            f"arguments."
        )


def key(task_name: str, debounce_key: str | None, content_type: str, payload: str) -> str:
    """The stored key: the task and its explicit key, or the task and its encoded arguments
    (options are not part of it). A hash, so the column and its index stay small."""
    parts: tuple[str, ...] = (
        ("key", task_name, debounce_key)
        if debounce_key is not None
        else ("args", task_name, content_type, payload)
    )
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def insert(alias: str, seconds: float, values: dict[str, Any]) -> OutboxMessage:
    """INSERT the row, due ``seconds`` from now, and again ``seconds`` after the commit.

    The row's due time is moved by an UPDATE in the same transaction as the INSERT (opened here for
    a call outside one: alone, the INSERT would commit the row due at once, and a relay could send
    it before the UPDATE). After the commit the due time is set again, by the database's clock;
    if the process dies before that, the row is due ``seconds`` after the dispatch.
    """
    connection = connections[alias]
    in_transaction = connection.in_atomic_block
    outbox = OutboxMessage.objects.using(alias)
    with contextlib.nullcontext() if in_transaction else transaction.atomic(using=alias):
        message = outbox.insert(**values)
        outbox.filter(pk=message.pk).update(due_at=later(seconds))
    if not in_transaction:
        return message  # committed just now

    def after_commit() -> None:
        try:
            outbox.filter(pk=message.pk, status=Status.PENDING).update(due_at=later(seconds))
        except Exception:  # the save succeeded: never turn it into an error after the commit
            logger.warning(
                "%s: could not restart the debounce wait after the commit; the message is due "
                "%ss after its dispatch instead",
                message,
                seconds,
                exc_info=True,
            )

    connection.on_commit(after_commit)
    return message


def drop_superseded(alias: str, rows: Sequence[OutboxMessage]) -> list[OutboxMessage]:
    """The claimed rows to send: those a newer pending row with the same key replaces are marked
    superseded (in one UPDATE) and left out. Costs nothing for a batch without debounced rows."""
    keyed = [(row.debounce_key, row.id) for row in rows if row.debounce_key]
    if not keyed:
        return list(rows)
    outbox = OutboxMessage.objects.using(alias)
    newest = {
        str(k): int(row_id)
        for k, row_id in outbox.filter(
            debounce_key__in={k for k, _ in keyed}, status=Status.PENDING
        )
        .values("debounce_key")
        .annotate(newest=Max("id"))
        .values_list("debounce_key", "newest")
    }
    # The newest row of each key this batch holds: sent instead of superseded when the key's
    # burst is past its maximum wait.
    held: dict[str, int] = {}
    for k, row_id in keyed:
        held[k] = max(held.get(k, 0), row_id)
    overdue = {k for k in held if held[k] < newest.get(k, 0) and _waited_too_long(outbox, k)}
    superseded = {
        row_id
        for k, row_id in keyed
        if row_id < newest.get(k, 0) and not (k in overdue and row_id == held[k])
    }
    if not superseded:
        return list(rows)
    outbox.filter(id__in=superseded, status=Status.PENDING).update(
        status=Status.SUPERSEDED, due_at=Now()
    )
    logger.debug("superseded %d debounced message(s) on %r", len(superseded), alias)
    return [row for row in rows if row.id not in superseded]


def _waited_too_long(outbox: Any, debounce_key: str) -> bool:
    """Has a message of this key been waiting (pending or superseded since the key's last send)
    longer than DEBOUNCE_MAX_WAIT? Reads the key's newest rows on its index."""
    last_sent = (
        outbox.filter(debounce_key=debounce_key, status=Status.SENT)
        .order_by("-id")
        .values_list("id", flat=True)
        .first()
    )
    return bool(
        outbox.filter(
            debounce_key=debounce_key,
            id__gt=last_sent or 0,
            status__in=(Status.PENDING, Status.SUPERSEDED),
            created_at__lt=later(-float(settings.DEBOUNCE_MAX_WAIT)),
        ).exists()
    )
