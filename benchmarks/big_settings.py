"""Settings for big_outbox.py: the test project on two outbox databases, one empty, one big.

``default`` is the database whose outbox starts empty (DATABASE_URL), ``big`` the one holding
millions of sent rows (BIG_OUTBOX_DATABASE, on the same server), ``other`` the test project's
second database, where its router sends TaskRun.
"""

from __future__ import annotations

import os

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES as TEST_DATABASES

DATABASES = {
    "default": TEST_DATABASES["default"],
    "big": dict(TEST_DATABASES["default"], NAME=os.environ["BIG_OUTBOX_DATABASE"]),
    "other": TEST_DATABASES["other"],
}
