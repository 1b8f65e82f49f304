"""A broker that needs no server, for development and the demo: kombu's filesystem transport with
atomic writes.

kombu's own writer creates the message file, then fills it; a consumer polling at that instant
moves the empty file away and fails to decode it, losing the message (celery/kombu#1551). Here a
message is written under a name consumers ignore and renamed into place, which is atomic.

    CELERY_BROKER_URL = "filesystem://"
    CELERY_BROKER_TRANSPORT = "aftercommit.transport:FilesystemTransport"
"""

from __future__ import annotations

import os
import uuid
from time import monotonic
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem
from kombu.utils.encoding import str_to_bytes
from kombu.utils.json import dumps


class FilesystemChannel(filesystem.Channel):  # type: ignore[misc]
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:  # type: ignore[override]
        name = f"{round(monotonic() * 1000)}_{uuid.uuid4()}.{queue}.msg"
        final = os.path.join(self.data_folder_out, name)
        # Without the queue in it: kombu up to 5.6 takes any file whose name merely contains
        # ".<queue>.msg", so it would take this one half written and fail to decode it.
        partial = os.path.join(self.data_folder_out, f".partial-{uuid.uuid4()}")
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.replace(partial, final)
        except OSError as exc:
            raise ChannelError(f"Cannot add file {final!r} to directory") from exc


class FilesystemTransport(filesystem.Transport):  # type: ignore[misc]
    Channel = FilesystemChannel
