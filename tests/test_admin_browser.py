"""The outbox admin as an operator sees it, in headless Chromium; the screenshot is kept."""

from __future__ import annotations

import json
import os
import shutil
import uuid

import pytest
from django.db import connections
from django.utils import timezone

from aftercommit.models import OutboxMessage, Status
from tests.support import ARTIFACTS, REQUIRE_SERVICES

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture
def browser():  # type: ignore[no-untyped-def]
    missing = None
    if not shutil.which(CHROMIUM):
        missing = f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = missing or "playwright is not installed (pip install playwright)"
    if missing:
        if REQUIRE_SERVICES:
            pytest.fail(f"REQUIRE_SERVICES=1 and {missing}")
        pytest.skip(missing)
    # Playwright runs its own event loop; Django must not mistake the test for async code.
    os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()
        # Connections opened while Playwright's loop ran live in that context, out of reach of
        # pytest-django's teardown (PostgreSQL would refuse to drop the test database).
        connections.close_all()


def add(status: int, **fields) -> None:  # type: ignore[no-untyped-def]
    now = timezone.now()
    OutboxMessage.objects.create(
        task_id=str(uuid.uuid4()),
        task_name="tests.testapp.tasks.read_item",
        payload=json.dumps([["x"], {}]),
        content_type="application/json",
        content_encoding="utf-8",
        options="{}",
        created_at=now - timezone.timedelta(seconds=42),
        due_at=now,
        status=status,
        **fields,
    )


@pytest.mark.django_db(transaction=True)
def test_admin_outbox_summary__screenshot(browser, live_server, django_user_model) -> None:  # type: ignore[no-untyped-def]
    django_user_model.objects.create_superuser("ops", "ops@example.com", "pw")
    for _ in range(3):
        add(Status.PENDING)
    add(Status.PENDING, attempts=2, last_error="OperationalError: broker unreachable")
    add(Status.DEAD, attempts=10, last_error="DecodeError: Expecting value")
    for _ in range(5):
        add(Status.SENT, sent_at=timezone.now())

    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(f"{live_server.url}/admin/login/?next=/admin/aftercommit/outboxmessage/")
    page.fill("#id_username", "ops")
    page.fill("#id_password", "pw")
    page.click("input[type=submit]")
    page.wait_for_selector("#outbox-summary")
    summary = page.inner_text("#outbox-summary")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "admin-outbox-summary.png"), full_page=True)
    cells = page.locator("#outbox-summary tbody td").all_inner_texts()
    assert cells[0] == "4", summary  # backlog
    assert cells[2] == "1", summary  # retrying
    assert cells[3] == "5", summary  # sent in the last minute
    assert cells[4] == "1", summary  # dead letters
    assert "DecodeError: Expecting value" in page.content()
    assert "By task" in page.inner_text("#changelist-filter")
