"""The catalog's logic, in-process: what a save dispatches, chunked updates, racing edits."""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from aftercommit.models import OutboxMessage
from catalog.models import Brand, Product, Propagation
from catalog.propagation import Snapshot, propagate

pytestmark = pytest.mark.django_db


def make_brand(products: int) -> Brand:
    brand = Brand.objects.create(name="Acme", discount_percent=10)
    Product.objects.bulk_create(
        Product(
            brand=brand,
            name=f"p{n}",
            price_cents=1000 + n,
            brand_name="Acme",
            discounted_cents=900,
            brand_version=brand.version,
        )
        for n in range(products)
    )
    return Brand.objects.get(pk=brand.pk)  # loaded, as the admin loads it


def edit(brand: Brand, **fields: object) -> Snapshot:
    for name, value in fields.items():
        setattr(brand, name, value)
    brand.save()
    snapshot = Snapshot.read(brand.pk)
    assert snapshot is not None
    return snapshot


def test_save__copied_field_changed__raises_version_and_dispatches() -> None:
    brand = make_brand(3)
    edit(brand, discount_percent=20)
    assert brand.version == 2
    assert Propagation.objects.get(brand=brand).changed == ["discount_percent"]
    assert OutboxMessage.objects.count() == 1  # recorded in this transaction, sent after commit


def test_saves_of_one_brand__debounced_on_one_key() -> None:
    brand = make_brand(3)
    edit(brand, discount_percent=20)
    edit(brand, discount_percent=30)
    other = Brand.objects.create(name="Other")
    other.name = "Other 2"
    other.save()
    keys = list(OutboxMessage.objects.order_by("id").values_list("debounce_key", flat=True))
    assert len(keys) == 3
    assert keys[0] == keys[1] != keys[2]  # the newest supersedes the older; another brand's not


def test_save__other_field_changed__dispatches_nothing() -> None:
    brand = make_brand(3)
    edit(brand, description="new words")
    assert brand.version == 1
    assert not Propagation.objects.exists()
    assert OutboxMessage.objects.count() == 0


def test_propagate__updates_in_chunks_of_bulk_updates() -> None:
    brand = make_brand(50)
    snapshot = edit(brand, name="Acme 2", discount_percent=25)
    with CaptureQueriesContext(connection) as queries:
        assert propagate(snapshot, chunk_size=7) == 50
    product_updates = [q for q in queries if q["sql"].startswith('UPDATE "catalog_product"')]
    assert len(product_updates) == 8  # ceil(50 / 7), never one a product
    for product in Product.objects.all():
        assert product.brand_name == "Acme 2"
        assert product.discounted_cents == product.price_cents * 75 // 100
    progress = Propagation.objects.get(brand=brand, version=2)
    assert (progress.state, progress.done, progress.total) == ("done", 50, 50)


def test_propagate__older_version_after_newer__products_keep_newer() -> None:
    brand = make_brand(20)
    older = edit(brand, discount_percent=30)
    newer = edit(brand, discount_percent=40)
    # The task of the first edit read the brand before the second committed, and runs last.
    propagate(newer, chunk_size=6)
    assert propagate(older, chunk_size=6) == 0
    assert set(Product.objects.values_list("brand_version", flat=True)) == {newer.version}
    for product in Product.objects.all():
        assert product.discounted_cents == product.price_cents * 60 // 100


def test_propagate__newer_version__supersedes_queued_older_ones() -> None:
    brand = make_brand(5)
    edit(brand, discount_percent=30)
    newer = edit(brand, discount_percent=40)
    propagate(newer)
    states = dict(Propagation.objects.values_list("version", "state"))
    assert states == {2: "superseded", 3: "done"}
