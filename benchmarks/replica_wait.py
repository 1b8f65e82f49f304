"""What replica-safe reads add before a task starts when the replica has caught up.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/<db> python benchmarks/replica_wait.py \
        [--rounds 5] [--samples 300] [--quick]

Needs the test replica (``make replica``; AFTERCOMMIT_TEST_REPLICA_URL, default port 5433). Each
round commits an admin-like save on the primary, reads the position the relay would stamp
(``replicas.position``), waits untimed until the replica has replayed it, then times the worker's
``task_prerun`` receiver (and ``task_postrun``) for a message carrying that position, the way a
worker runs them before and after each task: with the last answer dropped (one query on the
checking connection) and with it kept (no query). The same receiver for a message without a
position is the floor: what every task pays with the feature installed. The relay's side is one
query per batch, timed too.

``--end-to-end`` also measures commit-to-task-start with a real worker (threads pool) that relays,
with and without ``REPLICAS``, in alternating blocks (a fresh worker each), one admin-like save
every ``--pace`` seconds. For it the replica's ``recovery_min_apply_delay`` is set to 0 (a replica
that keeps up, a few ms behind at most) and put back afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=300, help="timed runs per round and way")
    parser.add_argument("--end-to-end", action="store_true", help="also with a real worker")
    parser.add_argument("--blocks", type=int, default=3, help="end to end: blocks per way")
    parser.add_argument("--block-samples", type=int, default=60, help="end to end: saves a block")
    parser.add_argument(
        "--pace", type=float, default=0.05, help="end to end: seconds between saves"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.samples, args.blocks, args.block_samples = 2, 20, 1, 10
    common.use_services()
    name = os.environ["DATABASE_URL"].rsplit("/", 1)[1]
    # Everything in the one database (the task records its runs in "other"); worker processes
    # read these names too.
    os.environ["AFTERCOMMIT_TEST_DB_NAMES"] = json.dumps(
        {"default": name, "other": name, "replica": name}
    )
    # Outside the test runner nothing makes the replica alias mirror the primary: name its
    # database here (a physical replica has the primary's databases).
    replica_url = os.environ.get(
        "AFTERCOMMIT_TEST_REPLICA_URL", "postgres://postgres@127.0.0.1:5433/postgres"
    )
    os.environ["AFTERCOMMIT_TEST_REPLICA_URL"] = f"{replica_url.rsplit('/', 1)[0]}/{name}"
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0)  # the primary only; the replica replays it

    from django.db import connections, transaction
    from django.test import override_settings
    from tests.testapp.models import Item

    from aftercommit import replicas

    if "replica" not in connections.settings:
        raise SystemExit("no replica configured: DATABASE_URL must be PostgreSQL")
    with connections["replica"].cursor() as cursor:
        cursor.execute("SELECT pg_is_in_recovery(), current_setting('recovery_min_apply_delay')")
        in_recovery, delay = cursor.fetchone()
    if not in_recovery:
        raise SystemExit("AFTERCOMMIT_TEST_REPLICA_URL is not a replica; run `make replica`")

    def task(needed: dict[str, str] | None) -> Any:
        request = SimpleNamespace(**({replicas.HEADER: needed} if needed else {}))
        return SimpleNamespace(name="bench.replica", request=request)

    def timed(needed: dict[str, str] | None, *, cached: bool) -> float:
        if not cached:
            replicas.replayed.seen.clear()
        job = task(needed)
        started = time.perf_counter()
        replicas.on_task_prerun(sender=job, task_id="bench", task=job)
        stale = replicas.stale_replicas()
        replicas.on_task_postrun()
        took = time.perf_counter() - started
        assert not stale, "the replica had not caught up: the benchmark measured a wait"
        return took * 1000

    ways: dict[str, list[float]] = {
        "no position (every task)": [],
        "caught up, one query": [],
        "caught up, cached": [],
    }
    stamp: list[float] = []
    with override_settings(AFTERCOMMIT={"REPLICAS": ["replica"], "REPLICA_WAIT": 10.0}):
        item = Item.objects.create(name="replica-bench")
        for _ in range(args.rounds):
            with transaction.atomic():
                item.version += 1
                item.save()
            lsn = replicas.position("default")
            assert lsn is not None
            needed = {"default": lsn}
            # Untimed: until the replica has replayed the save (recovery_min_apply_delay).
            if replicas.wait(needed, timeout=30):
                raise SystemExit("the replica did not replay the save within 30 s")
            timed(needed, cached=True)  # warm the checking connection
            for _ in range(args.samples):
                ways["no position (every task)"].append(timed(None, cached=True))
                ways["caught up, one query"].append(timed(needed, cached=False))
                ways["caught up, cached"].append(timed(needed, cached=True))
                started = time.perf_counter()
                replicas.position("default")
                stamp.append((time.perf_counter() - started) * 1000)
        Item.objects.filter(pk=item.pk).delete()
    replicas.replayed.close()

    lines = [
        "| worker, before a task starts | p50 ms | p99 ms | mean ms |",
        "|---|---|---|---|",
    ]
    data: dict[str, Any] = {"delay": delay, "rounds": args.rounds, "samples": args.samples}
    for way, values in ways.items():
        p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
        lines.append(f"| {way} | {p50:.3f} | {p99:.3f} | {statistics.fmean(values):.3f} |")
        data[way] = {"p50": p50, "p99": p99}
    lines.append(
        f"| relay, per batch: `position()` | {percentile(stamp, 0.5):.3f} | "
        f"{percentile(stamp, 0.99):.3f} | {statistics.fmean(stamp):.3f} |"
    )
    if args.end_to_end:
        lines += ["", "| real worker, commit → task start | p50 ms | p99 ms | mean ms |",
                  "|---|---|---|---|"]  # fmt: skip
        for way, values in end_to_end(args).items():
            p50, p99 = percentile(values, 0.5), percentile(values, 0.99)
            lines.append(f"| {way} | {p50:.2f} | {p99:.2f} | {statistics.fmean(values):.2f} |")
            data[f"end to end, {way}"] = {"p50": p50, "p99": p99, "n": len(values)}
    markdown = (
        f"PostgreSQL streaming replica on the same machine (recovery_min_apply_delay {delay}), "
        f"{args.rounds} rounds x {args.samples} samples. A task whose replica has replayed its "
        f"commit pays one query on a kept connection, or nothing when a recent answer already "
        f"covers it (a batch stamped with one position).\n\n" + "\n".join(lines)
    )
    common.write_section(
        name="replica_wait",
        order=7,
        title="Replica-safe reads: added commit-to-start latency with a caught-up replica",
        markdown=markdown,
        data=data,
        quick=args.quick,
    )
    return 0


def end_to_end(args: argparse.Namespace) -> dict[str, list[float]]:
    from django.db import transaction
    from tests.testapp.models import Item, TaskRun
    from tests.testapp.tasks import read_replica_item

    replica = [sys.executable, str(common.ROOT / "tests" / "replica.py"), "start", "--delay"]
    subprocess.run([*replica, "0"], check=True, stdout=subprocess.DEVNULL)
    ways: dict[str, dict[str, Any]] = {
        "without REPLICAS": {},
        "with REPLICAS, replica keeping up": {"REPLICAS": ["replica"]},
    }
    samples: dict[str, list[float]] = {way: [] for way in ways}
    item = Item.objects.create(name="replica-e2e")
    try:
        for block in range(args.blocks):
            for index, (way, overrides) in enumerate(ways.items()):
                token = f"replica-e2e-{os.getpid()}-{block}-{index}"
                committed: dict[int, float] = {}
                worker = start_worker(overrides)
                try:
                    for _ in range(args.block_samples):
                        with transaction.atomic():
                            item.version += 1
                            item.save(update_fields=["version"])
                            read_replica_item.delay(token, item.pk, item.version)
                        committed[item.version] = time.time()
                        time.sleep(args.pace)
                    deadline = time.monotonic() + 60
                    while TaskRun.objects.filter(token=token).count() < len(committed):
                        if time.monotonic() > deadline:
                            raise SystemExit("tasks did not all start; see replica-wait-worker.log")
                        time.sleep(0.2)
                finally:
                    worker.terminate()
                    worker.wait(30)
                for version, started in TaskRun.objects.filter(token=token).values_list(
                    "expected_version", "started_at"
                ):
                    samples[way].append((started - committed[version]) * 1000)
    finally:
        subprocess.run([*replica, "300ms"], check=False, stdout=subprocess.DEVNULL)
    return samples


def start_worker(overrides: dict[str, Any]) -> subprocess.Popen[bytes]:
    log = open(common.out_dir() / "replica-wait-worker.log", "wb")  # noqa: SIM115 - the worker's
    argv = [
        sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "-P", "threads",
        "-c", "4", "-Q", common.QUEUE, "-l", "info", "--without-heartbeat", "--without-gossip",
        "--without-mingle", "-n", f"replica-bench-{os.getpid()}@%h",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(common.ROOT))
    env["AFTERCOMMIT_TEST_SETTINGS"] = json.dumps(overrides)
    proc = subprocess.Popen(argv, env=env, cwd=common.ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while b"ready." not in Path(log.name).read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not start, see {log.name}")
        time.sleep(0.2)
    return proc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
