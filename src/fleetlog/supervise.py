"""``fleetlog up``: the whole system on the embedded default, in one command.

Before anything starts, ``up`` takes an exclusive lock on ``DATA_DIR/up.lock``
(held for its whole life, released by the kernel however it ends): a second
``up`` on the same data dir would start a second Valkey on the same AOF and a
second worker on the same store, so it exits 1 at once, naming the running
one's pid.  It also checks that the device port is free, since a gateway that
cannot listen would loop on "address already in use" while another program
answered in its place.

Start order: the embedded Valkey/Redis (unless ``--redis-url`` is given), then
the gateway and the worker as child processes; "fleetlog is up." is printed
only once the gateway listens.  A child that exits is started again (the
worker exits on purpose after ``--max-runtime``), and so is the embedded Redis:
with the same port, directory and AOF settings, so the gateway and worker
reconnect where they were and the AOF (``appendfsync always``) brings back
every record acked before it died; without that, a Redis killed once left
every device answered ``unavailable`` for as long as ``up`` ran.  Each part
going down and coming back is a line on stdout under the banner and a state
in ``DATA_DIR/redis/fleetlog-up.json``, which the API's ``/readyz`` shows
("redis": "down since ...; fleetlog up restarts it").  SIGINT or SIGTERM runs the
one shutdown path, in dependency order, each step bounded: the gateway
(stops accepting, waits for the replies in flight), then the worker (finishes
its batch and acks it), then Redis (writes its AOF); a child that does not stop
in time is SIGKILLed; exit 0.  The children run in process groups of their
own, so the Ctrl-C a terminal sends to its whole foreground group reaches
``up`` alone: otherwise Redis would stop at once under a worker still
draining ("Redis unavailable ... retrying"), and the gateway and worker would
take ``up``'s SIGTERM for a second, forcing, signal.  A second SIGINT does not wait:
it SIGKILLs the children (a worker acks only what it stored, so nothing is
lost), stops Redis and exits 130.  Children also get PR_SET_PDEATHSIG, so even
a SIGKILLed ``up`` leaves no process behind.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from fleetlog.backoff import Backoff
from fleetlog.config import Settings, mask_url
from fleetlog.embedded import RedisServer, remove_up_file, write_up_file
from fleetlog.lifecycle import EXIT_FORCED
from fleetlog.net import PortWait, wait_for_port
from fleetlog.process import Child, Supervisor, tend
from fleetlog.records import iso_ms

__all__ = ["run_up"]

log = logging.getLogger("fleetlog.up")

EXIT_OK = 0
EXIT_REFUSED = 1

_LOCK_FILE = "up.lock"
#: How long each child gets to stop after SIGTERM: above the gateway's own
#: drain limit and a worker's longest batch, so an orderly stop is never cut short.
_CHILD_STOP_TIMEOUT = 20.0
#: How often the watch loop looks for children that exited.
_WATCH_INTERVAL = 0.2
#: How long ``up`` waits for the gateway to listen before giving up.
_GATEWAY_START_TIMEOUT = 30.0
#: The API's CPU priority (nice): reads take what ingest (gateway, worker, Redis) leaves
#: of the cores, never the cores it needs (issue 17; ``python -m bench.ingest_reads``).
API_NICE = 19

#: A part's state when it runs (what ``/readyz`` shows for it).
OK = "ok"


def _niced(nice: int, argv: list[str]) -> list[str]:
    """``argv`` run at CPU priority ``nice`` (through ``nice(1)``; as it is where there is none)."""
    return ["nice", "-n", str(nice), *argv] if shutil.which("nice") else argv


def _how(code: int | None) -> str:
    """How a process ended, in words: ``killed by SIGKILL`` or ``exited with 1``."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with {code}"


def _lock_data_dir(data_dir: Path) -> int | None:
    """Take ``DATA_DIR/up.lock`` (flock, exclusive) and write our pid in it.

    Returns the open descriptor, to keep for the life of ``up``; None, after
    saying who holds it, when another ``up`` does.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / _LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        log.error("fleetlog up is already running on %s (pid %s); stop it first, or use "
                  "another --data-dir", data_dir, holder)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _port_taken(host: str, port: int) -> str | None:
    """Why the gateway could not listen on ``host:port``, or None if it can."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the gateway does
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use by another program"
            return f"cannot listen on {host}:{port}: {exc.strerror}"
    return None


def _command() -> str:
    """How the user can type ``fleetlog``: plain if it is on PATH, else its path (``.venv/bin``)."""
    script = Path(sys.executable).parent / "fleetlog"
    found = shutil.which("fleetlog")
    if not script.exists() or (found and Path(found).resolve() == script.resolve()):
        return "fleetlog"
    return os.path.relpath(script)


