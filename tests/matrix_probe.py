"""What a version-matrix session (noxfile.py) asks of its services, run inside the session's venv.

    python tests/matrix_probe.py create-database   # DATABASE_URL's database, if it is missing
    python tests/matrix_probe.py drop-database
    python tests/matrix_probe.py versions          # JSON: packages and servers this venv runs with
    python tests/matrix_probe.py redis-roundtrip   # publish one message to BROKER_URL and read it

`redis-roundtrip` needs nothing but kombu and its Redis transport: it checks that what pip
resolved for a user can send at all (kombu 5.7 with redis-py 5 cannot).
"""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import sys
import uuid
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit


def _url(name: str) -> str:
    url = os.environ.get(name, "")
    if not url:
        sys.exit(f"{name} is not set: the session names the service it probes")
    return url


def _server(database_url: str) -> tuple[Any, str]:
    """A connection to the database server itself (not to the database), and the database name."""
    parts = urlsplit(database_url)
    name = parts.path.lstrip("/")
    if parts.scheme.startswith("postgres"):
        import psycopg

        conn = psycopg.connect(
            host=parts.hostname,
            port=parts.port or 5432,
            user=parts.username,
            password=parts.password,
            dbname="postgres",
            autocommit=True,
        )
        return conn, name
    if parts.scheme.startswith("mysql"):
        import pymysql

        conn = pymysql.connect(
            host=parts.hostname,
            port=parts.port or 3306,
            user=parts.username,
            password=parts.password or "",
            autocommit=True,
        )
        return conn, name
    raise ValueError(f"no server to probe for {parts.scheme}://")


def database(action: str) -> None:
    url = _url("DATABASE_URL")
    if url.startswith("sqlite"):
        return  # the file is made on first use
    conn, name = _server(url)
    quote = '"' if url.startswith("postgres") else "`"
    with conn.cursor() as cur:
        if action == "create":
            if url.startswith("postgres"):
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
                if not cur.fetchone():
                    cur.execute(f"CREATE DATABASE {quote}{name}{quote}")
            else:
                cur.execute(f"CREATE DATABASE IF NOT EXISTS {quote}{name}{quote}")
        else:
            cur.execute(f"DROP DATABASE IF EXISTS {quote}{name}{quote}")
    conn.close()


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("django", "celery", "kombu", "redis", "amqp", "packaging"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    database_url = os.environ.get("DATABASE_URL", "")
    if database_url.startswith(("postgres", "mysql")):
        conn, _ = _server(database_url)
        with conn.cursor() as cur:
            cur.execute("SELECT version()")
            text = str(cur.fetchone()[0])
        conn.close()
        # "PostgreSQL 15.14 (Debian ...) on x86_64..." / "10.11.19-MariaDB-0+deb12u1"
        if database_url.startswith("postgres"):
            found["postgresql"] = text.split()[1]
        else:
            found["mariadb" if "mariadb" in text.lower() else "mysql"] = text.split("-")[0]
    else:
        found["sqlite"] = sqlite3.sqlite_version
    broker_url = os.environ.get("BROKER_URL", "")
    if broker_url.startswith("redis"):
        import redis

        client = redis.Redis.from_url(broker_url)
        found["redis-server"] = str(client.info("server")["redis_version"])
        client.close()
    elif broker_url.startswith("amqp"):
        from kombu import Connection

        with Connection(broker_url, connect_timeout=5) as conn:
            conn.connect()
            props = conn.connection.server_properties
            found["rabbitmq"] = str(props.get("version", "?"))
    return found


def redis_roundtrip() -> None:
    import kombu.transport.redis  # noqa: F401 - the import that fails on a broken pair
    from kombu import Connection, Exchange, Queue

    url = _url("BROKER_URL")
    name = f"matrix-probe-{uuid.uuid4().hex[:8]}"
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection(url, connect_timeout=5) as conn:
        producer = conn.Producer()
        producer.publish({"probe": name}, exchange=queue.exchange, routing_key=name,
                         declare=[queue], retry=False)  # fmt: skip
        with conn.SimpleQueue(queue) as simple:
            message = simple.get(timeout=5)
            message.ack()
        queue(conn.default_channel).delete()
    if message.payload != {"probe": name}:
        sys.exit(f"read back {message.payload!r}, sent {{'probe': {name!r}}}")
    print(f"redis round trip through kombu {metadata.version('kombu')} and redis-py "
          f"{metadata.version('redis')}: ok")  # fmt: skip


def main(argv: list[str]) -> None:
    command = argv[0] if argv else ""
    if command == "create-database":
        database("create")
    elif command == "drop-database":
        database("drop")
    elif command == "versions":
        print(json.dumps(versions()))
    elif command == "redis-roundtrip":
        redis_roundtrip()
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
