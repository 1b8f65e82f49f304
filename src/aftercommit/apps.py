"""The Django app: ``INSTALLED_APPS = [..., "aftercommit"]``."""

from django.apps import AppConfig


class AftercommitConfig(AppConfig):
    name = "aftercommit"
    verbose_name = "aftercommit outbox"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import metrics

        metrics.install()  # only does something when prometheus_client is installed
