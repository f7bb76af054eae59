"""fleetlog as a user installs it: a wheel and an sdist built from the checkout, the wheel
installed into a clean virtual environment outside it, and ``fleetlog up`` in an empty
directory serving devices, the API and the console."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest
import websockets.sync.client

import fleetlog
from fleetlog.embedded import free_port
from tests.conftest import wait_for_port
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.mark.timeout(600)
def test_the_wheel_installed_in_a_clean_venv_runs_everything(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = dist.glob("fleetlog-*.whl")
    (sdist,) = dist.glob("fleetlog-*.tar.gz")
    assert wheel.name.startswith(f"fleetlog-{fleetlog.__version__}-")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    modules = [f"fleetlog/api/static/{path.name}" for path in (ROOT / "src/fleetlog/api/static").glob("*.js")]
    assert len(modules) > 1  # the console's modules: every one it imports is shipped
    for needed in (*modules, "fleetlog/api/static/index.html", "fleetlog/py.typed"):
        assert needed in shipped, needed
    with tarfile.open(sdist) as archive:
        assert any(name.endswith("src/fleetlog/api/static/console.js") for name in archive.getnames())

    # What a user's shell has: none of this checkout on the path, no FLEETLOG_* settings.
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("FLEETLOG_") and key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=env)
    installed = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "-c", str(ROOT / "deploy" / "requirements.lock"),
         str(wheel)],
        capture_output=True, text=True, timeout=400, env=env)
    assert installed.returncode == 0, installed.stderr[-3000:]
    fleetlog_bin = str(venv / "bin" / "fleetlog")
    version = subprocess.run([fleetlog_bin, "--version"], capture_output=True, text=True, timeout=60,
                             env=env)
    assert fleetlog.__version__ in version.stdout, version.stdout

    run = tmp_path / "empty"
    run.mkdir()
    ws_port, http_port = free_port(), free_port()
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen([fleetlog_bin, "up", "--ws-port", str(ws_port), "--http-port", str(http_port)],
                          cwd=run, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port(ws_port, timeout=60, process=up)
        wait_for_port(http_port, timeout=60, process=up)

        def fleetlog_cmd(*args: str) -> str:
            done = subprocess.run([fleetlog_bin, *args], cwd=run, capture_output=True, text=True,
                                  timeout=60, env=env)
            assert done.returncode == 0, done.stderr
            return done.stdout.strip()

        device_token = fleetlog_cmd("device", "add", "door-1")
        reader = fleetlog_cmd("api-token", "add", "ci", "--role", "read")
        with websockets.sync.client.connect(f"ws://127.0.0.1:{ws_port}/?token={device_token}") as ws:
            ws.send(json.dumps({"type": "log", "id": "f1", "records": [{"seq": 1, "msg": "door open"}]}))
            assert json.loads(ws.recv(timeout=15))["type"] == "ack"
        api = f"http://127.0.0.1:{http_port}"
        auth = {"Authorization": f"Bearer {reader}"}
        assert "<html" in httpx.get(f"{api}/", timeout=10).text.lower()  # the console
        for module in modules:
            assert httpx.get(f"{api}/console/{Path(module).name}", timeout=10).status_code == 200, module

        def stored() -> bool:
            answer = httpx.get(f"{api}/api/devices/door-1/logs", headers=auth, timeout=10)
            return answer.status_code == 200 and "door open" in answer.text

        assert wait_until(stored, 30)
        assert (run / "fleetlog-data").is_dir()  # everything in the directory it was run in
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
        log.close()
    assert up.returncode == 0, (tmp_path / "up.log").read_text()[-3000:]
