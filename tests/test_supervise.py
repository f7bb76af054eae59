"""fleetlog.supervise (``fleetlog up``), its parts: the data-dir lock, the port check, the words for an
exit, the metrics ports and the banner.  ``up`` as a whole is tested end to end in test_e2e_up.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fleetlog.config import Settings
from fleetlog.embedded import free_port
from fleetlog.supervise import (
    _banner,
    _how,
    _lock_data_dir,
    _metrics_ports,
    _port_taken,
    _worker_metrics_port,
)


def test_one_up_per_data_dir_and_the_second_is_told_who_holds_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data_dir = tmp_path / "data"
    # The first holder is another process, as in real life (flock is per open file description).
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom pathlib import Path\nfrom fleetlog.supervise import _lock_data_dir\n"
        f"assert _lock_data_dir(Path({str(data_dir)!r})) is not None\nprint('locked', flush=True)\n"
        "time.sleep(60)\n")], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        assert _lock_data_dir(data_dir) is None
        assert f"pid {holder.pid}" in caplog.text
    finally:
        holder.kill()
        holder.wait()
    # The kernel let go of it with the process, however it ended: the next up takes it.
    fd = _lock_data_dir(data_dir)
    assert fd is not None
    assert (data_dir / "up.lock").read_text() == f"{os.getpid()}\n"
    os.close(fd)


def test_a_taken_port_is_named_before_anything_starts() -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        said = _port_taken("127.0.0.1", port)
        assert said == f"port {port} on 127.0.0.1 is already in use by another program"
    assert _port_taken("127.0.0.1", port) is None
    assert (_port_taken("203.0.113.7", 0) or "").startswith("cannot listen on 203.0.113.7:0:")


def test_an_exit_in_words() -> None:
    assert _how(-signal.SIGKILL) == "killed by SIGKILL"
    assert _how(1) == "exited with 1"
    assert _how(None) == "exited with None"
    assert _how(-200) == "killed by signal 200"


def test_the_banner_says_where_to_look_and_masks_the_password(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "d", http_port=8080, ws_port=9502, auth="token")
    text = _banner(settings, "redis://:s3cret@127.0.0.1:6380/0", embedded=True, metrics=(8082, 8081))
    assert text.startswith("fleetlog is up.")
    assert "ws://" in text and ":9502" in text and "http://" in text and ":8080/" in text
    assert "s3cret" not in text and "(embedded, AOF on)" in text
    assert f"--data-dir {tmp_path / 'd'}" in text and "device add door-1" in text
    assert _worker_metrics_port(settings) == 8081  # next to the API unless set
    assert _worker_metrics_port(Settings(http_port=8080, metrics_port=9999)) == 9999
    assert _worker_metrics_port(Settings(http_port=0)) == 0
    assert ":8082/metrics (gateway)" in text and ":8081/metrics (worker)" in text


def test_a_metrics_port_another_program_holds_is_off_and_not_in_the_banner(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The banner printed the gateway's metrics address although another program held the
    port (the gateway only logged that it could not serve there)."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]
        settings = Settings(data_dir=tmp_path, http_port=8080, gateway_metrics_port=held,
                            metrics_port=free_port())
        gateway, worker = _metrics_ports(settings)
        assert gateway == 0 and worker == settings.metrics_port
        assert f"port {held} on 127.0.0.1 is already in use" in caplog.text
        assert "--gateway-metrics-port" in caplog.text
        text = _banner(settings, "redis://127.0.0.1:6380/0", embedded=True, metrics=(gateway, worker))
        assert f":{held}/" not in text and f":{worker}/metrics (worker)" in text


def test_a_part_state_that_cannot_be_written_is_said_and_up_goes_on(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A full disk (Valkey exits on its short AOF write) made writing the up file raise, and
    ``up`` stopped every part: the state change is printed, the file left as it was."""
    from fleetlog.embedded import RedisServer
    from fleetlog.process import Child
    from fleetlog.supervise import Up

    up = Up(Settings(data_dir=tmp_path), None)
    up.redis = RedisServer(tmp_path)
    up.redis.process = subprocess.Popen([sys.executable, "-c", "pass"])
    up.redis.process.wait()
    (tmp_path / "fleetlog-up.tmp").mkdir()  # where the file is written first: now an error
    worker = Child("worker", ["true"])
    up._note(worker, "down (exit 1)", 0.0)
    up._note(worker, "ok", 1.0)
    said = capsys.readouterr().out
    assert "worker is down" in said and "cannot record the parts' state" in said
    assert up.parts["worker"] == "ok"
