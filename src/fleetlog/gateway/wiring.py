"""What a gateway node is built of, from its settings, apart from the server that runs it.

:func:`wire` builds :class:`GatewayParts` (in the manner of uvicorn's ``Config``):
the Redis clients, the producer, the link registry and the table of this node's
connections (:mod:`.devices`), the relay of commands (:mod:`.relay`), the token
cache and its watcher (:mod:`.tokens`), the authenticator, the limits and the
counters.  Building opens nothing: :class:`~fleetlog.gateway.server.Gateway`
(uvicorn's ``Server``) takes the parts, connects, listens and serves.

A device connection sees none of that but :class:`Shared`: exactly what it uses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import redis.asyncio
from prometheus_client import CollectorRegistry

from fleetlog.config import Settings
from fleetlog.credentials import TokenCache
from fleetlog.gateway.addresses import AddressLimit
from fleetlog.gateway.auth import Authenticator
from fleetlog.gateway.connection import CommandAnswer
from fleetlog.gateway.devices import Devices
from fleetlog.gateway.limits import AuthFailures, DeviceLimiter, DeviceLimiters
from fleetlog.gateway.messages import BufferBudget
from fleetlog.gateway.registry import LinkRegistry
from fleetlog.gateway.relay import CommandRelay
from fleetlog.gateway.tokens import TokenWatcher
from fleetlog.metrics import Histogram, TallyCollector
from fleetlog.process import give_memory_back
from fleetlog.queue import scripts
from fleetlog.queue.connection import connect_async, is_cluster
from fleetlog.queue.producer import Done, Producer
from fleetlog.queue.script_runner import ClusterAppend, ClusterScript, RedisAppend, RedisScript
from fleetlog.quietlog import RateLimitedLog

if TYPE_CHECKING:
    from fleetlog.gateway.server import DeviceConnection

__all__ = ["Counts", "GatewayParts", "HeapTrim", "Shared", "wire"]

log = logging.getLogger("fleetlog.gateway")

#: Trim the heap after this many buffered bytes were freed, or connections closed.
_TRIM_AFTER_BYTES: Final = 32 * 2**20
_TRIM_AFTER_CLOSES: Final = 200
#: ... and at most this often (seconds): a trim walks the whole heap.
_TRIM_EVERY: Final = 1.0


class Counts:
    """Counted in plain attributes on the hot path, read at scrape time (:mod:`fleetlog.metrics`)."""

    __slots__ = ("ack_latency", "acks", "errors", "frames_in")

    def __init__(self) -> None:
        self.frames_in = 0
        self.acks = 0
        #: Frames and connections refused, by error code.
        self.errors: dict[str, int] = {}
        self.ack_latency = Histogram()

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1


class HeapTrim:
    """After many connections closed or many buffered bytes were freed: trim the heap.

    Without it, memory an attack made the gateway hold (unfinished messages,
    the read buffers of thousands of connections) stays in the process for
    good once freed: 2,891 MB after 3,000 such connections closed, against
    170 MB before.
    """

    def __init__(self, buffered: BufferBudget) -> None:
        self._buffered = buffered
        #: Connections closed so far, and both counts at the last heap trim.
        self.closed = 0
        self._trimmed_at = (0, 0)
        self._due = 0.0

    def connection_closed(self) -> None:
        self.closed += 1
        if self.closed - self._trimmed_at[1] >= _TRIM_AFTER_CLOSES:
            self.maybe()

    def maybe(self) -> None:
        """Trim if enough was freed since the last trim, and that was long enough ago."""
        freed = self._buffered.given - self._trimmed_at[0]
        closed = self.closed - self._trimmed_at[1]
        now = time.monotonic()
        if (freed >= _TRIM_AFTER_BYTES or closed >= _TRIM_AFTER_CLOSES) and now >= self._due:
            self._trimmed_at = (self._buffered.given, self.closed)
            self._due = now + _TRIM_EVERY
            give_memory_back()


class Submit(Protocol):
    """:meth:`fleetlog.queue.producer.Producer.submit`."""

    def __call__(self, device_id: str, records: Sequence[bytes], done: Done, *,
                 seqs: Sequence[int | None] | None = ..., session: str = ...,
                 frame_id: str | None = ...) -> None: ...


@dataclass(frozen=True, slots=True)
class Shared:
    """All a device connection uses of its node (one object, shared by every connection)."""

    #: The limits of its sans-I/O :class:`~fleetlog.gateway.connection.Connection`.
    max_message_bytes: int
    max_records_per_frame: int
    limiter_for: Callable[[str, float], DeviceLimiter]
    #: Bytes held in unfinished (fragmented) messages, all connections together.
    budget: BufferBudget
    counts: Counts
    #: Where it registers, links and claims devices, and goes.
    devices: Devices[DeviceConnection]
    #: Hands records to the producer (raises :class:`~fleetlog.errors.QueueClosed` at shutdown).
    submit: Submit
    count_refusal: Callable[[str | None, str], None]
    #: Relays a device's ``command_result``.
    answer: Callable[[CommandAnswer], None]
    #: ``--queue list`` with device authentication: the record alone is pushed, so
    #: it must name its device (:func:`~fleetlog.protocol.owned_record`).
    records_name_device: bool = False


@dataclass(frozen=True, slots=True)
class GatewayParts:
    """A gateway node's parts, built from its settings by :func:`wire`; nothing opened yet."""

    settings: Settings
    #: Ingest, links, heartbeats, control messages, command replies.
    client: redis.asyncio.Redis
    #: Token lookups: a client and a pool of their own (``token_lookups`` connections).
    lookup_client: redis.asyncio.Redis
    lookup_slots: asyncio.Semaphore
    lookup_failures: RateLimitedLog
    tokens: TokenCache
    token_watcher: TokenWatcher
    auth: Authenticator
    auth_failures: AuthFailures
    addresses: AddressLimit
    buffered: BufferBudget
    limiters: DeviceLimiters
    #: The ingest scripts and the plain append, told to wait for replicas once the
    #: topology is known.
    ingest: ClusterScript | RedisScript
    ingest_plain: ClusterScript | RedisScript
    append: ClusterAppend | RedisAppend
    producer: Producer
    registry: LinkRegistry
    devices: Devices[DeviceConnection]
    relay: CommandRelay
    counts: Counts
    trim: HeapTrim
    shared: Shared
    metrics: CollectorRegistry


