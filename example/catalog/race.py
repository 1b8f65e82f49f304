"""`manage.py race`: the seed's race, measured for each way of dispatching the task.

Each mode gets its own brand and products. One thread makes admin-like saves: change the discount,
dispatch, hold the transaction open, commit. A real worker runs the tasks and records what it read.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from django.conf import settings
from django.db import transaction
from django.db.models import F

from aftercommit import guard

from . import processes
from .models import Brand, Product, Propagation, RaceRun
from .tasks import race_aftercommit, race_plain

MODES = {
    "plain .delay()": lambda args, countdown: race_plain.delay(*args),
    "delay_on_commit": lambda args, countdown: race_plain.delay_on_commit(*args),
    "countdown": lambda args, countdown: race_plain.apply_async(args, countdown=countdown),
    "aftercommit": lambda args, countdown: race_aftercommit.delay(*args),
}


# Seconds past the countdown to wait for the last task: the relay's longest pause after a broker
# outage (BROKER_BACKOFF_MAX, 1 s here) and a propagation of a few thousand products fit many times.
SETTLE_MARGIN = 12.0


@dataclass
class Result:
    mode: str
    saves: int
    committed: dict[int, float] = field(default_factory=dict)  # version -> commit time
    caller_errors: int = 0
    stale: int = 0
    lost: int = 0
    consistent: bool = False
    latencies: list[float] = field(default_factory=list)

    def row(self) -> list[str]:
        def ms(percentile: int) -> str:
            if len(self.latencies) < 2:
                return f"{self.latencies[0] * 1000:.0f}" if self.latencies else "-"
            cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
            return f"{cuts[percentile - 1] * 1000:.0f}"

        return [
            self.mode,
            str(self.saves),
            str(len(self.committed)),
            str(self.caller_errors),
            str(self.stale),
            str(self.lost),
            "yes" if self.consistent else "no",
            ms(50),
            ms(99),
        ]


HEADER = [
    "mode",
    "saves",
    "committed",
    "caller errors",
    "stale reads",
    "lost tasks",
    "products consistent",
    "commit→start p50 ms",
    "p99 ms",
]


def table(results: list[Result]) -> str:
    rows = [HEADER, ["---"] * len(HEADER), *(r.row() for r in results)]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def make_brand(mode: str, products: int) -> Brand:
    brand = Brand.objects.create(name=f"race {mode} {time.time_ns()}", discount_percent=0)
    Product.objects.bulk_create(
        (
            Product(
                brand=brand,
                name=f"race product {n}",
                price_cents=1000 + n,
                brand_name=brand.name,
                discounted_cents=1000 + n,
                brand_version=brand.version,
            )
            for n in range(products)
        ),
        batch_size=1000,
    )
    return brand


def admin_save(
    brand: Brand, result: Result, dispatch: Callable[[int], object], hold: float
) -> None:
    """What the admin does: one transaction around save(), the dispatch and the rest."""
    stamp: dict[str, float] = {}
    try:
        with transaction.atomic():
            # Registered first, so it runs first at commit: the commit time, before any send.
            transaction.on_commit(lambda: stamp.setdefault("at", time.time()))
            brand.discount_percent = (brand.discount_percent + 7) % 90
            brand.save(propagate=False)
            dispatch(brand.version)
            time.sleep(hold)
    except Exception:
        # plain Celery raises inside the transaction (the edit is rolled back, a 500);
        # delay_on_commit raises after the commit (a 500 for an edit that was saved).
        result.caller_errors += 1
        brand.refresh_from_db()
        brand._loaded = {f: getattr(brand, f) for f in Brand.COPIED}
    if "at" in stamp:
        result.committed[brand.version] = stamp["at"]


def settle(brand: Brand, result: Result, timeout: float) -> None:
    """Wait for every committed version's task (or the timeout), then score the mode."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = set(RaceRun.objects.filter(brand=brand).values_list("expected_version", flat=True))
        running = Propagation.objects.filter(brand=brand, state=Propagation.State.RUNNING)
        if seen >= set(result.committed) and not running.exists():
            break
        time.sleep(0.1)
    runs = list(RaceRun.objects.filter(brand=brand))
    result.stale = sum(1 for r in runs if r.seen_version < r.expected_version)
    started: dict[int, float] = {}
    for r in runs:
        started[r.expected_version] = min(
            r.started_at, started.get(r.expected_version, r.started_at)
        )
    result.lost = len(set(result.committed) - set(started))
    result.latencies = sorted(started[v] - t for v, t in result.committed.items() if v in started)
    brand.refresh_from_db()
    wrong = Product.objects.filter(brand=brand).exclude(
        brand_version=brand.version,
        brand_name=brand.name,
        discounted_cents=F("price_cents") * (100 - brand.discount_percent) / 100,
    )
    result.consistent = not wrong.exists()


