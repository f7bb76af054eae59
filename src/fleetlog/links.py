"""How a device's live link is kept in Redis (``device:links``), read by anyone.

The gateway writes links (:mod:`fleetlog.gateway.registry`); readers
(``fleetlog devices``, the HTTP API) decode them here, without importing the
gateway.  A link is online while its gateway node's heartbeat key lives.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["is_online", "parse_link"]


def parse_link(raw: bytes | str) -> dict[str, Any]:
    """Decode a ``device:links`` value; the original stored a bare fd number."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return value
    return {"node": None, "conn": raw.decode() if isinstance(raw, bytes) else raw, "since": None}


def is_online(link: dict[str, Any], live_nodes: set[str]) -> bool:
    """True when the node holding ``link`` is alive (its heartbeat key exists)."""
    return link.get("node") in live_nodes
