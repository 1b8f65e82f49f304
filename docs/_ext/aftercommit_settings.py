"""The settings reference, generated from ``aftercommit.conf.SETTINGS`` when the docs are built.

A page that holds the ``aftercommit-settings`` directive gets one table row per key (its default,
type and help), read from the same table the package validates settings with, so it cannot drift.
"""

from __future__ import annotations

import re
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective


def load_settings() -> dict[str, Any]:
    """``aftercommit.conf.SETTINGS``, importable outside a Django project."""
    from django.conf import settings

    if not settings.configured:
        # Importing aftercommit.conf needs Django settings to exist; none of them is read here.
        settings.configure()
    from aftercommit.conf import SETTINGS

    return SETTINGS


def type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("None" if k is type(None) else k.__name__ for k in kinds)


def describe(spec: Any) -> str:
    """The help text, with the limits the package enforces."""
    text = spec.help
    choices = getattr(spec, "choices", None)
    if choices:
        text += f" One of {', '.join(f'`{c!r}`' for c in choices)}."
    minimum = getattr(spec, "minimum", None)
    if minimum is not None:
        text += f" At least `{minimum!r}`."
    return text


def inline(text: str) -> nodes.paragraph:
    """A paragraph where `backquoted` parts of a help text are shown as code."""
    paragraph = nodes.paragraph()
    for i, part in enumerate(re.split(r"`([^`]*)`", text)):
        if part:
            paragraph += nodes.literal(part, part) if i % 2 else nodes.Text(part)
    return paragraph


def anchor(name: str) -> str:
    return "setting-" + name.lower().replace("_", "-")


def settings_table(specs: dict[str, Any]) -> nodes.table:
    table = nodes.table(classes=["aftercommit-settings"])
    group = nodes.tgroup(cols=4)
    table += group
    for width in (24, 12, 14, 50):
        group += nodes.colspec(colwidth=width)

    def row(cells: list[nodes.Node]) -> nodes.row:
        tr = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += cell
            tr += entry
        return tr

    head = nodes.thead()
    head += row([nodes.paragraph(text=t) for t in ("key", "default", "type", "what it does")])
    group += head
    body = nodes.tbody()
    for name, spec in specs.items():
        key = nodes.paragraph(ids=[anchor(name)])
        key += nodes.literal(name, name)
        default = nodes.paragraph()
        default += nodes.literal(repr(spec.default), repr(spec.default))
        body += row([key, default, inline(type_name(spec.kind)), inline(describe(spec))])
    group += body
    return table


class SettingsDirective(SphinxDirective):
    """``aftercommit-settings``: the table of every key of ``settings.AFTERCOMMIT``."""

    has_content = False

    def run(self) -> list[nodes.Node]:
        specs = load_settings()
        import aftercommit.conf

        # Rebuild the page whenever the table it comes from changes.
        self.env.note_dependency(aftercommit.conf.__file__)
        return [settings_table(specs)]


def setup(app: Sphinx) -> dict[str, Any]:
    app.add_directive("aftercommit-settings", SettingsDirective)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
