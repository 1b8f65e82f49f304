"""Django settings for Celery's integration suite with aftercommit's task class: the outbox on
PostgreSQL (CELERY_SUITE_DATABASE_URL, database ``cs`` by default, which tests/celery_suite.py
creates and migrates)."""

from __future__ import annotations

import os

import dj_database_url

from aftercommit.conf import SETTINGS

SECRET_KEY = "aftercommit-celery-suite"
USE_TZ = True
TIME_ZONE = "UTC"
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "aftercommit"]
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("CELERY_SUITE_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/cs"),
        conn_max_age=0,
    )
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# Only keys the installed aftercommit knows: its settings table rejects unknown ones, and the keys
# change with the one-sender redesign (issue 11).
# MAX_PAYLOAD_BYTES: the default (256 KiB) refuses at the call what Celery's suite sends on purpose
# (test_chain_to_a_chord_with_large_header: a chain whose rest is a chord of 1,000 tasks, about
# 470 KB of send options); a deployment that sends such canvases raises it, as this run does.
_wanted = {
    "CELERY_APP": "aftercommit_suite_app:app",
    "POLL_INTERVAL": 0.2,
    "MAX_PAYLOAD_BYTES": 4 * 1024 * 1024,
}
AFTERCOMMIT = {key: value for key, value in _wanted.items() if key in SETTINGS}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"aftercommit": {"handlers": ["console"], "level": "INFO"}},
}
