"""Settings for the example's tests: a state folder of their own, never a demo's example/.state."""

import os
import tempfile

os.environ.setdefault("EXAMPLE_STATE", tempfile.mkdtemp(prefix="example-tests-"))

from .settings import *  # noqa: F403
