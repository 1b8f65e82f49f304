"""The Django app: ``INSTALLED_APPS = [..., "aftercommit"]``."""

from django.apps import AppConfig


class AftercommitConfig(AppConfig):
    name = "aftercommit"
    verbose_name = "aftercommit outbox"
    default_auto_field = "django.db.models.BigAutoField"
