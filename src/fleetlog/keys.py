"""Every Redis key fleetlog reads or writes, named once.

The first two keep the original PHP design's names so that existing tools and
consumers keep working (docs/CONTRACT.md).  Stream and group names come from the
settings; the rest are fleetlog's own and carry the ``fleetlog:`` prefix.

Every variable part of a key (a device id, a node id, a session) goes through
:func:`part`, an injective escape: ``:`` and the other characters that mean
something in a key or a pattern (``{}`` hash tags, ``*?[]`` globs, spaces) are
never left as they are.  Without it device ``a`` with session ``b:s1`` and
device ``a:b`` with session ``s1`` named the same key, so one device could
make another's records look like duplicates.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote

#: The strings :func:`part` leaves as they are (``quote``'s always-safe characters).
_PLAIN: Final = re.compile(r"[A-Za-z0-9_.~-]+")


def part(value: str) -> str:
    """Escape one variable part of a key, injectively (percent-encoding of UTF-8).

    Only ASCII letters, digits and ``_.-~`` are kept as they are, so ids that
    are plain names read the same in ``redis-cli``; lone surrogates (which a
    JSON frame can carry) are encoded too, so no two strings share a form.
    """
    if _PLAIN.fullmatch(value):  # what quote() would keep: skip it on the hot path
        return value
    return quote(value, safe="", errors="surrogatepass")


def unpart(encoded: str) -> str:
    """The value :func:`part` escaped (for listing keys found by SCAN)."""
    return unquote(encoded, errors="surrogatepass")

#: Hash: device id -> JSON ``{"node", "conn", "since"}`` of its live connection.
DEVICE_LINKS = "device:links"

#: List the original design LPUSHed each record's JSON onto (``--queue list``).
LEGACY_LIST = "device:log:list"

#: Counter giving each batch taken off the legacy list its own id.
LEGACY_BATCH_SEQ = "fleetlog:list:batch-seq"

#: Sorted set of legacy batches in flight: member batch id, score claim time (ms).
LEGACY_INFLIGHT = "fleetlog:list:inflight"


def legacy_processing(batch_id: int) -> str:
    """List holding the records of one legacy batch until the store has them."""
    return f"fleetlog:list:processing:{batch_id}"


def node_heartbeat(node_id: str) -> str:
    """String key with a TTL: present while gateway ``node_id`` is alive."""
    return f"fleetlog:node:{part(node_id)}"

#: Hash: legacy batch id -> how many times it was claimed after its first take.
LEGACY_DELIVERIES = "fleetlog:list:deliveries"

#: Hash: legacy batch id -> when it was first taken (ms): its records' ``received_at``, the
#: same on every delivery, so a replayed batch is the same records to the store.
LEGACY_RECEIVED = "fleetlog:list:received"

#: String key (value: a worker's consumer name, with a TTL): the one worker draining the
#: legacy list (:class:`~fleetlog.queue.lease.LeasedListConsumer`).
LEGACY_LEASE = "fleetlog:list:lease"

#: Hash: SHA-256 of a device token -> device id.
TOKENS = "fleetlog:tokens"

#: Counter bumped on every credential change; gateways reload when it moves.
TOKENS_VERSION = "fleetlog:tokens:version"

#: Pub/sub channel announcing each credential change to every gateway node.
TOKENS_CHANGED = "fleetlog:tokens:changed"


@dataclass(frozen=True, slots=True)
class CredentialKeys:
    """The keys of the device credentials, which one script changes together.

    One Redis keeps the names above; on a Redis Cluster they share the hash
    tag ``{tokens}`` (one slot), since each change is one atomic script over
    the table, the version and the device's own hash.  The change is announced
    with ``publish`` on ``changed``: on a cluster a sharded channel of the same
    slot (SPUBLISH), whose subscriber count is the whole cluster's, so a
    command waits for every gateway that heard it.
    """

    tokens: str
    version: str
    device_prefix: str
    changed: str
    publish: str

    def device(self, device_id: str) -> str:
        """Hash: ``token_hash``, ``created_at``, ``rotated_at`` of one device."""
        return f"{self.device_prefix}{part(device_id)}"


SINGLE_CREDENTIALS = CredentialKeys("fleetlog:tokens", "fleetlog:tokens:version", "fleetlog:device:",
                                    "fleetlog:tokens:changed", "PUBLISH")
CLUSTER_CREDENTIALS = CredentialKeys("fleetlog:{tokens}", "fleetlog:{tokens}:version",
                                     "fleetlog:{tokens}:device:", "fleetlog:{tokens}:changed",
                                     "SPUBLISH")


def credential_keys(cluster: bool) -> CredentialKeys:
    """The credential keys for one Redis, or (``cluster``) for a Redis Cluster."""
    return CLUSTER_CREDENTIALS if cluster else SINGLE_CREDENTIALS


def token_change_acks(change_id: str) -> str:
    """List each gateway node pushes its id onto once it applied credential change ``change_id``."""
    return f"fleetlog:tokens:acks:{change_id}"


def device_credential(device_id: str) -> str:
    """Hash: ``token_hash``, ``created_at``, ``rotated_at`` of one device."""
    return f"fleetlog:device:{part(device_id)}"


def node_control(node_id: str) -> str:
    """Pub/sub channel a gateway node listens on (take-overs, commands)."""
    return f"fleetlog:control:{part(node_id)}"


def shard_of(device_id: str, shards: int) -> int:
    """The queue shard of a device: stable (CRC-32 of its UTF-8 id), so its order holds."""
    if shards == 1:
        return 0
    return zlib.crc32(device_id.encode("utf-8", "surrogatepass")) % shards


def shard_tag(shard: int, shards: int) -> str:
    """The hash tag of a shard's keys (``{s3}``: one cluster slot); '' with one shard.

    One shard keeps the names fleetlog always used, so existing deployments see
    no change; with more, every key of a shard hashes to the same slot, which
    lets one script call touch them all on a Redis Cluster.
    """
    return "" if shards == 1 else f"{{s{shard}}}"


def shard_stream(stream: str, shard: int, shards: int) -> str:
    """Shard ``shard``'s stream: ``stream`` itself with one shard, else
    ``fleetlog:{s3}:records`` for ``fleetlog:records`` (the tag before the last part)."""
    if shards == 1:
        return stream
    head, sep, tail = stream.rpartition(":")
    return f"{head}{sep}{shard_tag(shard, shards)}:{tail}"


def shard_lease(stream: str, shard: int, shards: int) -> str:
    """String key (value: a worker's consumer name, with a TTL): who drains shard ``shard``."""
    return f"{shard_stream(stream, shard, shards)}:lease"


def _hash_tag(key: str) -> str | None:
    """The hash tag a Redis Cluster hashes ``key`` by, if it has one (``{s3}`` gives ``s3``)."""
    start = key.find("{")
    end = key.find("}", start + 1) if start >= 0 else -1
    return key[start + 1:end] if end > start + 1 else None


def queue_backlog(stream: str) -> str:
    """String key: the records queued in ``stream`` (a shard's) and not yet acknowledged.

    The gateway's ingest script adds each packed entry's records, the worker's
    acknowledgement takes them off (:data:`~fleetlog.queue.scripts.ACK`).  It
    lives in the stream's cluster slot: ``fleetlog:{s3}:records:backlog`` beside
    a shard's stream, ``{fleetlog:records}:backlog`` beside a stream without a
    tag (a tag of the stream's whole name hashes as the name does).
    """
    if _hash_tag(stream) is not None or "}" in stream:
        return f"{stream}:backlog"  # (a name with a stray "}" cannot share its slot this way)
    return f"{{{stream}}}:backlog"


def shard_workers(stream: str) -> str:
    """Sorted set: worker consumer name -> until when (ms) it counts as alive, for rebalancing."""
    return f"{stream}:workers"


def _tagged(tag: str) -> str:
    return f"fleetlog:{tag}:" if tag else "fleetlog:"


def recent_frames(device_id: str, tag: str = "") -> str:
    """Sorted set: v2 frame ids the device had queued (score: when), its last
    :data:`~fleetlog.queue.scripts.MAX_FRAMES` within the dedupe window.
    ``tag``: its shard's hash tag (:func:`shard_tag`)."""
    return f"{_tagged(tag)}frames:{part(device_id)}"


def stored_seqs(device_id: str, tag: str = "") -> str:
    """Hash: session -> the ranges of v2 ``seq`` the device had stored in it.

    The value is ``USE|from-to,from-to,...`` (``USE`` orders the sessions by
    last use); at most :data:`~fleetlog.queue.scripts.MAX_SESSIONS` sessions and
    :data:`~fleetlog.queue.scripts.MAX_RANGES` ranges each are kept.
    ``tag``: its shard's hash tag (:func:`shard_tag`).
    """
    return f"{_tagged(tag)}seqs:{part(device_id)}"


#: Whose refusals those of no known device are (a handshake without a valid token): the empty
#: id, which no device can have (``-`` could, and a device named so got every stranger's 401s).
ANONYMOUS: Final = ""


def refusals(device_id: str) -> str:
    """Hash: reason -> how many frames or handshakes of this device (or :data:`ANONYMOUS`)
    were refused."""
    return f"fleetlog:refusals:{part(device_id)}"


def command_reply(command_id: str) -> str:
    """Pub/sub channel the gateway holding a device answers one command on.

    Both messages about command ``command_id`` come here: ``delivered`` or
    ``offline`` from the node, then the device's ``command_result``.
    """
    return f"fleetlog:command:{part(command_id)}"


#: Pub/sub channel a worker announces each committed batch on (see ``fleetlog.worker.commits``).
COMMITS = "fleetlog:commits"

#: Pub/sub channel ``fleetlog api-token revoke`` announces a revoked token's SHA-256 on:
#: every API process ends the answers still open with it (``fleetlog.api.bus``).
API_TOKEN_CHANGES = "fleetlog:api-token-changes"

@dataclass(frozen=True, slots=True)
class ApiTokenKeys:
    """The keys of the operator (API) tokens, which one script changes together.

    ``table`` is a hash: SHA-256 of a token -> JSON ``{"name", "role",
    "created_at"}``, what every API request looks up.  :meth:`name` is a hash
    per token name: ``token_hash``, ``role``, ``created_at``.  One Redis keeps
    the names fleetlog always used; on a Redis Cluster they share the hash tag
    ``{api-tokens}`` (one slot), since adding and revoking are each one script
    over the table and a name's record.
    """

    table: str
    name_prefix: str

    def name(self, name: str) -> str:
        """Hash: ``token_hash``, ``role``, ``created_at`` of the operator token named ``name``."""
        return f"{self.name_prefix}{part(name)}"


SINGLE_API_TOKENS = ApiTokenKeys("fleetlog:api-tokens", "fleetlog:api-token:")
CLUSTER_API_TOKENS = ApiTokenKeys("fleetlog:{api-tokens}", "fleetlog:{api-tokens}:name:")


def api_token_keys(cluster: bool) -> ApiTokenKeys:
    """The operator token keys for one Redis, or (``cluster``) for a Redis Cluster."""
    return CLUSTER_API_TOKENS if cluster else SINGLE_API_TOKENS
