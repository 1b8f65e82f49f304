"""Request-path cost of an admin-like save with one task dispatch, side by side, in one run.

    python benchmarks/request_path.py [--saves 2000] [--quick]

An admin-like save is an UPDATE of one row in ``transaction.atomic()``; the ways dispatch nothing,
plain ``.delay()`` (the seed's bug), Celery's ``delay_on_commit``, aftercommit's ``.delay()``, and
the floor under aftercommit: the same save plus a bare INSERT of an outbox row (no validation, no
encoding), which is all the database round trip aftercommit adds to a request. On psycopg 3 one more
way measures hiding that round trip: the bare INSERT and the COMMIT sent as one message, one round
trip for both, what a hook before the COMMIT could do if Django had one (not shipped: see the
report).

Saves run back to back, as on a busy server: blocks of saves with no idle gap between them, the
ways taking turns block by block (in a rotating order) so drift on a shared machine hits all alike.
Two figures a way, from the same loops:
- the request's latency: each save from ``atomic()`` to its return;
- the web process's CPU per save (``time.process_time`` over each block, divided by its saves):
  everything the process spends, every thread included. aftercommit's web process only INSERTs;
  nothing is left for a background thread.
No worker and no relay run (only what the web process pays is measured); the queue is purged and
the outbox rows deleted after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

BASE = "Celery `delay_on_commit`"
OURS = "aftercommit `.delay()`"
FLOOR = "floor: the outbox row's INSERT alone"
HIDDEN = "the same INSERT sent with the COMMIT, one round trip (not shipped)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saves", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="a small run that checks the code")
    args = parser.parse_args()
    if args.quick:
        args.saves = 60
    common.setup_test_project()
    from django.db import transaction

    from aftercommit import UnsafeDispatchWarning

    # The plain `.delay()` way is the seed's bug on purpose: the guard still runs (its cost counts),
    # its warning is not news here.
    warnings.simplefilter("ignore", UnsafeDispatchWarning)
    from django.db import connection
    from tests.celery_app import app
    from tests.testapp.models import Item
    from tests.testapp.tasks import plain_read_item, read_item

    from aftercommit.models import OutboxMessage, Status

    with connection.cursor() as cursor:  # the rows other benchmarks left
        cursor.execute(f"TRUNCATE {OutboxMessage._meta.db_table}")
    item = Item.objects.create(name="bench")
    outbox = OutboxMessage.objects.using("default")

    def stored(task_id: str) -> dict[str, object]:
        """What a dispatch of this call would store in its outbox row."""
        return {
            "task_id": task_id,
            "task_name": read_item.name,
            "payload": f'[["bench", {item.pk}, {item.version}], {{}}]',
            "content_type": "application/json",
            "content_encoding": "utf-8",
            "options": '{"reply_to": "floor"}',
            "status": Status.PENDING,
        }

    def insert_only() -> None:
        """The floor: the outbox row's INSERT alone."""
        outbox.insert(**stored("request-path-floor"))

    connection.ensure_connection()
    raw: Any = connection.connection
    hides = connection.vendor == "postgresql" and hasattr(raw, "pipeline")  # psycopg 3
    if hides:
        import psycopg

        from aftercommit.models import _insert_statement

        statement = _insert_statement(connection)
        row = OutboxMessage(**stored("request-path-hidden"))
        params = [f.get_db_prep_save(getattr(row, f.attname), connection) for f in statement.fields]
        # The bare INSERT with its values written in, then the COMMIT: one simple-protocol
        # message, so one round trip for both (what a hook before Django's COMMIT could send).
        insert_then_commit = (
            psycopg.ClientCursor(raw).mogrify(statement.sql.split(" RETURNING ")[0], params)
            + "; COMMIT"
        )

    def save(dispatch: Callable[[], object], phases: list[list[float]] | None = None) -> float:
        started = time.perf_counter()
        if dispatch is send_with_commit:  # what atomic() does, the COMMIT sent with the INSERT
            connection.set_autocommit(False)
            item.version += 1
            item.save(update_fields=["version"])
            saved = dispatched = time.perf_counter()
            with connection.cursor() as cursor:
                cursor.execute(insert_then_commit)
            connection.set_autocommit(True)
        else:
            with transaction.atomic():
                item.version += 1
                item.save(update_fields=["version"])
                saved = time.perf_counter()
                dispatch()
                dispatched = time.perf_counter()
        done = time.perf_counter()
        if phases is not None:  # the UPDATE, the dispatch call, the commit with its hooks
            phases.append([saved - started, dispatched - saved, done - dispatched])
        return done - started

    def send_with_commit() -> None:
        """A marker: ``save`` sends the bare INSERT and the COMMIT in one round trip."""

    ways: dict[str, Callable[[], object]] = {
        "no task": lambda: None,
        "plain `.delay()`": lambda: plain_read_item.delay("bench", item.pk, item.version),
        # What Celery's DjangoTask.delay_on_commit does: on_commit(partial(self.delay, ...)).
        BASE: lambda: transaction.on_commit(
            lambda: plain_read_item.delay("bench", item.pk, item.version)
        ),
        OURS: lambda: read_item.delay("bench", item.pk, item.version),
        FLOOR: insert_only,
    }
    if hides:
        ways[HIDDEN] = send_with_commit
    for _ in range(50):  # warm up connections and imports
        for dispatch in ways.values():
            save(dispatch)

    block = 20 if args.quick else 200
    rounds = max(1, args.saves // block)
    latency: dict[str, list[float]] = {name: [] for name in ways}
    phases: dict[str, list[list[float]]] = {name: [] for name in ways}
    cpu_total = {name: 0.0 for name in ways}
    names = list(ways)
    for turn in range(rounds):
        # Back to back: a block of saves with no idle gap, then the next way's block; the order
        # rotates so no way always follows the same one.
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            dispatch, samples, split = ways[name], latency[name], phases[name]
            started = time.process_time()
            for _ in range(block):
                samples.append(save(dispatch, split))
            cpu_total[name] += time.process_time() - started
    saves = rounds * block
    cpu = {name: total / saves for name, total in cpu_total.items()}
    common.purge_queue(app)
    outbox.all().delete()

    med = {name: statistics.median(samples) for name, samples in latency.items()}
    rows = [
        [
            name,
            f"{med[name] * 1000:.3f}",
            f"{common.percentile(samples, 90) * 1000:.3f}",
            f"{med[name] / med[BASE]:.2f}x",
            f"{cpu[name] * 1000:.3f}",
            f"{cpu[name] / cpu[BASE]:.2f}x",
            f"{(cpu[name] - cpu['no task']) * 1000:.3f}",
        ]
        for name, samples in latency.items()
    ]
    phase_rows = [
        [name, *(f"{statistics.median(p[i] for p in phases[name]) * 1000:.3f}" for i in range(3))]
        for name in ways
    ]
    latency_ratio = med[OURS] / med[BASE]
    cpu_ratio = cpu[OURS] / cpu[BASE]
    # The dispatch alone: what the way adds to a save that dispatches nothing.
    added = {name: cpu[name] - cpu["no task"] for name in ways}
    dispatch_cpu_ratio = added[OURS] / added[BASE] if added[BASE] > 0 else float("nan")
    above_floor = (med[OURS] - med[FLOOR]) * 1000
    floor_ratio = med[FLOOR] / med[BASE]
    hidden_note = ""
    if hides:
        hidden_ratio = med[HIDDEN] / med[BASE]
        phase = {name: [statistics.median(p[i] for p in phases[name]) for i in range(3)]
                 for name in (FLOOR, HIDDEN)}  # fmt: skip
        together = phase[HIDDEN][2]
        would_be = (med[OURS] - med[FLOOR] + med[HIDDEN]) / med[BASE]
        apart = phase[FLOOR][1] + phase[FLOOR][2]
        hidden_note = (
            f"Hiding the INSERT's round trip, measured: the same bare INSERT and the COMMIT sent "
            f"as one message (one round trip for both) is {hidden_ratio:.2f}x `delay_on_commit`, "
            f"against the floor's {floor_ratio:.2f}x ({(med[HIDDEN] - med[FLOOR]) * 1000:+.3f} ms "
            f"at the median). The floor's INSERT and COMMIT take {apart * 1000:.3f} ms in two "
            f"round trips, {together * 1000:.3f} ms in one: the round trip is "
            f"{(apart - together) * 1000:.3f} ms of the INSERT's {phase[FLOOR][1] * 1000:.3f}. "
            f"Hidden, aftercommit would be near {would_be:.2f}x "
            f"(its {above_floor:.3f} ms above the floor stay). aftercommit does not ship it: "
            f"Django has no hook "
            f"before its COMMIT, and the other way, psycopg 3's pipeline mode entered at the "
            f"dispatch and left open across the caller's own queries, refuses server-side "
            f"cursors (Django's `.iterator()`), defers a failing statement's error to a later "
            f"one, and costs a round trip of its own to leave.\n\n"
        )

    def verdict(ratio: float) -> str:
        return "met" if ratio <= 0.6 else "missed"

    markdown = (
        f"{saves:,} admin-like saves a way (an UPDATE in `atomic()` plus one dispatch), back to "
        f"back in blocks of {block} (no idle gap between saves), the ways taking turns block by "
        f"block; PostgreSQL with `synchronous_commit=on`, broker "
        f"`{os.environ['BROKER_URL'].split('://')[0]}`, no worker, no relay.\n\n"
        + common.table(
            [
                "way",
                "latency median ms",
                "p90 ms",
                "vs delay_on_commit",
                "web-process CPU ms a save",
                "vs delay_on_commit",
                "CPU ms above `no task`",
            ],
            rows,
        )
        + f"\n\nTargets (issue 11), aftercommit against `delay_on_commit`, back to back:\n\n"
        f"- request latency at most 0.6x: **{latency_ratio:.2f}x, {verdict(latency_ratio)}**;\n"
        f"- the web process's CPU per save (one dispatch each) at most 0.6x: "
        f"**{cpu_ratio:.2f}x, {verdict(cpu_ratio)}**; the dispatch alone (CPU above the save "
        f"without a task): {dispatch_cpu_ratio:.2f}x.\n\n"
        f"The floor is the save plus the outbox row's bare INSERT ({floor_ratio:.2f}x "
        f"`delay_on_commit`): aftercommit's `.delay()` costs {above_floor:.3f} ms more than it "
        f"at the median (validation, encoding, the task's options, the trace capture).\n\n"
        + hidden_note
        + "Where a save's time goes (medians, ms): the UPDATE, the dispatch call inside the "
        "transaction (aftercommit's INSERT of the outbox row is here), and the commit with its "
        "on-commit hooks (Celery's `delay_on_commit` publishes here; for aftercommit the commit "
        "delivers PostgreSQL's NOTIFY, which wakes the relays).\n\n"
        + common.table(["way", "UPDATE", "dispatch call", "commit + hooks"], phase_rows)
    )
    print(
        f"aftercommit vs delay_on_commit, back to back: latency {latency_ratio:.2f}x, "
        f"web-process CPU per save {cpu_ratio:.2f}x, per dispatch {dispatch_cpu_ratio:.2f}x",
        flush=True,
    )
    common.write_section(
        name="request_path",
        order=1,
        title="1. Request-path cost of an admin-like save with one dispatch",
        markdown=markdown,
        data={
            "saves": saves,
            "block": block,
            "latency_ms": {k: [round(x * 1000, 3) for x in v] for k, v in latency.items()},
            "cpu_ms": {k: v * 1000 for k, v in cpu.items()},
            "latency_ratio": latency_ratio,
            "cpu_ratio": cpu_ratio,
            "dispatch_cpu_ratio": dispatch_cpu_ratio,
            "above_floor_ms": above_floor,
            "floor_ratio": floor_ratio,
            "hidden_ratio": med[HIDDEN] / med[BASE] if hides else None,
            "phases_median_ms": {
                name: [statistics.median(p[i] for p in samples) * 1000 for i in range(3)]
                for name, samples in phases.items()
            },
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
