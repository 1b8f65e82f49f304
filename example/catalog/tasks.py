"""The catalog's task, plus the variants `manage.py race` compares it with."""

from __future__ import annotations

import time

from celery import shared_task
from celery.contrib.django.task import DjangoTask

from .models import RaceRun
from .propagation import Snapshot, propagate


@shared_task
def propagate_brand(brand_id: int) -> None:
    """Copy the brand, as committed now, onto its products (the app's task class: aftercommit)."""
    brand = Snapshot.read(brand_id)
    if brand is not None:
        propagate(brand)


def _race_run(mode: str, brand_id: int, expected_version: int) -> None:
    started = time.time()
    brand = Snapshot.read(brand_id)
    assert brand is not None
    RaceRun.objects.create(
        mode=mode,
        brand_id=brand_id,
        expected_version=expected_version,
        seen_version=brand.version,
        started_at=started,
    )
    propagate(brand)


@shared_task(name="catalog.race.aftercommit")
def race_aftercommit(mode: str, brand_id: int, expected_version: int) -> None:
    _race_run(mode, brand_id, expected_version)


# Celery's own Django task class: `.delay()` publishes at once, `.delay_on_commit()` on commit.
@shared_task(name="catalog.race.plain", base=DjangoTask)
def race_plain(mode: str, brand_id: int, expected_version: int) -> None:
    _race_run(mode, brand_id, expected_version)
