"""python manage.py aftercommit relay | status [--json] | purge"""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from aftercommit import operations


class Command(BaseCommand):
    help = "Run the aftercommit relay, show the outbox status, or purge sent messages."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        relay = sub.add_parser("relay", help="Send due messages until SIGTERM.")
        relay.add_argument(
            "--database",
            action="append",
            dest="databases",
            help="Alias to relay (repeatable; default: every outbox alias).",
        )
        relay.add_argument("--batch-size", type=int)
        relay.add_argument("--once", action="store_true", help="Stop when nothing is due.")
        status = sub.add_parser("status", help="Backlog, oldest pending age, retrying, dead.")
        status.add_argument("--json", action="store_true", dest="as_json")
        status.add_argument("--database", action="append", dest="databases")
        purge = sub.add_parser("purge", help="Delete sent messages past the retention window.")
        purge.add_argument("--older-than", type=float, metavar="SECONDS")
        purge.add_argument("--database", action="append", dest="databases")
        replay = sub.add_parser("replay", help="Give dead letters a fresh set of attempts.")
        replay.add_argument("--database", action="append", dest="databases")

    def handle(
        self, *args: Any, action: str, databases: list[str] | None = None, **options: Any
    ) -> None:
        try:
            if action == "relay":
                operations.run_relay(
                    databases, batch_size=options["batch_size"], once=options["once"]
                )
            elif action == "status":
                report = operations.status(databases)
                if options["as_json"]:
                    self.stdout.write(json.dumps(report, indent=2, sort_keys=True))
                else:
                    self.stdout.write(operations.format_status(report))
                if not operations.healthy(report):
                    raise SystemExit(1)  # for cron and probes: the output says why
            elif action == "purge":
                for alias, deleted in operations.purge(databases, options["older_than"]).items():
                    self.stdout.write(f"{alias}: deleted {deleted} sent message(s)")
                for alias, deleted in operations.purge_once_records(
                    databases, options["older_than"]
                ).items():
                    self.stdout.write(f"{alias}: deleted {deleted} once record(s)")
            elif action == "replay":
                for alias, count in operations.replay_dead(databases).items():
                    self.stdout.write(f"{alias}: {count} dead letter(s) due again")
        except operations.UnknownDatabase as exc:
            raise CommandError(str(exc)) from exc
