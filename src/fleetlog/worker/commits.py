"""Announcing each committed batch, so that live readers wake without polling the store.

After a batch is stored and acknowledged, the worker publishes on
``fleetlog:commits`` (:data:`fleetlog.keys.COMMITS`) one small JSON object::

    {"seq": 1234, "count": 500, "devices": ["door-1", "door-2"]}

``seq`` is the store's highest record seq after the commit: a reader that has
shown everything up to its own cursor reads ``store.after(cursor)`` and is
current.  ``devices`` lists the devices the batch touched (at most
:data:`MAX_DEVICES`; ``"more": true`` when there were more).  Pub/sub delivers
at most once, so a reader must also read after (re)subscribing, never rely on
the announcements alone.  A failed publish is logged and forgotten: the
records are stored either way.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Final

import orjson
import redis

from fleetlog import keys
from fleetlog.records import QueuedRecord

__all__ = ["MAX_DEVICES", "CommitAnnouncer"]

log = logging.getLogger("fleetlog.worker")

#: The most device ids one announcement lists.
MAX_DEVICES: Final = 100


class CommitAnnouncer:
    """Publishes one announcement per committed batch on a blocking Redis client."""

    def __init__(self, client: Any, channel: str = keys.COMMITS) -> None:
        self._client = client
        self._channel = channel

    def announce(self, seq: int, records: Sequence[QueuedRecord]) -> None:
        devices = sorted({record.device_id for record in records})
        message: dict[str, Any] = {"seq": seq, "count": len(records), "devices": devices[:MAX_DEVICES]}
        if len(devices) > MAX_DEVICES:
            message["more"] = True
        try:
            self._client.publish(self._channel, orjson.dumps(message))
        except redis.RedisError as exc:
            log.warning("commit announcement not published (%s); live readers catch up later", exc)
