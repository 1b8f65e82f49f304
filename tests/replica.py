"""A streaming replica of the local PostgreSQL cluster, for the replica-safe reads tests.

    python tests/replica.py start [--delay 300ms]   # idempotent; a second call only checks it
    python tests/replica.py status                  # exit 0 when a streaming replica answers
    python tests/replica.py stop

The replica is a second cluster made with ``pg_basebackup -R -X stream`` from 127.0.0.1:5432, on
port 5433, with ``recovery_min_apply_delay`` so the lag a real replica has is there to see. It is
a physical replica: the test databases pytest-django creates on the primary appear on it too.
PostgreSQL refuses to run as root, so its commands run as the ``postgres`` user (``runuser``).
``start`` prints the URL the tests read from ``AFTERCOMMIT_TEST_REPLICA_URL``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psycopg

PRIMARY = os.environ.get("AFTERCOMMIT_REPLICA_PRIMARY", "host=127.0.0.1 port=5432 user=postgres")
PORT = int(os.environ.get("AFTERCOMMIT_REPLICA_PORT", "5433"))
HOME = Path(os.environ.get("AFTERCOMMIT_REPLICA_DIR", "/var/tmp/aftercommit-replica"))
DATA = HOME / "data"
LOG = HOME / "replica.log"
DEFAULT_DELAY = os.environ.get("AFTERCOMMIT_REPLICA_DELAY", "300ms")
# A standby must allow at least what its primary does, or it refuses to start.
COPIED = (
    "max_connections",
    "max_worker_processes",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
)
HBA_LINE = "host replication all 127.0.0.1/32 trust"


def url() -> str:
    return f"postgres://postgres@127.0.0.1:{PORT}/postgres"


def bin_dir() -> Path:
    found = glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")
    found.sort(key=lambda path: int(path.split("/")[4]))
    if not found:
        sys.exit("no PostgreSQL server binaries under /usr/lib/postgresql/<version>/bin")
    return Path(found[-1]).parent


def as_postgres(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(
        [*prefix, *argv], check=check, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def replica_state() -> dict[str, object] | None:
    """What the replica says about itself, or None when nothing answers on its port."""
    try:
        with psycopg.connect(
            f"host=127.0.0.1 port={PORT} user=postgres dbname=postgres", connect_timeout=2
        ) as conn:
            row = conn.execute(
                "SELECT pg_is_in_recovery(), current_setting('recovery_min_apply_delay'), "
                "pg_last_wal_replay_lsn()::text, "
                "(SELECT status FROM pg_stat_wal_receiver)"
            ).fetchone()
    except psycopg.OperationalError:
        return None
    assert row is not None
    return {"in_recovery": row[0], "delay": row[1], "replayed": row[2], "receiver": row[3]}


def primary_settings() -> dict[str, str]:
    with psycopg.connect(PRIMARY + " dbname=postgres", connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
            (["hba_file", "wal_level", "max_wal_senders", *COPIED],),
        ).fetchall()
    return dict(rows)


def allow_replication(hba_file: str) -> None:
    """The primary must let a local replication connection in (trust, as for the tests' user)."""
    lines = Path(hba_file).read_text().splitlines()
    if any(line.split()[:2] == ["host", "replication"] for line in lines if line.strip()):
        return
    with open(hba_file, "a") as hba:
        hba.write(f"\n# aftercommit's test replica (tests/replica.py)\n{HBA_LINE}\n")
    with psycopg.connect(PRIMARY + " dbname=postgres", autocommit=True) as conn:
        conn.execute("SELECT pg_reload_conf()")
    print(f"added to {hba_file}: {HBA_LINE} (and reloaded the primary's configuration)")


def write_config(delay: str, primary: dict[str, str]) -> None:
    copied = "".join(f"{name} = {primary[name]}\n" for name in COPIED)
    (DATA / "postgresql.conf").write_text(
        f"# Written by tests/replica.py\n"
        f"port = {PORT}\n"
        f"listen_addresses = '127.0.0.1'\n"
        f"unix_socket_directories = '{HOME}'\n"
        f"hba_file = '{DATA}/pg_hba.conf'\n"
        f"hot_standby = on\n"
        # Without it the primary's cleanup cancels standby reads that still need the removed
        # rows, even a connection's first catalog read ("canceling statement due to conflict with
        # recovery"): seen when make test runs two PostgreSQL setups at once on one primary.
        f"hot_standby_feedback = on\n"
        f"recovery_min_apply_delay = '{delay}'\n"
        # Test teardown truncates tables; a read on the standby must not hold replay up for long.
        f"max_standby_streaming_delay = 5s\n"
        f"shared_buffers = 32MB\n"
        f"fsync = off\n"
        f"{copied}"
    )
    (DATA / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    shutil.chown(DATA / "postgresql.conf", "postgres", "postgres")
    shutil.chown(DATA / "pg_hba.conf", "postgres", "postgres")


def wait_streaming(timeout: float) -> dict[str, object] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = replica_state()
        if state and state["in_recovery"] and state["receiver"] == "streaming":
            return state
        time.sleep(0.2)
    return None


def stop() -> None:
    if (DATA / "postmaster.pid").exists():
        as_postgres(str(bin_dir() / "pg_ctl"), "-D", str(DATA), "stop", "-m", "fast", check=False)


def build(delay: str) -> None:
    primary = primary_settings()
    if primary["wal_level"] == "minimal" or int(primary["max_wal_senders"]) < 1:
        sys.exit(
            "the primary cannot feed a replica: it needs wal_level=replica and max_wal_senders>0, "
            "which take a restart of the primary; set them and restart it, then run this again"
        )
    allow_replication(primary["hba_file"])
    stop()
    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir(parents=True)
    shutil.chown(HOME, "postgres", "postgres")
    started = time.monotonic()
    made = as_postgres(
        str(bin_dir() / "pg_basebackup"), "-h", "127.0.0.1", "-p", "5432", "-U", "postgres",
        "-D", str(DATA), "-R", "-X", "stream", "-c", "fast", check=False,
    )  # fmt: skip
    if made.returncode:
        sys.exit(f"pg_basebackup failed:\n{made.stdout}")
    write_config(delay, primary)
    print(f"base backup in {time.monotonic() - started:.1f}s into {DATA}")


def start(delay: str) -> int:
    state = replica_state()
    if state and state["in_recovery"]:
        # The configuration is written again each time (a replica made by an older version of
        # this script lacks a setting); what it holds takes a reload.
        write_config(delay, primary_settings())
        as_postgres(str(bin_dir() / "pg_ctl"), "-D", str(DATA), "reload")
        if state["delay"] != _normalised(delay):
            print(f"recovery_min_apply_delay {state['delay']} -> {delay}")
        print(f"replica running on port {PORT}\nAFTERCOMMIT_TEST_REPLICA_URL={url()}")
        return 0
    if state:
        sys.exit(f"port {PORT} answers but is not a replica (pg_is_in_recovery() is false)")
    # A replica that was stopped may no longer catch up (the primary keeps no WAL for it: no
    # replication slot, so a stopped replica never fills the shared primary's disk). Try it, and
    # make a fresh one when it does not stream.
    if (DATA / "standby.signal").exists():
        stop()
        write_config(delay, primary_settings())
        if _pg_ctl_start() and wait_streaming(15):
            print(f"replica restarted on port {PORT}\nAFTERCOMMIT_TEST_REPLICA_URL={url()}")
            return 0
        print("the old replica does not stream; making a new one")
    build(delay)
    if not _pg_ctl_start() or not wait_streaming(30):
        sys.exit(f"the replica did not start streaming; see {LOG}")
    print(f"replica running on port {PORT}\nAFTERCOMMIT_TEST_REPLICA_URL={url()}")
    return 0


def _pg_ctl_start() -> bool:
    done = as_postgres(
        str(bin_dir() / "pg_ctl"), "-D", str(DATA), "-l", str(LOG), "-w", "-t", "60", "start",
        check=False,
    )  # fmt: skip
    if done.returncode:
        print(done.stdout)
    return done.returncode == 0


def _normalised(delay: str) -> str:
    """How PostgreSQL shows a delay: '300ms', '1s', '0'."""
    text = delay.strip().replace(" ", "")
    if text.endswith("ms") and text[:-2].isdigit():
        ms = int(text[:-2])
        return "0" if ms == 0 else f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"
    return text


def status() -> int:
    state = replica_state()
    if not state or not state["in_recovery"]:
        print(f"no replica on port {PORT}")
        return 1
    print(
        f"replica on port {PORT}: receiver {state['receiver']}, replayed {state['replayed']}, "
        f"recovery_min_apply_delay {state['delay']}\nAFTERCOMMIT_TEST_REPLICA_URL={url()}"
    )
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument(
        "--delay", default=DEFAULT_DELAY, help="recovery_min_apply_delay (default %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.command == "start":
        return start(args.delay)
    if args.command == "stop":
        stop()
        print("replica stopped")
        return 0
    return status()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
