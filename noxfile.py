"""The version matrix: Python x Django x Celery x database + broker, one nox session each.

`make matrix` runs every session, `make matrix-ci` the representative set CI runs; both end with
`report`. A `tests` session installs the package (built from the work tree, not editable) with one
Django / Celery pair and runs tests/matrix.py on one database + broker. A `resolve` session does
what a user does, `pip install aftercommit "django==X.*" "celery[redis]==Y.*"` from the wheel, and
sends one message through kombu's Redis transport. `report` gathers the sessions' records into
.artifacts/matrix.json, prints the table, and fails when the README's compatibility line names a
version no session ran and passed.

The services come from the environment, so a matrix run does not clash with `make test` (databases
`test`, Redis dbs 0 and 1, vhost `/`):
  MATRIX_DB_PREFIX   database name prefix; each session adds its own suffix (default `matrix`)
  MATRIX_REDIS_DB    Redis database number (default 2)
  MATRIX_AMQP_VHOST  RabbitMQ vhost, which must exist (default `matrix`): rabbitmqctl add_vhost
                     matrix; rabbitmqctl set_permissions -p matrix guest ".*" ".*" ".*"
  MATRIX_K           the tests every session but the main corner runs (pytest -k; empty: all)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
RECORDS = ROOT / ".artifacts" / "matrix"

PYTHONS = ("3.10", "3.11", "3.12", "3.13")
# Django's own support table: 6.0 needs Python 3.12, 4.2 stops at 3.12.
DJANGO_PYTHONS = {
    "4.2": ("3.10", "3.11", "3.12"),
    "5.2": PYTHONS,
    "6.0": ("3.12", "3.13"),
}
CELERYS = ("5.4", "5.5", "5.6", "5.7")
SETUPS = ("postgresql+redis", "postgresql+rabbitmq", "mariadb+redis", "sqlite+filesystem")
# `make test` runs the whole suite here on every setup; the matrix runs it whole here too.
MAIN = ("3.11", "5.2", "5.7")
# CI: every Django, every Celery minor, every setup and every Python at least once, and the pair
# that once installed broken (Django 4.2, celery[redis] 5.4) on Redis.
CI = {
    ("3.10", "4.2", "5.4"): "mariadb+redis",
    ("3.11", "5.2", "5.5"): "postgresql+rabbitmq",
    ("3.12", "6.0", "5.6"): "postgresql+redis",
    ("3.13", "6.0", "5.7"): "sqlite+filesystem",
}
# Fast and representative: the transaction semantics and the race through a real worker, and the
# serverless broker kombu's versions read differently.
DEFAULT_K = "transactions or race or transport or contract"

nox.options.default_venv_backend = "uv|venv"
nox.options.sessions = []  # name the sessions or tags: `make matrix`, `make matrix-ci`


def _find_pythons() -> None:
    """pyenv installs each Python under its own prefix and its shims answer only for the active
    version, so nox would not find python3.12: link each installed pythonX.Y into one folder on
    PATH. A Python found nowhere makes its sessions skip (or fail on CI, nox's default there)."""
    versions = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    links = ROOT / ".nox" / "pythons"
    for version in PYTHONS:
        found = sorted(versions.glob(f"{version}.*/bin/python{version}"))
        if found:
            links.mkdir(parents=True, exist_ok=True)
            link = links / f"python{version}"
            link.unlink(missing_ok=True)
            link.symlink_to(found[-1])
    if links.is_dir():
        os.environ["PATH"] = f"{links}{os.pathsep}{os.environ.get('PATH', '')}"


_find_pythons()


def _combinations() -> list[tuple[str, str, str, str]]:
    """Every Django on every Python it supports, with every Celery; the setups rotate, so each
    Django, Celery and Python meets every database and broker."""
    pairs = [(py, dj) for dj, pys in DJANGO_PYTHONS.items() for py in pys]
    return [
        (py, dj, ce, CI.get((py, dj, ce), SETUPS[(i + j) % len(SETUPS)]))
        for i, (py, dj) in enumerate(pairs)
        for j, ce in enumerate(CELERYS)
    ]


def _slug(*parts: str) -> str:
    return "_".join(re.sub(r"\W", "", p.replace("+", "_")) for p in parts)


def _services(setup: str, slug: str) -> dict[str, str]:
    database = f"{os.environ.get('MATRIX_DB_PREFIX', 'matrix')}_{slug}"
    redis_db = os.environ.get("MATRIX_REDIS_DB", "2")
    vhost = os.environ.get("MATRIX_AMQP_VHOST", "matrix")
    db, broker = setup.split("+")
    return {
        "DATABASE_URL": {
            "postgresql": f"postgres://postgres@127.0.0.1:5432/{database}",
            "mariadb": f"mysql://root@127.0.0.1:3306/{database}",
            "sqlite": f"sqlite:///{RECORDS / slug / 'db.sqlite3'}",
        }[db],
        "BROKER_URL": {
            "redis": f"redis://127.0.0.1:6379/{redis_db}",
            "rabbitmq": f"amqp://guest:guest@127.0.0.1:5672/{vhost}",
            "filesystem": "filesystem://",
        }[broker],
    }


def _write(record: dict[str, object]) -> None:
    RECORDS.mkdir(parents=True, exist_ok=True)
    (RECORDS / f"{record['id']}.json").write_text(json.dumps(record, indent=2))


def _versions(session: nox.Session, env: dict[str, str]) -> dict[str, str]:
    out = session.run("python", "tests/matrix_probe.py", "versions", env=env, silent=True)
    return dict(json.loads(str(out).strip().splitlines()[-1]))


def _check_installed(session: nox.Session, versions: dict[str, str], **wanted: str) -> None:
    """A session proves only the versions it is named for: a release of each minor asked for.
    (Python 3.10 / Django 4.2 / Celery 5.5 once passed on 5.5.0rc5 and recorded itself passed.)"""
    for package, minor in wanted.items():
        got = str(versions.get(package))
        if not re.fullmatch(rf"{re.escape(minor)}(\.\d+)*", got):
            session.error(f"{package} {got} installed where a {minor} release was asked for")


@nox.session
@nox.parametrize(
    "python,django,celery,setup",
    [
        nox.param(
            py,
            dj,
            ce,
            st,
            id=f"py{py}-dj{dj}-celery{ce}-{st}",
            tags=["matrix", *(["ci"] if (py, dj, ce) in CI else [])],
        )
        for py, dj, ce, st in _combinations()
    ],
)
def tests(session: nox.Session, django: str, celery: str, setup: str) -> None:
    """The suite (or MATRIX_K's part of it) on one database + broker with one version set."""
    py = str(session.python)
    slug = _slug(f"py{py}", f"dj{django}", f"c{celery}", setup)
    main = (py, django, celery) == MAIN
    record: dict[str, object] = {
        "id": f"tests-{slug}",
        "kind": "tests",
        "python": py,
        "django": django,
        "celery": celery,
        "setup": setup,
        "tests": "all" if main else os.environ.get("MATRIX_K", DEFAULT_K) or "all",
        "status": "failed",  # until it has passed: a session that dies leaves this behind
    }
    _write(record)
    env = {
        **_services(setup, slug),
        "AFTERCOMMIT_SETUP_NAME": f"matrix/{slug}",
        "AFTERCOMMIT_MATRIX_RESULT": str(RECORDS / slug / "result.json"),
    }
    if not main:
        env |= {"AFTERCOMMIT_SKIP_EXAMPLE": "1", "AFTERCOMMIT_SKIP_BENCH": "1"}
    redis_extra = "[redis]" if setup.endswith("+redis") else ""
    # uv takes Celery 5.5.0rc5 for "celery==5.5.*" on Python 3.10 with Django 4.2 (to pair it
    # with kombu 5.7), even with pre-releases allowed only where necessary: ">=5.5.0" rules every
    # release candidate of the minor out (5.5.0rc5 < 5.5.0), so a release is what runs.
    pins = [f"django=={django}.*", f"celery{redis_extra}=={celery}.*", f"celery>={celery}.0"]
    # Pre-releases only where a package has nothing else (OpenTelemetry's semantic conventions
    # are all betas).
    session.install(".[test]", *pins, env={"UV_PRERELEASE": "if-necessary-or-explicit"})
    session.run("python", "tests/matrix_probe.py", "create-database", env=env)
    record["versions"] = _versions(session, env)
    _write(record)
    args = list(session.posargs)
    if not main and record["tests"] != "all":
        args = ["-k", str(record["tests"]), *args]
    try:
        _check_installed(session, record["versions"], django=django, celery=celery)
        session.run("python", "tests/matrix.py", *args, env=env)
        record["status"] = "passed"
    finally:
        result = RECORDS / slug / "result.json"
        if result.exists():
            record["counts"] = json.loads(result.read_text())["totals"]
        _write(record)
        session.run("python", "tests/matrix_probe.py", "drop-database", env=env)


_wheels: list[Path] = []


def _wheel(session: nox.Session) -> Path:
    """The package as users get it, built once per nox run."""
    if not _wheels:
        out = RECORDS / "dist"
        shutil.rmtree(out, ignore_errors=True)
        session.run("python", "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT))
        _wheels.extend(out.glob("aftercommit-*.whl"))
    return _wheels[0]


# CI resolves the pairs its tests sessions run (the worst case, Django 4.2 with celery[redis] 5.4,
# among them); `make matrix` resolves all twelve.
CI_RESOLVE = {(dj, ce) for _, dj, ce in CI}
RESOLVE_PAIRS = [
    # The oldest Python each Django supports: the strictest resolution.
    nox.param(
        DJANGO_PYTHONS[dj][0],
        dj,
        ce,
        id=f"dj{dj}-celery{ce}",
        tags=["matrix", *(["ci"] if (dj, ce) in CI_RESOLVE else [])],
    )
    for dj in DJANGO_PYTHONS
    for ce in CELERYS
]


@nox.session(venv_backend="venv")  # pip's resolver, the one users run
@nox.parametrize("python,django,celery", RESOLVE_PAIRS)
def resolve(session: nox.Session, django: str, celery: str) -> None:
    """pip install of the wheel with a Django / celery[redis] pair resolves to a set that sends."""
    py = str(session.python)
    slug = _slug(f"py{py}", f"dj{django}", f"c{celery}")
    record: dict[str, object] = {
        "id": f"resolve-{slug}",
        "kind": "resolve",
        "python": py,
        "django": django,
        "celery": celery,
        "status": "failed",
    }
    _write(record)
    wheel = _wheel(session)
    session.install(str(wheel), f"django=={django}.*", f"celery[redis]=={celery}.*")
    session.run("python", "-m", "pip", "check")
    env = {"BROKER_URL": _services("sqlite+redis", slug)["BROKER_URL"], "DATABASE_URL": "sqlite://"}
    session.run("python", "tests/matrix_probe.py", "redis-roundtrip", env=env)
    record["versions"] = _versions(session, env)
    record["status"] = "passed"
    _write(record)


# The README's compatibility line, checked against what ran ----------------------------------------

# The line's names, and what in a session's record shows that name ran: a version key.
NAMES = {
    "python": "python",
    "django": "django",
    "celery": "celery",
    "postgresql": "postgresql",
    "mariadb": "mariadb",
    "mysql": "mysql",
    "sqlite": "sqlite",
    "redis": "redis-server",
    "rabbitmq": "rabbitmq",
}


def compatibility_line(readme: str) -> str:
    section = readme.split("## Compatibility", 1)
    if len(section) < 2:
        raise ValueError("README.md has no '## Compatibility' section")
    paragraph = section[1].strip().split("\n\n", 1)[0]
    return " ".join(paragraph.split())


def unproven_claims(line: str, records: list[dict[str, object]]) -> list[str]:
    """Each "Name v1 / v2" the line names that no passed tests session ran.

    A version matches by its leading parts: "3.12" matches Python 3.12.1, "15" PostgreSQL 15.20,
    "6.x" any Django 6; a name with no version needs only to have run.
    """
    ran: dict[str, set[str]] = {key: set() for key in NAMES.values()}
    for record in records:
        if record.get("kind") == "tests" and record.get("status") == "passed":
            for key, value in dict(record.get("versions") or {}).items():
                # A pre-release (5.5.0rc5) does not prove the release.
                if key in ran and value and re.fullmatch(r"[\d.]+", str(value)):
                    ran[key].add(str(value))
    problems = []
    named: dict[str, list[str]] = {}  # name as written -> versions claimed for it
    current = ""
    for token in re.findall(r"[A-Za-z][\w-]*|\d[\w.+]*", line):
        if token[0].isdigit():
            named[current].append(token.rstrip("."))  # a sentence's full stop
        else:
            current = token
            named.setdefault(current, [])
    for name, claims in named.items():
        if name.lower() not in NAMES:
            problems.append(f"{name}: no matrix session runs it")
            continue
        seen = ran[NAMES[name.lower()]]
        if not claims and not seen:
            problems.append(f"{name}: no passed session ran it")
        for claim in claims:
            if not re.fullmatch(r"\d+(\.(\d+|x))*", claim):
                problems.append(f"{name} {claim}: name the versions that ran, not a range")
                continue
            prefix = [p for p in claim.split(".") if p != "x"]
            if not any(v.split(".")[: len(prefix)] == prefix for v in seen):
                ran_text = ", ".join(sorted(seen)) or "none"
                problems.append(f"{name} {claim}: no passed session ran it (ran: {ran_text})")
    return problems


def _table(records: list[dict[str, object]]) -> str:
    header = ["session", "python", "django", "celery", "kombu", "redis-py", "setup", "servers",
              "tests", "passed", "failed", "skipped", "result"]  # fmt: skip
    rows = [header, ["---"] * len(header)]
    for r in sorted(records, key=lambda r: (str(r["kind"]), str(r["id"]))):
        v = dict(r.get("versions") or {})
        servers = ", ".join(
            f"{k} {v[k]}"
            for k in ("postgresql", "mariadb", "mysql", "sqlite", "redis-server", "rabbitmq")
            if v.get(k)
        )
        counts = dict(r.get("counts") or {})
        rows.append(
            [
                str(r["kind"]),
                str(v.get("python") or r["python"]),
                str(v.get("django") or r["django"]),
                str(v.get("celery") or r["celery"]),
                str(v.get("kombu") or "?"),
                str(v.get("redis") or "-"),
                str(r.get("setup") or "pip + redis round trip"),
                servers if r["kind"] == "tests" else "-",
                str(r.get("tests") or "-"),
                *(str(counts.get(k, "-")) for k in ("passed", "failed", "skipped")),
                str(r["status"]),
            ]
        )
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


@nox.session(python=False)
def report(session: nox.Session) -> None:
    """Gather the records into .artifacts/matrix.json, print the table, check the README."""
    records = [json.loads(p.read_text()) for p in sorted(RECORDS.glob("*.json"))]
    if not records:
        session.error(f"no session records in {RECORDS}: run `make matrix` or `make matrix-ci`")
    (ROOT / ".artifacts" / "matrix.json").write_text(json.dumps(records, indent=2))
    table = _table(records)
    (ROOT / ".artifacts" / "matrix.md").write_text(table + "\n")
    print(table)
    failed = [str(r["id"]) for r in records if r["status"] != "passed"]
    line = compatibility_line((ROOT / "README.md").read_text())
    problems = unproven_claims(line, records)
    print(f"\nREADME: {line}")
    for problem in problems:
        print(f"  not proven: {problem}")
    if failed:
        session.error(f"{len(failed)} of {len(records)} sessions failed: {', '.join(failed)}")
    if problems:
        session.error(
            "the README's compatibility line names what no passed session ran: run those "
            "versions in noxfile.py, or take them off the line"
        )
    print(f"{len(records)} sessions passed; every version on the README's line ran and passed")
