"""Settings of the example catalog.

With nothing set it runs on a SQLite file and a filesystem broker under example/.state (no server
needed). DATABASE_URL (PostgreSQL, MySQL) and BROKER_URL (Redis, RabbitMQ) switch to real servers.
EXAMPLE_STATE moves the state folder, so tests and several demos do not share files.
"""

import os
from pathlib import Path

import dj_database_url
import django

BASE_DIR = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("EXAMPLE_STATE", BASE_DIR / ".state")).resolve()
STATE_DIR.mkdir(parents=True, exist_ok=True)

SECRET_KEY = os.environ.get("EXAMPLE_SECRET_KEY", "example-only-not-secret")
DEBUG = os.environ.get("EXAMPLE_DEBUG", "1") == "1"  # runserver serves the admin's static files
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
USE_TZ = True
TIME_ZONE = "UTC"
ROOT_URLCONF = "example.urls"
STATIC_URL = "static/"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "aftercommit",
    "catalog",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
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

DATABASE_URL = os.environ.get("DATABASE_URL") or f"sqlite:///{STATE_DIR / 'db.sqlite3'}"
DATABASES = {"default": dj_database_url.parse(DATABASE_URL, conn_max_age=60)}
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    DATABASES["default"]["OPTIONS"] = {"timeout": 30}
if DATABASES["default"]["ENGINE"].endswith("sqlite3") and django.VERSION >= (5, 1):
    DATABASES["default"]["OPTIONS"] = {
        # Web server, worker and relay share one file: WAL lets readers run beside the writer,
        # IMMEDIATE takes the write lock up front instead of failing on a lock upgrade.
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
elif DATABASES["default"]["ENGINE"].endswith("mysql"):
    import pymysql

    pymysql.install_as_MySQLdb()

BROKER_URL = os.environ.get("BROKER_URL") or "filesystem://"
BROKER_DIR = STATE_DIR / "broker"
# Producers (web, and the relay inside the worker) may reach the broker another way than the
# worker's consumer does: `race --broker-outage` points them at a proxy, or at a link to the folder,
# that it can take away.
CELERY_BROKER_URL = BROKER_URL
CELERY_BROKER_WRITE_URL = os.environ.get("EXAMPLE_PRODUCER_BROKER_URL") or BROKER_URL
if BROKER_URL.startswith("filesystem"):
    CELERY_BROKER_TRANSPORT = "aftercommit.transport:FilesystemTransport"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(BROKER_DIR),
        "data_folder_out": os.environ.get("EXAMPLE_PRODUCER_BROKER_DIR", str(BROKER_DIR)),
        "control_folder": str(STATE_DIR / "broker-control"),
        "store_processed": False,
        "polling_interval": 0.01,
    }
    for folder in ("broker", "broker-control"):
        (STATE_DIR / folder).mkdir(exist_ok=True)
CELERY_BROKER_CONNECTION_TIMEOUT = 2
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

AFTERCOMMIT = {
    # Short, so the demo and `race --broker-outage` show the relay catching up within seconds.
    "POLL_INTERVAL": 0.5,
    "BROKER_BACKOFF_MAX": 1.0,
}

# How many products one bulk UPDATE of a propagation touches. A chunk costs a commit and a progress
# write whatever its size; at 25,000 (about 0.2 s a chunk here) the chunked propagation runs at
# 0.8x one bulk UPDATE's throughput, and still commits, and shows progress, several times a second
# (make bench, section 4).
CATALOG_CHUNK_SIZE = int(os.environ.get("EXAMPLE_CHUNK_SIZE", "25000"))
