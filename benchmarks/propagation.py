"""Propagating one brand's change onto 1,000,000 products, three ways, on PostgreSQL.

    python benchmarks/propagation.py [--quick]

(a) one bulk UPDATE of all the brand's products, the baseline; (b) the example's ``propagate()``:
chunked, version-guarded UPDATEs with progress after every chunk, at its default chunk size and
two smaller ones; (c) a loop that loads and ``save()``s each product, timed on a sample and
extrapolated.
Each run gives the brand a new version, so the products need no reset; a VACUUM and a CHECKPOINT
before each timing let every way start from the same table. The bulk and chunked ways run twice,
interleaved (the second round in reverse order), and the better run counts.

Uses DATABASE_URL (default: PostgreSQL `aftercommit_bench_catalog` on 127.0.0.1, created if
missing); the products are seeded once and reused. ``--quick``: 20,000 products, a 2,000 loop.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

DATABASE_URL = "postgres://postgres@127.0.0.1:5432/aftercommit_bench_catalog"
TARGET = 0.8  # the chunked propagation's throughput, as a share of the bulk UPDATE's
ROUNDS = 2
CHUNK_SIZES = (2_000, 5_000)  # tried beside the example's default (10,000)


def setup_django() -> None:
    """Django on the example project, migrated, on the benchmark database."""
    os.environ.setdefault("DATABASE_URL", DATABASE_URL)
    os.environ.setdefault("EXAMPLE_STATE", tempfile.mkdtemp(prefix="aftercommit-bench-catalog-"))
    os.environ["DJANGO_SETTINGS_MODULE"] = "example.settings"
    sys.path.insert(0, str(common.ROOT / "example"))
    common.ensure_database(os.environ["DATABASE_URL"])
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def seed(products: int) -> int:
    """The brand owning ``products`` products, seeded by one INSERT ... SELECT unless present."""
    from django.db import connection

    from catalog.models import Brand, Product

    brand, _ = Brand.objects.get_or_create(name=f"bench {products}")
    if Product.objects.filter(brand=brand).count() == products:
        print(f"reusing the {products:,} products of brand {brand.pk}", flush=True)
        return brand.pk
    started = time.perf_counter()
    with connection.cursor() as cursor:
        cursor.execute("DELETE FROM catalog_product WHERE brand_id = %s", [brand.pk])
        cursor.execute(
            """
            INSERT INTO catalog_product
                (brand_id, name, price_cents, brand_name, discounted_cents, brand_version)
            SELECT %s, 'product ' || n, 500 + (n::bigint * 7919) %% 49500, %s,
                   500 + (n::bigint * 7919) %% 49500, %s
            FROM generate_series(1, %s) AS n
            """,
            [brand.pk, brand.name, brand.version, products],
        )
    vacuum(analyze=True)
    print(f"seeded {products:,} products in {time.perf_counter() - started:.1f} s", flush=True)
    return brand.pk


def vacuum(analyze: bool = False) -> None:
    """Clear the dead tuples the last way left, and flush its WAL, so the next way starts clean."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE catalog_product" if analyze else "VACUUM catalog_product")
        cursor.execute("CHECKPOINT")


def new_version(brand_id: int) -> Any:
    """Edit the brand as the admin would (without dispatching) and read the snapshot to copy."""
    from django.db.models import F

    from catalog.models import Brand
    from catalog.propagation import Snapshot

    Brand.objects.filter(pk=brand_id).update(
        version=F("version") + 1, discount_percent=(F("discount_percent") + 5) % 90
    )
    return Snapshot.read(brand_id)


def bulk_update(brand: Any) -> int:
    """One UPDATE of every product behind, with propagate()'s SET expressions."""
    from django.db import transaction
    from django.db.models import F

    from catalog.models import Product

    with transaction.atomic():
        return Product.objects.filter(brand_id=brand.pk, brand_version__lt=brand.version).update(
            brand_name=brand.name,
            discounted_cents=F("price_cents") * (100 - brand.discount_percent) / 100,
            brand_version=brand.version,
        )


def save_loop(brand: Any, sample: int) -> int:
    """Load each product behind and save() it: what the seed's task did, one query a product."""
    from catalog.models import Product

    behind = Product.objects.filter(brand_id=brand.pk, brand_version__lt=brand.version)
    saved = 0
    for product in behind.order_by("pk")[:sample]:
        product.brand_name = brand.name
        product.discounted_cents = product.price_cents * (100 - brand.discount_percent) // 100
        product.brand_version = brand.version
        product.save()
        saved += 1
    return saved


