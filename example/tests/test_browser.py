"""End to end, as a person would see it: the demo's processes, Debian's chromium, the admin.

Runs `manage.py demo` on a fresh SQLite database and the filesystem broker, logs in, changes a
brand's discount, and waits for the page to say the propagation is done.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

EXAMPLE_DIR = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("AFTERCOMMIT_ARTIFACTS", EXAMPLE_DIR.parent / ".artifacts"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
PRODUCTS = 2000
PASSWORD = "browser-test-password"

pytestmark = pytest.mark.browser


def missing(reason: str) -> None:
    if os.environ.get("REQUIRE_SERVICES") == "1":
        pytest.fail(f"REQUIRE_SERVICES=1 and {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    """Playwright driving Debian's chromium; checked before the demo is started for nothing."""
    if not os.path.exists(CHROMIUM):
        missing(f"{CHROMIUM} is not installed (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("the playwright package is not installed (pip install playwright)")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The demo command, running; yields its admin URL and its SQLite file."""
    state = tmp_path_factory.mktemp("demo-state")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    env["EXAMPLE_STATE"] = str(state)
    log_path = state / "demo.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                *[sys.executable, "manage.py", "demo", "--products", str(PRODUCTS)],
                *["--port", str(port), "--password", PASSWORD],
            ],
            cwd=EXAMPLE_DIR,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while not (url := re.search(r"admin: (http://\S+)", log_path.read_text())):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the demo did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield url.group(1), state / "db.sqlite3"
    finally:
        proc.send_signal(signal.SIGTERM)  # the demo stops its web server, worker and relay
        proc.wait(30)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "example-demo.log").write_bytes(log_path.read_bytes())


def products_behind(db: Path, brand: str) -> tuple[int, int]:
    """(products of ``brand`` not yet at its version and discount, products of ``brand``)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        pk, version, discount = conn.execute(
            "SELECT id, version, discount_percent FROM catalog_brand WHERE name = ?", (brand,)
        ).fetchone()
        total, behind = conn.execute(
            "SELECT COUNT(*), SUM(brand_version != ? OR discounted_cents != price_cents * ? / 100)"
            " FROM catalog_product WHERE brand_id = ?",
            (version, 100 - discount, pk),
        ).fetchone()
    return behind, total


def test_admin_edit__every_product_updated_and_page_says_done(
    playwright: Any, demo: tuple[str, Path]
) -> None:
    from playwright.sync_api import expect

    url, db = demo
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.fill("#id_username", "admin")
        page.fill("#id_password", PASSWORD)
        page.click("input[type=submit]")
        page.click("text=Acme")
        page.fill("#id_discount_percent", "37")
        # "Save and continue editing" stays on the brand, whose page then polls the status.
        with page.expect_response(lambda r: r.url.endswith("/propagation/") and r.ok):
            page.click("input[name=_continue]")
        messages = page.locator(".messagelist")
        expect(messages).to_contain_text("was changed successfully")
        status = page.locator("#propagation-status")
        expect(status).to_contain_text("version 2 (discount_percent): done", timeout=30_000)
        expect(messages.locator("li")).to_have_count(1)  # and nothing else to say
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "example-admin-propagation.png"), full_page=True)
    finally:
        browser.close()
    behind, total = products_behind(db, "Acme")
    assert total > 0
    assert behind == 0


def test_burst_of_edits__propagates_once_with_the_final_values(
    playwright: Any, demo: tuple[str, Path]
) -> None:
    """Five saves in a row (each well within the brand's 2 s debounce of the one before): one
    propagation runs, of the last version; the four before it are superseded, never sent."""
    from playwright.sync_api import expect

    url, db = demo
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.fill("#id_username", "admin")
        page.fill("#id_password", PASSWORD)
        page.click("input[type=submit]")
        page.click("text=Globex")
        saves = []
        for discount in (11, 12, 13, 14, 15):
            page.fill("#id_discount_percent", str(discount))
            with page.expect_navigation():
                page.click("input[name=_continue]")
            saves.append(time.monotonic())
        status = page.locator("#propagation-status")
        expect(status).to_contain_text("version 6 (discount_percent): done", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "example-admin-debounce.png"), full_page=True)
    finally:
        browser.close()
    assert saves[-1] - saves[0] < 4 * 2.0, "the saves were too slow to test the debounce"
    behind, total = products_behind(db, "Globex")
    assert total > 0
    assert behind == 0
    with contextlib.closing(sqlite3.connect(db)) as conn:
        ran = conn.execute(
            "SELECT p.version FROM catalog_propagation p JOIN catalog_brand b ON b.id = p.brand_id"
            " WHERE b.name = 'Globex' AND p.started_at IS NOT NULL"
        ).fetchall()
        superseded = conn.execute(
            "SELECT COUNT(*) FROM aftercommit_outboxmessage WHERE status = 3"
        ).fetchone()[0]
    assert ran == [(6,)]  # one run, of the final version
    assert superseded == 4
