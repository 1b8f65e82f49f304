#!/usr/bin/env bash
# The package as a user gets it: build the sdist and the wheel, check their metadata, check the
# wheel holds every file of the package, install the wheel (never the work tree) into a fresh venv
# and run the example project's tests against it from a folder where src/ cannot be imported.
# `make package` runs this; PYTHON picks the interpreter of the fresh venv.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tools="${BIN:-$root/.venv/bin}"     # a venv with build and twine (the dev extra)
python="${PYTHON:-python3}"
work="$(mktemp -d "${TMPDIR:-/tmp}/aftercommit-wheel.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# Build from a copy without the work tree's build byproducts: setuptools trusts a stale
# src/*.egg-info/SOURCES.txt, which would put files in the sdist that package-data forgets.
mkdir "$work/tree"
tar -C "$root" --exclude=./.git --exclude=./.venv --exclude=./.artifacts --exclude=./build \
  --exclude=./dist --exclude='*.egg-info' --exclude=./docs/_build --exclude=./example/.state \
  --exclude=__pycache__ -cf - . | tar -C "$work/tree" -xf -
rm -f "$root"/dist/aftercommit-*
# build makes the sdist, then the wheel from the sdist: a file the sdist forgets is missing here too.
"$tools/python" -m build --outdir "$root/dist" "$work/tree"
"$tools/python" -m twine check --strict "$root"/dist/aftercommit-*
wheel="$(ls "$root"/dist/aftercommit-*.whl)"

echo "=== files in $(basename "$wheel")"
"$tools/python" - "$wheel" "$root/src/aftercommit" <<'PY'
import sys, zipfile
from pathlib import Path

wheel, package = sys.argv[1], Path(sys.argv[2])
names = sorted(zipfile.ZipFile(wheel).namelist())
print("\n".join(names))
in_wheel = {n for n in names if n.startswith("aftercommit/")}
# Every file of the package tree (templates, py.typed, migrations included), nothing else.
in_tree = {
    f"aftercommit/{p.relative_to(package).as_posix()}"
    for p in package.rglob("*")
    if p.is_file() and "__pycache__" not in p.parts
}
missing, extra = sorted(in_tree - in_wheel), sorted(in_wheel - in_tree)
for what, files in (("missing from", missing), ("not in src/ but in", extra)):
    if files:
        sys.exit(f"files {what} the wheel: {', '.join(files)}; fix package-data in pyproject.toml")
for needed in ("aftercommit/py.typed", "aftercommit/migrations/0001_initial.py"):
    if needed not in in_wheel:
        sys.exit(f"{needed} is not in the wheel")
if not any(n.startswith("aftercommit/templates/") for n in in_wheel):
    sys.exit("the admin templates are not in the wheel")
print(f"=== the wheel holds all {len(in_tree)} files of src/aftercommit")
PY

"$python" -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip
"$work/venv/bin/python" -m pip install -q "$wheel[test]"

# A copy of the example, so neither the work tree's src/ nor its tests/ is on the path.
cp -r "$root/example" "$work/example"
rm -rf "$work/example/.state"
find "$work/example" -name __pycache__ -prune -exec rm -rf {} +
cd "$work/example"
"$work/venv/bin/python" - "$work/venv" "$wheel" <<'PY'
import sys
from pathlib import Path

import aftercommit

venv, wheel = Path(sys.argv[1]), Path(sys.argv[2]).name
where = Path(aftercommit.__file__).resolve()
if venv.resolve() not in where.parents:
    sys.exit(f"aftercommit was imported from {where}, not from the wheel installed in {venv}")
if not wheel.startswith(f"aftercommit-{aftercommit.__version__}-"):
    sys.exit(f"aftercommit.__version__ is {aftercommit.__version__!r}, the wheel is {wheel}")
print(f"=== aftercommit {aftercommit.__version__} from {where.parent}")
PY
AFTERCOMMIT_ARTIFACTS="$root/.artifacts/package" "$work/venv/bin/python" -m pytest tests "$@"
