"""Trace context across the commit: captured at dispatch, restored around the relay's publish.

(Placeholder until the tracers land: no tracer is active.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def capture() -> str:
    return ""


@contextlib.contextmanager
def restore(captured: str) -> Iterator[None]:
    yield