def _worker_metrics_port(settings: Settings) -> int:
    """The worker's ``/metrics`` port under ``up``: as set, else the HTTP port + 1 (0: off)."""
    if settings.metrics_port or not settings.http_port:
        return settings.metrics_port
    return settings.http_port + 1


def _gateway_metrics_port(settings: Settings) -> int:
    """The gateway's metrics listener under ``up``: as set, else the HTTP port + 2 (0: off)."""
    if settings.gateway_metrics_port or not settings.http_port:
        return settings.gateway_metrics_port
    return settings.http_port + 2


def _gateway_node(node_id: str, start: int) -> dict[str, str]:
    """The gateway's node id for its ``start``-th start: a restarted gateway is a new node
    (``-r<n>``), as a pool's child is (:func:`~fleetlog.gateway.pool.child_node_id`), so that
    the links its killed process left read offline once that node's heartbeat lapses (with
    the same id, the new process renewed it, and they read online for good)."""
    return {"FLEETLOG_NODE_ID": node_id if start == 0 else f"{node_id}-r{start}"}


def _metrics_ports(settings: Settings) -> tuple[int, int]:
    """The gateway's and the worker's ``/metrics`` ports under ``up``; 0 (off, said in the log)
    for one that cannot be listened on, so that the banner never shows an address that is not
    fleetlog's (the part itself would only log that it could not serve there)."""
    ports = []
    for part, port, host, flag in (
            ("gateway", _gateway_metrics_port(settings), settings.metrics_host, "--gateway-metrics-port"),
            ("worker", _worker_metrics_port(settings), settings.host, "--metrics-port")):
        taken = _port_taken(host, port) if port else None
        if taken:
            log.warning("%s metrics off: %s (choose another with %s)", part, taken, flag)
            port = 0
        ports.append(port)
    return ports[0], ports[1]


def _files_dir(settings: Settings) -> Path:
    """Where ``up``'s worker writes the daily files: ``files`` if set (flag, env or TOML),
    else the data dir's ``logs``."""
    return settings.files if settings.files is not None else settings.data_dir / "logs"


def _banner(settings: Settings, redis_url: str, embedded: bool, metrics: tuple[int, int]) -> str:
    data_dir = settings.data_dir
    fleetlog = _command()
    ws = f"{'wss' if settings.tls_cert else 'ws'}://{settings.host}:{settings.ws_port}"
    flag = f" --data-dir {data_dir}" if data_dir != Path("fleetlog-data") else ""
    files = "off" if settings.no_files else str(_files_dir(settings) / "device" / "log")
    gateway_metrics, worker_metrics = metrics
    return "\n".join([
        "fleetlog is up.",
        f"  devices connect to   {ws}   (health: http://{settings.host}:{settings.ws_port}/healthz)",
        f"  queue                {mask_url(redis_url)}{'  (embedded, AOF on)' if embedded else ''}",
        f"  store                {mask_url(settings.store_url)}",
        f"  daily files          {files}",
        f"  API and console      http://{settings.host}:{settings.http_port}/   "
        f"(token: {fleetlog} api-token add NAME --role admin{flag})",
        f"  metrics              http://{settings.host}:{settings.http_port}/metrics (API, with a token)"
        + (f", http://{settings.metrics_host}:{gateway_metrics}/metrics (gateway)" if gateway_metrics else "")
        + (f", http://{settings.host}:{worker_metrics}/metrics (worker)" if worker_metrics else ""),
        "",
        f"  device auth          {settings.auth}",
        "",
        "Try, in another terminal:",
        *([f"  {fleetlog} device add door-1{flag}        # prints door-1's token, once",
           f"  {fleetlog} simulate --url {ws} --devices 5 --messages 100 --provision{flag}"]
          if settings.auth == "token" else
          [f"  {fleetlog} simulate --url {ws} --devices 5 --messages 100"]),
        f"  {fleetlog} devices{flag}",
        f"  {fleetlog} logs sim-0001{flag} --follow",
        f"  {fleetlog} alert add errors --when 'level == \"error\"' --to ntfy://ntfy.sh/TOPIC{flag}",
        "",
        "Ctrl-C stops everything.",
    ])


