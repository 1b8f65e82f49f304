"""``path("aftercommit/", include("aftercommit.urls"))`` serves ``aftercommit/health/``."""

from django.urls import path

from .views import health

app_name = "aftercommit"
urlpatterns = [path("health/", health, name="health")]
