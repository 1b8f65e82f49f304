"""Copying a brand onto its products: chunked bulk UPDATEs that an older version never wins.

Every UPDATE is guarded by ``brand_version < version``, so when two edits race, whichever task
runs last, the products end at the newest committed brand.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from .models import Brand, Product, Propagation


@dataclass(frozen=True)
class Snapshot:
    """The brand fields products copy, as one committed version had them."""

    pk: int
    version: int
    name: str
    discount_percent: int

    @classmethod
    def read(cls, brand_id: int) -> Snapshot | None:
        row = Brand.objects.filter(pk=brand_id).values("version", "name", "discount_percent")
        found = row.first()
        return cls(pk=brand_id, **found) if found else None


def propagate(brand: Snapshot, chunk_size: int | None = None) -> int:
    """Bring the brand's products up to ``brand``; returns how many this call updated."""
    chunk_size = chunk_size or settings.CATALOG_CHUNK_SIZE
    behind = Product.objects.filter(brand_id=brand.pk, brand_version__lt=brand.version)
    progress, _ = Propagation.objects.get_or_create(brand_id=brand.pk, version=brand.version)
    Propagation.objects.filter(pk=progress.pk).update(
        state=Propagation.State.RUNNING, total=behind.count(), done=0, started_at=timezone.now()
    )
    done = 0
    last_pk = 0
    while True:
        # Walk the primary key instead of re-querying "behind": an UPDATE another task made
        # meanwhile must not make us skip or revisit rows. One short transaction a chunk, so
        # the admin (and other writers) see progress while it runs.
        with transaction.atomic():
            bounds = list(
                Product.objects.filter(brand_id=brand.pk, pk__gt=last_pk)
                .order_by("pk")
                .values_list("pk", flat=True)[chunk_size - 1 : chunk_size]
            )
            chunk = Product.objects.filter(brand_id=brand.pk, pk__gt=last_pk)
            if bounds:
                chunk = chunk.filter(pk__lte=bounds[0])
            done += chunk.filter(brand_version__lt=brand.version).update(
                brand_name=brand.name,
                discounted_cents=F("price_cents") * (100 - brand.discount_percent) / 100,
                brand_version=brand.version,
            )
            Propagation.objects.filter(pk=progress.pk).update(done=done)
        if not bounds:
            break
        last_pk = bounds[0]
    with transaction.atomic():
        Propagation.objects.filter(pk=progress.pk).update(
            state=Propagation.State.DONE, finished_at=timezone.now()
        )
        # Versions whose task read this newer one (or has yet to run) have nothing left to do.
        Propagation.objects.filter(
            brand_id=brand.pk,
            version__lt=brand.version,
            state__in=[Propagation.State.QUEUED, Propagation.State.RUNNING],
        ).update(state=Propagation.State.SUPERSEDED, finished_at=timezone.now())
    return done
