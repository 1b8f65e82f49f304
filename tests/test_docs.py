"""The settings reference in the docs is generated from ``aftercommit.conf.SETTINGS``.

Needs no database or broker: it builds the reference table the docs build would, in process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from aftercommit.conf import SETTINGS

DOCS = Path(__file__).resolve().parent.parent / "docs"

pytest.importorskip("docutils", reason="the docs extra is not installed (pip install -e .[docs])")
sys.path.insert(0, str(DOCS / "_ext"))
import aftercommit_settings  # noqa: E402


def test_settings_reference__has_every_key_with_its_default_and_type() -> None:
    table = aftercommit_settings.settings_table(aftercommit_settings.load_settings())
    rows = [row.astext() for row in table.findall(lambda n: n.tagname == "row")][1:]

    assert len(rows) == len(SETTINGS)
    for row, (name, spec) in zip(rows, SETTINGS.items(), strict=True):
        assert row.startswith(name)
        assert repr(spec.default) in row
        assert aftercommit_settings.type_name(spec.kind) in row
        assert spec.help.replace("`", "") in row.replace("\n", " ")


def test_settings_page__is_generated_not_written() -> None:
    page = (DOCS / "settings.md").read_text()

    assert "{aftercommit-settings}" in page


def test_readme_settings_table__matches_conf() -> None:
    """The README's table lists every setting with its default and help, and nothing else."""
    readme = (DOCS.parent / "README.md").read_text()
    table = readme[readme.index("| key | default | what it does |") :].split("\n\n")[0]
    rows = table.splitlines()[2:]
    expected = [
        f"| `{name}` | `{spec.default!r}` | {spec.help} |".replace("'", '"')
        for name, spec in SETTINGS.items()
    ]
    assert [row.replace("'", '"') for row in rows] == expected
