"""What an outbox of 10,000,000 sent rows costs the request path and the relay.

    cd /work/main && .venv/bin/python benchmarks/big_outbox.py [--quick] [--saves 1500]

Two PostgreSQL databases on 127.0.0.1: ``aftercommit_bench_empty`` (its outbox emptied at the
start) and ``aftercommit_bench_10m`` (filled once with 10,000,000 sent rows, reused by later runs).
Admin-like saves with one aftercommit dispatch alternate between them, so noise on the shared
machine hits both alike; a relay process (``manage.py aftercommit relay``, the loop a worker's
relay runs) really claims, sends to Redis db 8 and marks every message meanwhile (no worker runs,
the queue is purged after). Then the outbox INSERT alone, with the WAL and buffer misses it costs,
and, with a few hundred pending due rows added to each, the relay's claim query explained and its
claim, ``mark_sent`` and ``purge_sent_batch`` timed.
``--quick`` uses 100,000 rows in ``aftercommit_bench_quick`` and a few hundred saves.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import common

SERVER = "postgres://postgres@127.0.0.1:5432"
EMPTY_DATABASE = "aftercommit_bench_empty"
TABLE = "aftercommit_outboxmessage"
TASK_NAME = "tests.testapp.tasks.read_item"
ALIASES = {"empty": "default", "big": "big"}
PENDING_ROWS = 500
CLAIM_BATCH = 100
PURGE_BATCH = 1000
PURGE_RUNS = 3

FILL_SQL = f"""
INSERT INTO {TABLE} (task_id, task_name, payload, content_type, content_encoding, options, trace,
                     status, created_at, due_at, sent_at, attempts, last_error)
SELECT gen_random_uuid()::text, '{TASK_NAME}',
       '[["bench", ' || i || ', ' || mod(i, 97) || '], {{}}]',
       'application/json', 'utf-8', '{{"ignore_result": false}}', '', 1,
       t, t + interval '2 seconds', t + interval '4 milliseconds', 0, ''
FROM generate_series(1, %(rows)s) AS i,
     LATERAL (SELECT now() - interval '7 days' * ((%(rows)s - i)::float8 / %(rows)s)) AS s(t)
"""

PENDING_SQL = f"""
INSERT INTO {TABLE} (task_id, task_name, payload, content_type, content_encoding, options, trace,
                     status, created_at, due_at, sent_at, attempts, last_error)
SELECT gen_random_uuid()::text, '{TASK_NAME}', '[["bench", ' || i || ', 1], {{}}]',
       'application/json', 'utf-8', '{{"ignore_result": false}}', '', 0,
       now() - interval '1 minute', now() - interval '1 second' * i, NULL, 0, ''
FROM generate_series(1, %(rows)s) AS i
"""

# The row record() inserts, as one autocommit statement; task_id comes from Python.
INSERT_SQL = f"""
EXPLAIN (ANALYZE, BUFFERS, WAL, FORMAT JSON)
INSERT INTO {TABLE} (task_id, task_name, payload, content_type, content_encoding, options, trace,
                     status, created_at, due_at, sent_at, attempts, last_error)
VALUES (%(task_id)s, 'big-outbox-insert', '[["bench", 1, 2], {{}}]', 'application/json',
        'utf-8', '{{"ignore_result": false}}', '', 0, now(), now(), NULL, 0, '')