def timed(brand_id: int, run: Callable[[Any], int], expected: int) -> float:
    """Seconds one way takes to bring ``expected`` products up to a new brand version."""
    vacuum()
    brand = new_version(brand_id)
    started = time.perf_counter()
    updated = run(brand)
    seconds = time.perf_counter() - started
    if updated != expected:
        raise RuntimeError(f"expected {expected:,} products updated, got {updated:,}")
    return seconds


def chart(rates: dict[str, float], path: Path) -> None:
    fig, ax = common.figure(figsize=(8, 0.6 * len(rates) + 1.2))
    labels = list(rates)[::-1]
    bars = ax.barh(labels, [rates[label] for label in labels], color="#4878a8")
    ax.bar_label(bars, labels=[f"{rates[label]:,.0f}" for label in labels], padding=3)
    ax.margins(x=0.15)
    ax.set_xlabel("products updated per second")
    ax.set_title("Propagating a brand to its products (PostgreSQL)")
    common.save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20,000 products, a 2,000 loop")
    args = parser.parse_args()
    products, sample = (20_000, 2_000) if args.quick else (1_000_000, 20_000)

    setup_django()
    from django.conf import settings

    from catalog.propagation import propagate

    default_chunk = settings.CATALOG_CHUNK_SIZE
    brand_id = seed(products)
    bulk_name = "bulk UPDATE (baseline)"
    chunked = {
        size: f"propagate(), chunk {size:,}" + (" (default)" if size == default_chunk else "")
        for size in sorted({default_chunk, *CHUNK_SIZES})
    }
    ways: dict[str, Callable[[Any], int]] = {bulk_name: bulk_update}
    for size, name in chunked.items():
        ways[name] = lambda brand, size=size: propagate(brand, chunk_size=size)
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(ROUNDS):
        for name in list(ways)[:: 1 if round_ % 2 == 0 else -1]:
            samples[name].append(timed(brand_id, ways[name], products))
            print(f"  {name}: {samples[name][-1]:.2f} s", flush=True)
    loop_name = f"save() loop, {sample:,} sampled, extrapolated"
    loop_seconds = timed(brand_id, lambda brand: save_loop(brand, sample), sample)
    print(f"  {loop_name}: {loop_seconds:.2f} s for {sample:,}", flush=True)

    seconds = {name: min(times) for name, times in samples.items()}
    seconds[loop_name] = loop_seconds * products / sample
    rates = {name: products / s for name, s in seconds.items()}
    ratios = {name: rate / rates[bulk_name] for name, rate in rates.items()}
    rows = [
        [name, f"{s:.2f}", f"{rates[name]:,.0f}", f"{ratios[name]:.2f}x"]
        for name, s in seconds.items()
    ]
    ratio = ratios[chunked[default_chunk]]
    meeting = [size for size, name in chunked.items() if ratios[name] >= TARGET]
    verdict = f"target {TARGET}x **{'met' if ratio >= TARGET else 'missed'}**"
    if meeting:
        verdict += f"; met here at chunk {', '.join(f'{size:,}' for size in meeting)}"
    chart(rates, common.out_dir() / "propagation.png")
    markdown = "\n\n".join(
        [
            f"One brand's new version copied onto its {products:,} products on PostgreSQL. "
            f"Bulk and chunked ways: the better of {ROUNDS} interleaved runs, each after a VACUUM "
            f"and a CHECKPOINT. The save() loop ran on {sample:,} products; its time for "
            f"{products:,} is **extrapolated** from them.",
            common.table(["way", f"seconds for {products:,}", "products/s", "vs bulk"], rows),
            f"propagate() at its default chunk ({default_chunk:,}) runs at **{ratio:.2f}x** the "
            f"bulk UPDATE's throughput: {verdict}.",
            "![propagation throughput](propagation.png)",
        ]
    )
    common.write_section(
        name="propagation",
        order=4,
        title=f"4. Propagating a brand to {products:,} products",
        markdown=markdown,
        data={
            "products": products,
            "loop_sample": sample,
            "loop_sample_seconds": loop_seconds,
            "default_chunk_size": default_chunk,
            "samples_seconds": samples,
            "seconds": seconds,
            "rows_per_second": rates,
            "ratio_to_bulk": ratios,
            "ratio_default_to_bulk": ratio,
            "target": TARGET,
            "target_met": ratio >= TARGET,
        },
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
