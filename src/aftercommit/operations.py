"""What ``manage.py aftercommit`` does, as functions: the command only parses arguments."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery import current_app as celery_current_app
from django.db import connections
from kombu.utils.imports import symbol_by_name

from . import once
from .conf import settings
from .models import OutboxMessage
from .relay import Relay, outbox_aliases
from .relay import purge as purge_alias
from .relay import status as alias_status


class UnknownDatabase(ValueError):
    pass


def celery_app() -> Celery:
    path = settings.CELERY_APP
    if path:
        app: Celery = symbol_by_name(path)
        return app
    return celery_current_app._get_current_object()  # type: ignore[no-any-return]


def _aliases(databases: list[str] | None) -> list[str]:
    if not databases:
        return outbox_aliases()
    unknown = [a for a in databases if a not in connections.settings]
    if unknown:
        raise UnknownDatabase(
            f"unknown database alias(es): {', '.join(unknown)}; "
            f"configured: {', '.join(connections.settings)}"
        )
    return databases


def run_relay(databases: list[str] | None, *, batch_size: int | None, once: bool) -> None:
    Relay(celery_app(), aliases=_aliases(databases), batch_size=batch_size).run(once=once)


def status(databases: list[str] | None) -> dict[str, Any]:
    """Per database: the figures, plus what is wrong against the HEALTH_* thresholds."""
    report = {}
    for alias in _aliases(databases):
        figures = alias_status(alias)
        figures["problems"] = problems(figures)
        report[alias] = figures
    return report


def problems(figures: dict[str, Any]) -> list[str]:
    found = []
    if figures["backlog"] > settings.HEALTH_MAX_BACKLOG:
        found.append(
            f"backlog {figures['backlog']} over HEALTH_MAX_BACKLOG {settings.HEALTH_MAX_BACKLOG}"
        )
    age = figures["oldest_pending_age"]
    if age is not None and age > settings.HEALTH_MAX_AGE:
        found.append(
            f"oldest pending message is {age:.0f}s old, over HEALTH_MAX_AGE "
            f"{settings.HEALTH_MAX_AGE:.0f}s"
        )
    if settings.HEALTH_REQUIRE_RELAY and not figures["relays"]:
        found.append(
            "no relay heartbeat seen recently: is a Celery worker running (it relays, unless "
            "AFTERCOMMIT['RELAY_IN_WORKER'] is False), or `manage.py aftercommit relay`?"
        )
    found.extend(f"relay setup error: {error}" for error in figures.get("setup_errors", ()))
    return found


def healthy(report: dict[str, Any]) -> bool:
    return not any(figures["problems"] for figures in report.values())


def format_status(report: dict[str, Any]) -> str:
    lines = [
        f"{'database':<12} {'backlog':>8} {'oldest':>9} {'retrying':>9} {'dead':>6} "
        f"{'sent/min':>9} {'relays':>7}"
    ]
    for alias, s in report.items():
        age = s["oldest_pending_age"]
        oldest = "-" if age is None else f"{age:.1f}s"
        lines.append(
            f"{alias:<12} {s['backlog']:>8} {oldest:>9} {s['retrying']:>9} {s['dead']:>6} "
            f"{s['sent_last_minute']:>9} {len(s['relays']):>7}"
        )
    for alias, s in report.items():
        lines.extend(f"{alias}: {problem}" for problem in s["problems"])
    return "\n".join(lines)


def purge(databases: list[str] | None, older_than: float | None) -> dict[str, int]:
    return {alias: purge_alias(alias, older_than=older_than) for alias in _aliases(databases)}


def purge_once_records(databases: list[str] | None, older_than: float | None) -> dict[str, int]:
    """The ``once=True`` records past the retention window (see :mod:`aftercommit.once`)."""
    return {alias: once.purge(alias, older_than=older_than) for alias in _aliases(databases)}


def replay_dead(databases: list[str] | None) -> dict[str, int]:
    return {alias: OutboxMessage.objects.using(alias).retry_dead() for alias in _aliases(databases)}
