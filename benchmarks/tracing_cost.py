"""What carrying the trace context costs, in microseconds per call: ``tracing.capture()`` in the
request, ``tracing.restore()`` around each publish in the relay.

    python benchmarks/tracing_cost.py [--calls 20000]

Each setup runs in a process of its own, the SDKs set up as in tests/tracing_app.py (recording to
a temporary folder, nothing sent): none imported, imported but not configured, OpenTelemetry,
Sentry, both. Best of five rounds of ``--calls`` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETUPS = ["none", "imported", "otel", "sentry", "both"]


def per_call_us(function: object, calls: int) -> float:
    return min(timeit.repeat(function, number=calls, repeat=5)) / calls * 1e6  # type: ignore[arg-type]


def child(setup: str, calls: int) -> dict[str, float | int]:
    from aftercommit import tracing

    def publish_inside(captured: str) -> None:
        with tracing.restore(captured):
            pass

    if setup in ("none", "imported"):
        if setup == "imported":
            import opentelemetry.trace  # noqa: F401
            import sentry_sdk
        return {
            "capture_us": per_call_us(tracing.capture, calls),
            "restore_us": per_call_us(lambda: publish_inside(""), calls),
            "captured_chars": 0,
        }

    import sentry_sdk
    from opentelemetry import trace

    from tests import tracing_app

    tracing_app.set_up_tracers("cost")
    for name in {"otel": ["sentry"], "sentry": ["otel"], "both": []}[setup]:
        tracing.unregister(name)
    with (
        sentry_sdk.isolation_scope(),
        sentry_sdk.start_transaction(op="http.server", name="GET /cost"),
        trace.get_tracer("cost").start_as_current_span("GET /cost"),
    ):
        capture_us = per_call_us(tracing.capture, calls)
        captured = tracing.capture()
    return {
        "capture_us": capture_us,
        "restore_us": per_call_us(lambda: publish_inside(captured), calls),
        "captured_chars": len(captured),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--child", choices=SETUPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.calls)))
        return
    print("| tracers active | capture() µs | restore() enter+exit µs | captured chars |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, TRACING_OUT=out, DJANGO_SETTINGS_MODULE="tests.settings")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        for setup in SETUPS:
            argv = [sys.executable, __file__, "--child", setup, "--calls", str(args.calls)]
            done = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{setup}: {done.stderr}")
            r = json.loads(done.stdout.splitlines()[-1])
            print(
                f"| {setup} | {r['capture_us']:.2f} | {r['restore_us']:.2f} "
                f"| {r['captured_chars']} |"
            )


if __name__ == "__main__":
    main()
