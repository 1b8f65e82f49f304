"""Request-path cost of an admin-like save with one task dispatch, four ways, in one run.

    python benchmarks/request_path.py [--saves 2000] [--quick]

An admin-like save is an UPDATE of one row in ``transaction.atomic()``; the four ways dispatch
nothing, plain ``.delay()`` (the seed's bug), Celery's ``delay_on_commit`` and aftercommit's
``.delay()``. The ways are interleaved save by save so drift on a shared machine hits all alike.

Two figures a way:
- the request's latency: the save from ``atomic()`` to its return, with aftercommit's background
  publisher given time to finish between saves (untimed), as between two requests;
- the CPU a save costs the process, background publisher included: process CPU time over a run of
  back-to-back saves, then the publisher flushed, divided by the saves.
No worker runs (only what the web process pays is measured); the queue is purged after.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saves", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="a small run that checks the code")
    args = parser.parse_args()
    if args.quick:
        args.saves = 50
    common.setup_test_project()
    from django.db import transaction

    from aftercommit import UnsafeDispatchWarning

    # The plain `.delay()` way is the seed's bug on purpose: the guard still runs (its cost counts),
    # its warning is not news here.
    warnings.simplefilter("ignore", UnsafeDispatchWarning)
    from tests.celery_app import app
    from tests.testapp.models import Item
    from tests.testapp.tasks import plain_read_item, read_item

    from aftercommit.publisher import publisher

    item = Item.objects.create(name="bench")

    def save(dispatch: Callable[[], object], phases: list[list[float]] | None = None) -> float:
        started = time.perf_counter()
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

    ways: dict[str, Callable[[], object]] = {
        "no task": lambda: None,
        "plain `.delay()`": lambda: plain_read_item.delay("bench", item.pk, item.version),
        # What Celery's DjangoTask.delay_on_commit does: on_commit(partial(self.delay, ...)).
        "Celery `delay_on_commit`": lambda: transaction.on_commit(
            lambda: plain_read_item.delay("bench", item.pk, item.version)
        ),
        "aftercommit `.delay()`": lambda: read_item.delay("bench", item.pk, item.version),
    }
    for _ in range(50):  # warm up connections, imports and the publisher thread
        for dispatch in ways.values():
            save(dispatch)
    publisher.flush(30)

    latency: dict[str, list[float]] = {name: [] for name in ways}
    phases: dict[str, list[list[float]]] = {name: [] for name in ways}
    for _ in range(args.saves):
        for name, dispatch in ways.items():
            latency[name].append(save(dispatch, phases[name]))
            publisher.flush(10)  # the publisher's work is not the next request's

    runs = max(1, args.saves // 200)
    block = 200 if not args.quick else 20
    totals = {name: 0.0 for name in ways}
    for _ in range(runs):  # short blocks, alternating, so drift hits every way alike
        for name, dispatch in ways.items():
            started = time.process_time()
            for _ in range(block):
                save(dispatch)
            publisher.flush(60)
            totals[name] += time.process_time() - started
    cpu: dict[str, float] = {name: total / (runs * block) for name, total in totals.items()}
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge(common.QUEUE)

    base = "Celery `delay_on_commit`"
    base_median = statistics.median(latency[base])
    rows = []
    for name, samples in latency.items():
        median = statistics.median(samples)
        rows.append(
            [
                name,
                f"{median * 1000:.3f}",
                f"{common.percentile(samples, 90) * 1000:.3f}",
                f"{median / base_median:.2f}x",
                f"{cpu[name] * 1000:.3f}",
                f"{cpu[name] / cpu[base]:.2f}x",
            ]
        )
    phase_rows = [
        [name, *(f"{statistics.median(p[i] for p in phases[name]) * 1000:.3f}" for i in range(3))]
        for name in ways
    ]
    ours = statistics.median(latency["aftercommit `.delay()`"]) / base_median
    markdown = (
        f"{args.saves:,} admin-like saves a way (an UPDATE in `atomic()` plus one dispatch), "
        f"interleaved; PostgreSQL with `synchronous_commit=on`, broker "
        f"`{os.environ['BROKER_URL'].split('://')[0]}`, no worker.\n\n"
        + common.table(
            [
                "way",
                "latency median ms",
                "p90 ms",
                "vs delay_on_commit",
                "CPU ms a save (publisher included)",
                "vs delay_on_commit",
            ],
            rows,
        )
        + f"\n\nTarget: aftercommit at most 0.6x `delay_on_commit` on the request path — "
        f"{ours:.2f}x: **{'met' if ours <= 0.6 else 'missed'}**.\n\nWhere a save's time goes "
        "(medians, ms): the UPDATE, the dispatch call inside the transaction (aftercommit's "
        "INSERT of the outbox row is here), and the commit with its on-commit hooks (Celery's "
        "`delay_on_commit` publishes here; aftercommit hands the row to its publisher thread).\n\n"
        + common.table(["way", "UPDATE", "dispatch call", "commit + hooks"], phase_rows)
    )
    common.write_section(
        name="request_path",
        order=1,
        title="1. Request-path cost of an admin-like save with one dispatch",
        markdown=markdown,
        data={
            "saves": args.saves,
            "latency_ms": {k: [round(x * 1000, 3) for x in v] for k, v in latency.items()},
            "cpu_ms": {k: v * 1000 for k, v in cpu.items()},
            "phases_median_ms": {
                name: [statistics.median(p[i] for p in samples) * 1000 for i in range(3)]
                for name, samples in phases.items()
            },
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
