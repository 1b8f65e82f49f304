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
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent

SETUPS = {
    "sqlite+filesystem": ("", ""),
    "postgresql+redis": ("postgres://postgres@127.0.0.1:5432/test", "redis://127.0.0.1:6379/0"),
    "postgresql+rabbitmq": (
        "postgres://postgres@127.0.0.1:5432/test",
        "amqp://guest:guest@127.0.0.1:5672//",
    ),
    "mariadb+redis": ("mysql://root@127.0.0.1:3306/test", "redis://127.0.0.1:6379/1"),
}
# AFTERCOMMIT_SETUPS=all, or a comma-separated list of names, picks others.
DEFAULT_SETUPS = ("sqlite+filesystem", "postgresql+redis", "postgresql+rabbitmq", "mariadb+redis")
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


def run(argv: list[str], env: dict[str, str]) -> Output:
    """Run a command, streaming its output."""
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
    return Output(proc.wait(), "".join(lines))


def pytest(argv: list[str], env: dict[str, str], artifacts: Path) -> dict[str, int]:
    """One pytest session; returns its counts."""
    artifacts.mkdir(parents=True, exist_ok=True)
    junit = artifacts / "junit.xml"
    junit.unlink(missing_ok=True)  # a stale report must not stand in for a run that broke
    output = run([sys.executable, "-m", "pytest", f"--junitxml={junit}", *argv], env)
    return counts(junit, output.code)


def main(argv: list[str]) -> int:
    require = os.environ.get("REQUIRE_SERVICES") == "1"
    wanted = os.environ.get("AFTERCOMMIT_SETUPS", "")
    names = list(SETUPS) if wanted == "all" else wanted.split(",") if wanted else DEFAULT_SETUPS
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        print(f"unknown setup(s) {', '.join(unknown)}; known: {', '.join(SETUPS)}")
        return 2
    chosen = {name: SETUPS[name] for name in names}
    if os.environ.get("DATABASE_URL") or os.environ.get("BROKER_URL"):
        # Named, so its artifacts and SQLite state stay apart from other runs (noxfile.py).
        custom = os.environ.get("AFTERCOMMIT_SETUP_NAME", "custom")
        chosen = {custom: (os.environ.get("DATABASE_URL", ""), os.environ.get("BROKER_URL", ""))}

    totals = {"passed": 0, "failed": 0, "skipped": 0}
    results: dict[str, dict[str, int]] = {}
    summary: list[str] = []
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
        print(f"\n=== {name}", flush=True)
        env = dict(os.environ, DATABASE_URL=database_url, BROKER_URL=broker_url)
        env["AFTERCOMMIT_ARTIFACTS"] = str(ROOT / ".artifacts" / name)
        env["AFTERCOMMIT_TEST_STATE"] = str(ROOT / ".artifacts" / name / "state")
        started = time.monotonic()
        found = pytest(argv, env, ROOT / ".artifacts" / name)
        results[name] = found
        for key in totals:
            totals[key] += found.get(key, 0)
        summary.append(
            f"{name}: {found.get('passed', 0)} passed, {found.get('failed', 0)} failed, "
            f"{found.get('skipped', 0)} skipped in {time.monotonic() - started:.0f}s"
        )

    # The example project (the demo, its propagation and its browser test) has its own settings,
    # so it runs as one more pytest session, on its embedded defaults.
    if not os.environ.get("AFTERCOMMIT_SKIP_EXAMPLE"):
        print("\n=== example (sqlite+filesystem)", flush=True)
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
        env["AFTERCOMMIT_ARTIFACTS"] = str(ROOT / ".artifacts" / "example")
        started = time.monotonic()
        found = pytest(
            ["example/tests", "-c", "example/pytest.ini"], env, ROOT / ".artifacts" / "example"
        )
        results["example"] = found
        for key in totals:
            totals[key] += found.get(key, 0)
        summary.append(
            f"example: {found.get('passed', 0)} passed, {found.get('failed', 0)} failed, "
            f"{found.get('skipped', 0)} skipped in {time.monotonic() - started:.0f}s"
        )

    # The benchmarks' short form: every benchmark runs on a few hundred messages, so a change that
    # breaks one shows here; the figures come from `make bench`.
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
            print(f"\n=== {name}", flush=True)
            out = ROOT / ".artifacts" / "bench"
            report = out / "REPORT.md"
            env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
            started = time.monotonic()
            make = ["make", "--no-print-directory", "bench", "BENCH_ARGS=--quick"]
            output = run([*make, f"BENCH_OUT={out}", f"BENCH_REPORT={report}"], env)
            verdict = "passed" if output.code == 0 else "FAILED"
            totals["passed" if output.code == 0 else "failed"] += 1
            took = time.monotonic() - started
            summary.append(f"{name}: {verdict} in {took:.0f}s, report in {report}")
            results[name] = {"passed": int(output.code == 0), "failed": int(output.code != 0)}

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