def run_mode(
    mode: str,
    saves: int,
    hold: float,
    pause: float,
    countdown: float,
    products: int,
    outage: Outage | None,
) -> Result:
    brand = make_brand(mode, products)
    result = Result(mode, saves)

    def dispatch(version: int) -> object:
        # The unsafe modes are the point of the experiment: keep the guard from reporting them.
        with guard.forced("off"):
            return MODES[mode]((mode, brand.pk, version), countdown)

    try:
        for n in range(saves):
            if outage and n == saves // 2:
                outage.down()
            admin_save(brand, result, dispatch, hold)
            time.sleep(pause)  # the next edit; back to back, SQLite's one writer starves the worker
    finally:
        if outage:
            outage.up()
    settle(brand, result, timeout=countdown + SETTLE_MARGIN)
    brand.delete()
    return result


# A broker the producers (this process, the worker's relay) can lose while the worker keeps it ----


class Outage:
    def __init__(self) -> None:
        self.proxy: Proxy | None = None
        self.producer_env: dict[str, str] = {}
        app = race_plain.app
        if settings.BROKER_URL.startswith("filesystem"):
            # Producers write through a link to the folder; removing it is the outage.
            self.folder = Path(settings.BROKER_DIR)
            self.link = self.folder.with_name("broker-producers")
            self.link.unlink(missing_ok=True)
            self.link.symlink_to(self.folder)
            self.producer_env["EXAMPLE_PRODUCER_BROKER_DIR"] = str(self.link)
            app.conf.broker_transport_options = {
                **app.conf.broker_transport_options,
                "data_folder_out": str(self.link),
            }
        else:
            parts = urlsplit(settings.BROKER_URL)
            port = parts.port or {"redis": 6379, "amqp": 5672, "pyamqp": 5672}[parts.scheme]
            self.proxy = Proxy((parts.hostname or "127.0.0.1", port))
            userinfo = parts.netloc.rpartition("@")[0]
            netloc = f"{userinfo}@" if userinfo else ""
            url = urlunsplit(parts._replace(netloc=f"{netloc}127.0.0.1:{self.proxy.port}"))
            self.producer_env["EXAMPLE_PRODUCER_BROKER_URL"] = url
            app.conf.broker_write_url = url

    def down(self) -> None:
        if self.proxy:
            self.proxy.down()
        else:
            self.link.unlink()

    def up(self) -> None:
        if self.proxy:
            self.proxy.up()
        elif not self.link.exists():
            self.link.symlink_to(self.folder)

    def close(self) -> None:
        if self.proxy:
            self.proxy.down()
        else:
            self.link.unlink(missing_ok=True)


class Proxy:
    """A TCP proxy to the broker: ``down()`` refuses and cuts connections, ``up()`` restores."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self._socks: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
            listener.close()
        with self._lock:
            socks, self._socks = self._socks, set()
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                if self._listener is not listener:
                    return
                continue
            upstream.settimeout(None)
            with self._lock:
                self._socks |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def race(
    *,
    saves: int,
    hold: float,
    pause: float,
    countdown: float,
    products: int,
    broker_outage: bool,
    start_processes: bool,
    modes: list[str],
    relay: bool = False,
    log: Callable[[str], None],
) -> list[Result]:
    outage = Outage() if broker_outage else None
    children: list[processes.Child] = []
    try:
        if start_processes:
            # The worker relays by itself; its relay publishes the way the producers do (through
            # the outage), its consumer reads the broker directly.
            producer_env = outage.producer_env if outage else {}
            log("starting a worker" + (" and a relay" if relay else ""))
            children.append(processes.start_worker("race-worker", env=producer_env))
            if relay:
                children.append(processes.start_relay("race-relay", **producer_env))
        results = []
        for mode in modes:
            log(f"{mode}: {saves} saves")
            results.append(run_mode(mode, saves, hold, pause, countdown, products, outage))
        return results
    finally:
        processes.stop_all(children)
        if outage:
            outage.close()
        shutil.rmtree(settings.STATE_DIR / "broker-producers", ignore_errors=True)
