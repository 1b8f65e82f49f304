"""The Django app: ``INSTALLED_APPS = [..., "aftercommit"]``."""

from django.apps import AppConfig


class AftercommitConfig(AppConfig):
    name = "aftercommit"
    verbose_name = "aftercommit outbox"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks, guard, metrics, replicas

        metrics.install()  # only does something when prometheus_client is installed
        guard.install_all()
        checks.register()
        replicas.install()  # the worker's wait; one attribute read per task without a position
