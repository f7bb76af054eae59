"""The shipped service configs in deploy/ work, with real components.

* supervisord runs ``deploy/supervisor/fleetlog.conf`` unchanged (everything it needs comes
  from the environment, as an operator would set it): a real gateway and two real workers on a
  private Redis.  A worker's planned ``--max-runtime`` exit (status 0) is restarted under a new
  PID, and so is a SIGKILLed worker; records keep flowing and every acknowledged record is
  stored exactly once (store and daily files).  No process is left behind.
* ``systemd-analyze verify`` accepts the systemd units (when systemd-analyze is installed).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xmlrpc.client
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import psutil
import pytest
import websockets

from fleetlog.embedded import free_port
from tests.helpers import (
    STORED,
    file_lines,
    legacy_device,
    legacy_frame,
    send_legacy,
    stored_rows,
    wait_until,
)

try:
    from supervisor.xmlrpc import SupervisorTransport
except ImportError:  # only the supervisord test needs it (test extra `supervisor`)
    SupervisorTransport = None

pytestmark = pytest.mark.slow

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SUPERVISOR_CONF = DEPLOY / "supervisor" / "fleetlog.conf"
SYSTEMD = DEPLOY / "systemd"
MAX_RUNTIME = 3  # seconds; the shipped default is 3600
WORKERS = ("fleetlog-worker-0", "fleetlog-worker-1")
SHIPPED_BIN = "/opt/fleetlog/.venv/bin/fleetlog"


def _fleetlog_bin() -> str:
    beside = Path(sys.executable).parent / "fleetlog"
    found = str(beside) if beside.exists() else shutil.which("fleetlog")
    if not found:
        pytest.skip("no `fleetlog` executable (install the package: pip install -e .)")
    return found


class Supervised:
    """supervisord running the shipped config, and ways to look at it."""

    def __init__(self, tmp_path: Path, redis_url: str) -> None:
        self.data_dir = tmp_path / "data"
        self.log_dir = tmp_path / "log"
        # A short path: a unix socket path may not be longer than ~107 bytes.
        self.run_dir = Path(tempfile.mkdtemp(prefix="fl-sv-"))
        for directory in (self.data_dir, self.log_dir):
            directory.mkdir()
        self.ws_port = free_port()
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("FLEETLOG_")}
        self.env.update(
            FLEETLOG_BIN=_fleetlog_bin(),
            FLEETLOG_USER=str(os.getuid()),  # supervisord takes a name or a uid
            FLEETLOG_DATA_DIR=str(self.data_dir),
            FLEETLOG_REDIS_URL=redis_url,
            FLEETLOG_LOG_DIR=str(self.log_dir),
            FLEETLOG_RUN_DIR=str(self.run_dir),
            FLEETLOG_WORKERS=str(len(WORKERS)),
            FLEETLOG_MAX_RUNTIME=str(MAX_RUNTIME),
            # Ordinary fleetlog settings, inherited by the programs: a legacy fleet on a free port.
            FLEETLOG_WS_PORT=str(self.ws_port),
            FLEETLOG_AUTH="none",
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None
        self._rpc: Any = None

    def start(self) -> None:
        """Start supervisord; once more on a fresh port if another process took the gateway's."""
        for _attempt in range(3):
            self._start_once()
            if wait_until(self._gateway_listening, 10, 0.1):
                return
            assert self.process is not None
            assert self.process.poll() is None, f"supervisord exited:\n{self.supervisord_log()}"
            # free_port() raced with another process: try another port.  (The gateway does not
            # exit when it cannot listen, and ignores SIGTERM then: kill the programs first.)
            for program in self.ours():
                program.kill()
            self.stop()
            self.ws_port = free_port()
            self.env["FLEETLOG_WS_PORT"] = str(self.ws_port)
        pytest.fail(f"the gateway never listened on its port:\n{self.program_log('fleetlog-gateway')}")

    def _start_once(self) -> None:
        socket_path = self.run_dir / "supervisor.sock"
        socket_path.unlink(missing_ok=True)
        self._output = (self.log_dir / "supervisord.out").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(SUPERVISOR_CONF)],
            env=self.env, stdout=self._output, stderr=subprocess.STDOUT,
        )
        process = self.process
        opened = wait_until(lambda: socket_path.exists() or process.poll() is not None, 15)
        output = (self.log_dir / "supervisord.out").read_text(errors="replace")
        assert opened and process.poll() is None, (
            f"supervisord is not up:\n{output}\n{self.supervisord_log()}"
        )
        transport = SupervisorTransport(None, None, f"unix://{socket_path}")
        self._rpc = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)

    def _gateway_listening(self) -> bool:
        """The gateway itself (not some other process) listens on ws_port: the program, or
        its gateway processes when it runs several (``--processes``, one per core by default)."""
        pid = int(self.info()["fleetlog-gateway"]["pid"])
        if not pid:
            return False
        try:
            gateway = psutil.Process(pid)
            sockets = [s for process in (gateway, *gateway.children())
                       for s in process.net_connections(kind="inet")]
        except psutil.NoSuchProcess:
            return False
        return any(s.status == psutil.CONN_LISTEN and s.laddr.port == self.ws_port for s in sockets)

    def info(self) -> dict[str, dict[str, Any]]:
        """name -> supervisord's process info (statename, pid, exitstatus, ...)."""
        return {row["name"]: row for row in self._rpc.supervisor.getAllProcessInfo()}

    def running_pid(self, name: str) -> int:
        row = self.info()[name]
        return int(row["pid"]) if row["statename"] == "RUNNING" else 0

    def wait_new_pid(self, name: str, old: int, timeout: float) -> int:
        """Wait until ``name`` is RUNNING again under a PID other than ``old``."""
        pid = 0

        def restarted() -> bool:
            nonlocal pid
            pid = self.running_pid(name)
            return pid not in (0, old)

        assert wait_until(restarted, timeout, 0.2), (
            f"{name} not running again after pid {old}: {self.info()[name]}\n{self.supervisord_log()}"
        )
        return pid

    def supervisord_log(self) -> str:
        path = self.log_dir / "supervisord.log"
        return path.read_text() if path.exists() else ""

    def program_log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ours(self) -> list[psutil.Process]:
        """Every live process of this instance: the programs run with cwd = the data dir."""
        found = []
        for process in psutil.process_iter():
            try:
                if Path(process.cwd()) == self.data_dir and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def stop(self) -> int | None:
        """SIGTERM supervisord (it stops every program, each within stopwaitsecs); its exit code."""
        if self._rpc is not None:
            self._rpc("close")()  # the transport's connection to the control socket
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(45)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            if self._output is not None:
                self._output.close()

    def clean_up(self) -> None:
        """Whatever a failed test left: supervisord, its programs, the socket's directory."""
        self.stop()
        for process in self.ours():
            process.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)


