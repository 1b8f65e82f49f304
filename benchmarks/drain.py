"""Draining a backlog (the broker was down): the relay vs a Celery apply_async loop vs the ceiling.

    python benchmarks/drain.py [--messages 100000] [--quick]

One run, one broker (BROKER_URL, default Redis db 7), no worker (the queue is purged between
ways), and the same task and arguments three ways:

- a Celery ``apply_async`` loop with one held producer: what a script re-sending a backlog does;
- the broker's own pipelined push of the very message Celery built (Redis LPUSH in pipelines of
  1,000): the ceiling, no Python message building at all;
- ``manage.py aftercommit relay --once`` (``Relay(app).run(once=True)``, the loop a worker's relay
  runs) over an outbox of ``--messages`` due rows, one process and then two at once (they share the
  rows through SKIP LOCKED). It builds each batch's messages in bulk and publishes the batch at
  once (a Redis pipeline; on RabbitMQ with publisher confirms). Its rate is read from the rows'
  ``sent_at`` (first to last), so process start-up is not counted; its resident memory is sampled
  every 0.1 s while it drains (section 6 plots it).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def queue_length(app: Any) -> int:
    with app.connection_for_write() as conn:
        queue = app.amqp.queues[app.conf.task_default_queue](conn.default_channel)
        return int(queue.queue_declare(passive=True).message_count)


def purge(app: Any) -> None:
    common.purge_queue(app)


def apply_async_loop(app: Any, count: int, *, confirmed: bool = False) -> float:
    """Seconds for ``count`` plain Celery apply_async calls through one held producer; with
    ``confirmed``, on a connection with AMQP publisher confirms (each publish waits for its ack)."""
    from tests.testapp.tasks import plain_read_item

    purge(app)
    options = {"confirm_publish": True} if confirmed else {}
    with app.connection_for_write(transport_options=options) as conn:
        producer = app.amqp.Producer(conn, auto_declare=False)
        plain_read_item.apply_async(("warm-up", 0, 0), producer=producer)
        started = time.perf_counter()
        for i in range(count):
            plain_read_item.apply_async(("drain", i, 1), producer=producer)
        elapsed = time.perf_counter() - started
    assert queue_length(app) == count + 1, "the apply_async loop lost messages"
    return elapsed


def pipelined_push(app: Any, count: int) -> float | None:
    """Seconds for the broker to take ``count`` copies of a Celery-built message, pipelined.

    Redis only: AMQP has no pipelined publish to compare with. Expects the queue to hold messages.
    """
    with app.connection_for_write() as conn:
        if conn.transport.driver_type != "redis":
            return None
        client = conn.default_channel.client
        body = client.lindex(common.QUEUE, 0)
        client.delete(common.QUEUE)
        started = time.perf_counter()
        pipe = client.pipeline(transaction=False)
        for i in range(count):
            pipe.lpush(common.QUEUE, body)
            if i % 1000 == 999:
                pipe.execute()
        pipe.execute()
        elapsed = time.perf_counter() - started
        assert client.llen(common.QUEUE) == count
        client.delete(common.QUEUE)
    return elapsed


def fill_outbox(count: int) -> None:
    """``count`` due rows, each a real dispatch's row with its own task id and arguments."""
    from django.db import connection, transaction
    from tests.testapp.tasks import read_item

    from aftercommit.models import OutboxMessage

    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {OutboxMessage._meta.db_table}")
    with transaction.atomic():
        read_item.delay("drain", 0, 1)  # the template: what a real call stores
    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO aftercommit_outboxmessage (task_id, task_name, payload, content_type,
                content_encoding, options, trace, status, created_at, due_at, attempts, last_error)
            SELECT gen_random_uuid()::text, t.task_name,
                   '[["drain", ' || g || ', 1], {}]', t.content_type, t.content_encoding,
                   t.options, t.trace, 0, now() - interval '1 minute', now() - interval '1 minute',
                   0, ''
            FROM aftercommit_outboxmessage t, generate_series(1, %s) g
            """,
            [count - 1],
        )
        cursor.execute("UPDATE aftercommit_outboxmessage SET due_at = now() - interval '1 minute'")
        cursor.execute("ANALYZE aftercommit_outboxmessage")


def run_relays(processes: int, count: int, batch_size: int) -> dict[str, Any]:
    """Start ``processes`` relays on the filled outbox; rate from sent_at, RSS sampled."""
    from django.db.models import Max, Min

    from aftercommit.models import OutboxMessage

    env = dict(os.environ, PYTHONPATH=str(common.ROOT))
    argv = [
        sys.executable, "-m", "django", "aftercommit", "relay", "--once",
        "--batch-size", str(batch_size),
    ]  # fmt: skip
    procs = [subprocess.Popen(argv, env=env, cwd=common.ROOT) for _ in range(processes)]
    samples: list[tuple[float, int]] = []  # (seconds since start, KiB) of the first relay
    started = time.monotonic()

    def sample() -> None:
        while procs[0].poll() is None:
            try:
                samples.append((time.monotonic() - started, common.rss_kib(procs[0].pid)))
            except (OSError, StopIteration):
                break
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for proc in procs:
        if proc.wait(timeout=900) != 0:
            raise SystemExit(f"a relay exited with {proc.returncode}")
    sampler.join()
    rows = OutboxMessage.objects.aggregate(first=Min("sent_at"), last=Max("sent_at"))
    left = OutboxMessage.objects.filter(status=0).count()
    if left:
        raise SystemExit(f"{left} message(s) left unsent after the relay stopped")
    span = (rows["last"] - rows["first"]).total_seconds()
    # The first batch's rows are stamped when it is done: count from there.
    rate = (count - batch_size * processes) / span
    return {"processes": processes, "rate": rate, "span": span, "rss": samples}


# Where a relay's time goes: (label, file suffix, function name) of profiled functions. "build:"
# parts are inside "build the batch's messages", "publish:" parts inside "publish the batch".
PROFILE_PARTS = [
    ("claim: one UPDATE ... = ANY(ARRAY(SELECT ... SKIP LOCKED)) RETURNING, waited for",
     "aftercommit/models.py", "claim"),
    ("claim the next batch ahead: sent before the publish (PostgreSQL)", "aftercommit/models.py",
     "claim_ahead"),
    ("claim the next batch ahead: its rows read after the publish", "aftercommit/relay.py",
     "_take_claimed_ahead"),
    ("mark sent: one UPDATE a batch", "aftercommit/models.py", "mark_sent"),
    ("build the batch's messages (`Builder.build`, per message)", "aftercommit/messages.py",
     "build"),
    ("build: read the row back", "aftercommit/dispatch.py", "decode_arguments"),
    ("build: Celery routes it", "celery/app/routes.py", "route"),
    ("build: Celery builds the message (`as_task_v2`)", "celery/app/amqp.py", "as_task_v2"),
    ("publish the batch (`Sender.send`)", "aftercommit/brokers.py", "send"),
    ("publish: Celery `send_task_message`, per message (publish signals included)",
     "celery/app/amqp.py", "send_task_message"),
    ("publish: kombu `Producer.publish` into the batch", "kombu/messaging.py", "publish"),
    ("publish: the batch's one pipelined write (Redis)", "kombu/transport/redis.py", "flush"),
    ("publish: waiting for the broker's confirms (RabbitMQ)", "aftercommit/brokers.py", "_await"),
    ("Celery settings lookups (via Django's settings), anywhere", "celery/utils/collections.py",
     "__getitem__"),
]  # fmt: skip


def profile_relay(count: int, batch_size: int) -> list[tuple[str, float]]:
    """One relay over ``count`` due rows under cProfile: each part's share of its loop."""
    import pstats

    fill_outbox(count)
    path = common.out_dir() / "drain-relay.prof"
    env = dict(os.environ, PYTHONPATH=str(common.ROOT))
    argv = [
        sys.executable, "-m", "cProfile", "-o", str(path), "-m", "django", "aftercommit",
        "relay", "--once", "--batch-size", str(batch_size),
    ]  # fmt: skip
    subprocess.run(argv, env=env, cwd=common.ROOT, check=True)
    stats = pstats.Stats(str(path)).stats  # type: ignore[attr-defined]
    path.unlink()

    def cumulative(suffix: str, name: str) -> float | None:
        found = [v[3] for (f, _, n), v in stats.items() if f.endswith(suffix) and n == name]
        return max(found, default=None)

    total = cumulative("aftercommit/relay.py", "run")
    if not total:
        raise SystemExit("the profile holds no relay loop (aftercommit/relay.py: run)")
    shares = [(label, cumulative(suffix, name)) for label, suffix, name in PROFILE_PARTS]
    # A part never called on this broker (the Redis pipeline on RabbitMQ, confirms on Redis) is
    # left out rather than shown as 0%.
    return [(label, part / total) for label, part in shares if part is not None]


