"""The serverless broker (aftercommit.transport): a consumer never takes a message half written."""

from __future__ import annotations

import os
from pathlib import Path
from queue import Empty

import pytest
from kombu import Connection

from aftercommit import transport


def test_put__message_being_written__no_consumer_takes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folders = {"data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path)}
    with Connection(
        "filesystem://", transport=transport.FilesystemTransport, transport_options=folders
    ) as conn:
        channel = conn.default_channel
        while_written: list[str] = []
        rename = os.replace

        def replace(src: str, dst: str) -> None:
            while_written.extend(os.listdir(tmp_path))
            with pytest.raises(Empty):  # what this kombu's consumer does at that instant
                channel._get("celery")
            rename(src, dst)

        monkeypatch.setattr(transport.os, "replace", replace)
        channel._put("celery", {"body": "whole"})
        monkeypatch.undo()

        # kombu up to 5.6 takes any file whose name contains ".celery.msg" (5.7 only one named
        # "<anything>.celery.msg"): the matrix runs both, so the name must pass both.
        assert while_written, "the message was not written under a temporary name"
        assert not [name for name in while_written if ".celery.msg" in name]
        assert channel._get("celery") == {"body": "whole"}
