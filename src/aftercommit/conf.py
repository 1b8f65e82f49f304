"""Settings: the ``AFTERCOMMIT`` dict in Django settings, read each time a value is used.

Every key is optional. Values are checked when read, so a typo or a wrong type is reported with the
key's name and what it expects instead of failing somewhere deep in the relay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.conf import settings as django_settings
from django.core.signals import setting_changed

from .exceptions import ImproperlyConfigured


@dataclass(frozen=True)
class Setting:
    default: Any
    kind: type | tuple[type, ...]
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None


SETTINGS: dict[str, Setting] = {
    "GUARD": Setting(
        "warn",
        str,
        "What to do when plain Celery publishes inside an open transaction.",
        choices=("off", "warn", "raise"),
    ),
    "CELERY_APP": Setting(
        None,
        (str, type(None)),
        "Dotted path of the Celery app the relay publishes with, e.g. 'proj.celery:app' (None: "
        "Celery's current app, the one your project's __init__ imports).",
    ),
    "DATABASES": Setting(
        None,
        (list, tuple, type(None)),
        "Aliases whose outbox the relay, status and purge look at (None: every alias where the "
        "outbox table may be migrated).",
    ),
    "RELAY_IN_WORKER": Setting(
        True,
        bool,
        "Run the relay inside every Celery worker (a worker bootstep); the workers share the work "
        "through the claim. False: run `manage.py aftercommit relay` yourself.",
    ),
    "MAX_ATTEMPTS": Setting(
        10, int, "Failed sends of one message before it becomes a dead letter.", minimum=1
    ),
    "BACKOFF_BASE": Setting(
        1.0, (int, float), "First retry delay in seconds; it doubles each attempt.", minimum=0
    ),
    "BACKOFF_MAX": Setting(300.0, (int, float), "Longest retry delay in seconds.", minimum=0),
    "BROKER_BACKOFF_MAX": Setting(
        30.0,
        (int, float),
        "Longest pause in seconds between relay attempts while the broker is unreachable.",
        minimum=0,
    ),
    "LEASE": Setting(
        60.0,
        (int, float),
        "Seconds a relay owns the messages it claimed; after that another relay may take them.",
        minimum=1,
    ),
    "BATCH_SIZE": Setting(500, int, "Messages claimed and sent per relay batch.", minimum=1),
    "POLL_INTERVAL": Setting(
        1.0,
        (int, float),
        "Seconds between the relay's looks for due messages when nothing wakes it. On PostgreSQL "
        "each commit wakes it (LISTEN/NOTIFY), so this is only the safety net and the pace of "
        "retries.",
        minimum=0.01,
    ),
    "PROBE_INTERVAL": Setting(
        0.02,
        (int, float),
        "Seconds between the relay's cheap looks for new messages on databases that cannot notify "
        "it (MariaDB/MySQL, SQLite): one read of the claim index each time.",
        minimum=0.001,
    ),
    "MAX_PAYLOAD_BYTES": Setting(
        256 * 1024,
        int,
        "Largest encoded arguments plus send options (headers included) a call may carry; larger "
        "ones are refused at the call.",
        minimum=1,
    ),
    "RETENTION": Setting(
        7 * 24 * 3600.0,
        (int, float),
        "Seconds sent messages are kept before purge deletes them. Dead letters are kept.",
        minimum=0,
    ),
    "PURGE_BATCH_SIZE": Setting(
        1000, int, "Rows deleted per statement by purge, to keep locks short.", minimum=1
    ),
    "DEBOUNCE_MAX_WAIT": Setting(
        60.0,
        (int, float),
        "Longest a debounced key waits in seconds: when newer dispatches with the same key keep "
        "superseding the pending one for this long, the relay sends the newest due one anyway.",
        minimum=0,
    ),
    "HEALTH_MAX_BACKLOG": Setting(
        10_000,
        int,
        "Pending messages above which `aftercommit status` exits non-zero and the health view "
        "answers 503.",
        minimum=0,
    ),
    "HEALTH_MAX_AGE": Setting(
        300.0,
        (int, float),
        "Age in seconds of the oldest pending message above which status and health fail.",
        minimum=0,
    ),
    "HEALTH_REQUIRE_RELAY": Setting(
        True,
        bool,
        "Whether status and health fail when no relay has shown a heartbeat recently.",
    ),
    "HEALTH_TOKEN": Setting(
        None,
        (str, type(None)),
        "Secret the health view wants before it shows figures: 'Authorization: Bearer <token>' "
        "or '?token=<token>'. Without it the view answers only {\"healthy\": true|false} (same "
        "status code, so probes need no secret); a wrong one gets 403. None: figures for all.",
    ),
    "HEALTH_CACHE_SECONDS": Setting(
        5.0,
        (int, float),
        "Seconds the health view reuses its figures in each process, so frequent probes cost one "
        "set of COUNT queries per period. 0: read them on every request.",
        minimum=0,
    ),
    "REPLICAS": Setting(
        (),
        (list, tuple),
        "Aliases of PostgreSQL streaming replicas your routers may send a task's reads to. Before "
        "a task runs, the worker waits until each replica of the database that dispatched it has "
        "replayed that commit; put aftercommit.replicas.ReplicaRouter first in DATABASE_ROUTERS. "
        "A replica belongs to the primary its TEST['MIRROR'] names, else to 'default'.",
    ),
    "REPLICA_WAIT": Setting(
        2.0,
        (int, float),
        "Seconds a task waits for a lagging replica before its reads of that replica go to the "
        "primary instead (signals.replica_fallback counts it). Above ordinary lag, so a replica a "
        "few hundred ms behind still serves the reads.",
        minimum=0,
    ),
}


class Settings:
    """Typed access to ``settings.AFTERCOMMIT``, validated once per value of the setting.

    Nothing is cached at import: the validated values are dropped whenever Django reports the
    setting changed (``override_settings`` in tests), or the dict itself is replaced.
    """

    def __init__(self) -> None:
        self._checked: tuple[int, dict[str, Any]] | None = None

    def _values(self) -> dict[str, Any]:
        raw = getattr(django_settings, "AFTERCOMMIT", None) or {}
        checked = self._checked
        if checked is not None and checked[0] == id(raw):
            return checked[1]
        values = _validate(raw)
        self._checked = (id(raw), values)
        return values

    def reset(self, **kwargs: Any) -> None:
        self._checked = None

    def __getattr__(self, name: str) -> Any:
        if name not in SETTINGS:
            raise AttributeError(name)
        return self._values()[name]


def _validate(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ImproperlyConfigured(
            f"settings.AFTERCOMMIT must be a dict, not {type(raw).__name__}."
        )
    unknown = sorted(set(raw) - set(SETTINGS))
    if unknown:
        removed = {
            "GRACE_PERIOD": "the relay sees a message the moment its transaction commits",
            "PUBLISHER": "the relay is the only sender",
            "EXIT_FLUSH_TIMEOUT": "web processes hold nothing to flush",
        }
        why = "; ".join(f"{k} was removed in 0.2: {removed[k]}" for k in unknown if k in removed)
        raise ImproperlyConfigured(
            f"Unknown key(s) in settings.AFTERCOMMIT: {', '.join(unknown)}. "
            + (f"{why}. Delete it. " if why else "")
            + f"Known keys: {', '.join(sorted(SETTINGS))}."
        )
    values = {}
    for name, spec in SETTINGS.items():
        values[name] = _checked(name, spec, raw[name]) if name in raw else spec.default
    return values


def _checked(name: str, spec: Setting, value: Any) -> Any:
    ok = isinstance(value, spec.kind) and not (
        isinstance(value, bool) and spec.kind in (int, (int, float))
    )
    if not ok:
        expected = (
            " or ".join(k.__name__ for k in spec.kind)
            if isinstance(spec.kind, tuple)
            else spec.kind.__name__
        )
        raise ImproperlyConfigured(
            f"settings.AFTERCOMMIT[{name!r}] must be {expected}, got {value!r}. {spec.help}"
        )
    if spec.choices is not None and value not in spec.choices:
        raise ImproperlyConfigured(
            f"settings.AFTERCOMMIT[{name!r}] must be one of "
            f"{', '.join(map(repr, spec.choices))}, got {value!r}."
        )
    if spec.minimum is not None and value < spec.minimum:
        raise ImproperlyConfigured(
            f"settings.AFTERCOMMIT[{name!r}] must be at least {spec.minimum}, got {value!r}."
        )
    return value


settings = Settings()


def _on_setting_changed(setting: str, **kwargs: Any) -> None:
    if setting == "AFTERCOMMIT":
        settings.reset()


setting_changed.connect(_on_setting_changed)
