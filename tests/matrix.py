"""Run the test suite once per setup (database + broker), the way ``make test`` does.

Setups whose servers are not reachable are skipped with the reason printed, or fail the run when
REQUIRE_SERVICES=1. With DATABASE_URL or BROKER_URL set, only that one setup runs.
Extra arguments go to pytest: ``python tests/matrix.py -k race``.

The setups, the example project's tests and the benchmarks' short form run AFTERCOMMIT_JOBS (2)
at a time, the longest first, each writing to its own .artifacts/<part>/output.log, printed whole
when it ends; one setup, AFTERCOMMIT_JOBS=1 or a debugger in the arguments streams instead.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent

SETUPS = {
    "sqlite+filesystem": ("", ""),
    "postgresql+redis": ("postgres://postgres@127.0.0.1:5432/test", "redis://127.0.0.1:6379/0"),
    "postgresql+rabbitmq": (
        # A database of its own (pytest-django makes test_test_rabbitmq): it runs beside the other.
        "postgres://postgres@127.0.0.1:5432/test_rabbitmq",
        "amqp://guest:guest@127.0.0.1:5672//",
    ),
    "mariadb+redis": ("mysql://root@127.0.0.1:3306/test", "redis://127.0.0.1:6379/1"),
}
# AFTERCOMMIT_SETUPS=all, or a comma-separated list of names, picks others.
DEFAULT_SETUPS = ("sqlite+filesystem", "postgresql+redis", "postgresql+rabbitmq", "mariadb+redis")
# How long each part took in a CI run, one at a time (2 cores): the runner starts the longest first.
TYPICAL_SECONDS = {
    "postgresql+rabbitmq": 565,
    "postgresql+redis": 424,
    "mariadb+redis": 261,
    "sqlite+filesystem": 218,
    "benchmarks --quick": 150,
    "example": 60,
}
DEFAULT_PORTS = {"postgres": 5432, "mysql": 3306, "redis": 6379, "amqp": 5672}


def unreachable(*urls: str) -> str | None:
    for url in urls:
        if not url:
            continue
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS and not parts.port:
            continue  # a file, not a server: sqlite://, filesystem://
        port = parts.port or DEFAULT_PORTS.get(parts.scheme, 0)
        try:
            socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=2).close()
        except OSError as exc:
            return f"{parts.scheme}://{parts.hostname}:{port} is not reachable ({exc})"
    return None


# pytest's exit codes: 0 all passed, 1 some failed, 5 nothing collected; anything else (2
# interrupted, 3 internal error, 4 usage error) means the run itself broke.
PYTEST_RAN = (0, 1, 5)


def counts(junit: Path, code: int) -> dict[str, int]:
    """What one pytest run did, read from its JUnit XML report and its exit code."""
    found = {"passed": 0, "failed": 0, "skipped": 0}
    try:
        suites = ElementTree.parse(junit).getroot().iter("testsuite")
    except (OSError, ElementTree.ParseError):
        suites = iter(())
    for suite in suites:
        tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
        failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        found["failed"] += failed
        found["skipped"] += skipped
        found["passed"] += tests - failed - skipped
    # A run that broke, or that failed without a report saying so, counts as one failure.
    if code not in PYTEST_RAN or (code == 1 and not found["failed"]):
        found["failed"] += 1
    return found


@dataclass
class Output:
    code: int
    text: str


# The commands the jobs are running, so that Ctrl-C (or a SIGINT to this runner alone) reaches them.
_running: set[subprocess.Popen[Any]] = set()
_running_lock = threading.Lock()


@contextlib.contextmanager
def _tracked(proc: subprocess.Popen[Any]) -> Iterator[subprocess.Popen[Any]]:
    with _running_lock:
        _running.add(proc)
    try:
        yield proc
    finally:
        with _running_lock:
            _running.discard(proc)


def run(argv: list[str], env: dict[str, str], log: Path | None = None) -> Output:
    """Run a command, streaming its output, or writing it to ``log`` when jobs run side by side
    (then with no terminal input: two jobs must not both wait on it)."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            proc = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            with _tracked(proc):
                code = proc.wait()
        return Output(code, log.read_text(errors="replace"))
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = []
    with _tracked(proc):
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
        return Output(proc.wait(), "".join(lines))


def pytest(argv: list[str], env: dict[str, str], artifacts: Path, alone: bool) -> dict[str, int]:
    """One pytest session; returns its counts."""
    artifacts.mkdir(parents=True, exist_ok=True)
    junit = artifacts / "junit.xml"
    junit.unlink(missing_ok=True)  # a stale report must not stand in for a run that broke
    log = None if alone else artifacts / "output.log"
    output = run([sys.executable, "-m", "pytest", f"--junitxml={junit}", *argv], env, log)
    return counts(junit, output.code)