"""

# Every index but the primary key, with what recreates it: a unique constraint comes back as a
# constraint, the others (task_id's, the claim's, sent_at's) from their definition.
SECONDARY_INDEXES_SQL = f"""
SELECT ci.relname, pg_get_indexdef(i.indexrelid), con.conname, pg_get_constraintdef(con.oid)
FROM pg_index i
JOIN pg_class ci ON ci.oid = i.indexrelid
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
WHERE i.indrelid = '{TABLE}'::regclass AND NOT i.indisprimary
ORDER BY ci.relname
"""

INDEX_STATS_SQL = f"""
SELECT s.indexrelname, s.idx_blks_read, s.idx_blks_hit, pg_relation_size(s.indexrelid)
FROM pg_statio_user_indexes s WHERE s.relname = '{TABLE}' ORDER BY s.indexrelname
"""


def configure(big_database: str) -> None:
    """Point Django at the two outbox databases and Redis db 8, then migrate every alias."""
    os.environ["DATABASE_URL"] = f"{SERVER}/{EMPTY_DATABASE}"
    os.environ["BIG_OUTBOX_DATABASE"] = big_database
    os.environ["BROKER_URL"] = "redis://127.0.0.1:6379/8"
    os.environ["AFTERCOMMIT_TEST_STATE"] = "/tmp/aftercommit-bench-big"
    os.environ["AFTERCOMMIT_TEST_APP_NAME"] = "aftercommit-bench-big"
    os.environ["AFTERCOMMIT_TEST_QUEUE"] = common.QUEUE
    os.environ["DJANGO_SETTINGS_MODULE"] = "benchmarks.big_settings"
    common.ensure_database(os.environ["DATABASE_URL"], f"{EMPTY_DATABASE}_other", big_database)
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connections

    for alias in connections:
        call_command("migrate", database=alias, verbosity=0)


def sql(alias: str, statement: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    from django.db import connections

    with connections[alias].cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def filled_rows(alias: str) -> int:
    """The id range, read from the ends of the primary key: the fill numbers its rows from 1, and
    runs only add rows after them (and delete only their own)."""
    return int(sql(alias, f"SELECT coalesce(max(id) - min(id) + 1, 0) FROM {TABLE}")[0][0])


def fill(alias: str, rows: int) -> float:
    """Replace the outbox with ``rows`` sent rows, loaded without its secondary indexes.

    One transaction, so an interrupted fill leaves the table as it was. Returns seconds taken.
    """
    from django.db import transaction

    started = time.perf_counter()
    with transaction.atomic(using=alias):
        sql(alias, "SET LOCAL maintenance_work_mem = '512MB'")
        indexes = sql(alias, SECONDARY_INDEXES_SQL)
        sql(alias, f"TRUNCATE {TABLE} RESTART IDENTITY")
        for name, _, constraint, _ in indexes:
            if constraint:
                sql(alias, f'ALTER TABLE {TABLE} DROP CONSTRAINT "{constraint}"')
            else:
                sql(alias, f'DROP INDEX "{name}"')
        sql(alias, FILL_SQL, {"rows": rows})
        for _, definition, constraint, constraint_definition in indexes:
            if constraint:
                sql(
                    alias,
                    f'ALTER TABLE {TABLE} ADD CONSTRAINT "{constraint}" {constraint_definition}',
                )
            else:
                sql(alias, definition)
    sql(alias, f"VACUUM ANALYZE {TABLE}")
    return time.perf_counter() - started


def index_stats(alias: str) -> dict[str, tuple[int, int, int]]:
    """Per index: shared-buffer misses, hits, size in bytes."""
    return {name: (read, hit, size) for name, read, hit, size in sql(alias, INDEX_STATS_SQL)}


def index_io(
    before: dict[str, tuple[int, int, int]], after: dict[str, tuple[int, int, int]], saves: int
) -> dict[str, dict[str, float]]:
    return {
        name: {
            "misses_per_save": (after[name][0] - before[name][0]) / saves,
            "hits_per_save": (after[name][1] - before[name][1]) / saves,
            "size_mb": after[name][2] / 2**20,
        }
        for name in after
    }


def start_relay() -> subprocess.Popen[bytes]:
    """``manage.py aftercommit relay`` on this run's databases and broker (what a worker's relay
    does), its log beside the results."""
    log = open(common.out_dir() / "big_outbox-relay.log", "wb")  # noqa: SIM115 - the relay's
    argv = [sys.executable, "-m", "django", "aftercommit", "relay"]
    env = dict(os.environ, PYTHONPATH=str(common.ROOT))
    return subprocess.Popen(argv, env=env, cwd=common.ROOT, stdout=log, stderr=subprocess.STDOUT)


def stop_relay(relay: subprocess.Popen[bytes]) -> None:
    relay.send_signal(signal.SIGTERM)  # it stops after the batch in hand
    try:
        relay.wait(30)
    except subprocess.TimeoutExpired:
        relay.kill()
        relay.wait()


def measure_saves(saves: int, warmup: int) -> dict[str, Any]:
    """Interleaved admin-like saves on both databases, a relay process sending meanwhile; seconds
    per save and index I/O per save."""
    from django.db import transaction
    from tests.celery_app import app
    from tests.testapp.models import Item
    from tests.testapp.tasks import read_item

    from aftercommit.models import OutboxMessage, Status

    items = {
        label: Item.objects.using(alias).get_or_create(name="big-outbox")[0]
        for label, alias in ALIASES.items()
    }

    def save(label: str) -> float:
        alias, item = ALIASES[label], items[label]
        started = time.perf_counter()
        with transaction.atomic(using=alias):
            item.version += 1
            item.save(update_fields=["version"])
            read_item.apply_async(args=["bench", item.pk, item.version], using=alias)
        return time.perf_counter() - started

    def pending() -> dict[str, int]:
        return {
            label: OutboxMessage.objects.using(alias).filter(status=Status.PENDING).count()
            for label, alias in ALIASES.items()
        }

    def wait_sent(timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while any(pending().values()) and time.monotonic() < deadline:
            time.sleep(0.2)

    labels = list(ALIASES)
    relay = start_relay()
    try:
        for _ in range(warmup):
            for label in labels:
                save(label)
        wait_sent(60)
        before = {label: index_stats(alias) for label, alias in ALIASES.items()}
        samples: dict[str, list[float]] = {label: [] for label in labels}
        for i in range(saves):
            # Each database goes first half the time.
            for label in labels if i % 2 == 0 else labels[::-1]:
                samples[label].append(save(label))
        wait_sent(60)
        io = {
            label: index_io(before[label], index_stats(alias), saves)
            for label, alias in ALIASES.items()
        }
    finally:
        stop_relay(relay)
    unsent = pending()
    queued = common.purge_queue(app)
    return {"samples": samples, "index_io": io, "unsent": unsent, "queued": queued}


def measure_inserts(inserts: int, task_id: Callable[[], uuid.UUID]) -> dict[str, dict[str, float]]:
    """A plain INSERT of one outbox row on each database in alternation: its time with the commit,
    and the WAL and shared-buffer misses it costs, with task ids made by ``task_id``."""
    samples: dict[str, list[float]] = {label: [] for label in ALIASES}
    totals = {label: {"wal_bytes": 0, "wal_fpi": 0, "misses": 0} for label in ALIASES}
    labels = list(ALIASES)
    for i in range(inserts):
        for label in labels if i % 2 == 0 else labels[::-1]:
            started = time.perf_counter()
            plan = sql(ALIASES[label], INSERT_SQL, {"task_id": str(task_id())})[0][0][0]["Plan"]
            samples[label].append(ms_since(started))
            totals[label]["wal_bytes"] += plan["WAL Bytes"]
            totals[label]["wal_fpi"] += plan["WAL FPI"]
            totals[label]["misses"] += plan["Shared Read Blocks"]
    for alias in ALIASES.values():
        sql(alias, f"DELETE FROM {TABLE} WHERE task_name = 'big-outbox-insert'")
    return {
        label: {
            "median_ms": statistics.median(samples[label]),
            "p90_ms": common.percentile(samples[label], 90),
            **{key: total / inserts for key, total in totals[label].items()},
        }
        for label in ALIASES
    }


def explain_claim(alias: str) -> tuple[str, str]:
    """The claim's SELECT, EXPLAIN (ANALYZE, BUFFERS), rolled back: its SQL and its plan."""
    from django.db import connections, transaction
    from django.test.utils import CaptureQueriesContext

    from aftercommit.models import OutboxMessage

    with transaction.atomic(using=alias), CaptureQueriesContext(connections[alias]) as queries:
        # What claim() selects (its claimed_at annotation is Now(), no change to the plan).
        qs = (
            OutboxMessage.objects.using(alias)
            .due()
            .select_for_update(skip_locked=True, of=("self",))
        )
        plan = qs[:CLAIM_BATCH].explain(analyze=True, buffers=True)
        transaction.set_rollback(True, using=alias)
    return queries.captured_queries[-1]["sql"], plan


