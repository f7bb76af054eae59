"""What presence and queue rules look at, read from Redis every ``alert_poll`` seconds.

* Presence: a device is online while ``device:links`` has its link and the
  link's gateway node heartbeat lives (:mod:`fleetlog.links`).  The alerter
  keeps, per device it has seen online, ``{on, since, conn}``
  (``fleetlog:{alerts}:presence``), so an offline device's ``since`` survives
  a restart of the alerter or a failover.  A device the alerter never saw
  online is not reported offline.  A reconnect is a device seen on another
  connection than at the last poll, or online again after being offline: a
  device that reconnects several times between two polls counts once.
* Refusals: the gateway's per-device counters (``fleetlog:refusals:DEVICE``,
  by reason); the rate is the increase over the last minute, from samples the
  alerter keeps in memory (after a restart it counts from its first sample).
* Queue: backlog and dead letters from :mod:`fleetlog.queue.stats`; the lag is
  the age of the oldest record not yet stored (the oldest pending entry, or the
  first entry the workers' group has not read), over every shard.  The legacy
  list carries no times: there the lag is the age of the oldest batch in flight.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
import redis

from fleetlog import keys
from fleetlog.config import Settings
from fleetlog.links import parse_link
from fleetlog.queue.stats import queue_stats_for

__all__ = ["Presence", "QueueFacts", "RefusalRates", "online_devices", "queue_facts"]

#: The rates' window: a minute.
MINUTE_MS: Final = 60_000
_REFUSALS_PREFIX: Final = "fleetlog:refusals:"


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw


def online_devices(client: Any) -> dict[str, str]:
    """Device id -> its connection (``node|conn``) for every device online now."""
    links: dict[str, dict[str, Any]] = {}
    for device, raw in client.hscan_iter(keys.DEVICE_LINKS, count=5000):
        links[_text(device)] = parse_link(raw)
    nodes = sorted({str(link["node"]) for link in links.values() if isinstance(link.get("node"), str)})
    live: set[str] = set()
    if nodes:
        pipe = client.pipeline(transaction=False)
        for node in nodes:
            pipe.exists(keys.node_heartbeat(node))
        live = {node for node, exists in zip(nodes, pipe.execute(), strict=True) if exists}
    return {device: f"{link.get('node')}|{link.get('conn')}" for device, link in links.items()
            if link.get("node") in live}


@dataclass
class _State:
    on: bool
    since: int
    conn: str

    def to_json(self) -> bytes:
        return orjson.dumps({"on": self.on, "since": self.since, "conn": self.conn})


@dataclass
class Presence:
    """Each device's online state as the alerter saw it, and its recent reconnects."""

    states: dict[str, _State] = field(default_factory=dict)
    reconnects: dict[str, collections.deque[int]] = field(default_factory=dict)

    @classmethod
    def load(cls, saved: dict[str, bytes]) -> Presence:
        states = {}
        for device, raw in saved.items():
            try:
                value = orjson.loads(raw)
                states[device] = _State(bool(value["on"]), int(value["since"]), str(value["conn"]))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
        return cls(states)

    def update(self, online: dict[str, str], now: int) -> dict[str, bytes | None]:
        """Take a new view; return the changed states (to commit)."""
        changed: dict[str, bytes | None] = {}
        for device, conn in online.items():
            state = self.states.get(device)
            if state is None:
                state = self.states[device] = _State(True, now, conn)
            elif state.on and state.conn == conn:
                continue
            else:
                self.reconnects.setdefault(device, collections.deque()).append(now)
                state.on, state.since, state.conn = True, now, conn
            changed[device] = state.to_json()
        for device, state in self.states.items():
            if state.on and device not in online:
                state.on, state.since = False, now
                changed[device] = state.to_json()
        return changed

    def offline(self) -> dict[str, int]:
        """Device id -> since when (ms) it is offline."""
        return {device: state.since for device, state in self.states.items() if not state.on}

    def reconnect_counts(self, now: int) -> dict[str, int]:
        """Device id -> reconnects seen in the last minute."""
        counts = {}
        for device, times in list(self.reconnects.items()):
            while times and times[0] <= now - MINUTE_MS:
                times.popleft()
            if times:
                counts[device] = len(times)
            else:
                del self.reconnects[device]
        return counts


@dataclass
class RefusalRates:
    """Refusals per device over the last minute, from the gateway's counters."""

    samples: dict[str, collections.deque[tuple[int, dict[str, int]]]] = field(default_factory=dict)

    def update(self, client: Any, now: int) -> None:
        names = [_text(name) for name in client.scan_iter(match=f"{_REFUSALS_PREFIX}*", count=5000)]
        if not names:
            return
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(name)
        for name, counts in zip(names, pipe.execute(), strict=True):
            device = keys.unpart(name[len(_REFUSALS_PREFIX):])
            reasons = {_text(reason): int(count) for reason, count in counts.items()}
            times = self.samples.setdefault(device, collections.deque())
            times.append((now, reasons))
            while len(times) > 1 and times[1][0] <= now - MINUTE_MS:
                times.popleft()

    def rates(self) -> dict[str, tuple[int, dict[str, int]]]:
        """Device id -> (refusals in the last minute, by reason)."""
        found = {}
        for device, times in self.samples.items():
            first, last = times[0][1], times[-1][1]
            by_reason = {reason: count - first.get(reason, 0) for reason, count in last.items()
                         if count - first.get(reason, 0) > 0}
            if by_reason:
                found[device] = (sum(by_reason.values()), by_reason)
        return found


@dataclass(frozen=True, slots=True)
class QueueFacts:
    backlog: int
    dead_letters: int
    lag_ms: int


def _entry_ms(entry_id: bytes | str) -> int:
    return int(_text(entry_id).split("-", 1)[0])


def _oldest_unstored(client: Any, stream: str, group: str) -> int | None:
    """The time (ms) of the oldest entry of ``stream`` the group has not acknowledged."""
    oldest: list[int] = []
    last_delivered = None
    try:
        for info in client.xinfo_groups(stream):
            if _text(info["name"]) == group:
                last_delivered = _text(info["last-delivered-id"])
        if last_delivered is not None:
            summary = client.xpending(stream, group)
            if summary and summary.get("pending"):
                oldest.append(_entry_ms(summary["min"]))
    except redis.ResponseError:  # no stream yet
        return None
    unread = client.xrange(stream, min=f"({last_delivered}" if last_delivered else "-", max="+", count=1)
    if unread:
        oldest.append(_entry_ms(unread[0][0]))
    return min(oldest) if oldest else None


def queue_facts(client: Any, settings: Settings, now: int) -> QueueFacts:
    stats = queue_stats_for(client, settings)
    times: Iterable[int | None]
    if settings.queue == "list":
        first = client.zrange(keys.LEGACY_INFLIGHT, 0, 0, withscores=True)
        times = [int(first[0][1])] if first else []
    else:
        times = [_oldest_unstored(client, keys.shard_stream(settings.stream, shard, settings.shards),
                                  settings.group) for shard in range(settings.shards)]
    known = [at for at in times if at is not None]
    return QueueFacts(stats.backlog, stats.dead_letters, max(0, now - min(known)) if known else 0)
