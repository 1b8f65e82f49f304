"""python manage.py demo: the whole system in one command (what `make demo` runs)."""

from __future__ import annotations

import secrets
import signal
import sys
import time
from types import FrameType
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser

from catalog import processes
from catalog.models import Product
from catalog.seed import seed


class Command(BaseCommand):
    help = (
        "Create the database, a superuser and sample data, then run the web server and a Celery "
        "worker (which relays the outbox by itself)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--products", type=int, default=100_000)
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--password", help="The superuser's password (default: random).")
        parser.add_argument(
            "--relay",
            action="store_true",
            help="Also run `manage.py aftercommit relay` apart (the worker relays without it).",
        )

    def handle(
        self,
        *args: Any,
        products: int,
        port: int,
        password: str | None,
        relay: bool,
        **kw: Any,
    ) -> None:
        db = settings.DATABASES["default"]
        self.stdout.write(f"database: {db['ENGINE'].rsplit('.', 1)[-1]} {db['NAME']}")
        self.stdout.write(f"broker:   {settings.BROKER_URL}")
        call_command("migrate", verbosity=0)
        password = password or secrets.token_urlsafe(9)
        admin = get_user_model().objects.filter(username="admin").first()
        if admin is None:
            get_user_model().objects.create_superuser("admin", "admin@example.com", password)
        else:
            admin.set_password(password)
            admin.save()
        self.stdout.write(f"superuser: admin / {password}")
        if not Product.objects.exists():
            self.stdout.write(f"seeding {products:,} products")
            started = time.monotonic()
            seed(products, sys.stdout)  # its bar redraws one line
            self.stdout.write(f"  in {time.monotonic() - started:.1f} s")

        # SIGTERM (e.g. from a test or `kill`) stops everything the way Ctrl-C does.
        def interrupt(signum: int, frame: FrameType | None) -> None:
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
        children: list[processes.Child] = []
        try:
            children.append(processes.start_worker())
            if relay:
                children.append(processes.start_relay())
            children.append(processes.start_web(port))
            self.stdout.write(f"logs in {settings.STATE_DIR / 'logs'}")
            self.stdout.write(
                self.style.SUCCESS(f"admin: http://127.0.0.1:{port}/admin/catalog/brand/")
            )
            self.stdout.write(f"Ctrl-C stops {', '.join(child.name for child in children)}.")
            self.stdout.flush()
            while all(child.alive() for child in children):
                time.sleep(0.5)
            dead = next(child for child in children if not child.alive())
            self.stderr.write(f"{dead.name} exited; its log:\n{dead.output()[-3000:]}")
        except KeyboardInterrupt:
            self.stdout.write("\nstopping")
        finally:
            processes.stop_all(children)
