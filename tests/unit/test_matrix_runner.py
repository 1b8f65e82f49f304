"""The runner behind `make test` (tests/matrix.py): parts side by side, each one's output whole,
a summary whatever happens, and Ctrl-C stops the run instead of starting the rest."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import matrix


def _job(tmp: Path, name: str, code: str) -> matrix.Job:
    folder = tmp / name

    def work(alone: bool) -> dict[str, int]:
        log = None if alone else folder / "output.log"
        output = matrix.run([sys.executable, "-c", code], dict(os.environ), log)
        ok = output.code == 0
        return {"passed": int(ok), "failed": int(not ok), "skipped": 0}

    return matrix.Job(name, work, folder)


def test_side_by_side__each_output_printed_whole_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slow = "import time\nfor i in range(3):\n    print('slow', i, flush=True); time.sleep(0.3)"
    fast = "for i in range(3):\n    print('fast', i)\nraise SystemExit(1)"
    done, interrupted = matrix.run_jobs([_job(tmp_path, "a", slow), _job(tmp_path, "b", fast)], 2)
    out = capsys.readouterr().out
    assert not interrupted
    assert done["a"].found["passed"] == 1
    assert done["b"].found["failed"] == 1
    # Each job's lines come together, under its own heading, never interleaved with the other's.
    assert "slow 0\nslow 1\nslow 2\n" in out
    assert "fast 0\nfast 1\nfast 2\n" in out
    assert out.index("=== b (ended") < out.index("fast 0") < out.index("=== a (ended")


def test_a_job_that_breaks_the_runner__still_a_failed_summary_line(tmp_path: Path) -> None:
    def broken(alone: bool) -> dict[str, int]:
        raise KeyError("{took}")  # braces too: nothing formats this text

    done, _ = matrix.run_jobs([matrix.Job("broken", broken, tmp_path)], 2)
    assert done["broken"].found["failed"] == 1
    assert "KeyError" in done["broken"].error


def test_interrupted__running_jobs_stopped_queued_ones_never_start(tmp_path: Path) -> None:
    sleeper = "import time\ntime.sleep(60)"
    jobs = [_job(tmp_path, name, sleeper) for name in ("a", "b", "c")]
    # A SIGINT to this process alone (not to its children's group): the runner passes it on.
    # Python's own handler, whatever this process inherited: a shell's background job (how a CI
    # may start the suite) begins with SIGINT ignored, and then no Ctrl-C reaches Python at all.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    try:
        done, interrupted = matrix.run_jobs(jobs, 2)
    finally:
        timer.cancel()
        signal.signal(signal.SIGINT, previous)
    assert interrupted
    assert time.monotonic() - started < 20  # not the 60 s the jobs would sleep, nor c's turn
    assert set(done) == {"a", "b"}  # c was queued: it never started
    assert all(d.found["failed"] == 1 for d in done.values())