class Up(Supervisor):
    """``up``'s supervisor: the core's children, plus the embedded Redis and the parts' states."""

    def __init__(self, settings: Settings, config_file: str | None) -> None:
        # Only a second SIGINT forces: a SIGTERM after a Ctrl-C still stops in order.
        super().__init__([], logger=log, forcing="second interrupt: killing the children now",
                         force_on={signal.SIGINT}, watch_interval=_WATCH_INTERVAL,
                         on_stop=lambda: log.info("stopping (interrupt again to stop at once)"))
        self.settings = settings
        self.config_file = config_file
        self.redis: RedisServer | None = None
        #: The Redis given with --redis-url (None: the embedded one, ``redis``).
        self.external_url: str | None = None
        #: Where the up file goes (see :mod:`fleetlog.embedded`), whichever Redis.
        self._up_dir = settings.data_dir / "redis"
        #: The embedded Redis as a :class:`Child`: restarted by :func:`tend`, like the others.
        self.redis_child: Child | None = None
        #: Whether the Redis started last has answered PING (loaded its AOF) since.
        self.redis_answers = False
        #: Each part's state: ``OK``, or why not (what ``/readyz`` shows, via the up file).
        self.parts: dict[str, str] = {}
        #: When each part that was said to be down went down (monotonic), to say for how long.
        self.down_since: dict[str, float] = {}

    def _argv(self, command: str, *extra: str) -> list[str]:
        argv = [sys.executable, "-m", "fleetlog", command, "--data-dir", str(self.settings.data_dir)]
        if self.config_file:
            argv += ["--config", self.config_file]
        return [*argv, *extra]

    def run(self) -> int:
        settings = self.settings
        for port, flag in ((settings.ws_port, "--ws-port"), (settings.http_port, "--http-port")):
            taken = _port_taken(settings.host, port)
            if taken:
                log.error("%s: choose another with %s", taken, flag)
                return EXIT_REFUSED
        redis_url = settings.redis_url
        if redis_url is None:
            self.redis = RedisServer(
                settings.data_dir / "redis", appendfsync=settings.redis_appendfsync
            )
            # Its own backoff, shorter than the children's: everything waits on Redis, and
            # a Redis that cannot start (port taken, disk full) still backs off to 5 s.
            self.redis_child = Child("redis", self.redis.command(), spawn=self.redis.spawn,
                                     backoff=Backoff(initial=0.2, cap=5.0))
            self.redis_child.start()
            self.redis.wait_ready()
            self.redis_answers = True
            self.parts = {"redis": OK, "gateway": OK, "worker": OK, "api": OK, "alerter": OK}
            self.redis.write_up_file(self.parts)
            redis_url = self.redis.url
        else:  # its own Redis: the other commands given this data dir find it the same way
            self.external_url = redis_url
            self.parts = {"gateway": OK, "worker": OK, "api": OK, "alerter": OK}
            write_up_file(self._up_dir, redis_url, self.parts)
        metrics = gateway_metrics, worker_metrics = _metrics_ports(settings)
        try:
            worker_extra = ["--redis-url", redis_url, "--consumer", f"up-{settings.node_id}",
                            "--metrics-port", str(worker_metrics)]
            if not settings.no_files:
                worker_extra += ["--files", str(_files_dir(settings))]
            env = {**os.environ, **settings.as_env()}
            self.children = [
                Child("gateway", self._argv(
                    "gateway", "--redis-url", redis_url, "--port", str(settings.ws_port),
                    "--gateway-metrics-port", str(gateway_metrics),
                ), env=env, env_for_start=functools.partial(_gateway_node, settings.node_id)),
                Child("worker", self._argv("worker", *worker_extra), env=env),
                Child("api", _niced(API_NICE, self._argv(
                    "api", "--redis-url", redis_url, "--port", str(settings.http_port),
                )), env=env),
                # Alert rules (fleetlog.alerts): follows the store, so it stops after the worker.
                Child("alerter", self._argv(
                    "alerter", "--redis-url", redis_url, "--consumer", f"up-alerter-{settings.node_id}",
                ), env=env),
            ]
            self.start()
            problem = self._wait_for_gateway(timeout=_GATEWAY_START_TIMEOUT)
            if problem:
                log.error("%s; stopping", problem)
                return EXIT_REFUSED
            print(_banner(settings, redis_url, self.redis is not None, metrics), flush=True)
            self.watch()
        finally:
            self._shutdown()
        return EXIT_FORCED if self.forced else EXIT_OK

    def _wait_for_gateway(self, timeout: float) -> str | None:
        """Wait until our gateway listens; what went wrong if it does not."""
        gateway = self.children[0]
        port = self.settings.ws_port
        outcome = wait_for_port(port, host=self.settings.host, timeout=timeout,
                                gone=lambda: self.stopping.is_set() or not gateway.alive())
        if outcome is PortWait.TIMED_OUT:
            return f"the gateway did not listen on port {port} in {timeout:.0f}s"
        if outcome is PortWait.GONE and not self.stopping.is_set():
            code = gateway.process.returncode if gateway.process else None
            return f"the gateway exited with {code} before listening on port {port}"
        return None

    def tend(self, now: float) -> None:
        if self.redis_child is not None:
            self._tend_redis(self.redis_child, now)
        for child in self.children:
            tend(child, now)
            self._note(child, OK if child.alive() else self._down(child), now)

    def _tend_redis(self, child: Child, now: float) -> None:
        """Restart the embedded Redis if it died; it is up again once it answers PING.

        Between its start and its first PONG it replays the AOF: "restarting",
        not yet "ok" (the gateway still answers ``unavailable``).
        """
        assert self.redis is not None
        starts = child.starts
        tend(child, now)
        if child.starts != starts:
            self.redis_answers = False
            log.info("redis started again (pid %s) on port %d, directory %s",
                     child.process.pid if child.process else None, self.redis.port,
                     self.redis.directory)
        if child.alive() and not self.redis_answers:
            self.redis_answers = self.redis.answers(timeout=_WATCH_INTERVAL)
        elif not child.alive() and self.parts.get("redis", OK).startswith("restarting"):
            log.warning("redis exited before it answered; the end of %s:\n%s",
                        self.redis.directory / "server.log", self.redis.log_tail(800))
        if not child.alive():
            state = self._down(child)
        elif self.redis_answers:
            state = OK
        elif self.parts.get("redis", OK).startswith("restarting"):
            state = self.parts["redis"]  # the same state: keep its first time
        else:
            state = f"restarting since {iso_ms(int(time.time() * 1000))} (loading its data)"
        self._note(child, state, now)

    def _down(self, child: Child) -> str:
        """The state of a part that is not running (and :func:`tend` will start again)."""
        if self.parts.get(child.name, OK).startswith("down"):
            return self.parts[child.name]  # the same state: keep its first time
        code = child.process.returncode if child.process else None
        return (f"down since {iso_ms(int(time.time() * 1000))} ({_how(code)}); "
                "fleetlog up restarts it")

    def _note(self, child: Child, state: str, now: float) -> None:
        """Record a part's new state: a line on stdout, and the up file for ``/readyz``.

        A planned exit (exit 0 after a long run, restarted at once) is no news and
        is not printed; the up file still shows it down until the next watch tick.
        """
        before = self.parts.get(child.name, OK)
        if state == before:
            return
        self.parts[child.name] = state
        code = child.process.returncode if child.process else None
        if before == OK and state.startswith("down"):
            if not (code == 0 and child.next_start <= now):
                self.down_since[child.name] = now
                delay = max(0.0, child.next_start - now)
                where = (f" on port {self.redis.port}, same data"
                         if child is self.redis_child and self.redis else "")
                print(f"fleetlog: {child.name} is down ({_how(code)}); restarting it in "
                      f"{delay:.1f} s{where}.", flush=True)
        elif state == OK and child.name in self.down_since:
            print(f"fleetlog: {child.name} is back (down "
                  f"{now - self.down_since.pop(child.name):.1f} s).", flush=True)
        try:
            if self.redis is not None and self.redis.process is not None:
                self.redis.write_up_file(self.parts)
            elif self.external_url is not None:
                write_up_file(self._up_dir, self.external_url, self.parts)
        except OSError as exc:  # a full disk (the one Redis just failed on, likely)
            print(f"fleetlog: cannot record the parts' state in {self._up_dir} "
                  f"({exc}); /readyz shows the last one written until it can be.", flush=True)

    def _shutdown(self) -> None:
        """Stop in dependency order: gateway, worker (``self.children``'s order), then Redis.

        Each waits for the one before it: the gateway's last replies need Redis,
        and the worker's last batch needs Redis to be acked.
        """
        self.stop(_CHILD_STOP_TIMEOUT, in_order=True)
        if self.redis is not None:
            self.redis.stop()
            self.redis.remove_up_file()
            log.info("stopped: redis")
        elif self.external_url is not None:
            remove_up_file(self._up_dir)
        print("fleetlog stopped.", flush=True)


def run_up(settings: Settings, config_file: str | None = None) -> int:
    """Entry point of ``fleetlog up``: run until SIGINT/SIGTERM, return the exit code.

    0 after an orderly stop; 1 when it could not start (another ``up`` holds
    the data dir, the port is taken); 130 after a forced stop (second SIGINT).
    """
    supervisor = Up(settings, config_file)
    supervisor.install()
    lock = _lock_data_dir(settings.data_dir)
    if lock is None:
        return EXIT_REFUSED
    try:
        return supervisor.run()
    finally:
        os.close(lock)  # the lock goes with it; the file stays (unlinking it would race)
