"""Commit-to-task-start latency with a real worker: delay_on_commit vs aftercommit vs the countdown.

    python benchmarks/latency.py [--samples 300] [--countdown 60] [--pool prefork] [--quick]

One Celery worker (``--pool``: prefork, Celery's default, or threads; concurrency 4) runs the test
project's tasks, which record when they start. It is also aftercommit's only sender: the relay runs
inside it (a worker bootstep, the default; with prefork, a thread of the worker's main process,
beside the consumer), woken by PostgreSQL's NOTIFY when a transaction that recorded a message
commits; no relay process runs. Each sample is an admin-like save that dispatches one task; the
caller notes the time of the commit (in the first on-commit hook), the task notes the time it
started (same machine, same clock). The ways are interleaved, one save every ``--pace`` seconds so
the worker is waiting, not queueing. The seed's own fix, a countdown, is dispatched inside the
transaction as the seed did; its samples are sent spread over the run and all land ``--countdown``
seconds later.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def start_worker(pool: str) -> subprocess.Popen[bytes]:
    log = open(common.out_dir() / "latency-worker.log", "wb")  # noqa: SIM115 - the worker's
    argv = [
        sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "-P", pool,
        "-c", "4", "-Q", common.QUEUE, "-l", "info", "--without-heartbeat", "--without-gossip",
        "--without-mingle", "-n", f"bench-{os.getpid()}@%h",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(common.ROOT))
    proc = subprocess.Popen(argv, env=env, cwd=common.ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while b"ready." not in Path(log.name).read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not start, see {log.name}")
        time.sleep(0.2)
    return proc


def plot(path: Path, samples: dict[str, list[float]]) -> None:
    fig, ax = common.figure(figsize=(8, 4.5))
    for name, values in samples.items():
        ordered = sorted(values)
        if not ordered:
            continue
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=name)
    ax.set_xscale("log")
    ax.set_xlabel("commit → task start (ms, log scale)")
    ax.set_ylabel("fraction of tasks started")
    ax.set_title("Commit-to-task-start latency, real worker")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    common.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument(
        "--countdown", type=float, default=60.0, help="the seed's countdown (0: leave it out)"
    )
    parser.add_argument("--pool", choices=("prefork", "threads"), default="prefork")
    parser.add_argument("--pace", type=float, default=0.02, help="seconds between saves")
    parser.add_argument("--quick", action="store_true", help="a small run that checks the code")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.countdown = 20, min(args.countdown, 2.0)
    common.setup_test_project()
    from django.db import transaction
    from tests.celery_app import app
    from tests.testapp.models import Item, TaskRun
    from tests.testapp.tasks import plain_read_item, read_item

    from aftercommit.models import OutboxMessage, Status

    common.purge_queue(app)
    TaskRun.objects.all().delete()
    item = Item.objects.create(name="latency")
    worker = start_worker(args.pool)
    committed: dict[str, float] = {}  # token -> when the commit returned

    def save(token: str, dispatch: Callable[[str], Any]) -> None:
        def stamp() -> None:
            committed[token] = time.time()

        with transaction.atomic():
            item.version += 1
            item.save(update_fields=["version"])
            # Hooks run in the order they were registered: this one notes the commit before
            # delay_on_commit's hook publishes. aftercommit's NOTIFY is delivered by the commit
            # itself, a few microseconds before this hook runs.
            transaction.on_commit(stamp)
            dispatch(token)

    countdown = f"countdown ({args.countdown:g} s, the seed's fix)"
    ways: dict[str, Callable[[str], Any]] = {
        "Celery `delay_on_commit`": lambda token: transaction.on_commit(
            lambda: plain_read_item.delay(token, item.pk, item.version)
        ),
        "aftercommit": lambda token: read_item.delay(token, item.pk, item.version),
    }
    countdown_every = max(1, args.samples // 100)  # 100 countdown samples are plenty
    try:
        for warm in range(20):
            for name, dispatch in ways.items():
                save(f"warm-{name}-{warm}", dispatch)
                time.sleep(args.pace)
        for i in range(args.samples):
            for name, dispatch in ways.items():
                save(f"{name}|{i}", dispatch)
                time.sleep(args.pace)
            if args.countdown and i % countdown_every == 0:
                save(
                    f"{countdown}|{i}",
                    lambda token: plain_read_item.apply_async(
                        (token, item.pk, item.version), countdown=args.countdown
                    ),
                )
        expected = {t for t in committed if not t.startswith("warm-")}
        deadline = time.monotonic() + args.countdown + 60
        while True:
            started = dict(
                TaskRun.objects.filter(token__in=expected).values_list("token", "started_at")
            )
            if len(started) >= len(expected) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        worker.terminate()
        worker.wait(30)
    if len(started) < len(expected):
        unsent = OutboxMessage.objects.filter(status=Status.PENDING).count()
        raise SystemExit(
            f"{len(expected) - len(started)} task(s) never started ({unsent} outbox row(s) still "
            f"pending); see {common.out_dir() / 'latency-worker.log'}"
        )
    # What the worker's relay logged (aftercommit logs warnings and errors only, here).
    relay_log = [
        line
        for line in (common.out_dir() / "latency-worker.log").read_text().splitlines()
        if "aftercommit" in line and ("ERROR" in line or "WARNING" in line or "Traceback" in line)
    ]
    for line in relay_log:
        print(f"worker log: {line}", flush=True)

    latency: dict[str, list[float]] = {
        name: [] for name in [*ways, *([countdown] if args.countdown else [])]
    }
    for token, at in started.items():
        latency[token.split("|")[0]].append((at - committed[token]) * 1000)
    base = "Celery `delay_on_commit`"
    p50 = {name: common.percentile(v, 50) for name, v in latency.items()}
    p99 = {name: common.percentile(v, 99) for name, v in latency.items()}
    rows = [
        [
            name,
            len(values),
            f"{p50[name]:.1f}",
            f"{common.percentile(values, 90):.1f}",
            f"{p99[name]:.1f}",
            f"{max(values):.1f}",
            f"{p50[name] / p50[base]:.2f}x / {p99[name] / p99[base]:.2f}x",
        ]
        for name, values in latency.items()
    ]
    ours = "aftercommit"
    setup = common.setup_name()
    if setup == "postgresql+redis":
        name, title, order = "latency", "2. Commit-to-task-start latency with a real worker", 2
        target = "aftercommit p50 at most 1.5x and p99 at most 2x `delay_on_commit`"
        met = p50[ours] <= 1.5 * p50[base] and p99[ours] <= 2 * p99[base]
        wake = "woken by PostgreSQL's NOTIFY at the commit"
    else:
        name, title = f"latency-{setup}", f"2. Commit-to-task-start latency ({setup})"
        order = 2.1 if setup.startswith("postgresql") else 2.2 if "maria" in setup else 2.3
        if setup.startswith("postgresql"):
            limit, wake = None, "woken by PostgreSQL's NOTIFY at the commit"
        else:
            # No notifications there: the relay probes the claim index every PROBE_INTERVAL.
            limit = 25.0 if setup.startswith("mariadb") else 100.0
            wake = "which probes the claim index every 20 ms (no notifications on this database)"
        if limit is None:
            target = "aftercommit p50 at most 1.5x and p99 at most 2x `delay_on_commit`"
            met = p50[ours] <= 1.5 * p50[base] and p99[ours] <= 2 * p99[base]
        else:
            target = f"aftercommit p50 under {limit:.0f} ms"
            met = p50[ours] < limit
    if args.pool != "prefork":  # the same setup with another pool: a section of its own
        name, title, order = f"{name}-{args.pool}", f"{title}, {args.pool} pool", order + 0.05
    png = common.out_dir() / f"{name}-cdf.png"
    plot(png, latency)
    markdown = (
        f"A real Celery worker ({args.pool} pool, concurrency 4) on "
        f"`{setup}`, with aftercommit's relay running inside "
        f"it (the default; no relay process), {wake}; one "
        f"admin-like save every {args.pace * 1000:.0f} ms, the ways interleaved. Latency is from "
        f"the commit (the first on-commit hook) in the caller to the task body starting in the "
        f"worker.\n\n"
        + common.table(
            ["way", "tasks", "p50 ms", "p90 ms", "p99 ms", "max ms", "p50 / p99 vs on_commit"],
            rows,
        )
        + f"\n\nTarget: {target} — p50 {p50[ours]:.1f} ms, "
        f"{p50[ours] / p50[base]:.2f}x and {p99[ours] / p99[base]:.2f}x `delay_on_commit`: "
        f"**{'met' if met else 'missed'}**.\n\n![latency CDF]({png.name})"
    )
    common.write_section(
        name=name,
        order=order,
        title=title,
        markdown=markdown,
        data={
            "latency_ms": latency,
            "pace": args.pace,
            "countdown": args.countdown,
            "pool": args.pool,
            "relay_log": relay_log,
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
