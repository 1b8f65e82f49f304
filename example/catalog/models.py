"""The seed's system: brands edited in the admin, products that copy a few of their fields."""

from __future__ import annotations

from typing import Any

from django.core.validators import MaxValueValidator
from django.db import models
from django.db.models import F

#: Saves of one brand closer together than this propagate once (aftercommit's debounce).
DEBOUNCE_SECONDS = 2.0


class Brand(models.Model):
    #: The fields products copy; editing any other field dispatches nothing.
    COPIED = ("name", "discount_percent")

    name = models.CharField(max_length=100, unique=True)
    discount_percent = models.PositiveSmallIntegerField(
        default=0, validators=[MaxValueValidator(90)]
    )
    description = models.TextField(blank=True, help_text="Not copied to products.")
    #: Raised by every save that changes a copied field; products record the one they copy.
    version = models.PositiveIntegerField(default=1, editable=False)

    def __str__(self) -> str:
        return self.name

    def save(self, *args: Any, propagate: bool = True, **kwargs: Any) -> None:
        from .tasks import propagate_brand

        changed = self.changed_fields()
        if changed:
            # Raise the version in the database, not from the value we loaded: two admins saving
            # at once each get their own version (the UPDATE waits for the other's row lock).
            Brand.objects.filter(pk=self.pk).update(version=F("version") + 1)
            self.version = Brand.objects.values_list("version", flat=True).get(pk=self.pk)
        super().save(*args, **kwargs)
        self._loaded = {f: getattr(self, f) for f in self.COPIED}
        if changed:
            Propagation.objects.create(brand=self, version=self.version, changed=changed)
            if propagate:
                # The seed's line, with debounce: an editor's burst of saves propagates once,
                # 2 s after the last commit, with the final values (the earlier calls are
                # superseded; their Propagation rows say so when the run reads the newest one).
                propagate_brand.apply_async((self.pk,), debounce=DEBOUNCE_SECONDS)

    @classmethod
    def from_db(cls, db: str | None, field_names: Any, values: Any, **kwargs: Any) -> Brand:
        # Django 6.1 passes fetch_mode= and deprecates from_db() methods that cannot take it.
        brand = super().from_db(db, field_names, values, **kwargs)
        # Remember what was loaded, so save() knows what changed without another query.
        brand._loaded = {f: getattr(brand, f) for f in cls.COPIED if f in field_names}
        return brand

    def changed_fields(self) -> list[str]:
        loaded = getattr(self, "_loaded", None)
        if self.pk is None or loaded is None:
            return []
        return [f for f in self.COPIED if f in loaded and loaded[f] != getattr(self, f)]


class Product(models.Model):
    brand = models.ForeignKey(Brand, related_name="products", on_delete=models.CASCADE)
    name = models.CharField(max_length=100)
    price_cents = models.PositiveIntegerField()
    # Copies of the brand, kept by propagate_brand. Cents keep the arithmetic exact in SQL.
    brand_name = models.CharField(max_length=100)
    discounted_cents = models.PositiveIntegerField()
    brand_version = models.PositiveIntegerField(default=0)

    class Meta:
        indexes = [models.Index(fields=["brand", "brand_version"])]

    def __str__(self) -> str:
        return self.name


class Propagation(models.Model):
    """One brand version on its way to the products: what the admin page shows."""

    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        SUPERSEDED = "superseded"  # a newer version was propagated first

    brand = models.ForeignKey(Brand, related_name="propagations", on_delete=models.CASCADE)
    version = models.PositiveIntegerField()
    changed = models.JSONField(default=list)
    state = models.CharField(max_length=10, choices=State.choices, default=State.QUEUED)
    done = models.PositiveIntegerField(default=0)
    total = models.PositiveIntegerField(null=True)
    queued_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True)
    finished_at = models.DateTimeField(null=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["brand", "version"], name="one_propagation_a_version")
        ]
        ordering = ["-version"]

    def __str__(self) -> str:
        what = f"version {self.version} ({', '.join(self.changed)})"
        if self.state == self.State.RUNNING:
            return f"{what}: running, {self.done:,} of {self.total or 0:,}"
        if self.state == self.State.DONE:
            return f"{what}: done, {self.done:,} products updated"
        return f"{what}: {self.state}"


class RaceRun(models.Model):
    """What a task of `manage.py race` saw when it started (written by the worker)."""

    mode = models.CharField(max_length=20)
    brand = models.ForeignKey(Brand, on_delete=models.CASCADE)
    expected_version = models.PositiveIntegerField()
    seen_version = models.PositiveIntegerField()
    started_at = models.FloatField()

    def __str__(self) -> str:
        return f"{self.mode}: expected version {self.expected_version}, saw {self.seen_version}"
