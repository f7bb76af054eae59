"""`fleetlog up` as a user runs it, and the reading commands against what it stored."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import websockets

from fleetlog import keys
from fleetlog.embedded import free_port
from fleetlog.supervise import API_NICE, _port_taken
from tests.conftest import wait_for_port
from tests.faults.harness import Outcome
from tests.helpers import legacy_device, run_fleetlog, stored_rows, wait_until


def _token(data_dir: Path, device: str) -> str:
    added = run_fleetlog("device", "add", device, "--data-dir", str(data_dir))
    assert added.returncode == 0, added.stderr
    time.sleep(1.0)  # gateways pick up credential changes within half a second
    return added.stdout.strip()


def _start_up(data_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "fleetlog", "up", "--data-dir", str(data_dir), "--ws-port", str(port),
         "--http-port", str(free_port())],
        stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )
    wait_for_port(port, timeout=30, process=process)
    assert wait_until(lambda: "fleetlog is up." in log.read_text(), timeout=30)
    return process


def _stop(process: subprocess.Popen[bytes]) -> list[psutil.Process]:
    tree = psutil.Process(process.pid).children(recursive=True)
    assert {p.name() for p in tree} >= {"valkey-server"} or any("server" in p.name() for p in tree)
    assert len(tree) >= 3, "embedded Redis, gateway and worker"
    api = [p for p in tree if p.cmdline()[1:4] == ["-m", "fleetlog", "api"]]
    assert [p.nice() for p in api] == [API_NICE], "the API yields the cores to ingest"
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    return tree


def test_up_runs_everything_stops_cleanly_and_keeps_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    log = tmp_path / "up.log"
    up = _start_up(data_dir, port, log)
    try:
        token = _token(data_dir, "kiosk-1")
        assert len(token) > 40
        url = f"ws://127.0.0.1:{port}/?token={token}"
        acked = asyncio.run(legacy_device(url, "kiosk-1", 100))
        assert acked == list(range(100))
        assert wait_until(lambda: len(stored_rows(data_dir)) == 100, timeout=30)

        # Another command finds the running instance's Redis from the data dir alone.
        devices = run_fleetlog("devices", "--json", "--data-dir", str(data_dir))
        assert devices.returncode == 0, devices.stderr
        [row] = json.loads(devices.stdout)
        assert row["device_id"] == "kiosk-1" and row["records"] == 100

        logs = run_fleetlog("logs", "kiosk-1", "--json", "--limit", "5", "--data-dir", str(data_dir))
        lines = [json.loads(line) for line in logs.stdout.splitlines()]
        assert [line["data"]["seq"] for line in lines] == [95, 96, 97, 98, 99]
        day_files = list((data_dir / "logs" / "device" / "log").glob("*.log"))
        assert len(day_files) == 1
    finally:
        tree = _stop(up)
    time.sleep(0.5)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "no orphans"
    assert "fleetlog stopped." in log.read_text()

    # Restart on the same data dir: everything is still there, and ingest goes on.
    up = _start_up(data_dir, port, log)
    try:
        acked = asyncio.run(legacy_device(url, "kiosk-1", 10))  # the token survived too
        assert acked == list(range(10))
        assert wait_until(lambda: len(stored_rows(data_dir)) == 110, timeout=30)
    finally:
        _stop(up)


def test_up_leaves_no_process_when_killed(tmp_path: Path) -> None:
    """Even SIGKILL on `up` takes its children down (PR_SET_PDEATHSIG)."""
    port = free_port()
    up = _start_up(tmp_path / "data", port, tmp_path / "up.log")
    tree = psutil.Process(up.pid).children(recursive=True)
    os.kill(up.pid, signal.SIGKILL)
    up.wait(10)
    _gone, alive = psutil.wait_procs(tree, timeout=20)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"


def test_logs_follow_grep_since_and_unicode(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    up = _start_up(data_dir, port, tmp_path / "up.log")
    token = _token(data_dir, "door-7")
    follow = subprocess.Popen(
        [sys.executable, "-m", "fleetlog", "logs", "door-7", "--follow", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, text=True, encoding="utf-8",
    )
    try:
        async def send() -> None:
            import websockets

            from tests.helpers import send_legacy

            headers = {"Authorization": f"Bearer {token}"}
            async with websockets.connect(f"ws://127.0.0.1:{port}", additional_headers=headers) as ws:
                for n, msg in enumerate(["门已打开", "door closed", "门已关闭"]):
                    level = "error" if n == 1 else "info"
                    frame = {"deviceId": "door-7", "type": 4, "data": {"msg": msg, "level": level}}
                    await send_legacy(ws, json.dumps(frame, ensure_ascii=False))

        time.sleep(0.5)
        asyncio.run(send())
        assert follow.stdout is not None
        got = [follow.stdout.readline() for _ in range(3)]
        assert "门已打开" in got[0] and "door closed" in got[1] and "门已关闭" in got[2]

        grep = run_fleetlog("logs", "door-7", "--grep", "已关", "--data-dir", str(data_dir))
        assert grep.stdout.count("\n") == 1 and "门已关闭" in grep.stdout
        errors = run_fleetlog("logs", "door-7", "--level", "error", "--data-dir", str(data_dir))
        assert errors.stdout.count("\n") == 1 and "door closed" in errors.stdout
        future = run_fleetlog("logs", "door-7", "--since", "2999-01-01", "--data-dir", str(data_dir))
        assert future.stdout == ""
        raw = run_fleetlog("logs", "door-7", "--json", "--data-dir", str(data_dir))
        assert "\\u" not in raw.stdout and "门已打开" in raw.stdout
        bad = run_fleetlog("logs", "door-7", "--since", "yesterday-ish", "--data-dir", str(data_dir))
        assert bad.returncode == 2 and "neither a duration" in bad.stderr
    finally:
        follow.terminate()
        follow.wait(10)
        _stop(up)


def _up(data_dir: Path, port: int, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fleetlog", "up", "--data-dir", str(data_dir), "--ws-port", str(port),
         "--http-port", str(free_port()), *extra], stdout=log.open("ab"), stderr=subprocess.STDOUT,
    )


def _ours(data_dir: Path) -> list[psutil.Process]:
    """Every process started for ``data_dir`` (by its command line), zombies aside."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(data_dir) in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


