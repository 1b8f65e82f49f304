"""The admin the seed's users edit brands in; the brand page shows its propagation live."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from .models import Brand, Product


def propagation_lines(brand: Brand, last: int = 5) -> list[str]:
    """The newest propagations of ``brand``, newest first, as the page shows them."""
    lines = [str(p) for p in brand.propagations.all()[:last]]  # ordered newest version first
    return lines or ["nothing propagated yet"]


@admin.register(Brand)
class BrandAdmin(admin.ModelAdmin):
    list_display = ("name", "discount_percent", "version", "propagation")
    search_fields = ("name",)
    fields = ("name", "discount_percent", "description", "version", "live_propagation")
    readonly_fields = ("version", "live_propagation")

    @admin.display(description="propagation")
    def propagation(self, brand: Brand) -> str:
        return propagation_lines(brand, last=1)[0]

    @admin.display(description="propagation")
    def live_propagation(self, brand: Brand) -> str:
        if brand.pk is None:
            return "-"
        lines = propagation_lines(brand)
        # The change page polls the status view below, so "running n of N" moves on its own.
        return format_html(
            '<div id="propagation-status" data-url="{}"><strong>{}</strong>{}</div>',
            reverse("admin:catalog_brand_propagation", args=[brand.pk]),
            lines[0],
            format_html_join("", "<div>{}</div>", ((line,) for line in lines[1:])),
        )

    def get_urls(self) -> list[Any]:
        status = self.admin_site.admin_view(self.propagation_view)
        return [
            path("<int:pk>/propagation/", status, name="catalog_brand_propagation"),
            *super().get_urls(),
        ]

    def propagation_view(self, request: HttpRequest, pk: int) -> JsonResponse:
        brand = get_object_or_404(Brand, pk=pk)
        return JsonResponse({"version": brand.version, "lines": propagation_lines(brand)})

    class Media:
        js = ("catalog/propagation.js",)


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ("name", "brand_name", "price", "discounted_price", "brand_version")
    list_filter = ("brand",)
    search_fields = ("name",)
    raw_id_fields = ("brand",)
    readonly_fields = ("brand_name", "discounted_cents", "brand_version")
    show_full_result_count = False  # no COUNT(*) over 100,000 rows on every page

    @admin.display(description="price")
    def price(self, product: Product) -> str:
        return f"{product.price_cents / 100:.2f}"

    @admin.display(description="discounted price")
    def discounted_price(self, product: Product) -> str:
        return f"{product.discounted_cents / 100:.2f}"