def wire(settings: Settings, redis_url: str) -> GatewayParts:
    """Build a node's parts from its settings (no I/O: :meth:`Gateway.start` connects)."""
    client = connect_async(redis_url, timeout=settings.redis_timeout)
    tokens = TokenCache()
    buffered = BufferBudget(settings.max_buffered_bytes)
    limiters = DeviceLimiters(
        records_per_s=settings.rate_records, bytes_per_s=settings.rate_bytes,
        burst=settings.rate_burst, max_delay=settings.rate_max_delay,
    )
    cluster = is_cluster(client)
    runner = ClusterScript if cluster else RedisScript
    replicas = settings.ack_replicas or 0
    # within the socket timeout, so WAIT's own answer comes back
    replica_timeout = min(settings.ack_replicas_timeout, settings.redis_timeout / 2)
    ingest, ingest_plain = (runner(client, script, replicas=replicas, replica_timeout=replica_timeout)
                            for script in (scripts.INGEST, scripts.INGEST_PLAIN))
    append = (ClusterAppend if cluster else RedisAppend)(
        client, replicas=replicas, replica_timeout=replica_timeout)
    producer = Producer(
        client, mode=settings.queue, stream=settings.stream, max_backlog=settings.max_backlog,
        shards=settings.shards, runner=ingest, plain_runner=ingest_plain, append_runner=append,
        dedupe_window=int(settings.dedupe_window),
        linger=settings.ingest_linger,
    )
    registry = LinkRegistry(
        client,
        node_id=settings.node_id,
        heartbeat_ttl=settings.heartbeat_ttl,
        info={"host": settings.host, "port": settings.ws_port},
        take_over=settings.auth != "none",
    )
    trim = HeapTrim(buffered)
    devices: Devices[DeviceConnection] = Devices(registry, trim.connection_closed)
    relay = CommandRelay(client, settings.node_id, devices.recipient)
    counts = Counts()
    return GatewayParts(
        settings=settings,
        client=client,
        lookup_client=connect_async(redis_url, timeout=settings.redis_timeout,
                                    pool_size=settings.token_lookups),
        lookup_slots=asyncio.Semaphore(settings.token_lookups),
        lookup_failures=RateLimitedLog(log, interval=10.0),
        tokens=tokens,
        token_watcher=TokenWatcher(client, tokens, node_id=settings.node_id,
                                   on_revoked=devices.close_revoked,
                                   connected=devices.connected_tokens),
        auth=Authenticator(settings.auth, tokens, jwt_secret=settings.jwt_secret,
                           jwt_public_key=settings.jwt_public_key),
        auth_failures=AuthFailures(per_s=settings.auth_failures_per_ip,
                                   burst=settings.auth_failures_burst),
        addresses=AddressLimit(settings.max_connections_per_ip),
        buffered=buffered,
        limiters=limiters,
        ingest=ingest,
        ingest_plain=ingest_plain,
        append=append,
        producer=producer,
        registry=registry,
        devices=devices,
        relay=relay,
        counts=counts,
        trim=trim,
        shared=Shared(max_message_bytes=settings.max_frame_bytes,
                      max_records_per_frame=settings.max_records_per_frame,
                      limiter_for=limiters.get, budget=buffered, counts=counts, devices=devices,
                      submit=producer.submit, count_refusal=registry.count_refusal,
                      answer=relay.answer,
                      records_name_device=settings.queue == "list" and settings.auth != "none"),
        metrics=_metrics(devices, counts, buffered, producer, relay),
    )


def _metrics(devices: Devices[Any], counts: Counts, buffered: BufferBudget, producer: Producer,
             relay: CommandRelay) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TallyCollector([
        ("gauge", "fleetlog_gateway_connections", "Open device connections.",
         lambda: len(devices.connections)),
        ("counter", "fleetlog_gateway_frames_total", "Data frames received from devices.",
         lambda: counts.frames_in),
        ("counter", "fleetlog_gateway_acks_total",
         "Frames acknowledged to devices once Redis had their records.", lambda: counts.acks),
        ("counter", "fleetlog_gateway_errors_total|code",
         "Frames and connections refused, by error code.", lambda: counts.errors),
        ("gauge", "fleetlog_gateway_buffered_bytes",
         "Bytes held for what devices send: unfinished fragmented messages and the growth of "
         "read buffers, all connections together.",
         lambda: buffered.held),
        ("counter", "fleetlog_gateway_buffer_full_closes_total",
         "Connections closed (1008) because max_buffered_bytes was held already.",
         lambda: buffered.refused),
        ("counter", "fleetlog_gateway_unconfirmed_records_total",
         "Records answered unconfirmed: sent to Redis, perhaps queued, not acknowledged.",
         lambda: producer.unconfirmed),
        ("histogram", "fleetlog_gateway_ack_latency_seconds",
         "From handing a frame's records to the producer to Redis' answer.",
         lambda: counts.ack_latency),
        ("counter", "fleetlog_gateway_commands_total|status",
         "Commands for devices on this node, by outcome.", lambda: relay.counts),
    ]))
    return registry
