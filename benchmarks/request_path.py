"""Request-path cost of an admin-like save with one task dispatch, four ways, in one run.

    python benchmarks/request_path.py [--saves 2000]

Uses DATABASE_URL / BROKER_URL (default: PostgreSQL `aftercommit_bench` and Redis db 7 on
127.0.0.1). No worker runs: only what the request pays is measured; the queue is purged after.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/aftercommit_bench")
os.environ.setdefault("BROKER_URL", "redis://127.0.0.1:6379/7")
os.environ.setdefault("AFTERCOMMIT_TEST_STATE", "/tmp/aftercommit-bench")
os.environ["DJANGO_SETTINGS_MODULE"] = "tests.settings"


def ensure_database() -> None:
    import dj_database_url
    import psycopg

    db = dj_database_url.parse(os.environ["DATABASE_URL"])
    if not db["ENGINE"].endswith("postgresql"):
        return
    with psycopg.connect(
        host=db["HOST"] or "127.0.0.1", port=db["PORT"] or 5432, user=db["USER"],
        dbname="postgres", autocommit=True,
    ) as conn:  # fmt: skip
        exists = "SELECT 1 FROM pg_database WHERE datname = %s"
        if not conn.execute(exists, [db["NAME"]]).fetchone():
            conn.execute(f'CREATE DATABASE "{db["NAME"]}"')
            conn.execute(f'CREATE DATABASE "{db["NAME"]}_other"')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--saves", type=int, default=2000)
    args = parser.parse_args()

    ensure_database()
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import transaction

    call_command("migrate", verbosity=0)
    call_command("migrate", database="other", verbosity=0)
    from tests.celery_app import app
    from tests.testapp.models import Item
    from tests.testapp.tasks import plain_read_item, read_item

    from aftercommit.publisher import publisher

    item = Item.objects.create(name="bench")

    def save(dispatch) -> float:  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        with transaction.atomic():
            item.version += 1
            item.save(update_fields=["version"])
            dispatch()
        return time.perf_counter() - started

    modes = {
        "no task": lambda: None,
        "plain .delay()": lambda: plain_read_item.delay("bench", item.pk, item.version),
        # What Celery's DjangoTask.delay_on_commit does: on_commit(partial(self.delay, ...)).
        "delay_on_commit": lambda: transaction.on_commit(
            lambda: plain_read_item.delay("bench", item.pk, item.version)
        ),
        "aftercommit .delay()": lambda: read_item.delay("bench", item.pk, item.version),
    }
    results: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(50):  # warm up connections, imports and the publisher thread
        for dispatch in modes.values():
            save(dispatch)
    publisher.flush(30)
    # Interleave the modes so drift on a shared machine hits all of them alike.
    for _ in range(args.saves):
        for name, dispatch in modes.items():
            results[name].append(save(dispatch))
    publisher.flush(60)
    with app.connection_for_write() as conn:
        conn.default_channel.queue_purge("celery")

    base = statistics.median(results["delay_on_commit"])
    print(f"\nrequest path, {args.saves} admin-like saves per mode ({os.environ['DATABASE_URL']}, "
          f"{os.environ['BROKER_URL']})")  # fmt: skip
    print(f"{'mode':<22} {'median ms':>10} {'p90 ms':>8} {'vs delay_on_commit':>19}")
    for name, samples in results.items():
        samples.sort()
        median = statistics.median(samples)
        p90 = samples[int(len(samples) * 0.9)]
        print(f"{name:<22} {median * 1000:>10.3f} {p90 * 1000:>8.3f} {median / base:>18.2f}x")


if __name__ == "__main__":
    main()
