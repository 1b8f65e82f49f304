"""A row planted in the outbox table decides nothing about how it is read: a pickle is never
unpickled, by the relay, the admin, or the test helpers. (0.1 decoded a row as whatever content
type the row named, so a planted pickle ran code when it was read.)"""

from __future__ import annotations

import base64
import os
import pickle
import uuid
from pathlib import Path

import pytest
from django.utils import timezone
from kombu.exceptions import ContentDisallowed

from aftercommit import signals
from aftercommit.models import OutboxMessage, Status
from aftercommit.relay import Relay
from aftercommit.testing import capture, drain
from tests.celery_app import app
from tests.testapp.tasks import read_item

pytestmark = pytest.mark.django_db(databases=["default", "other"])


class _RunsCode:
    """Unpickling this creates ``path``: the proof that the pickle was loaded."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.makedirs, (self.path,))


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "the-pickle-ran"


def planted(marker: Path) -> OutboxMessage:
    """What someone with write access to the table could add: a pickle that runs code."""
    now = timezone.now()
    return OutboxMessage.objects.create(
        task_id=str(uuid.uuid4()),
        task_name=read_item.name,
        payload=base64.b64encode(pickle.dumps(_RunsCode(marker))).decode("ascii"),
        content_type="application/x-python-serialize",
        content_encoding="binary",
        options="{}",
        created_at=now,
        due_at=now,
    )


def test_planted_pickle__relay_makes_it_a_dead_letter_at_once_without_loading_it(marker) -> None:  # type: ignore[no-untyped-def]
    row = planted(marker)
    relay = Relay(app, aliases=["default"])
    try:
        assert relay.run_batch("default") == 1
    finally:
        relay.close()
    assert not marker.exists()
    row.refresh_from_db()
    assert (row.status, row.attempts) == (Status.DEAD, 1)  # no retry can ever decode it
    assert "ContentDisallowed" in row.last_error and "python-serialize" in row.last_error


def test_planted_pickle__admin_payload_view_shows_an_error_not_the_data(  # type: ignore[no-untyped-def]
    admin_client, marker
) -> None:
    row = planted(marker)
    response = admin_client.get(f"/admin/aftercommit/outboxmessage/{row.pk}/change/payload/")
    assert response.status_code == 200
    shown = response.json()
    assert "args" not in shown
    assert "ContentDisallowed" in shown["error"]
    assert not marker.exists()


def test_planted_pickle__drain_refuses_it(marker) -> None:  # type: ignore[no-untyped-def]
    planted(marker)
    with pytest.raises(ContentDisallowed, match="python-serialize"):
        drain("default")
    assert not marker.exists()


def test_planted_pickle__captured_calls_refuse_it(marker) -> None:  # type: ignore[no-untyped-def]
    row = planted(marker)
    with capture() as captured:
        # As if it had been recorded: capture() reads what the recorded signal hands it.
        signals.send(signals.recorded, message=row, using="default")
    with pytest.raises(ContentDisallowed, match="python-serialize"):
        captured.calls()
    with pytest.raises(ContentDisallowed):
        captured.assert_dispatched(read_item)
    assert not marker.exists()