def execution_ms(plan: str) -> float:
    match = re.search(r"Execution Time: ([\d.]+) ms", plan)
    return float(match.group(1)) if match else float("nan")


def ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def measure_relay(alias: str) -> dict[str, Any]:
    """Claim, mark_sent and one purge_sent batch with PENDING_ROWS due rows over the sent ones."""
    from django.db import transaction

    from aftercommit.models import OutboxMessage, Status, database_now

    outbox = OutboxMessage.objects.using(alias)
    outbox.filter(status=Status.PENDING).delete()  # what an interrupted run left
    first_id = sql(alias, f"SELECT coalesce(max(id), 0) + 1 FROM {TABLE}")[0][0]
    sql(alias, PENDING_SQL, {"rows": PENDING_ROWS})
    sql(alias, f"ANALYZE {TABLE}")
    plans: list[str] = []
    claim_ms: list[float] = []
    mark_sent_ms: list[float] = []
    claim_sql = ""
    for _ in range(PENDING_ROWS // CLAIM_BATCH):
        statement, plan = explain_claim(alias)
        claim_sql = claim_sql or statement
        plans.append(plan)
        started = time.perf_counter()
        claimed = outbox.claim(limit=CLAIM_BATCH, lease=60)
        claim_ms.append(ms_since(started))
        started = time.perf_counter()
        outbox.mark_sent([m.id for m in claimed])
        mark_sent_ms.append(ms_since(started))

    # One purge batch: the retention window ends just past the PURGE_BATCH oldest sent rows
    # (seconds before the database's now), rolled back, so the same batch can be timed again.
    oldest = list(
        outbox.filter(status=Status.SENT)
        .order_by("sent_at")
        .values_list("sent_at", flat=True)[PURGE_BATCH : PURGE_BATCH + 1]
    )
    now = database_now(alias)
    older_than = (now - oldest[0]).total_seconds() if oldest and oldest[0] else 0.0
    purge_ms: list[float] = []
    for _ in range(PURGE_RUNS):
        with transaction.atomic(using=alias):
            started = time.perf_counter()
            purged = outbox.purge_sent_batch(older_than=older_than, batch_size=PURGE_BATCH)
            purge_ms.append(ms_since(started))
            transaction.set_rollback(True, using=alias)
    sql(alias, f"DELETE FROM {TABLE} WHERE id >= %(first)s", {"first": first_id})
    return {
        "claim_sql": claim_sql,
        "plan": plans[0],
        "claim_select_ms": [execution_ms(p) for p in plans],
        "claim_ms": claim_ms,
        "mark_sent_ms": mark_sent_ms,
        "purge_batch_ms": purge_ms,
        "purged_rows": purged,
    }


def summary(samples: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(samples) * 1000,
        "p90_ms": common.percentile(samples, 90) * 1000,
        "p99_ms": common.percentile(samples, 99) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100,000 rows, a few hundred saves")
    parser.add_argument("--saves", type=int, help="saves per database (default 1500, quick 200)")
    args = parser.parse_args()
    rows = 100_000 if args.quick else 10_000_000
    saves = args.saves or (200 if args.quick else 1500)
    warmup = 20 if args.quick else 100
    inserts = 200 if args.quick else 1000
    big_database = "aftercommit_bench_quick" if args.quick else "aftercommit_bench_10m"
    configure(big_database)
    from django.conf import settings

    run_started = time.perf_counter()
    found = filled_rows("big")
    if found >= rows:
        fill_s = None
        print(f"{big_database}: reused, ids 1..{found:,}", flush=True)
    else:
        print(f"{big_database}: {found:,} rows, filling with {rows:,} sent rows ...", flush=True)
        fill_s = fill("big", rows)
        print(f"{big_database}: filled in {fill_s:.1f} s", flush=True)
    sql("default", f"TRUNCATE {TABLE}")

    measure_started = time.perf_counter()
    saved = measure_saves(saves, warmup)
    from aftercommit.dispatch import time_ordered_uuid

    id_kinds = {
        "random (uuid4)": uuid.uuid4,
        "time-ordered (UUIDv7, record()'s default)": time_ordered_uuid,
    }
    inserted_by_kind = {kind: measure_inserts(inserts, make) for kind, make in id_kinds.items()}
    inserted = inserted_by_kind["time-ordered (UUIDv7, record()'s default)"]
    relay = {label: measure_relay(alias) for label, alias in ALIASES.items()}
    measure_s = time.perf_counter() - measure_started

    stats = {label: summary(s) for label, s in saved["samples"].items()}
    ratio = stats["big"]["median_ms"] / stats["empty"]["median_ms"]
    ratio_p90 = stats["big"]["p90_ms"] / stats["empty"]["p90_ms"]
    big_rows = f"{rows:,} sent"
    label_of = {"empty": "empty", "big": big_rows}
    save_table = common.table(
        ["outbox", "median ms", "p90 ms", "p99 ms"],
        [
            [
                label_of[label],
                *(f"{stats[label][k]:.3f}" for k in ("median_ms", "p90_ms", "p99_ms")),
            ]
            for label in ALIASES
        ],
    )
    insert_ratio = inserted["big"]["median_ms"] / inserted["empty"]["median_ms"]
    insert_table = common.table(
        [
            "task_id",
            "outbox",
            "median ms",
            "p90 ms",
            "WAL bytes",
            "full-page images",
            "buffer misses",
        ],
        [
            [
                kind,
                label_of[label],
                f"{measured[label]['median_ms']:.3f}",
                f"{measured[label]['p90_ms']:.3f}",
                f"{measured[label]['wal_bytes']:.0f}",
                f"{measured[label]['wal_fpi']:.2f}",
                f"{measured[label]['misses']:.2f}",
            ]
            for kind, measured in inserted_by_kind.items()
            for label in ALIASES
        ],
    )
    relay_table = common.table(
        ["outbox", "claim SELECT ms", "claim ms", "mark_sent ms", "purge_sent_batch ms"],
        [
            [
                label_of[label],
                f"{statistics.median(relay[label]['claim_select_ms']):.2f}",
                f"{statistics.median(relay[label]['claim_ms']):.2f}",
                f"{statistics.median(relay[label]['mark_sent_ms']):.2f}",
                f"{statistics.median(relay[label]['purge_batch_ms']):.1f}"
                f" ({relay[label]['purged_rows']} rows)",
            ]
            for label in ALIASES
        ],
    )
    io_table = common.table(
        ["index", "size MB (big)", "misses/save empty", "misses/save big", "hits/save big"],
        [
            [
                name,
                f"{io['size_mb']:.0f}",
                f"{saved['index_io']['empty'][name]['misses_per_save']:.2f}",
                f"{io['misses_per_save']:.2f}",
                f"{io['hits_per_save']:.2f}",
            ]
            for name, io in saved["index_io"]["big"].items()
        ],
    )
    verdict = "met" if ratio <= 1.10 else "missed"
    shared_buffers = sql("big", "SHOW shared_buffers")[0][0]
    unsent = sum(saved["unsent"].values())
    fill_note = f"filled in this run in {fill_s:.0f} s" if fill_s is not None else "reused"
    markdown = f"""\
An admin-like save with one aftercommit dispatch (`transaction.atomic`, `item.save()`,
`read_item.apply_async(using=...)`), {saves} times on each of two PostgreSQL databases in
alternation, after {warmup} warm-up saves each. One outbox starts empty, the other holds
{big_rows} rows ({fill_note}). The web process only INSERTs; a relay process
(`manage.py aftercommit relay`, the loop a worker's relay runs), woken by each commit's NOTIFY,
sent each message to Redis and marked it sent, as in production: {saved["queued"]} messages
reached the queue, {unsent} rows were left pending.

{save_table}

Ratio {big_rows} / empty: **{ratio:.3f}** at the median ({ratio_p90:.3f} at p90); target <= 1.10:
**{verdict}**.

Index I/O of the saves (inserts, the relay's `claim` and `mark_sent`), per save, from
`pg_statio_user_indexes` (misses are reads into shared_buffers = {shared_buffers}):

{io_table}

The outbox INSERT alone ({inserts} per database and kind of id, alternating, each its own
transaction), with the WAL and shared-buffer misses `EXPLAIN (ANALYZE, BUFFERS, WAL)` counts per
insert. A random task id lands on a random page of the big task_id index (a miss and a full-page
image each); a time-ordered one on its right edge. With time-ordered ids the ratio is
{insert_ratio:.3f} at the median:

{insert_table}

The relay with {PENDING_ROWS} pending due rows added: the claim's SELECT (median of
{PENDING_ROWS // CLAIM_BATCH} `EXPLAIN ANALYZE` runs), the whole `claim()` and `mark_sent()` of
{CLAIM_BATCH} rows, and one `purge_sent_batch()` of {PURGE_BATCH} (median of {PURGE_RUNS}, each
rolled back):

{relay_table}

Claim SELECT at {big_rows} rows:

```sql
{relay["big"]["claim_sql"]}
```

```
{relay["big"]["plan"]}
```"""
    data = {
        "rows": rows,
        "database": big_database,
        "filled_s": fill_s,
        "measure_s": measure_s,
        "run_s": time.perf_counter() - run_started,
        "saves_per_database": saves,
        "warmup": warmup,
        "saves": stats,
        "ratio_median": ratio,
        "ratio_p90": ratio_p90,
        "target_met": ratio <= 1.10,
        "index_io": saved["index_io"],
        "queued": saved["queued"],
        "inserts_per_database": inserts,
        "insert": inserted_by_kind,
        "insert_ratio_median": insert_ratio,
        "unsent": saved["unsent"],
        "shared_buffers": shared_buffers,
        "relay": relay,
        "broker": settings.CELERY_BROKER_URL,
    }
    print(
        f"fill: {'reused' if fill_s is None else f'{fill_s:.1f} s'}, measure: {measure_s:.1f} s",
        flush=True,
    )
    common.write_section(
        name="big_outbox",
        order=5,
        title=f"5. Dispatch with {rows:,} sent rows in the outbox",
        markdown=markdown,
        data=data,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
