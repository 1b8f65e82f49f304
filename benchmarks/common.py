"""What every benchmark shares: the services it runs on, where results go, how a machine is named.

Each benchmark is a script that measures its alternatives in one run, prints a table with ratios
and writes ``<out>/<name>.json`` holding a markdown section (and, when it draws one, a PNG
beside it).
``report.py`` joins the sections into REPORT.md. ``--quick`` runs a small form (CI uses it) that
checks the code path, not the figures.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "benchmarks"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/aftercommit_bench"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/7"
#: The task queue the benchmarks use (the tests use "celery" on the same RabbitMQ).
QUEUE = "aftercommit-bench"


def out_dir() -> Path:
    """Where results go: BENCH_OUT, else benchmarks/results (committed with the report)."""
    path = Path(os.environ.get("BENCH_OUT") or HERE / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def use_services(database_url: str | None = None, broker_url: str | None = None) -> None:
    """Point the test project's settings at the benchmark database and broker."""
    os.environ.setdefault("DATABASE_URL", database_url or DEFAULT_DATABASE_URL)
    os.environ.setdefault("BROKER_URL", broker_url or DEFAULT_BROKER_URL)
    os.environ.setdefault("AFTERCOMMIT_TEST_STATE", "/tmp/aftercommit-bench")
    os.environ.setdefault("AFTERCOMMIT_TEST_APP_NAME", "aftercommit-bench")
    os.environ.setdefault("AFTERCOMMIT_TEST_QUEUE", QUEUE)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")


def purge_queue(app: Any) -> int:
    """Empty the benchmarks' task queue; how many messages it held. Declared first: on RabbitMQ a
    fresh broker has no such queue yet, and purging a missing queue is an error there."""
    with app.connection_for_write() as conn:
        queue = app.amqp.queues[QUEUE](conn.default_channel)
        queue.declare()
        return int(queue.purge() or 0)


def ensure_database(url: str, *names: str) -> None:
    """Create the PostgreSQL databases ``url`` names (and ``names``) if they do not exist."""
    import dj_database_url
    import psycopg

    if not url:
        return  # SQLite: the file is made by migrate
    db = dj_database_url.parse(url)
    if db["ENGINE"].endswith("mysql"):
        import pymysql

        conn = pymysql.connect(
            host=db["HOST"] or "127.0.0.1", port=int(db["PORT"] or 3306), user=db["USER"]
        )
        with conn.cursor() as cursor:
            for name in (db["NAME"], *names):
                cursor.execute(f"CREATE DATABASE IF NOT EXISTS `{name}`")
        conn.close()
        return
    if not db["ENGINE"].endswith("postgresql"):
        return
    with psycopg.connect(
        host=db["HOST"] or "127.0.0.1",
        port=db["PORT"] or 5432,
        user=db["USER"],
        dbname="postgres",
        autocommit=True,
    ) as conn:
        for name in (db["NAME"], *names):
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')


def setup_test_project() -> None:
    """Django on the test project, migrated, on the benchmark services."""
    use_services()
    url = os.environ["DATABASE_URL"]
    ensure_database(url, f"{url.rsplit('/', 1)[1]}_other" if url else "")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    call_command("migrate", database="other", verbosity=0)


def machine() -> dict[str, Any]:
    """The machine, the services and the versions a result was measured with."""
    import celery
    import django
    import kombu

    info: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "django": django.get_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
        with open("/proc/meminfo") as f:
            kb = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
            info["memory"] = f"{kb / 1024 / 1024:.0f} GiB"
        info["load"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except (OSError, StopIteration):
        pass
    for name, cmd in {
        "postgresql": ["psql", "-h", "127.0.0.1", "-U", "postgres", "-tAc", "SHOW server_version"],
        "redis": ["redis-cli", "INFO", "server"],
    }.items():
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        if name == "redis":
            out = next((x.split(":")[1] for x in out.splitlines() if "redis_version" in x), "")
        info[name] = out.strip()
    return info


def rss_kib(pid: int) -> int:
    """Resident memory of a process (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("VmRSS")))


def setup_name() -> str:
    """The database + broker in use, as tests/matrix.py names them (e.g. "mariadb+redis")."""
    database = os.environ.get("DATABASE_URL", "").split(":", 1)[0] or "sqlite"
    database = {"postgres": "postgresql", "mysql": "mariadb"}.get(database, database)
    broker = (os.environ.get("BROKER_URL") or "filesystem://").split(":", 1)[0]
    broker = {"amqp": "rabbitmq", "pyamqp": "rabbitmq"}.get(broker, broker)
    return f"{database}+{broker}"


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def figure(*args: Any, **kwargs: Any) -> Any:
    """``plt.subplots(...)``, drawn off-screen (no display here): (figure, axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """A markdown table (also readable as printed text)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(
    name: str, order: int, title: str, markdown: str, data: dict[str, Any], quick: bool
) -> Path:
    """Save one benchmark's section for the report, and print it."""
    path = out_dir() / f"{name}.json"
    payload = {
        "name": name,
        "order": order,
        "title": title,
        "markdown": markdown,
        "data": data,
        "quick": quick,
        "machine": machine(),
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\n## {title}\n\n{markdown}\n\n(written to {path})", flush=True)
    return path
