"""The unsafe-dispatch guard: plain Celery publishes inside an open transaction are reported."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from django.db import transaction

from aftercommit import guard
from aftercommit.exceptions import UnsafeDispatchError, UnsafeDispatchWarning
from aftercommit.testing import guard as forced_guard
from tests.celery_app import app
from tests.testapp.tasks import plain_read_item, read_item, read_now

THIS_FILE = __file__


@pytest.mark.django_db(transaction=True)
def test_plain_delay_inside_atomic__raises_with_task_alias_line_and_fix() -> None:
    with pytest.raises(UnsafeDispatchError) as caught, transaction.atomic():
        line = _line() + 1
        plain_read_item.delay("guard")
    text = str(caught.value)
    assert "tests.testapp.tasks.plain_read_item" in text
    assert "database 'default'" in text
    assert f"{THIS_FILE}:{line}" in text
    assert "aftercommit.celery:Task" in text and "on_commit" in text


@pytest.mark.django_db(transaction=True)
def test_send_task_inside_atomic__reported() -> None:
    with pytest.raises(UnsafeDispatchError, match=r"tests\.guard\.anything"), transaction.atomic():
        app.send_task("tests.guard.anything")


@pytest.mark.django_db(transaction=True)
def test_warn_mode__warning_points_at_the_caller() -> None:
    with (
        forced_guard("warn"),
        transaction.atomic(),
        pytest.warns(UnsafeDispatchWarning) as recorded,
    ):
        line = _line() + 1
        plain_read_item.delay("guard-warn")
    assert recorded[0].filename == THIS_FILE
    assert recorded[0].lineno == line


@pytest.mark.django_db(transaction=True)
def test_off__nothing_reported() -> None:
    with forced_guard("off"), transaction.atomic(), warnings.catch_warnings():
        warnings.simplefilter("error")
        plain_read_item.delay("guard-off")


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction__not_reported() -> None:
    plain_read_item.delay("guard-outside")


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("broker")
def test_aftercommit_task_and_opt_out_inside_atomic__not_reported() -> None:
    from aftercommit.relay import Relay
    from tests.celery_app import app

    with transaction.atomic():
        read_item.delay("guard-ours")  # recorded, sent by the relay after commit
        read_now.delay("guard-now")  # after_commit=False: an explicit choice
        with transaction.atomic():  # the relay's own publish, even with a transaction open
            relay = Relay(app, aliases=["default"])
            try:
                relay.run_batch("default")
            finally:
                relay.close()


@pytest.mark.django_db(transaction=True)
def test_exempt_block__not_reported() -> None:
    with transaction.atomic(), guard.exempt():
        plain_read_item.delay("guard-exempt")


@pytest.mark.django_db
def test_testcase_atomic__ignored_but_one_opened_by_the_code_is_caught() -> None:
    plain_read_item.delay("guard-testcase")  # only TestCase's own atomic is open
    with pytest.raises(UnsafeDispatchError), transaction.atomic():
        plain_read_item.delay("guard-testcase-inner")


def test_explicit_setting_wins_over_the_plugin_default(settings) -> None:  # type: ignore[no-untyped-def]
    assert guard.session_default == "raise"
    assert guard.mode() == "raise"
    settings.AFTERCOMMIT = {**settings.AFTERCOMMIT, "GUARD": "off"}
    assert guard.mode() == "off"
    with forced_guard("warn"):
        assert guard.mode() == "warn"


def test_default_setting_is_warn(settings, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(guard, "session_default", None)
    settings.AFTERCOMMIT = {k: v for k, v in settings.AFTERCOMMIT.items() if k != "GUARD"}
    assert guard.mode() == "warn"


# Code run as __main__ or exec'd by Django's shell --------------------------------------------

ROOT = Path(__file__).resolve().parent.parent
# The same lines in every way of running them; the publish is on line 6.
MAIN_SOURCE = """import django
django.setup()
from django.db import transaction
from tests.testapp.tasks import plain_read_item
with transaction.atomic():
    plain_read_item.delay("guard-main")
