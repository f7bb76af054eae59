"""``fleetlog devices``: what the store knows of each device, joined with its live link."""

from __future__ import annotations

from typing import Any

from fleetlog import keys
from fleetlog.config import Settings
from fleetlog.gateway.registry import is_online, parse_link
from fleetlog.queue.connection import REDIS_DOWN, connect
from fleetlog.records import iso_ms
from fleetlog.store import open_store

__all__ = ["list_devices"]


def _live_nodes(client: Any) -> set[str]:
    prefix = keys.node_heartbeat("")
    return {keys.unpart(key.decode()[len(prefix):])
            for key in client.scan_iter(match=f"{prefix}*", count=1000)}


def _refusals(client: Any) -> dict[str, dict[str, int]]:
    prefix = keys.refusals("")
    result = {}
    for key in client.scan_iter(match=f"{prefix}*", count=1000):
        counts = client.hgetall(key)
        result[keys.unpart(key.decode()[len(prefix):])] = {k.decode(): int(v) for k, v in counts.items()}
    return result


def list_devices(settings: Settings, redis_url: str | None) -> tuple[list[dict[str, Any]], str]:
    """One row per device (CONTRACT.md's fields plus ``refused`` counts by reason), and a warning."""
    links: dict[str, dict[str, Any]] = {}
    refused: dict[str, dict[str, int]] = {}
    live: set[str] = set()
    warning = ""
    if redis_url is not None:
        client: Any = connect(redis_url, timeout=settings.redis_timeout)
        try:
            links = {
                device.decode(): parse_link(raw)
                for device, raw in client.hgetall(keys.DEVICE_LINKS).items()
            }
            live = _live_nodes(client)
            refused = _refusals(client)
        except REDIS_DOWN as exc:
            warning = f"Redis unavailable ({exc}); online state unknown (shown as offline)"
        finally:
            client.close()
    store = open_store(settings.store_url)
    try:
        stats = {row.device_id: row for row in store.devices()}
    finally:
        store.close()
    rows = []
    for device_id in sorted(stats.keys() | links.keys() | (refused.keys() - {"-"})):
        link = links.get(device_id)
        online = link is not None and is_online(link, live)
        stat = stats.get(device_id)
        rows.append({
            "device_id": device_id,
            "online": online,
            "node": link.get("node") if link and online else None,
            "connected_since": link.get("since") if link and online else None,
            "last_seen": iso_ms(stat.last_seen) if stat else None,
            "records": stat.records if stat else 0,
            "refused": refused.get(device_id, {}),
        })
    return rows, warning
