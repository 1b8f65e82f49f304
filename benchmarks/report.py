"""Join the benchmark sections into one report: ``python benchmarks/report.py [--output FILE]``.

Reads every ``<out>/*.json`` a benchmark wrote (see common.py), in section order, and writes a
markdown report that starts with the machine the figures were measured on.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=common.HERE / "REPORT.md")
    args = parser.parse_args()
    out = common.out_dir()
    sections = sorted(
        (json.loads(path.read_text()) for path in out.glob("*.json")),
        key=lambda s: (s["order"], s["name"]),
    )
    if not sections:
        raise SystemExit(f"no results in {out}: run `make bench` first")
    machine = sections[0]["machine"]
    first, last = (
        min(s["machine"]["when"] for s in sections),
        max(s["machine"]["when"] for s in sections),
    )
    keys = ["cpu", "cpus", "memory", "os", "python", "django", "celery", "kombu"]
    keys += ["postgresql", "redis"]
    described = ", ".join(f"{key} {machine[key]}" for key in keys if machine.get(key))
    relative = Path(out).resolve()
    with contextlib.suppress(ValueError):  # results elsewhere: link them absolutely
        relative = relative.relative_to(args.output.resolve().parent)
    lines = [
        "# aftercommit benchmarks",
        "",
        "Every figure below compares aftercommit with the alternative measured in the same run, on "
        "the same machine, database and broker. The machine is shared and noisy: read the ratios, "
        "not the absolute times. `make bench` runs the whole set; each script in `benchmarks/` "
        "says in its docstring what it measures and how.",
        "",
        f"Measured {first} to {last} on: {described}; load average at the start: "
        f"{machine.get('load', '?')}.",
    ]
    if any(s["quick"] for s in sections):
        lines += ["", "**Quick run (`--quick`): these figures check the code, not the targets.**"]
    for section in sections:
        markdown = (
            section["markdown"]
            .replace("](", f"]({relative}/")
            .replace(f"]({relative}/http", "](http")
        )
        lines += ["", f"## {section['title']}", "", markdown]
    args.output.write_text("\n".join(lines) + "\n")
    print(f"report written to {args.output}")


if __name__ == "__main__":
    main()
