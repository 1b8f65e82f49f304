"""Sphinx configuration: pages in Markdown (MyST), the furo theme, and the settings reference
generated from ``aftercommit.conf`` by the extension in ``_ext/``."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS / "_ext"))
# The reference documents the package next to these pages, installed or not.
sys.path.insert(0, str(DOCS.parent / "src"))

project = "aftercommit"
author = "The aftercommit authors"
copyright = "2026, The aftercommit authors"
# pyproject.toml's version, the only place it is written, read from the installed package.
try:
    release = metadata.version("aftercommit")
except metadata.PackageNotFoundError:
    release = "unknown"
version = release

extensions = ["myst_parser", "aftercommit_settings"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "_ext"]
myst_heading_anchors = 3  # links such as [the relay](operating.md#the-relay) resolve
myst_enable_extensions = ["deflist"]
smartquotes = False  # quotes in settings and code stay as typed

html_theme = "furo"
html_title = f"aftercommit {release}"
