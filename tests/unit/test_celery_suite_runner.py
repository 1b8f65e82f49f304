"""The Celery-suite runner's limit on a test file's process (tests/celery_suite.py): a file that
hangs past its tests' own timeouts is interrupted, and what finished before is kept."""

from __future__ import annotations

import signal
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from tests import celery_suite

HANGS = """
import time

def test_finishes():
    pass

def test_hangs():
    time.sleep(120)  # as a listener deadlocked in redis-py's PubSub does, past any test timeout
"""


def _run(folder: Path, source: str, limit: float) -> tuple[bool, float, Path]:
    (folder / "test_file.py").write_text(source)
    xml = folder / "junit.xml"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    started = time.monotonic()
    finished = celery_suite.run_file([*argv, "test_file.py"], folder, {}, limit)
    return finished, time.monotonic() - started, xml


def test_a_hung_file_is_interrupted__what_finished_is_kept(tmp_path: Path) -> None:
    finished, took, xml = _run(tmp_path, HANGS, limit=15)
    assert not finished
    assert took < 50  # interrupted at the limit, not after the 120 s sleep
    cases = {case.get("name"): case for case in ET.parse(xml).getroot().iter("testcase")}
    assert "test_finishes" in cases
    assert not list(cases["test_finishes"])  # no failure, error or skip: it passed


def test_a_file_that_ends_in_time__is_left_alone(tmp_path: Path) -> None:
    finished, _, xml = _run(tmp_path, "def test_finishes():\n    pass\n", limit=60)
    assert finished
    assert [c.get("name") for c in ET.parse(xml).getroot().iter("testcase")] == ["test_finishes"]


def test_a_hung_file_is_interrupted__also_when_this_runner_ignores_sigint(tmp_path: Path) -> None:
    # CI starts the runner as a shell's background job, with SIGINT ignored, which every child
    # inherits: pytest would then ignore the interrupt and lose its report to the SIGKILL.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        finished, took, xml = _run(tmp_path, HANGS, limit=15)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not finished
    assert took < 50
    names = {case.get("name") for case in ET.parse(xml).getroot().iter("testcase")}
    assert "test_finishes" in names
