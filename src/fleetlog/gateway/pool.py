"""``fleetlog gateway --processes N``: N gateway processes on one port, one parent.

One gateway process uses one core (its event loop); a machine with more
cores runs more processes.  They share the port with ``SO_REUSEPORT``: the
kernel spreads new connections over the listening sockets, so no process
hands connections to another.  Each child is a whole gateway node of its own
(node id ``<node_id>-p<k>``, with ``-r<n>`` after its n-th restart; its own
heartbeat, control channel and ``/healthz``): the registry already routes
take-overs and commands between nodes, so nothing here is shared but the port.

The parent does no I/O on the connections.  It binds the port first with
``SO_REUSEPORT`` (a taken port fails here, once, and ``--port 0`` picks one
port for all children) without listening on it, so the kernel never hands it
a connection; then it starts the children, restarts one that dies (bounded
backoff, :func:`fleetlog.process.tend`), and on SIGTERM or SIGINT stops them
all at once, each draining as a lone gateway does (:meth:`Gateway.stop`).  A
second signal kills them: a frame without a reply was not acked, so its
device sends it again.  Children get PR_SET_PDEATHSIG, so a killed parent
leaves none behind.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
from typing import Final

from fleetlog.config import Settings
from fleetlog.net import PortWait, wait_for_port
from fleetlog.process import Child, Supervisor

__all__ = ["child_node_id", "run_pool"]

log = logging.getLogger("fleetlog.gateway")

#: How long the children get to drain after SIGTERM: above a gateway's own drain limit.
_STOP_TIMEOUT: Final = 20.0
#: How often the parent looks for children that exited.
_WATCH_INTERVAL: Final = 0.2
#: How long the parent waits for the first child to listen.
_START_TIMEOUT: Final = 30.0


def child_node_id(node_id: str, index: int, start: int = 0) -> str:
    """The node id of child ``index`` in its ``start``-th life: ``gw-p0``, then ``gw-p0-r1``...

    A restarted child is a new node.  The links of the connections that died
    with the old process name a node whose heartbeat then expires, so their
    devices read offline until they reconnect, as after any node's death; under
    the old name they would have read online for good.
    """
    return f"{node_id}-p{index}" if start == 0 else f"{node_id}-p{index}-r{start}"


def _node_env(node_id: str, index: int, metrics_port: int, start: int) -> dict[str, str]:
    env = {"FLEETLOG_NODE_ID": child_node_id(node_id, index, start)}
    if metrics_port:  # each child its own metrics listener: port + k
        env["FLEETLOG_GATEWAY_METRICS_PORT"] = str(metrics_port + index)
    return env


def _reserve(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` with ``SO_REUSEPORT``, not listening: the port is ours, the children's too."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


class _Pool(Supervisor):
    def __init__(self, settings: Settings, redis_url: str, port: int) -> None:
        count = settings.gateway_processes
        env = {**os.environ, **settings.as_env(), "FLEETLOG_REDIS_URL": redis_url,
               "FLEETLOG_WS_PORT": str(port), "FLEETLOG_PROCESSES": "1",
               "FLEETLOG_REUSE_PORT": "true"}
        argv = [sys.executable, "-m", "fleetlog", "gateway"]
        super().__init__([
            Child(f"gateway {child_node_id(settings.node_id, k)}", argv, env=env,
                  env_for_start=functools.partial(_node_env, settings.node_id, k,
                                                  settings.gateway_metrics_port))
            for k in range(count)
        ], logger=log, forcing="second signal: killing the gateway processes now",
            watch_interval=_WATCH_INTERVAL)

    def run(self, host: str, port: int) -> int:
        try:
            self.start()
            outcome = wait_for_port(port, host=host, timeout=_START_TIMEOUT, gone=lambda: (
                self.stopping.is_set() or not any(child.alive() for child in self.children)))
            if outcome is PortWait.TIMED_OUT:
                log.error("gateway cannot start: no process listened on port %d in %.0fs",
                          port, _START_TIMEOUT)
                return 1
            if outcome is PortWait.GONE and not self.stopping.is_set():
                log.error("gateway cannot start: every gateway process exited before listening")
                return 1
            log.info("%d gateway processes on port %d", len(self.children), port)
            self.watch()
        finally:
            log.info("gateway stopping")
            self.stop(_STOP_TIMEOUT)  # all at once: they share nothing but the port
        return 1 if self.forced else 0


def run_pool(settings: Settings, redis_url: str) -> int:
    """Entry point of ``fleetlog gateway --processes N`` (N > 1): 0 after an orderly stop."""
    try:
        # The port is reserved (and watched) on the first of several addresses.
        host = settings.host.split(",")[0].strip()
        reservation = _reserve(host, settings.ws_port)
    except OSError as exc:
        log.error("gateway cannot start: cannot listen on %s:%d: %s", settings.host,
                  settings.ws_port, exc.strerror)
        return 1
    try:
        port: int = reservation.getsockname()[1]
        pool = _Pool(settings, redis_url, port)
        pool.install()
        return pool.run(host, port)
    finally:
        reservation.close()