print("published")
"""
MAIN_LINE = 6
MANAGE_PY = """import sys

if __name__ == "__main__":
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""


@pytest.mark.parametrize(
    "way",
    [
        "python -c",
        "python - < file",
        "python -m module",
        "python -m django shell -c",
        "manage.py shell -c",
    ],
)
def test_warn_mode_outside_a_module__warns_at_the_users_line_and_publishes(
    way: str, tmp_path: Path
) -> None:
    """warn_explicit(module_globals=__main__'s) raised ImportError from __main__'s loader (python
    -c, -, -m), and under manage.py shell -c the warning named manage.py's line."""
    (tmp_path / "guard_main.py").write_text(MAIN_SOURCE)
    (tmp_path / "manage.py").write_text(MANAGE_PY)
    where, argv, stdin = {
        "python -c": ("<string>", ["-c", MAIN_SOURCE], None),
        "python - < file": ("<stdin>", ["-"], MAIN_SOURCE),
        "python -m module": (str(tmp_path / "guard_main.py"), ["-m", "guard_main"], None),
        "python -m django shell -c": (
            "<string>",
            ["-m", "django", "shell", "-c", MAIN_SOURCE],
            None,
        ),
        "manage.py shell -c": ("<string>", ["manage.py", "shell", "-c", MAIN_SOURCE], None),
    }[way]
    # The default test setup (SQLite, the filesystem broker) in a directory of its own: this
    # publish is plain Celery's and goes straight to the broker.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AFTERCOMMIT_TEST_", "DATABASE_URL", "BROKER_URL", "PYTHONWARNINGS"))
    }
    env.update(
        DJANGO_SETTINGS_MODULE="tests.settings",
        AFTERCOMMIT_TEST_STATE=str(tmp_path),
        AFTERCOMMIT_TEST_SETTINGS='{"GUARD": "warn"}',
        PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]),
    )
    done = subprocess.run(
        [sys.executable, *argv],
        cwd=tmp_path,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "ImportError" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert f"{where}:{MAIN_LINE}: UnsafeDispatchWarning: " in done.stderr, done.stderr
    assert f"plain Celery at {where}:{MAIN_LINE} " in done.stderr
    assert "published" in done.stdout
    assert list((tmp_path / "aftercommit-tests" / "broker").iterdir())  # the message was sent


@pytest.mark.django_db(transaction=True)
def test_warn_mode__a_failing_warning_display_is_logged_not_raised(caplog) -> None:  # type: ignore[no-untyped-def]
    def broken_display(*args: object, **kwargs: object) -> None:
        raise RuntimeError("the display failed")

    with forced_guard("warn"), warnings.catch_warnings(), transaction.atomic():
        warnings.simplefilter("always")
        warnings.showwarning = broken_display
        plain_read_item.delay("guard-broken-display")
    assert "published by plain Celery" in caplog.text
    assert "the display failed" in caplog.text


def _line() -> int:
    import sys

    return sys._getframe(1).f_lineno


def test_relay_publishes_past_the_guard_only__another_wrapper_stays() -> None:
    """The relay's publishes are exempt, so it calls Celery's sender without the guard's
    wrapper; a wrapper someone put around the guard's (a tracer's) is still called."""
    import functools

    from aftercommit import guard as guard_module
    from tests.celery_app import app

    amqp = app.amqp
    guarded = amqp.send_task_message
    assert guard_module.unguarded(amqp) is amqp._aftercommit_guard[1]
    assert guard_module.unguarded(amqp) is not guarded

    @functools.wraps(guarded)  # copies the guard wrapper's attributes: identity decides
    def tracer(*args, **kwargs):  # type: ignore[no-untyped-def]
        return guarded(*args, **kwargs)

    amqp.send_task_message = tracer
    try:
        assert guard_module.unguarded(amqp) is tracer
    finally:
        amqp.send_task_message = guarded
