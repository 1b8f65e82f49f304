"""python manage.py race: the seed's race measured for plain Celery, its fixes, and aftercommit."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from catalog.race import MODES, race, table


class Command(BaseCommand):
    help = (
        "Admin-like saves that hold the transaction open after dispatching, for each way of "
        "dispatching; prints stale reads, lost tasks, consistency and commit-to-start latency."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--saves", type=int, default=50, help="saves per mode (default 50)")
        parser.add_argument(
            "--hold", type=float, default=30, help="ms the transaction stays open after dispatch"
        )
        parser.add_argument(
            "--pause", type=float, default=100, help="ms between one save and the next"
        )
        parser.add_argument(
            "--countdown",
            type=float,
            default=2,
            help="seconds for the countdown mode (the seed used 60; 2 keeps the run short)",
        )
        parser.add_argument("--products", type=int, default=2000, help="products per brand")
        parser.add_argument(
            "--broker-outage",
            action="store_true",
            help="producers lose the broker from the middle save to the last one",
        )
        parser.add_argument(
            "--no-processes",
            dest="start_processes",
            action="store_false",
            help="use a worker already running (e.g. the demo's)",
        )
        parser.add_argument(
            "--relay",
            action="store_true",
            help="also start `manage.py aftercommit relay` apart (the worker relays without it)",
        )
        parser.add_argument("--mode", action="append", choices=list(MODES), dest="modes")

    def handle(self, *args: Any, hold: float, modes: list[str] | None, **options: Any) -> None:
        call_command("migrate", verbosity=0)  # so it runs alone on a fresh machine
        db = settings.DATABASES["default"]["ENGINE"].rsplit(".", 1)[-1]
        broker = settings.BROKER_URL.split(":", 1)[0]
        results = race(
            saves=options["saves"],
            hold=hold / 1000,
            pause=options["pause"] / 1000,
            countdown=options["countdown"],
            products=options["products"],
            broker_outage=options["broker_outage"],
            start_processes=options["start_processes"],
            relay=options["relay"],
            modes=modes or list(MODES),
            log=self.stderr.write,
        )
        outage = ", broker outage for the second half" if options["broker_outage"] else ""
        self.stdout.write(
            f"\n{options['saves']} saves a mode holding the transaction {hold:.0f} ms, "
            f"{options['products']:,} products a brand, {db} + {broker}{outage}:\n"
        )
        self.stdout.write(table(results))
