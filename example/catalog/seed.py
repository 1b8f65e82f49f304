"""Sample brands and products, written with bulk INSERTs behind a progress bar."""

from __future__ import annotations

import random
import sys
from typing import TextIO

from django.db import transaction

from .models import Brand, Product

BRANDS = ["Acme", "Globex", "Initech", "Umbrella", "Hooli", "Stark", "Wayne", "Wonka"]
BATCH = 5000


def seed(products: int, out: TextIO = sys.stdout) -> None:
    """Create the brands and ``products`` products, shared unevenly (the first brand is biggest)."""
    rng = random.Random(42)
    brands = [
        Brand.objects.create(name=name, discount_percent=5 * i, version=1)
        for i, name in enumerate(BRANDS)
    ]
    weights = [len(BRANDS) - i for i in range(len(BRANDS))]
    written = 0
    while written < products:
        batch = []
        for n in range(written, min(written + BATCH, products)):
            brand = rng.choices(brands, weights)[0]
            price = rng.randrange(500, 50_000)
            batch.append(
                Product(
                    brand=brand,
                    name=f"{brand.name} product {n + 1}",
                    price_cents=price,
                    brand_name=brand.name,
                    discounted_cents=price * (100 - brand.discount_percent) // 100,
                    brand_version=brand.version,
                )
            )
        with transaction.atomic():
            Product.objects.bulk_create(batch, batch_size=1000)
        written += len(batch)
        progress_bar(out, written, products)
    out.write("\n")


def progress_bar(out: TextIO, done: int, total: int, width: int = 40) -> None:
    filled = width * done // total
    out.write(f"\r  products [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,}")
    out.flush()