@dataclass
class Job:
    """One part of the run: a setup's pytest session, the example's, or the benchmarks' short
    form."""

    name: str
    work: Callable[[bool], dict[str, int]]  # (alone) -> its counts
    artifacts: Path  # its output.log is there when it runs beside others
    note: str = ""  # added to its summary line


@dataclass
class Done:
    found: dict[str, int]
    took: float
    error: str = ""  # this runner's own failure, if the job could not even run


def jobs_wanted() -> int:
    """How many parts run at once (AFTERCOMMIT_JOBS; default 2). Each setup has its own databases,
    Redis db or broker folder, queues and state, and its tests mostly wait on worker and relay
    processes, so on 2 cores two at a time take about half the time; 1 runs them one after
    another, streaming their output."""
    raw = os.environ.get("AFTERCOMMIT_JOBS", "2")
    try:
        wanted = int(raw)
    except ValueError:
        sys.exit(f"AFTERCOMMIT_JOBS={raw!r} is not a number: set it to how many setups run at once")
    if wanted < 1:
        sys.exit(f"AFTERCOMMIT_JOBS={raw!r}: set it to 1 or more (1 runs setups one at a time)")
    return wanted


# pytest options that talk to the terminal: a run with one of them streams, one job at a time.
INTERACTIVE = ("--pdb", "--trace", "-s", "--capture=no")
# While jobs run side by side, a line every this many seconds says which are still running.
HEARTBEAT = 300.0


def run_jobs(jobs: list[Job], parallel: int) -> tuple[dict[str, Done], bool]:
    """Run the jobs, ``parallel`` at a time, in the order given; what each did, and whether the
    run was interrupted (Ctrl-C). Side by side, each job writes to its own log, printed whole when
    it ends, so one setup's output never interleaves another's."""
    alone = parallel == 1 or len(jobs) == 1
    done: dict[str, Done] = {}
    started: dict[str, float] = {}
    print_lock = threading.Lock()

    def say(text: str) -> None:
        with print_lock:
            print(text, end="", flush=True)

    def one(job: Job) -> None:
        started[job.name] = time.monotonic()
        say(f"\n=== {job.name}\n" if alone else f"=== {job.name}: started\n")
        try:
            done[job.name] = Done(job.work(alone), time.monotonic() - started[job.name])
        except BaseException as exc:  # a bug of this runner must still end in a summary line
            took = time.monotonic() - started[job.name]
            done[job.name] = Done({"passed": 0, "failed": 1, "skipped": 0}, took, repr(exc))
        if not alone:
            log = job.artifacts / "output.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            say(f"\n=== {job.name} (ended after {done[job.name].took:.0f}s)\n{text}")

    pool = ThreadPoolExecutor(max_workers=parallel)
    futures = [pool.submit(one, job) for job in jobs]
    pending = set(futures)
    interrupted = False
    try:
        while pending:
            _, pending = wait(pending, timeout=HEARTBEAT)
            running = [
                f"{name} ({time.monotonic() - at:.0f}s)"
                for name, at in started.items()
                if name not in done
            ]
            if pending and running and not alone:
                say(f"=== still running: {', '.join(running)}\n")
    except KeyboardInterrupt:
        interrupted = True
        pool.shutdown(wait=False, cancel_futures=True)  # nothing new starts
        say("\n=== interrupted: stopping the running jobs (their output follows)\n")
        with _running_lock:  # a terminal's Ctrl-C reached them already; a SIGINT to us did not
            for proc in _running:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
    pool.shutdown(wait=True)
    return done, interrupted


