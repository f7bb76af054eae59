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
