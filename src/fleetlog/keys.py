"""Every Redis key fleetlog reads or writes, named once.

The first two keep the original PHP design's names so that existing tools and
consumers keep working (CONTRACT.md).  Stream and group names come from the
settings; the rest are fleetlog's own and carry the ``fleetlog:`` prefix.
"""

from __future__ import annotations

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
    return f"fleetlog:node:{node_id}"

#: Hash: legacy batch id -> how many times it was claimed after its first take.
LEGACY_DELIVERIES = "fleetlog:list:deliveries"

#: Hash: SHA-256 of a device token -> device id.
TOKENS = "fleetlog:tokens"

#: Counter bumped on every credential change; gateways reload when it moves.
TOKENS_VERSION = "fleetlog:tokens:version"

#: Pub/sub channel announcing each credential change to every gateway node.
TOKENS_CHANGED = "fleetlog:tokens:changed"


def token_change_acks(change_id: str) -> str:
    """List each gateway node pushes its id onto once it applied credential change ``change_id``."""
    return f"fleetlog:tokens:acks:{change_id}"


def device_credential(device_id: str) -> str:
    """Hash: ``token_hash``, ``created_at``, ``rotated_at`` of one device."""
    return f"fleetlog:device:{device_id}"


def node_control(node_id: str) -> str:
    """Pub/sub channel a gateway node listens on (take-overs, commands)."""
    return f"fleetlog:control:{node_id}"


def frame_seen(device_id: str, frame_id: str) -> str:
    """Marker that a v2 frame id was queued, kept for the dedupe window."""
    return f"fleetlog:frame:{device_id}:{frame_id}"


def seq_state(device_id: str, session: str) -> str:
    """Hash with the device's ``through`` watermark (v2 ``seq``), per session."""
    return f"fleetlog:seq:{device_id}:{session}"


def seq_above(device_id: str, session: str) -> str:
    """Sorted set of seqs received above the watermark (the gaps' far side)."""
    return f"fleetlog:seq-above:{device_id}:{session}"


def refusals(device_id: str) -> str:
    """Hash: reason -> how many frames or handshakes of this device were refused."""
    return f"fleetlog:refusals:{device_id}"
