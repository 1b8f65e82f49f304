"""Run the test suite once per setup (database + broker), the way ``make test`` does.

Setups whose servers are not reachable are skipped with the reason printed, or fail the run when
REQUIRE_SERVICES=1. With DATABASE_URL or BROKER_URL set, only that one setup runs.
Extra arguments go to pytest: ``python tests/matrix.py -k race``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
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


def run(argv: list[str], env: dict[str, str], log: Path | None = None) -> Output:
    """Run a command, streaming its output, or writing it to ``log`` when jobs run side by side."""
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("w") as out:
            code = subprocess.run(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        return Output(code.returncode, log.read_text(errors="replace"))
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = []
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
    work: Callable[[bool], tuple[dict[str, int], str]]  # (alone) -> (counts, summary detail)
    artifacts: Path  # its output.log is there when it runs beside others


def jobs_wanted() -> int:
    """How many parts run at once (AFTERCOMMIT_JOBS; default 2). Each setup has databases, Redis
    dbs and a vhost or folder of its own, and its tests mostly wait on worker and relay processes,
    so on 2 cores two at a time take about half the time; 1 runs them one after another."""
    raw = os.environ.get("AFTERCOMMIT_JOBS", "2")
    try:
        wanted = int(raw)
    except ValueError:
        sys.exit(f"AFTERCOMMIT_JOBS={raw!r} is not a number: set it to how many setups run at once")
    if wanted < 1:
        sys.exit(f"AFTERCOMMIT_JOBS={raw!r}: set it to 1 or more (1 runs setups one at a time)")
    return wanted


def run_jobs(jobs: list[Job], parallel: int) -> list[tuple[str, dict[str, int], str]]:
    """Run the jobs, ``parallel`` at a time, in the order given. Side by side, each job writes to
    its own log, printed whole when it ends, so one setup's output never interleaves another's."""
    alone = parallel == 1 or len(jobs) == 1
    done: dict[str, tuple[dict[str, int], str]] = {}

    def one(job: Job) -> None:
        if alone:
            print(f"\n=== {job.name}", flush=True)
        else:
            print(f"=== {job.name}: started", flush=True)
        started = time.monotonic()
        try:
            found, detail = job.work(alone)
        except Exception as exc:  # a bug of this runner must still end in a failed summary line
            found, detail = {"passed": 0, "failed": 1, "skipped": 0}, f"runner error {exc!r}"
        took = time.monotonic() - started
        done[job.name] = (found, detail.format(took=took))
        if not alone:
            log = job.artifacts / "output.log"
            text = log.read_text(errors="replace") if log.exists() else ""
            with print_lock:
                print(f"\n=== {job.name} (ended after {took:.0f}s)\n{text}", end="", flush=True)

    print_lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=parallel) as pool:
        for future in [pool.submit(one, job) for job in jobs]:
            future.result()
    return [(job.name, *done[job.name]) for job in jobs]


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

    totals = {"passed": 0, "failed": 0, "skipped": 0}
    results: dict[str, dict[str, int]] = {}
    summary: list[str] = []
    jobs: list[Job] = []

    def setup_job(name: str, database_url: str, broker_url: str) -> Job:
        env = dict(os.environ, DATABASE_URL=database_url, BROKER_URL=broker_url)
        env["AFTERCOMMIT_ARTIFACTS"] = str(ROOT / ".artifacts" / name)
        env["AFTERCOMMIT_TEST_STATE"] = str(ROOT / ".artifacts" / name / "state")

        def work(alone: bool) -> tuple[dict[str, int], str]:
            found = pytest(argv, env, ROOT / ".artifacts" / name, alone)
            return found, "in {took:.0f}s"

        return Job(name, work, ROOT / ".artifacts" / name)

    for name, (database_url, broker_url) in chosen.items():
        problem = unreachable(database_url, broker_url)
        if problem:
            if require:
                summary.append(f"{name}: FAILED, REQUIRE_SERVICES=1 and {problem}")
                totals["failed"] += 1
            else:
                summary.append(f"{name}: skipped, {problem}")
            print(f"\n=== {name}: skipped: {problem}", flush=True)
            continue
        jobs.append(setup_job(name, database_url, broker_url))

    # The example project (the demo, its propagation and its browser test) has its own settings,
    # so it runs as one more pytest session, on its embedded defaults.
    if not os.environ.get("AFTERCOMMIT_SKIP_EXAMPLE"):
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
        env["AFTERCOMMIT_ARTIFACTS"] = str(ROOT / ".artifacts" / "example")

        def example(alone: bool) -> tuple[dict[str, int], str]:
            argv = ["example/tests", "-c", "example/pytest.ini"]
            return pytest(argv, env, ROOT / ".artifacts" / "example", alone), "in {took:.0f}s"

        jobs.append(Job("example", example, ROOT / ".artifacts" / "example"))

    # The benchmarks' short form: every benchmark runs on a few hundred messages, so a change that
    # breaks one shows here; the figures come from `make bench`. Its database, Redis db and queue
    # are its own (benchmarks/common.py), so it runs beside the setups.
    if not os.environ.get("AFTERCOMMIT_SKIP_BENCH") and not argv and chosen.keys() <= SETUPS.keys():
        name = "benchmarks --quick"
        database_url, redis_url = SETUPS["postgresql+redis"]
        problem = unreachable(
            database_url, redis_url, SETUPS["postgresql+rabbitmq"][1], SETUPS["mariadb+redis"][0]
        )
        if problem:
            verdict = "FAILED, REQUIRE_SERVICES=1 and" if require else "skipped,"
            summary.append(f"{name}: {verdict} {problem}")
            totals["failed" if require else "skipped"] += 1
        else:
            out = ROOT / ".artifacts" / "bench"
            report = out / "REPORT.md"
            env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}

            def bench(alone: bool) -> tuple[dict[str, int], str]:
                make = ["make", "--no-print-directory", "bench", "BENCH_ARGS=--quick"]
                log = None if alone else out / "output.log"
                output = run([*make, f"BENCH_OUT={out}", f"BENCH_REPORT={report}"], env, log)
                ok = output.code == 0
                found = {"passed": int(ok), "failed": int(not ok), "skipped": 0}
                return found, (
                    "passed" if ok else "FAILED"
                ) + f" in {{took:.0f}}s, report in {report}"

            jobs.append(Job(name, bench, out))

    # Longest first, so that the last ones to start are short ones.
    jobs.sort(key=lambda job: -TYPICAL_SECONDS.get(job.name, 0))
    for name, found, detail in run_jobs(jobs, parallel):
        results[name] = found
        for key in totals:
            totals[key] += found.get(key, 0)
        if name == "benchmarks --quick":
            summary.append(f"{name}: {detail}")
        else:
            summary.append(
                f"{name}: {found.get('passed', 0)} passed, {found.get('failed', 0)} failed, "
                f"{found.get('skipped', 0)} skipped {detail}"
            )

    # For the version matrix (noxfile.py): what ran, per setup.
    result_file = os.environ.get("AFTERCOMMIT_MATRIX_RESULT")
    if result_file:
        Path(result_file).parent.mkdir(parents=True, exist_ok=True)
        Path(result_file).write_text(json.dumps({"totals": totals, "setups": results}, indent=2))

    print("\n=== summary")
    for line in summary:
        print(line)
    print(
        f"aftercommit: {totals['passed']} passed, {totals['failed']} failed, "
        f"{totals['skipped']} skipped"
    )
    return 1 if totals["failed"] or not totals["passed"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
