"""Celery's own integration suite, twice: plain Celery, then aftercommit's task class (issue 15).

    python tests/celery_suite.py                 # the whole suite (make celery-suite)
    python tests/celery_suite.py --ci            # the representative subset (make celery-suite-ci)
    python tests/celery_suite.py --celery 5.4.0  # in a venv of its own with that Celery
    python tests/celery_suite.py t/integration/test_tasks.py -k retry   # pick tests

It fetches the sdist of the Celery in use (``pip download``, cached under .artifacts/), extracts its
``t/`` and runs ``t/integration`` with a real worker (the suite's own in-process one) on Redis:

1. plain Celery;
2. the apps' task class set to aftercommit's (tests/celery_suite_support/), Django configured
   (the outbox on PostgreSQL, database ``cs``, created and migrated here) and aftercommit
   sending: whatever sends in the process that dispatched, plus ``python -m django aftercommit
   relay`` as a subprocess (two senders are safe: claims are exclusive).

Each test file runs in a pytest process of its own, as a file can leave its process unfit for the
next one (a worker thread a timeout cut short, a session worker that then never starts). Both runs
write JUnit XML per file under .artifacts/celery-suite/<version>/ (``run/`` for the whole suite,
``pick/`` for chosen tests, ``ci/``); the report compares them: the counts per file and in all, each
file's wall time, and the tests that pass only on plain Celery, with their failure summaries
grouped by cause. Tests listed in INHERENT are reported apart, with the reason, and not counted as
failures. Each test gets --timeout seconds at most (the suite's own longer marks included) and
no reruns, so a test that hangs with one task class costs bounded time and a failure shows once;
a file's process still running after --file-timeout is interrupted, keeping what finished.
The default, 300 (the suite's own mark), lets the tests that need minutes by design finish
(test_disabling_flag_allow_error_cb_on_chord_header waits 30 s for each of 7 chords, the fixture
leak test starts 20 workers); the CI subset has none of those and caps at 45.
The files in LEFT_OUT are not run; within the others the suite skips by itself what needs
RabbitMQ, memcached or another backend.

The whole suite (16 files, 398 tests on Celery 5.7) takes about 25 minutes each way on a busy
2-core machine; the CI subset about 5 minutes in all.

Services: CELERY_SUITE_BROKER (redis://127.0.0.1:6379/13), CELERY_SUITE_BACKEND
(redis://127.0.0.1:6379/14), CELERY_SUITE_DATABASE_URL (postgres://postgres@127.0.0.1:5432/cs).
Both Redis dbs are emptied (FLUSHDB) before each run: use dbs of your own.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
# Our side of the run: the plugin, the settings, the relay's app. Not under the `tests` package,
# whose __init__ creates the test project's Celery app (it would become the current app).
SUPPORT = ROOT / "tests" / "celery_suite_support"
ARTIFACTS = ROOT / ".artifacts"
SDISTS = ARTIFACTS / "celery-sdist"

BROKER = os.environ.get("CELERY_SUITE_BROKER", "redis://127.0.0.1:6379/13")
BACKEND = os.environ.get("CELERY_SUITE_BACKEND", "redis://127.0.0.1:6379/14")
DATABASE_URL = os.environ.get("CELERY_SUITE_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/cs")
SETTINGS = "aftercommit_suite_settings"

# Files of t/integration left out of the whole run, and why. The suite's own conditions skip the
# tests that need another broker or backend (RabbitMQ, memcached, Azure, quorum queues) by
# themselves; these files never reach the task class under test (each makes a Celery app of its
# own, with Celery's Task), so they would only measure Celery twice.
LEFT_OUT = {
    "test_mem_leak_in_exception_handling.py": "its own Celery app (Celery's Task, eager, "
    "memory:// broker) measuring memory: no call through the task class",
    "test_events_state_memory_leak.py": "its own Celery app on memory://, events only: no task "
    "call",
    "test_database_backend.py": "the SQLAlchemy result backend alone, no task call (and SQLAlchemy "
    "is not installed)",
    "test_backend.py": "Azure Blob Storage only (AZUREBLOCKBLOB_URL); it imports the azure package "
    "before its importorskip, so without it the file fails to collect",
}

# Tests not run, and why (older suites run them; newer ones skip them themselves).
DESELECTED = {
    "t/integration/test_tasks.py::test_tasks::test_multiprocess_producer": "forks a pool of 20 "
    "from the test process (Celery skips it as broken since 5.5); the forks share the parent's "
    "Django connection, which breaks the rest of the aftercommit run of the file",
    "t/integration/test_tasks.py::test_tasks::test_multithread_producer": "skipped as broken by "
    "Celery since 5.5",
    "t/integration/test_tasks.py::test_tasks::test_revoked_by_headers_complex_canvas": "deadlocks "
    "on Celery 5.4 with redis-py 5, plain Celery too: building the chord, a result's __del__ "
    "(garbage collection inside PubSub.subscribe) calls PubSub.unsubscribe, which waits forever on "
    "the lock the subscribe holds (seen in both runs, py-spy); on Celery 5.7 it fails both ways",
}

# The representative subset (make celery-suite-ci): every failure class of issue 15 (replace(),
# re-applying a frozen signature, stamping / stamped_headers, app_id / throw, pydantic,
# ignore_result, result-channel subscription) plus chains, groups, chords,
# countdown/eta/expires, retries and links.
CI_TESTS = [
    # replace(): in a chain, a group, a chord header, nested
    "t/integration/test_canvas.py::test_chain::test_chain_replaced_with_a_chain_and_a_callback",
    "t/integration/test_canvas.py::test_group::test_group_child_replaced_with_chain_first",
    "t/integration/test_canvas.py::test_chord::test_chord_header_task_replaced_with_chain",
    "t/integration/test_tasks.py::test_task_replacement::test_replaced_task_nesting_level_1",
    # re-applying a frozen signature
    "t/integration/test_canvas.py::test_chord::test_reapplying_frozen_chord_dispatches_body_again",
    # stamping, stamped_headers (revoke by stamped headers)
    "t/integration/test_tasks.py::test_tasks::test_revoked_by_headers_simple_canvas",
    "t/integration/test_canvas.py::test_stamping_mechanism::test_stamping_workflow",
    # app_id; throw (an eager chain inside a task)
    "t/integration/test_tasks.py::test_tasks::test_properties",
    "t/integration/test_canvas.py::test_chain::test_eager_chain_inside_task",
    # pydantic
    "t/integration/test_tasks.py::test_tasks::test_pydantic_model_arguments",
    # ignore_result: result.ignored
    "t/integration/test_tasks.py::test_tasks::test_ignore_result",
    "t/integration/test_tasks.py::test_task_redis_result_backend::test_ignoring_result_no_subscriptions",
    # the result channel subscribed at the call
    "t/integration/test_tasks.py::test_task_redis_result_backend::test_asyncresult_forget_cancels_subscription",
    "t/integration/test_tasks.py::test_task_redis_result_backend::test_asyncresult_get_cancels_subscription",
    # chains, groups, chords
    "t/integration/test_canvas.py::test_chain::test_simple_chain",
    "t/integration/test_canvas.py::test_chain::test_chain_on_error",
    "t/integration/test_canvas.py::test_group::test_parent_ids",
    "t/integration/test_canvas.py::test_chord::test_parent_ids",
    # countdown / eta / expires
    "t/integration/test_tasks.py::test_tasks::test_eta",
    "t/integration/test_tasks.py::test_tasks::test_expired",
    "t/integration/test_canvas.py::test_chord::test_group_or_task_countdown_delays_header",
    # retries
    "t/integration/test_tasks.py::test_tasks::test_retry",
    "t/integration/test_tasks.py::test_tasks::test_task_retried_once",
    # links
    "t/integration/test_canvas.py::test_link_error::test_link_error_callback_retries",
    "t/integration/test_canvas.py::test_chord::test_link_option_runs_after_the_body",
]

# Celery tests whose difference under aftercommit is inherent to sending after commit: test id
# (classname::name as in the JUnit XML) -> the reason, the same as in the README. Reported apart,
# not as failures. The goal is none. Each of these connects a before_task_publish receiver in the
# test process and asserts, right after apply_async() returns, what it saw; the message is
# published later by the relay, which fires the signal in its own process (the relay thread in the
# test process's worker, when it wins the claim, fires it there, but after apply_async returned).
_PUBLISH_SIGNAL_IN_CALLER = (
    "reads before_task_publish in the calling process during apply_async(); aftercommit "
    "publishes after the commit, in the relay (a worker's relay thread or `manage.py aftercommit "
    "relay`), which fires the signal there and then (README: What you can count on)"
)
INHERENT: dict[str, str] = {
    f"t.integration.{test}": _PUBLISH_SIGNAL_IN_CALLER
    for test in (
        "test_tasks.test_signal_bound_method_receivers::test_each_instance_receives",
        "test_tasks.test_signal_bound_method_receivers::"
        "test_disconnect_leaves_other_instance_connected",
        "test_tasks.test_signal_bound_method_receivers::"
        "test_other_instance_receives_after_garbage_collection",
        "test_canvas.test_stamping_mechanism::test_stamp_value_type_defined_by_visitor",
        "test_canvas.test_stamping_mechanism::test_properties_not_affected_from_stamping",
        "test_group_chains.test_group_chains::test_large_group_pipeline",
    )
}

# Failure text -> cause, to group what fails only with aftercommit (first match wins).
CAUSES = [
    ("task id already in the outbox (replace(), a re-applied frozen signature)", r"already the id"),
    ("an option aftercommit rejects as unknown", r"unknown option"),
    ("pydantic arguments", r"pydantic|BaseModel"),
    ("result.ignored not set (get() waits forever)", r"result\.ignored|ignore_result=True"),
    ("result channel not subscribed at the call", r"PUBSUB|get_active_redis_channels"),
]
# ... and when none of those shows in the whole failure, the summary line:
TIMED_OUT = "timed out (a result never stored, or a task never sent)"


@dataclass
class Run:
    name: str
    folder: Path  # one JUnit XML per test file, and seconds.json
    seconds: dict[str, float] = field(default_factory=dict)  # test file -> wall seconds
    files: dict[str, str] = field(default_factory=dict)  # test id -> its test file
    outcomes: dict[str, str] = field(default_factory=dict)  # test id -> passed/failed/skipped
    messages: dict[str, str] = field(default_factory=dict)  # test id -> failure summary
    details: dict[str, str] = field(default_factory=dict)  # test id -> the whole failure
    cut: list[str] = field(default_factory=list)  # test files interrupted at --file-timeout


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--celery", help="Celery version to run (default: the installed one)")
    parser.add_argument("--ci", action="store_true", help="the representative subset only")
    parser.add_argument("--only", choices=("plain", "aftercommit"), help="one of the two runs")
    parser.add_argument("--timeout", type=int, help="seconds a test may take (300; --ci: 45)")
    parser.add_argument(
        "--file-timeout",
        type=int,
        help="seconds a test file's pytest process may take in all (2400; --ci: 600): a process "
        "that hangs past its tests' own timeouts is interrupted, keeping what finished",
    )
    parser.add_argument(
        "--report", action="store_true", help="only compare the JUnit XML of the last runs"
    )
    parser.add_argument(
        "--no-flush",
        action="store_true",
        help="leave the Redis dbs as they are (another run uses them, with broker and backend "
        "swapped)",
    )
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    parser.add_argument("tests", nargs="*", help="test files or ids under t/integration/")
    args = parser.parse_args(argv)

    installed = importlib.metadata.version("celery")
    version = args.celery or installed
    if version != installed:
        return in_own_venv(version, argv)

    # The whole suite's results stay apart from a re-run of some tests ("pick").
    kind = "ci" if args.ci else "pick" if args.tests or args.keyword else "run"
    out = ARTIFACTS / "celery-suite" / version / kind
    if args.report:
        runs = [Run(mode, out / mode) for mode in ("plain", "aftercommit")]
        for run in runs:
            read_junit(run)
        return report(runs, version)
    if args.timeout is None:
        args.timeout = 45 if args.ci else 300
    if args.file_timeout is None:
        args.file_timeout = 600 if args.ci else 2400
    suite = extract_suite(version)
    check_services()
    prepare_database()
    if args.ci:
        tests = collectable(CI_TESTS, suite)
    elif args.tests:
        tests = args.tests
    else:
        tests = [
            f"t/integration/{p.name}"
            for p in sorted((suite / "t" / "integration").glob("test_*.py"))
            if p.name not in LEFT_OUT
        ]
        for name, reason in LEFT_OUT.items():
            print(f"left out: t/integration/{name}: {reason}")
    for test, reason in DESELECTED.items():
        print(f"not run: {test}: {reason}")
    out.mkdir(parents=True, exist_ok=True)

    runs = []
    for mode in ("plain", "aftercommit"):
        if args.only and args.only != mode:
            continue
        run = Run(mode, out / mode)
        run_pytest(run, suite, tests, args, out)
        read_junit(run)
        runs.append(run)
    return report(runs, version)


# Celery of another version ------------------------------------------------------------------------


def in_own_venv(version: str, argv: list[str]) -> int:
    """Run this script again in a venv with that Celery."""
    return subprocess.call([str(venv_with(version)), __file__, *argv])


def venv_with(version: str) -> Path:
    """The python of .artifacts/celery-<version>/venv, made once with that Celery, a kombu and
    redis-py of its time, and aftercommit installed from this worktree (-e)."""
    venv = ARTIFACTS / f"celery-{version}" / "venv"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not stamp.exists():
        print(f"creating {venv} with Celery {version}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        major_minor = ".".join(version.split(".")[:2])
        subprocess.run(
            [
                str(python), "-m", "pip", "install", "-q",
                f"celery=={version}",
                f"kombu~={major_minor}.0",  # Celery 5.x goes with kombu 5.x of the same minor
                "redis>=5,<6" if major_minor in ("5.4", "5.5") else "redis>=5",
                "-e", f"{ROOT}[test,celery-suite]",
                "pytest-subtests",  # imported by the suites before Celery 5.6 (pytest 9 has it)
            ],
            check=True,
        )  # fmt: skip
        stamp.touch()
    return python


# The suite ---------------------------------------------------------------------------------------


def extract_suite(version: str) -> Path:
    """t/ (the integration suite and what it imports) and Celery's pytest configuration, from the
    sdist; the rest of the sdist stays out, so the installed Celery is the one imported."""
    sdist = SDISTS / f"celery-{version}.tar.gz"
    if not sdist.exists():
        SDISTS.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                "--no-binary", ":all:", f"celery=={version}", "-d", str(SDISTS),
            ],
            check=True,
        )  # fmt: skip
    suite = ARTIFACTS / "celery-suite" / version / "src"
    if not (suite / "t" / "integration" / "conftest.py").exists():
        shutil.rmtree(suite, ignore_errors=True)
        prefix = f"celery-{version}/"
        with tarfile.open(sdist) as tar:
            members = [
                m
                for m in tar.getmembers()
                if m.name.startswith((prefix + "t/", prefix + "pyproject.toml"))
                and not m.name.startswith((prefix + "t/unit/", prefix + "t/smoke/"))
            ]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(suite, members=members, filter="data")
    return suite


def check_services() -> None:
    import redis

    for url in (BROKER, BACKEND):
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        try:
            client.ping()
        except redis.RedisError as exc:
            raise SystemExit(
                f"Redis at {url} is not reachable ({exc}); start it or set "
                "CELERY_SUITE_BROKER / CELERY_SUITE_BACKEND"
            ) from exc
        finally:
            client.close()


def empty_redis() -> None:
    """Leftovers of the previous run (a countdown not due yet, results) must not reach this one."""
    import redis

    for url in (BROKER, BACKEND):
        client = redis.Redis.from_url(url)
        client.flushdb()
        client.close()


def prepare_database() -> None:
    """Create the outbox database if it is missing and migrate it (no pytest-django here)."""
    import psycopg

    parts = urlsplit(DATABASE_URL)
    name = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl()
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        raise SystemExit(
            f"PostgreSQL at {parts.hostname}:{parts.port} is not reachable ({exc}); start it or "
            "set CELERY_SUITE_DATABASE_URL"
        ) from exc
    django_command("migrate", "-v0")


def django_command(*argv: str) -> None:
    subprocess.run([sys.executable, "-m", "django", *argv], env=django_env(), cwd=ROOT, check=True)


def django_env() -> dict[str, str]:
    return dict(
        os.environ,
        DJANGO_SETTINGS_MODULE=SETTINGS,
        CELERY_SUITE_DATABASE_URL=DATABASE_URL,
        TEST_BROKER=BROKER,
        TEST_BACKEND=BACKEND,
        PYTHONPATH=os.pathsep.join([str(SUPPORT), os.environ.get("PYTHONPATH", "")]),
    )


def collectable(tests: list[str], suite: Path) -> list[str]:
    """The tests of the list this version of the suite has (an older one lacks some files and
    tests; pytest stops at an id it cannot find)."""
    files = sorted({t.split("::")[0] for t in tests if (suite / t.split("::")[0]).exists()})
    listing = subprocess.run(
        [*pytest_argv(), "--collect-only", "-q", *files],
        cwd=suite, env=pytest_env("plain", suite), capture_output=True, text=True,
    ).stdout  # fmt: skip
    collected = [line for line in listing.splitlines() if "::" in line and " " not in line]
    found = [
        t for t in tests if any(c == t or c.startswith((t + "[", t + "::")) for c in collected)
    ]
    for test in tests:
        if test not in found:
            print(f"not in Celery's suite of this version: {test}")
    return found


def pytest_argv() -> list[str]:
    return [
        sys.executable, "-m", "pytest",
        # Celery's fixtures (pytest-celery registers them upstream), then ours, which override.
        "-p", "celery.contrib.pytest", "-p", "aftercommit_suite_plugin",
        # Django is configured by the plugin and the database by this script; pytest-django
        # would block the database. Reruns would turn each failure into five.
        "-p", "no:django", "-p", "no:rerunfailures", "-p", "no:cacheprovider",
        # A file that cannot be imported is reported as an error, and the other files still run.
        "--continue-on-collection-errors",
    ]  # fmt: skip


def pytest_env(mode: str, suite: Path) -> dict[str, str]:
    env = dict(
        django_env() if mode == "aftercommit" else os.environ,
        CELERY_SUITE_MODE=mode,
        TEST_BROKER=BROKER,
        TEST_BACKEND=BACKEND,
        PYTHONPATH=os.pathsep.join([str(suite), str(SUPPORT), os.environ.get("PYTHONPATH", "")]),
        # Tests run the `celery` command: this interpreter's, also when its venv is not active.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    if mode == "plain":
        env.pop("DJANGO_SETTINGS_MODULE", None)  # Celery's Django fixup must stay out of it
    return env


def by_file(tests: list[str]) -> dict[str, list[str]]:
    """The test paths grouped by their file, in order."""
    files: dict[str, list[str]] = {}
    for test in tests:
        files.setdefault(test.split("::")[0], []).append(test)
    return files


def run_pytest(
    run: Run, suite: Path, tests: list[str], args: argparse.Namespace, out: Path
) -> None:
    """One pytest process per test file, as upstream's CI isolates nothing else: a file that
    leaves the process broken (a worker thread a timeout cut short, a stray current app) cannot
    fail the files after it, and each file's wall time is measured."""
    if not args.no_flush:
        empty_redis()
    shutil.rmtree(run.folder, ignore_errors=True)
    run.folder.mkdir(parents=True)
    env = pytest_env(run.name, suite)
    relay = None
    if run.name == "aftercommit":
        django_command("flush", "--noinput")  # an empty outbox
        log = open(out / "relay.log", "wb")  # noqa: SIM115 - closed below
        relay = subprocess.Popen(
            [sys.executable, "-m", "django", "aftercommit", "relay"],
            env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    files = by_file(tests)
    print(
        f"\n=== {run.name} Celery run: {len(tests)} test path(s) in {len(files)} file(s)",
        flush=True,
    )
    try:
        for path, selected in files.items():
            xml = run.folder / f"{Path(path).stem}.xml"
            argv = [
                *pytest_argv(),
                f"--timeout={args.timeout}", f"--junitxml={xml}",
                "-q", "-rN", "-o", "junit_family=xunit1", *selected,
            ]  # fmt: skip
            for test in DESELECTED:
                if test.startswith(path + "::"):
                    argv += ["--deselect", test]
            if args.keyword:
                argv += ["-k", args.keyword]
            print(f"\n--- {run.name}: {path}", flush=True)
            started = time.monotonic()
            try:
                if not run_file(argv, suite, env, args.file_timeout):
                    print(
                        f"--- {run.name}: {path} still running after {args.file_timeout}s "
                        "(hung past its tests' own timeouts): interrupted, what finished is kept",
                        flush=True,
                    )
                    run.cut.append(path)
                elif not xml.exists():  # killed from outside, or it died: nothing to count
                    print(f"--- {run.name}: {path} ended without a report", flush=True)
                    run.cut.append(path)
            finally:
                run.seconds[path] = time.monotonic() - started
                (run.folder / "seconds.json").write_text(json.dumps(run.seconds, indent=1))
                (run.folder / "cut.json").write_text(json.dumps(run.cut))
    finally:
        if relay is not None:
            relay.send_signal(signal.SIGTERM)
            try:
                relay.wait(30)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait()
            log.close()


def run_file(argv: list[str], suite: Path, env: dict[str, str], limit: float) -> bool:
    """One test file's pytest process; False when it was still running after ``limit`` seconds.

    A file can hang past every test's own timeout (a result listener deadlocked in redis-py's
    PubSub, celery/celery#10477, seen twice on plain Celery 5.4): the process group then gets
    SIGINT, on which pytest stops and still writes its JUnit XML of what ran, then SIGKILL. (A
    main thread blocked where Python cannot raise, as in that deadlock, misses the SIGINT: the
    file then has no report, and the report counts it as cut short.)"""
    proc = subprocess.Popen(
        argv, cwd=suite, env=env, start_new_session=True,
        # SIGINT as pytest expects it: a shell's background job (CI's) starts with it ignored,
        # and an ignored signal stays ignored in every child.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        proc.wait(limit)
        return True
    except subprocess.TimeoutExpired:
        _interrupt(proc)
        return False
    except KeyboardInterrupt:  # its own session does not get the terminal's Ctrl-C: pass it on
        _interrupt(proc)
        raise
    finally:  # whatever of its process group is left (a worker it forked)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _interrupt(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(60)


# The report --------------------------------------------------------------------------------------


def read_junit(run: Run) -> None:
    """Every file's JUnit XML of the run, and the files' wall times."""
    seconds = run.folder / "seconds.json"
    if seconds.exists():
        run.seconds = json.loads(seconds.read_text())
    cut = run.folder / "cut.json"
    if cut.exists():
        run.cut = json.loads(cut.read_text())
    for xml in sorted(run.folder.glob("*.xml")):
        read_junit_file(run, xml, f"t/integration/{xml.stem}.py")


def read_junit_file(run: Run, xml: Path, path: str) -> None:
    for case in ET.parse(xml).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        run.files[test_id] = path
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                text = child.get("message") or ""
                body = (child.text or "").strip().splitlines()
                run.messages[test_id] = text or (body[-1] if body else child.tag)
                run.details[test_id] = f"{text}\n{child.text or ''}"
                break
            if child.tag == "skipped":
                outcome = "skipped"
        # A test that fails and then errors in teardown appears twice; the failure counts.
        if run.outcomes.get(test_id) != "failed":
            run.outcomes[test_id] = outcome


def cause_of(summary: str, details: str) -> str:
    for cause, pattern in CAUSES:
        if re.search(pattern, details):
            return cause
    return TIMED_OUT if re.search(r"[Tt]ime(d )?out", summary) else "other"


def counts(run: Run, path: str | None = None) -> str:
    """passed/failed/skipped of the run (or of one file), and its wall time."""
    outcomes = [o for t, o in run.outcomes.items() if path is None or run.files[t] == path]
    seconds = sum(run.seconds.values()) if path is None else run.seconds.get(path, 0.0)
    return (
        f"{outcomes.count('passed')}/{outcomes.count('failed')}/{outcomes.count('skipped')} "
        f"of {len(outcomes)} in {seconds:.0f}s"
    )


def report(runs: list[Run], version: str) -> int:
    print(f"\n=== Celery {version} integration suite")
    files = sorted({path for run in runs for path in [*run.files.values(), *run.seconds]})
    width = max((len(path) for path in files), default=10)
    print(f"{'passed/failed/skipped':>{width}}  " + "  ".join(f"{run.name:<28}" for run in runs))
    for path in files:
        print(f"{path:<{width}}  " + "  ".join(f"{counts(run, path):<28}" for run in runs))
    print(f"{'total':<{width}}  " + "  ".join(f"{counts(run):<28}" for run in runs))
    for run in runs:
        for path in run.cut:
            print(
                f"{run.name}: {path} was cut short (hung or killed): unfinished tests not counted"
            )
    if len(runs) < 2:
        return 0 if all("failed" not in r.outcomes.values() and not r.cut for r in runs) else 1
    plain, ours = runs
    both = set(plain.outcomes) & set(ours.outcomes)
    print(
        f"finished in both runs: {len(both)}; plain Celery passed "
        f"{sum(plain.outcomes[t] == 'passed' for t in both)}, aftercommit passed "
        f"{sum(ours.outcomes[t] == 'passed' for t in both)}"
    )
    only_plain = sorted(
        t
        for t, outcome in plain.outcomes.items()
        if outcome == "passed" and ours.outcomes.get(t) != "passed"
    )
    inherent = [t for t in only_plain if t in INHERENT]
    failing = [t for t in only_plain if t not in INHERENT]
    if inherent:
        print(f"\ninherent to sending after commit ({len(inherent)}):")
        for test in inherent:
            print(f"  {test}: {INHERENT[test]}")
    if failing:
        print(f"\npass on plain Celery only ({len(failing)}):")
        by_cause: dict[str, list[str]] = {}
        for test in failing:
            message = ours.messages.get(test, f"not run ({ours.outcomes.get(test, 'missing')})")
            cause = cause_of(message, ours.details.get(test, message))
            by_cause.setdefault(cause, []).append(test)
        for cause, tests in sorted(by_cause.items(), key=lambda item: -len(item[1])):
            print(f"\n  {cause} ({len(tests)}):")
            for test in tests:
                message = ours.messages.get(test, f"not run ({ours.outcomes.get(test, 'missing')})")
                print(f"    {test}\n      {message.splitlines()[0][:300] if message else ''}")
    only_ours = sorted(
        t
        for t, outcome in ours.outcomes.items()
        if outcome == "passed" and plain.outcomes.get(t) == "failed"
    )
    if only_ours:
        print(f"\npass with aftercommit only (flaky on plain Celery?) ({len(only_ours)}):")
        for test in only_ours:
            print(f"  {test}")
    # A file that hung only with aftercommit may hide tests that would fail: not a pass.
    hung_ours = [path for path in ours.cut if path not in plain.cut]
    return 1 if failing or hung_ours else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
