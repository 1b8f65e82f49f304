"""Settings of the test project. DATABASE_URL and BROKER_URL pick the services; without them it runs
on a SQLite file and kombu's filesystem transport, which need no server."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import dj_database_url

SECRET_KEY = "aftercommit-tests"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "tests.urls"
ALLOWED_HOSTS = ["*"]
STATIC_URL = "/static/"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "aftercommit",
    "tests.testapp",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# Shared with the worker and relay subprocesses, which must open the same SQLite files.
STATE_DIR = (
    Path(os.environ.get("AFTERCOMMIT_TEST_STATE", tempfile.gettempdir())) / "aftercommit-tests"
)
STATE_DIR.mkdir(parents=True, exist_ok=True)

DATABASE_URL = os.environ.get("DATABASE_URL", "")
if DATABASE_URL.startswith("mysql"):
    import pymysql

    pymysql.install_as_MySQLdb()
default: dict[str, Any]
other: dict[str, Any]
if DATABASE_URL:
    default = dict(dj_database_url.parse(DATABASE_URL, conn_max_age=0))
    other = dict(default, NAME=f"{default['NAME']}_other")
else:
    default = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(STATE_DIR / "default.sqlite3")}
    other = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(STATE_DIR / "other.sqlite3")}
for db, name in ((default, "default"), (other, "other")):
    if db["ENGINE"].endswith("sqlite3"):
        db["OPTIONS"] = {"timeout": 30}
        db["TEST"] = {"NAME": str(STATE_DIR / f"test_{name}.sqlite3")}
    if db["ENGINE"].endswith("postgresql"):
        # The fault suite cuts one process's connections by this name.
        app_name = os.environ.get("AFTERCOMMIT_TEST_APP_NAME", "aftercommit-tests")
        db["OPTIONS"] = {"application_name": app_name}
    if db["ENGINE"].endswith("mysql"):
        # Celery closes every database connection around each task (its Django fixup, whatever
        # CONN_MAX_AGE says), so each task connects anew. PyMySQL >= 1.2 builds a TLS context
        # on every connect unless told not to: 20 ms of CPU, 100 ms on a busy machine, which
        # delays the task's read past the writer's commit and hides the race test_race.py shows.
        db["OPTIONS"] = {"isolation_level": "read committed", "ssl_disabled": True}
DATABASES = {"default": default, "other": other}
DATABASE_ROUTERS = ["tests.testapp.routers.TaskRunRouter"]
# A streaming replica of the PostgreSQL above (`make replica` starts one and prints the URL). It
# mirrors `default`: pytest-django makes no database on it (the replica replays the primary's test
# database), and its NAME becomes the primary's test database's.
REPLICA_URL = os.environ.get("AFTERCOMMIT_TEST_REPLICA_URL", "")
if REPLICA_URL and default["ENGINE"].endswith("postgresql"):
    replica = dict(dj_database_url.parse(REPLICA_URL, conn_max_age=0))
    replica["TEST"] = {"MIRROR": "default"}
    replica["OPTIONS"] = dict(default.get("OPTIONS", {}))
    DATABASES["replica"] = replica
    DATABASE_ROUTERS = [
        "aftercommit.replicas.ReplicaRouter",
        *DATABASE_ROUTERS,
        "tests.testapp.routers.ReplicaReadRouter",
    ]

# Subprocesses (the Celery worker, the relay) are pointed at the test databases pytest-django made.
_test_names = os.environ.get("AFTERCOMMIT_TEST_DB_NAMES")
if _test_names:
    for alias, name in json.loads(_test_names).items():
        DATABASES[alias]["NAME"] = name
        # The relay keeps its connections, as in production. (A Celery worker closes its own
        # around every task anyway, unless CELERY_DB_REUSE_MAX is set.)
        DATABASES[alias]["CONN_MAX_AGE"] = 60

BROKER_URL = os.environ.get("BROKER_URL", "") or "filesystem://"
FS_BROKER_DIR = STATE_DIR / "broker"
FS_BROKER_DIR.mkdir(exist_ok=True)  # a test may publish before the broker fixture has run
# Publishing (the web process, the relays, the worker's own relay) goes through the proxy the outage
# tests cut; a worker reads from the real broker.
CELERY_BROKER_URL = BROKER_URL
CELERY_BROKER_WRITE_URL = os.environ.get("AFTERCOMMIT_TEST_PROXY_URL") or BROKER_URL
if BROKER_URL.startswith("filesystem"):
    CELERY_BROKER_TRANSPORT = "aftercommit.transport:FilesystemTransport"
CELERY_BROKER_TRANSPORT_OPTIONS = (
    {
        "data_folder_in": str(FS_BROKER_DIR),
        # The web process and the relay may write through a link the outage tests remove.
        "data_folder_out": os.environ.get("AFTERCOMMIT_TEST_FS_OUT", str(FS_BROKER_DIR)),
        "control_folder": str(STATE_DIR / "broker-control"),
        "store_processed": False,
        "polling_interval": 0.005,
    }
    if BROKER_URL.startswith("filesystem")
    # Redis hands an unacknowledged message (its worker died) to another after this long.
    else {
        "visibility_timeout": float(os.environ.get("AFTERCOMMIT_TEST_VISIBILITY", "3600")),
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    }
    if BROKER_URL.startswith("redis")
    else {}
)
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_TASK_IGNORE_RESULT = True
# On Redis, a result backend for the tests that ask for results (ignore_result=False); the real
# server, not the proxy the outage tests cut.
if BROKER_URL.startswith("redis"):
    CELERY_RESULT_BACKEND = BROKER_URL
    CELERY_RESULT_EXPIRES = 600
# A test module may start its worker with another result backend (e.g. rpc://).
if os.environ.get("AFTERCOMMIT_TEST_RESULT_BACKEND"):
    CELERY_RESULT_BACKEND = os.environ["AFTERCOMMIT_TEST_RESULT_BACKEND"]
# The benchmarks use their own queue, so a test run beside them cannot take their messages.
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("AFTERCOMMIT_TEST_QUEUE", "celery")
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

AFTERCOMMIT = {
    "POLL_INTERVAL": 0.2,
    "BROKER_BACKOFF_MAX": 1.0,
    "BACKOFF_BASE": 0.2,
    "BACKOFF_MAX": 1.0,
}

# Subprocesses (relays) get their own overrides, e.g. a lower MAX_ATTEMPTS.
AFTERCOMMIT.update(json.loads(os.environ.get("AFTERCOMMIT_TEST_SETTINGS", "{}")))

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"aftercommit": {"handlers": ["console"], "level": "WARNING"}},
}