@pytest.fixture
def supervised(tmp_path: Path, redis_url: str) -> Iterator[Supervised]:
    if SupervisorTransport is None:
        pytest.skip("supervisor (PyPI) is not installed: pip install supervisor")
    instance = Supervised(tmp_path, redis_url)
    try:
        yield instance
    finally:
        instance.clean_up()


def _send(url: str, device: str, count: int, pause: float = 0.0) -> list[int]:
    """Legacy frames one after the other; the seqs the gateway acknowledged (stored in Redis)."""

    async def run() -> list[int]:
        if not pause:
            return await legacy_device(url, device, count)
        acked = []
        async with websockets.connect(url, max_size=None) as ws:
            for seq in range(count):
                replies = await send_legacy(ws, legacy_frame(device, seq, msg=f"record {seq}"))
                if replies[1] == STORED:
                    acked.append(seq)
                await asyncio.sleep(pause)
        return acked

    return asyncio.run(run())


def _rows(data_dir: Path) -> int:
    return len(stored_rows(data_dir))


def test_supervisord_restarts_planned_exits_and_kills_and_loses_nothing(supervised: Supervised) -> None:
    supervised.start()
    assert wait_until(lambda: all(supervised.running_pid(name) for name in (*WORKERS, "fleetlog-gateway")),
                      20, 0.2), f"{supervised.info()}\n{supervised.supervisord_log()}"
    url = f"ws://127.0.0.1:{supervised.ws_port}"

    # The shipped [supervisorctl] section reaches supervisord through the ENV-named socket.
    status = subprocess.run(
        [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(SUPERVISOR_CONF), "status"],
        env=supervised.env, capture_output=True, text=True, timeout=20,
    )
    for name in ("fleetlog:fleetlog-gateway", *(f"fleetlog:{w}" for w in WORKERS)):
        assert re.search(rf"^{re.escape(name)}\s+RUNNING\s+pid \d+", status.stdout, re.M), status.stdout

    sent: dict[str, int] = {}

    # (a) The planned --max-runtime exit (status 0) is restarted, and records keep flowing.
    first = {name: supervised.running_pid(name) for name in WORKERS}
    acked = _send(url, "before-recycle", 40)
    assert acked == list(range(40))
    sent["before-recycle"] = 40
    assert wait_until(lambda: _rows(supervised.data_dir) == 40, 15), _rows(supervised.data_dir)
    for name in WORKERS:
        supervised.wait_new_pid(name, first[name], timeout=MAX_RUNTIME + 15)
        assert not psutil.pid_exists(first[name]) or (
            psutil.Process(first[name]).status() == psutil.STATUS_ZOMBIE
        )
    log = supervised.supervisord_log()
    for name in WORKERS:
        assert f"exited: {name} (exit status 0; expected)" in log, log
        assert "max runtime" in supervised.program_log(name)
    acked = _send(url, "after-recycle", 40)
    assert acked == list(range(40))
    sent["after-recycle"] = 40
    assert wait_until(lambda: _rows(supervised.data_dir) == 80, 15), _rows(supervised.data_dir)

    # (b) A SIGKILLed worker is restarted, records keep flowing while it dies, none is lost.
    during: list[int] = []
    sender = threading.Thread(
        target=lambda: during.extend(_send(url, "during-kill", 300, pause=0.005)), daemon=True
    )
    sender.start()
    assert wait_until(lambda: _rows(supervised.data_dir) > 100, 15), "records are not flowing"
    victim = WORKERS[0]
    victim_pid = 0
    for _attempt in range(5):
        victim_pid = supervised.running_pid(victim) or supervised.wait_new_pid(victim, 0, 15)
        try:
            os.kill(victim_pid, signal.SIGKILL)
            break
        except ProcessLookupError:  # it made its planned exit just now: kill the next one
            continue
    supervised.wait_new_pid(victim, victim_pid, timeout=15)
    assert f"exited: {victim} (terminated by SIGKILL; not expected)" in supervised.supervisord_log()
    sender.join(30)
    assert not sender.is_alive(), "the device did not finish sending"
    assert during == list(range(300)), "the gateway acknowledged every record"
    sent["during-kill"] = 300
    acked = _send(url, "after-kill", 20)
    assert acked == list(range(20))
    sent["after-kill"] = 20

    total = sum(sent.values())
    assert wait_until(lambda: _rows(supervised.data_dir) >= total, 20), _rows(supervised.data_dir)
    rows = stored_rows(supervised.data_dir)
    assert len(rows) == total, "every acknowledged record is stored, once"
    assert len({qid for qid, *_ in rows}) == total
    for device, count in sent.items():
        assert sorted(seq for _, d, seq, _ in rows if d == device) == list(range(count)), device
    # The daily files are written exactly once too (several workers, a kill in between).
    assert wait_until(lambda: len(file_lines(supervised.data_dir)) >= total, 15)
    lines = file_lines(supervised.data_dir)
    assert len(lines) == total
    assert Counter((line["device_id"], line["data"]["seq"]) for line in lines) == Counter(
        (device, seq) for device, count in sent.items() for seq in range(count)
    )
    assert "gave up" not in supervised.supervisord_log()

    # Stopping supervisord stops every program; nothing is left behind.  (A worker may be between
    # two lives at that moment, so only the gateway's clean exit is certain to be logged.)
    assert supervised.process is not None
    children = psutil.Process(supervised.process.pid).children(recursive=True)
    assert children, "supervisord's programs are its children"
    assert {p.pid for p in supervised.ours()} >= {supervised.running_pid("fleetlog-gateway")}
    started = time.monotonic()
    assert supervised.stop() == 0
    assert time.monotonic() - started < 35, "every program stopped within stopwaitsecs"
    _gone, alive = psutil.wait_procs(children, timeout=5)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "no orphans"
    assert not supervised.ours(), "no orphans"
    log = supervised.supervisord_log()
    assert "stopped: fleetlog-gateway (exit status 0)" in log, log


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze (Debian's systemd): make test checks for it first"
    # verify insists that ExecStart's binary exists: point the copies at this checkout's.
    fleetlog = _fleetlog_bin()
    units = tmp_path / "units"
    units.mkdir()
    for source in SYSTEMD.iterdir():
        text = source.read_text()
        if source.suffix in (".service", ".target"):
            assert source.suffix == ".target" or SHIPPED_BIN in text
            text = text.replace(SHIPPED_BIN, fleetlog)
        (units / source.name).write_text(text)
    names = ["fleetlog.target", "fleetlog-gateway.service", "fleetlog-worker@.service",
             "fleetlog-worker@3.service"]
    result = subprocess.run(
        [analyze, "verify", *(f"./{name}" for name in names)],
        cwd=units, capture_output=True, text=True, timeout=60,
    )
    # Warnings (an unknown key, a key in the wrong section) leave the status 0: fail on them too.
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "fleetlog" in line]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr

    gateway = (SYSTEMD / "fleetlog-gateway.service").read_text()
    worker = (SYSTEMD / "fleetlog-worker@.service").read_text()
    for unit in (gateway, worker):
        for line in ("Restart=always", "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes",
                     "PrivateTmp=yes", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                     "KillSignal=SIGTERM", "EnvironmentFile=-/etc/fleetlog/fleetlog.env",
                     "User=fleetlog", "StateDirectory=fleetlog"):
            assert re.search(rf"^{re.escape(line)}$", unit, re.M), line
    assert re.search(r"^LimitNOFILE=65536$", gateway, re.M)
    assert "--consumer %H-%i" in worker
