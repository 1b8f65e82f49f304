"""A web process for the fault suite: dispatches in transactions, and with --die, is SIGKILLed
right after each commit (a hook registered before the dispatch runs first after the commit): what
it committed is in the outbox, and the relay sends it."""

from __future__ import annotations

import argparse
import os
import signal
import sys

import django


def emit(task_id: str) -> None:
    # One write() a line: after a fork, two processes write to the same log file.
    os.write(1, f"{task_id}\n".encode())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--token", required=True)
    parser.add_argument("--count", type=int, default=1, help="transactions")
    parser.add_argument("--per-transaction", type=int, default=1)
    parser.add_argument("--die", action="store_true", help="SIGKILL after the first commit")
    parser.add_argument(
        "--fork", action="store_true", help="fork after the first dispatch; both sides dispatch"
    )
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    django.setup()
    from django.db import connections, transaction

    from tests.testapp.tasks import read_item

    if args.fork:
        # Like a gunicorn worker forked from a master that already dispatched: both sides
        # record through their own connection.
        emit(read_item.delay(args.token, None, 0).id)
        # As gunicorn and Celery's prefork pool do: a database connection must not be shared
        # across fork.
        connections.close_all()
        child = os.fork()
        side = 1 if child == 0 else 2
        with transaction.atomic():
            emit(read_item.delay(args.token, None, side).id)
        if child == 0:
            sys.exit(0)
        _, status = os.waitpid(child, 0)
        sys.exit(os.waitstatus_to_exitcode(status))

    for n in range(args.count):
        with transaction.atomic():
            if args.die:
                transaction.on_commit(lambda: os.kill(os.getpid(), signal.SIGKILL))
            for i in range(args.per_transaction):
                result = read_item.delay(args.token, None, n * args.per_transaction + i)
                emit(result.id)


if __name__ == "__main__":
    main()