def test_a_second_up_on_the_same_data_dir_exits_at_once_and_leaves_the_first_alone(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    first = _start_up(data_dir, port, tmp_path / "up.log")
    try:
        up_file = data_dir / "redis" / "fleetlog-up.json"
        recorded = up_file.read_bytes()
        running = {p.pid for p in _ours(data_dir)}

        second_port = free_port()
        second = _up(data_dir, second_port, tmp_path / "second.log")
        try:
            assert second.wait(20) == 1
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()
        out = (tmp_path / "second.log").read_text()
        assert f"already running on {data_dir} (pid {first.pid})" in out
        assert "fleetlog is up." not in out
        assert up_file.read_bytes() == recorded, "the first's Redis is still the one recorded"
        assert {p.pid for p in _ours(data_dir)} == running, "no second Valkey, gateway or worker"

        # The first keeps working, and CLI commands still find its Redis.
        url = f"ws://127.0.0.1:{port}/?token={_token(data_dir, 'kiosk-2')}"
        assert asyncio.run(legacy_device(url, "kiosk-2", 20)) == list(range(20))
        assert wait_until(lambda: len(stored_rows(data_dir)) == 20, timeout=30)
        devices = run_fleetlog("devices", "--json", "--data-dir", str(data_dir))
        assert devices.returncode == 0, devices.stderr
    finally:
        _stop(first)


def test_up_with_its_port_taken_says_so_and_exits_one(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        up = _up(data_dir, port, tmp_path / "up.log")
        try:
            assert up.wait(30) == 1
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
    out = (tmp_path / "up.log").read_text()
    assert f"port {port} on 127.0.0.1 is already in use" in out
    assert "fleetlog is up." not in out
    assert not _ours(data_dir), "nothing left running"


def test_a_second_sigint_forces_up_to_exit(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    up = _start_up(data_dir, port, tmp_path / "up.log")
    tree = psutil.Process(up.pid).children(recursive=True)
    [worker] = [p for p in tree if "worker" in p.cmdline()]
    worker.suspend()  # a child that does not stop when asked: the orderly stop would wait 20 s
    try:
        up.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert up.poll() is None, "the first SIGINT waits for the children"
        up.send_signal(signal.SIGINT)
        assert up.wait(10) == 130
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    _gone, alive = psutil.wait_procs(tree, timeout=20)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
    assert "second interrupt" in (tmp_path / "up.log").read_text()


def test_up_serves_the_api_on_http_port(tmp_path: Path) -> None:
    import httpx

    data_dir, log, ws_port = tmp_path / "data", tmp_path / "up.log", free_port()
    # The worker's metrics go next to the API (+1) unless set: a port whose next two are free
    # (free_port hands out neighbours: +1 was once the device port, and up leaves a metrics
    # port it cannot have off, out of its banner).
    http_port = next(port for port in (free_port() for _ in range(100))
                     if ws_port not in (port + 1, port + 2) and not _port_taken("127.0.0.1", port + 1)
                     and not _port_taken("127.0.0.1", port + 2))
    up = _up(data_dir, ws_port, log, "--http-port", str(http_port))
    try:
        wait_for_port(http_port, timeout=30, process=up)
        assert httpx.get(f"http://127.0.0.1:{http_port}/healthz", timeout=10).json() == {"status": "ok"}
        assert wait_until(lambda: f"http://127.0.0.1:{http_port}/" in log.read_text(), timeout=30)
        assert wait_until(lambda: f"http://127.0.0.1:{http_port + 1}/metrics" in log.read_text(), 5)
    finally:
        _stop(up)


def test_ctrl_c_stops_in_dependency_order_without_redis_warnings(tmp_path: Path) -> None:
    """Ctrl-C in a terminal signals the whole foreground process group, children included.

    ``up`` must still stop gateway, then worker, then Redis: a worker that saw
    Redis go first would log "Redis unavailable ... retrying" on a clean stop.
    """
    data_dir = tmp_path / "data"
    port = free_port()
    log = tmp_path / "up.log"
    up = subprocess.Popen(
        [sys.executable, "-m", "fleetlog", "up", "--data-dir", str(data_dir), "--ws-port", str(port),
         "--http-port", str(free_port())],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True,  # as a terminal
    )
    try:
        wait_for_port(port, timeout=30, process=up)
        assert wait_until(lambda: "fleetlog is up." in log.read_text(), timeout=30)
        url = f"ws://127.0.0.1:{port}/?token={_token(data_dir, 'kiosk-3')}"
        assert asyncio.run(legacy_device(url, "kiosk-3", 50)) == list(range(50))
        tree = psutil.Process(up.pid).children(recursive=True)
        os.killpg(up.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        assert up.wait(30) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    _gone, alive = psutil.wait_procs(tree, timeout=20)
    assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
    out = log.read_text()
    assert "fleetlog stopped." in out
    assert "unavailable" not in out.lower(), out[-3000:]
    assert "second signal" not in out and "second interrupt" not in out, \
        "the children stopped in order, not forced by a second signal"
    stopped = [line for line in out.splitlines() if "stopped:" in line and "fleetlog.up" in line]
    order = [line.split("stopped: ")[1].split()[0] for line in stopped]
    assert order == ["gateway", "worker", "api", "alerter", "redis"], "Redis last: everything else needs it"
    # Everything acked before the stop is stored, and still there after it.
    assert len(stored_rows(data_dir)) == 50


def test_the_store_exists_once_up_says_it_is_up(tmp_path: Path) -> None:
    """A reader started on "fleetlog is up." must find the store, not "no store at ..."."""
    data_dir = tmp_path / "data"
    up = _start_up(data_dir, free_port(), tmp_path / "up.log")
    try:
        assert (data_dir / "fleetlog.db").is_file()
        shown = run_fleetlog("logs", "nobody", "--data-dir", str(data_dir))
        assert shown.returncode == 1 and "has no records" in shown.stderr, shown.stderr
    finally:
        _stop(up)


def _stored_seqs(data_dir: Path) -> Counter[tuple[str, int]]:
    """(device, seq) of every stored record, with how many times each is there."""
    return Counter((device, seq) for _qid, device, seq, _data in stored_rows(data_dir) if seq >= 0)


def test_up_restarts_its_redis_killed_under_load_and_loses_nothing(tmp_path: Path) -> None:
    """kill -9 of the embedded Redis while v2 devices send: ``up`` starts it again on the
    same port and AOF, devices are acked again within 5 s, and every acked record is stored.

    Before, the gateway answered every frame ``unavailable`` for as long as ``up`` ran.
    """
    import httpx
    import redis

    from fleetlog.queue.connection import connect
    from fleetlog.simulate import SimulationSummary, simulate

    data_dir, log, port, http_port = tmp_path / "data", tmp_path / "up.log", free_port(), free_port()
    up = _up(data_dir, port, log, "--auth", "none", "--http-port", str(http_port))
    try:
        wait_for_port(port, timeout=30, process=up)
        assert wait_until(lambda: "fleetlog is up." in log.read_text(), timeout=30)
        reader = run_fleetlog("api-token", "add", "probe", "--data-dir", str(data_dir)).stdout.strip()
        wait_for_port(http_port, timeout=30, process=up)
        up_file = data_dir / "redis" / "fleetlog-up.json"
        redis_port = int(json.loads(up_file.read_text())["url"].split(":")[2].split("/")[0])
        [server] = [p for p in psutil.Process(up.pid).children() if "server" in p.name()]

        acks: list[float] = []  # when each frame was acked (the simulator's progress callback)
        summaries: list[SimulationSummary] = []
        devices = threading.Thread(target=lambda: summaries.append(asyncio.run(simulate(
            f"ws://127.0.0.1:{port}", 20, 500, rate=2000, batch=10, timeout=120,
            progress=lambda _count: acks.append(time.monotonic())))), daemon=True)
        devices.start()
        assert wait_until(lambda: len(acks) >= 100, timeout=30), "records flow before the fault"

        server.kill()  # SIGKILL
        killed_at, killed_ms = time.monotonic(), int(time.time() * 1000)
        said: list[dict[str, Any]] = []  # /readyz answers while Redis was not back
        client = connect(f"redis://127.0.0.1:{redis_port}", timeout=0.5)  # no retries: says "refused"
        with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=2,
                          headers={"Authorization": f"Bearer {reader}"}) as http:
            gone = False  # the killed server may answer a last PING before the signal lands
            while time.monotonic() - killed_at < 15:
                try:
                    answers = bool(client.ping())
                except redis.RedisError:
                    answers = False
                gone = gone or not answers
                if answers and gone:
                    break
                answer = http.get("/readyz")
                if answer.status_code == 503:
                    said.append(answer.json())
                time.sleep(0.02)
        client.close()
        back_at = time.monotonic()
        assert wait_until(lambda: acks[-1] > back_at, timeout=10), "acked again once Redis is back"
        again = next(moment for moment in acks if moment > back_at) - killed_at
        assert again < 5.0, f"devices acked again {again:.2f} s after the kill"
        # Stored again: a record queued (stream id, in ms of Redis' clock) after the kill.
        assert wait_until(lambda: any(int(qid.split("-")[0]) > killed_ms
                                      for qid, *_ in stored_rows(data_dir)), timeout=10, interval=0.05)
        stored_again = time.monotonic() - killed_at
        assert stored_again < 5.0, f"records reached the store again {stored_again:.2f} s after the kill"

        devices.join(150)
        [summary] = summaries
        assert summary.acked == 10_000, summary.as_dict()
        unavailable = summary.errors.get("unavailable", 0)
        assert unavailable > 0, "devices were told, not left in silence"

        # up said so: a line under its banner, and /readyz named Redis while it was down.
        out = log.read_text()
        assert "fleetlog: redis is down (killed by SIGKILL); restarting it in" in out, out[-3000:]
        assert "fleetlog: redis is back" in out
        states = [body["checks"]["redis"] for body in said]
        assert any(state.startswith(("down since", "restarting since")) for state in states), states
        assert all(not body["ready"] for body in said)
        [new_server] = [p for p in psutil.Process(up.pid).children() if "server" in p.name()]
        assert new_server.pid != server.pid
        recorded = json.loads(up_file.read_text())
        assert recorded["pid"] == new_server.pid and recorded["parts"]["redis"] == "ok"
        assert wait_until(lambda: httpx.get(f"http://127.0.0.1:{http_port}/readyz", timeout=5, headers={
            "Authorization": f"Bearer {reader}"}).status_code == 200, timeout=30)
        assert run_fleetlog("devices", "--json", "--data-dir", str(data_dir)).returncode == 0

        acked = {(device, seq) for device, count in summary.acked_through.items() for seq in range(count)}
        assert wait_until(lambda: acked <= _stored_seqs(data_dir).keys(), timeout=60)
        stored = _stored_seqs(data_dir)
        outcome = Outcome(
            "fleetlog up: embedded Redis SIGKILL, restarted by up", len(acked), sum(stored.values()),
            len(acked - stored.keys()), sum(count - 1 for count in stored.values() if count > 1),
            round(again, 2), f"Redis back {back_at - killed_at:.1f} s after the kill; stored again "
            f"at {stored_again:.1f} s; {unavailable} unavailable replies")
        outcome.record()
        assert outcome.lost == 0, outcome
        assert outcome.duplicated == 0, outcome
    finally:
        if up.poll() is None:
            _stop(up)


def test_a_device_on_a_killed_gateway_reads_offline_once_its_node_lapses(tmp_path: Path) -> None:
    """``up`` restarted its killed gateway under the same node id: the new process renewed
    that node's heartbeat, so the links the dead one left read online for good (``devices``,
    the console, ``--offline`` alerts).  A restarted gateway is a new node (``-r1``)."""
    from tests.helpers import legacy_frame, send_legacy

    data_dir, log, port = tmp_path / "data", tmp_path / "up.log", free_port()
    up = subprocess.Popen(
        [sys.executable, "-m", "fleetlog", "up", "--data-dir", str(data_dir), "--ws-port", str(port),
         "--http-port", str(free_port()), "--auth", "none"],
        stdout=log.open("ab"), stderr=subprocess.STDOUT, env={**os.environ, "FLEETLOG_HEARTBEAT_TTL": "2"})

    def device(name: str) -> dict[str, Any]:
        listed = run_fleetlog("devices", "--json", "--data-dir", str(data_dir))
        assert listed.returncode == 0, listed.stderr
        return next(d for d in json.loads(listed.stdout) if d["device_id"] == name)

    async def connect_and_send(name: str) -> None:
        ws = await websockets.connect(f"ws://127.0.0.1:{port}")  # left open: the kill ends it
        await send_legacy(ws, legacy_frame(name, 0, msg="hello"))

    try:
        wait_for_port(port, timeout=30, process=up)
        assert wait_until(lambda: "fleetlog is up." in log.read_text(), timeout=30)
        loop = asyncio.new_event_loop()
        loop.run_until_complete(connect_and_send("door-gone"))
        assert wait_until(lambda: device("door-gone")["online"], timeout=10)
        [gateway] = [p for p in psutil.Process(up.pid).children()
                     if p.cmdline()[1:4] == ["-m", "fleetlog", "gateway"]]
        first_node = device("door-gone")["node"]
        gateway.kill()
        assert wait_until(lambda: "gateway is down" in log.read_text(), timeout=10), log.read_text()[-2000:]
        wait_for_port(port, timeout=30, process=up)
        assert wait_until(lambda: not device("door-gone")["online"], timeout=15), device("door-gone")
        loop.run_until_complete(connect_and_send("door-back"))  # the new process: a new node
        back = device("door-back")
        assert back["online"] and back["node"] != first_node and "-r1" in back["node"]
        loop.close()
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()


def test_up_on_a_redis_of_its_own_is_found_from_its_data_dir(tmp_path: Path, redis_url: str) -> None:
    """``up --redis-url``: the commands its banner prints (``device add ... --data-dir``) found no
    Redis, since only an embedded one was recorded in the data dir."""
    import redis

    data_dir, log, ws_port = tmp_path / "data", tmp_path / "up.log", free_port()
    up = _up(data_dir, ws_port, log, "--redis-url", redis_url)
    try:
        wait_for_port(ws_port, timeout=30, process=up)
        assert wait_until(lambda: "fleetlog is up." in log.read_text(), timeout=30)
        up_file = data_dir / "redis" / "fleetlog-up.json"
        assert json.loads(up_file.read_text())["url"] == redis_url
        assert up_file.stat().st_mode & 0o777 == 0o600, "its URL may hold a password"
        added = run_fleetlog("device", "add", "door-1", "--data-dir", str(data_dir))
        assert added.returncode == 0, added.stderr
        assert redis.Redis.from_url(redis_url).exists(keys.device_credential("door-1")), "added there"
        listed = run_fleetlog("devices", "--json", "--data-dir", str(data_dir))
        assert listed.returncode == 0 and "no Redis found" not in listed.stderr, listed.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
    assert not (data_dir / "redis" / "fleetlog-up.json").exists(), "gone with up"
