"""fleetlog.gateway.pool, its parts: node ids per child and life, each child's settings, the reserved port.

The pool as a whole (N processes on one port, restarts, one stop) is tested end to end in
``test_processes.py``; the restart policy in ``tests/test_process.py``.
"""

from __future__ import annotations

import errno
import socket

import pytest

from fleetlog.gateway.pool import _node_env, _reserve, child_node_id


def test_each_child_and_each_restart_is_a_node_of_its_own() -> None:
    names = [child_node_id("gw", k, start) for k in range(2) for start in range(3)]
    assert names == ["gw-p0", "gw-p0-r1", "gw-p0-r2", "gw-p1", "gw-p1-r1", "gw-p1-r2"]
    assert len(set(names)) == len(names)


def test_each_child_gets_its_node_id_and_its_own_metrics_port() -> None:
    assert _node_env("gw", 2, 9100, 1) == {"FLEETLOG_NODE_ID": "gw-p2-r1",
                                           "FLEETLOG_GATEWAY_METRICS_PORT": "9102"}
    assert _node_env("gw", 2, 0, 0) == {"FLEETLOG_NODE_ID": "gw-p2"}  # no metrics listener asked for


def test_the_reserved_port_is_shared_with_the_children_and_never_accepts_itself() -> None:
    reservation = _reserve("127.0.0.1", 0)
    try:
        port = reservation.getsockname()[1]
        assert port > 0
        # Nothing listens yet: a device connecting now is refused, never queued on the parent.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        # A child (SO_REUSEPORT, the same user) may listen on it ...
        child = socket.socket()
        child.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        child.bind(("127.0.0.1", port))
        child.listen()
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        child.close()
        # ... another program (no SO_REUSEPORT) may not take it.
        other = socket.socket()
        with pytest.raises(OSError, match="Address already in use") as taken:
            other.bind(("127.0.0.1", port))
        assert taken.value.errno == errno.EADDRINUSE
        other.close()
    finally:
        reservation.close()


def test_a_port_another_program_holds_cannot_be_reserved() -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        with pytest.raises(OSError, match="Address already in use") as taken:
            _reserve("127.0.0.1", holder.getsockname()[1])
        assert taken.value.errno == errno.EADDRINUSE
    finally:
        holder.close()
