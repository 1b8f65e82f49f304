"""Resident memory of the web process and the relay while they move a lot of messages.

    python benchmarks/memory.py [--saves 30000] [--quick]

- the web process: ``--saves`` admin-like saves with one aftercommit dispatch each, back to back;
  it only INSERTs outbox rows (the relay sends them, elsewhere), and reports its own RSS every 500
  saves;
- the relay: the RSS sampled every 0.1 s while one relay drained the backlog in drain.py (run that
  first; this reads its results).
"Flat" means the memory after warm-up does not grow with the number of messages: the table gives
the RSS after the first tenth of the run, at the end, and the peak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def child(saves: int) -> None:
    """The web process: saves with dispatches, printing "<saves> <rss KiB>" as it goes."""
    common.setup_test_project()
    from django.db import transaction
    from tests.celery_app import app
    from tests.testapp.models import Item
    from tests.testapp.tasks import read_item

    from aftercommit.models import OutboxMessage, Status

    item = Item.objects.create(name="memory")
    for i in range(saves + 1):
        with transaction.atomic():
            item.version += 1
            item.save(update_fields=["version"])
            read_item.delay("memory", item.pk, item.version)
        if i % 500 == 0:
            print(i, common.rss_kib(os.getpid()), flush=True)
    print(saves, common.rss_kib(os.getpid()), flush=True)
    # No relay ran: the rows are still pending. Nothing reached the broker, the purge is for a
    # run that was interrupted elsewhere.
    OutboxMessage.objects.filter(task_name=read_item.name, status=Status.PENDING).delete()
    common.purge_queue(app)


def flatness(series: list[tuple[float, int]]) -> dict[str, float]:
    values = [kib for _, kib in series]
    after_warmup = values[max(1, len(values) // 10)] if len(values) > 1 else values[0]
    return {
        "after_warmup_mib": after_warmup / 1024,
        "end_mib": values[-1] / 1024,
        "peak_mib": max(values) / 1024,
        "growth_mib": (values[-1] - after_warmup) / 1024,
    }


def plot(path: Path, web: list[tuple[float, int]], relay: list[tuple[float, int]]) -> None:
    fig, (left, right) = common.figure(1, 2, figsize=(10, 4))
    left.plot([x for x, _ in web], [kib / 1024 for _, kib in web])
    left.set_xlabel("saves with one dispatch")
    left.set_ylabel("RSS (MiB)")
    left.set_title("web process (only INSERTs)")
    right.plot([x for x, _ in relay], [kib / 1024 for _, kib in relay], color="tab:orange")
    right.set_xlabel("seconds draining")
    right.set_title("relay draining the backlog")
    peak = max(kib for _, kib in web + relay) / 1024
    for ax in (left, right):
        ax.set_ylim(0, peak * 1.3)
        ax.grid(True, alpha=0.3)
    common.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--saves", type=int, default=30_000)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a small run that checks the code")
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    if args.quick:
        args.saves = 1000
    common.use_services()
    drain = common.out_dir() / "drain-redis.json"
    if not drain.exists():
        raise SystemExit(f"{drain} is missing: run benchmarks/drain.py first")
    relay_run = json.loads(drain.read_text())["data"]["relays"][0]
    relay = [(float(t), int(kib)) for t, kib in relay_run["rss"]]

    env = dict(os.environ, PYTHONPATH=str(common.ROOT))
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(args.saves)],
        env=env,
        cwd=common.ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    web = [(float(a), int(b)) for a, b in (line.split() for line in out.splitlines())]

    png = common.out_dir() / "memory.png"
    plot(png, web, relay)
    webs, rel = flatness(web), flatness(relay)
    rows = [
        [
            f"web process, {args.saves:,} dispatches",
            f"{webs['after_warmup_mib']:.1f}",
            f"{webs['end_mib']:.1f}",
            f"{webs['peak_mib']:.1f}",
            f"{webs['growth_mib']:+.1f}",
        ],
        [
            f"relay, {json.loads(drain.read_text())['data']['messages']:,} messages",
            f"{rel['after_warmup_mib']:.1f}",
            f"{rel['end_mib']:.1f}",
            f"{rel['peak_mib']:.1f}",
            f"{rel['growth_mib']:+.1f}",
        ],
    ]
    markdown = (
        "Resident memory (RSS) while messages flow: the web process only records them (no thread, "
        "no broker connection), the relay sends them; the relay's is sampled during the drain of "
        "section 3.\n\n"
        + common.table(["process", "after warm-up MiB", "end MiB", "peak MiB", "growth MiB"], rows)
        + f"\n\n![memory]({png.name})"
    )
    common.write_section(
        name="memory",
        order=6,
        title="6. Memory while sending",
        markdown=markdown,
        data={"web": web, "relay": relay, "web_flat": webs, "relay_flat": rel},
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