def plot(path: Path, rows: list[tuple[str, float]], title: str) -> None:
    """Messages per second, one bar a way (log scale: the ceiling is far above the rest)."""
    fig, ax = common.figure(figsize=(8, 0.6 * len(rows) + 1.2))
    labels = [label for label, _ in rows]
    rates = [rate for _, rate in rows]
    colors = [
        "tab:gray" if "apply_async" in label else "tab:blue" if "ceiling" in label else "tab:orange"
        for label in labels
    ]
    bars = ax.barh(labels, rates, color=colors)
    ax.bar_label(bars, labels=[f"{r:,.0f}/s" for r in rates], padding=3)
    ax.set_xscale("log")
    ax.set_xlim(100, max(rates) * 4)
    ax.invert_yaxis()
    ax.set_xlabel("messages per second (log scale)")
    ax.set_title(title)
    common.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument(
        "--baseline-messages",
        type=int,
        default=30_000,
        help="apply_async calls timed (its rate does not depend on the backlog's size)",
    )
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--quick", action="store_true", help="a small run that checks the code")
    args = parser.parse_args()
    if args.quick:
        args.messages, args.baseline_messages = 3000, 1000
    common.setup_test_project()
    from tests.celery_app import app

    broker = os.environ["BROKER_URL"]
    print(f"draining a backlog on {broker}, {os.environ['DATABASE_URL']}", flush=True)
    loop = apply_async_loop(app, args.baseline_messages)
    loop_rate = args.baseline_messages / loop
    print(f"apply_async loop: {loop_rate:,.0f}/s", flush=True)
    confirmed_rate = None
    if broker.startswith("amqp"):  # what a loop that knows its messages arrived costs
        confirmed_rate = args.baseline_messages / apply_async_loop(
            app, args.baseline_messages, confirmed=True
        )
        print(f"apply_async loop with confirms: {confirmed_rate:,.0f}/s", flush=True)
    push = pipelined_push(app, args.messages)
    push_rate = args.messages / push if push else None
    purge(app)
    relays = []
    for processes in (1, 2):
        fill_outbox(args.messages)
        result = run_relays(processes, args.messages, args.batch_size)
        assert queue_length(app) == args.messages, "the relay lost or duplicated messages"
        purge(app)
        relays.append(result)
        print(f"relay x{processes}: {result['rate']:,.0f}/s", flush=True)

    rows = [
        ["Celery `apply_async` loop, one held producer", f"{loop_rate:,.0f}", "1.00x", ""],
    ]
    if confirmed_rate:
        rows.append(
            [
                "the same loop with publisher confirms (each publish awaits its ack)",
                f"{confirmed_rate:,.0f}",
                f"{confirmed_rate / loop_rate:.2f}x",
                "",
            ]
        )
    for result in relays:
        ways = "1 process" if result["processes"] == 1 else f"{result['processes']} processes"
        rows.append(
            [
                f"aftercommit relay, {ways}",
                f"{result['rate']:,.0f}",
                f"{result['rate'] / loop_rate:.2f}x",
                f"{result['rate'] / push_rate:.1%} of the ceiling" if push_rate else "",
            ]
        )
    if push_rate:
        rows.append(
            [
                "Redis pipelined LPUSH of the same message (ceiling)",
                f"{push_rate:,.0f}",
                f"{push_rate / loop_rate:.2f}x",
                "",
            ]
        )
    profile = profile_relay(min(args.messages, 10_000), args.batch_size)
    purge(app)
    kind = broker.split("://")[0]
    png = common.out_dir() / f"drain-{kind}.png"
    bars = [("Celery apply_async loop", loop_rate)]
    bars += [(f"aftercommit relay x{r['processes']}", r["rate"]) for r in relays]
    if confirmed_rate:
        bars.insert(1, ("apply_async loop, confirms", confirmed_rate))
    if push_rate:
        bars.append(("Redis pipelined LPUSH (ceiling)", push_rate))
    plot(png, bars, f"Draining a backlog into {kind}")
    one = relays[0]["rate"] / loop_rate
    two = relays[1]["rate"] / loop_rate
    one_confirmed = relays[0]["rate"] / confirmed_rate if confirmed_rate else None
    if one_confirmed is not None:
        # RabbitMQ: the relay waits for the broker's confirms, so it is held against the loop
        # that does too.
        goal = (
            f"The relay publishes with confirms (a message is marked sent only once the broker "
            f"has it). Target on RabbitMQ: one relay process at least 3x the loop that confirms "
            f"each publish: {one_confirmed:.2f}x: **{'met' if one_confirmed >= 3 else 'missed'}** "
            f"({one:.2f}x the loop without confirms). Two relays share the backlog through "
            f"`SKIP LOCKED`: {relays[1]['rate'] / confirmed_rate:.2f}x the confirmed loop."
        )
    else:
        goal = (
            f"Target: one relay process at least 5x the `apply_async` loop: {one:.2f}x: "
            f"**{'met' if one >= 5 else 'missed'}**. Two relays share the backlog through "
            f"`SKIP LOCKED`: {two:.2f}x."
        )
    if push_rate:
        goal += (
            f"\n\nDistance to the broker's pipelined-push ceiling: one relay process sends "
            f"{relays[0]['rate'] / push_rate:.1%} of it ({push_rate / relays[0]['rate']:.1f}x "
            f"below)."
        )
    print(
        f"relay x1 vs apply_async loop: {one:.2f}x"
        + (f", vs the confirmed loop: {one_confirmed:.2f}x" if one_confirmed else "")
        + (f", {relays[0]['rate'] / push_rate:.1%} of the pipelined ceiling" if push_rate else ""),
        flush=True,
    )
    markdown = (
        f"{args.messages:,} due messages in the outbox (the broker was down), drained into "
        f"`{broker.split('://')[0]}` with no worker running; the `apply_async` loop timed over "
        f"{args.baseline_messages:,} calls. Relay batch size {args.batch_size}.\n\n"
        + common.table(["way", "messages/s", "vs apply_async loop", "vs ceiling"], rows)
        + "\n\n"
        + goal
        + "\n\nWhere one relay's time goes (cProfile, "
        f"{min(args.messages, 10_000):,} messages; shares of the relay loop):\n\n"
        + common.table(["part", "share"], [[label, f"{share:.0%}"] for label, share in profile])
        + f"\n\n![drain throughput]({png.name})"
    )
    common.write_section(
        name=f"drain-{broker.split('://')[0]}",
        order=3,
        title=f"3. Draining a {args.messages:,}-message backlog ({broker.split('://')[0]})",
        markdown=markdown,
        data={
            "broker": broker,
            "messages": args.messages,
            "apply_async_rate": loop_rate,
            "apply_async_confirmed_rate": confirmed_rate,
            "pipelined_push_rate": push_rate,
            "relays": relays,
            "relay_vs_loop": one,
            "relay_vs_confirmed_loop": one_confirmed,
            "profile": profile,
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