def main(argv: list[str]) -> int:
    require = os.environ.get("REQUIRE_SERVICES") == "1"
    wanted = os.environ.get("AFTERCOMMIT_SETUPS", "")
    names = list(SETUPS) if wanted == "all" else wanted.split(",") if wanted else DEFAULT_SETUPS
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        print(f"unknown setup(s) {', '.join(unknown)}; known: {', '.join(SETUPS)}")
        return 2
    parallel = jobs_wanted()
    chosen = {name: SETUPS[name] for name in names}
    if os.environ.get("DATABASE_URL") or os.environ.get("BROKER_URL"):
        # Named, so its artifacts and SQLite state stay apart from other runs (noxfile.py).
        custom = os.environ.get("AFTERCOMMIT_SETUP_NAME", "custom")
        chosen = {custom: (os.environ.get("DATABASE_URL", ""), os.environ.get("BROKER_URL", ""))}
    if len(chosen) == 1 or any(a in INTERACTIVE or a.startswith("--pdbcls") for a in argv):
        parallel = 1  # one setup (the example after it), or a debugger: streamed, as it runs

    totals = {"passed": 0, "failed": 0, "skipped": 0}
    results: dict[str, dict[str, int]] = {}
    summary: dict[str, str] = {}  # in the order the parts are named here
    jobs: list[Job] = []

    def setup_job(name: str, database_url: str, broker_url: str) -> Job:
        env = dict(os.environ, DATABASE_URL=database_url, BROKER_URL=broker_url)
        env["AFTERCOMMIT_ARTIFACTS"] = str(ROOT / ".artifacts" / name)
        env["AFTERCOMMIT_TEST_STATE"] = str(ROOT / ".artifacts" / name / "state")

        def work(alone: bool) -> dict[str, int]:
            return pytest(argv, env, ROOT / ".artifacts" / name, alone)

        return Job(name, work, ROOT / ".artifacts" / name)

    for name, (database_url, broker_url) in chosen.items():
        problem = unreachable(database_url, broker_url)
        if problem:
            if require:
                summary[name] = f"{name}: FAILED, REQUIRE_SERVICES=1 and {problem}"
                totals["failed"] += 1
            else:
                summary[name] = f"{name}: skipped, {problem}"
            print(f"\n=== {name}: skipped: {problem}", flush=True)
            continue
        summary[name] = ""
        jobs.append(setup_job(name, database_url, broker_url))

    # The example project (the demo, its propagation and its browser test) has its own settings,
    # so it runs as one more pytest session, on its embedded defaults.
    if not os.environ.get("AFTERCOMMIT_SKIP_EXAMPLE"):
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
        env["AFTERCOMMIT_ARTIFACTS"] = str(ROOT / ".artifacts" / "example")

        def example(alone: bool) -> dict[str, int]:
            argv = ["example/tests", "-c", "example/pytest.ini"]
            return pytest(argv, env, ROOT / ".artifacts" / "example", alone)

        summary["example"] = ""
        jobs.append(Job("example", example, ROOT / ".artifacts" / "example"))

    # The benchmarks' short form: every benchmark runs on a few hundred messages, so a change that
    # breaks one shows here; the figures come from `make bench`. Its database, Redis db and queue
    # are its own (benchmarks/common.py), so it runs beside the setups.
    bench_name = "benchmarks --quick"
    if not os.environ.get("AFTERCOMMIT_SKIP_BENCH") and not argv and chosen.keys() <= SETUPS.keys():
        database_url, redis_url = SETUPS["postgresql+redis"]
        problem = unreachable(
            database_url, redis_url, SETUPS["postgresql+rabbitmq"][1], SETUPS["mariadb+redis"][0]
        )
        if problem:
            verdict = "FAILED, REQUIRE_SERVICES=1 and" if require else "skipped,"
            summary[bench_name] = f"{bench_name}: {verdict} {problem}"
            totals["failed" if require else "skipped"] += 1
        else:
            out = ROOT / ".artifacts" / "bench"
            report = out / "REPORT.md"
            env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}

            def bench(alone: bool) -> dict[str, int]:
                make = ["make", "--no-print-directory", "bench", "BENCH_ARGS=--quick"]
                log = None if alone else out / "output.log"
                output = run([*make, f"BENCH_OUT={out}", f"BENCH_REPORT={report}"], env, log)
                ok = output.code == 0
                return {"passed": int(ok), "failed": int(not ok), "skipped": 0}

            summary[bench_name] = ""
            jobs.append(Job(bench_name, bench, out, note=f", report in {report}"))

    # Longest first, so that the last ones to start are short ones.
    jobs.sort(key=lambda job: -TYPICAL_SECONDS.get(job.name, 0))
    done, interrupted = run_jobs(jobs, parallel)
    for job in jobs:
        if job.name not in done:
            summary[job.name] = f"{job.name}: not run (interrupted)"
            continue
        result = done[job.name]
        found = results[job.name] = result.found
        for key in totals:
            totals[key] += found.get(key, 0)
        took = f"in {result.took:.0f}s"
        if result.error:
            summary[job.name] = f"{job.name}: FAILED, the runner broke {took}: {result.error}"
        elif job.name == bench_name:
            verdict = "passed" if not found["failed"] else "FAILED"
            summary[job.name] = f"{job.name}: {verdict} {took}{job.note}"
        else:
            summary[job.name] = (
                f"{job.name}: {found.get('passed', 0)} passed, {found.get('failed', 0)} failed, "
                f"{found.get('skipped', 0)} skipped {took}{job.note}"
            )

    # For the version matrix (noxfile.py): what ran, per setup.
    result_file = os.environ.get("AFTERCOMMIT_MATRIX_RESULT")
    if result_file:
        Path(result_file).parent.mkdir(parents=True, exist_ok=True)
        Path(result_file).write_text(json.dumps({"totals": totals, "setups": results}, indent=2))

    print("\n=== summary")
    for line in summary.values():
        print(line)
    print(
        f"aftercommit: {totals['passed']} passed, {totals['failed']} failed, "
        f"{totals['skipped']} skipped" + (", interrupted" if interrupted else "")
    )
    if interrupted:
        return 130
    return 1 if totals["failed"] or not totals["passed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
