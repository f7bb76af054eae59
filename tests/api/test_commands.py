"""Commands end to end: API -> Redis -> the gateway node holding the device -> the device."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from fleetlog.credentials import Credentials
from fleetlog.queue.connection import connect
from tests.api.conftest import Api
from tests.conftest import Processes
from tests.helpers import RECEIVED, legacy_frame, send_legacy, wait_until

pytestmark = pytest.mark.slow


def _send(api: Api, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FLEETLOG_API_TOKEN": api.admin}
    return subprocess.run([sys.executable, "-m", "fleetlog", "send", "--api-url", api.url, *args],
                          capture_output=True, text=True, timeout=60, env=env)


def _linked(api: Api, device_id: str) -> bool:
    client = connect(api.redis_url)
    try:
        return bool(client.hexists("device:links", device_id))
    finally:
        client.close()


async def _post(api: Api, device_id: str, body: Any, wait: float = 0) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=api.url, timeout=30,
                                 headers={"Authorization": f"Bearer {api.admin}"}) as http:
        answer = await http.post(f"/api/devices/{device_id}/commands", params={"wait": wait}, json=body)
        assert answer.status_code == 200, answer.text
        outcome: dict[str, Any] = answer.json()
        return outcome


async def test_legacy_device_receives_commands_as_text_frames(
        api: Api, processes: Processes, tmp_path: Path) -> None:
    _, port = processes.gateway(api.redis_url, tmp_path / "gw")
    async with websockets.connect(f"ws://127.0.0.1:{port}") as ws:
        assert (await send_legacy(ws, legacy_frame("old-1", 0)))[0] == RECEIVED
        assert await asyncio.to_thread(wait_until, lambda: _linked(api, "old-1"), 10)
        # Two at once: both arrive, each as the body exactly.
        first, second = await asyncio.gather(_post(api, "old-1", {"cmd": "reboot", "n": 1}),
                                             _post(api, "old-1", [1, "two"]))
        assert first["status"] == second["status"] == "delivered"
        assert first["id"] != second["id"]
        frames = sorted([await asyncio.wait_for(ws.recv(), 10) for _ in range(2)])
        assert sorted((json.loads(frame) for frame in frames), key=str) == sorted(
            [{"cmd": "reboot", "n": 1}, [1, "two"]], key=str)
        sent = await asyncio.to_thread(_send, api, "old-1", '{"cmd": "ping"}')
        assert sent.returncode == 0, sent.stderr
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {"cmd": "ping"}
        # A legacy device never answers: with --wait that is a timeout (exit 2; a usage error is 64).
        timed_out = await asyncio.to_thread(_send, api, "old-1", '{"cmd": "ping"}', "--wait", "0.5")
        assert timed_out.returncode == 2, timed_out.stdout + timed_out.stderr
        assert json.loads(timed_out.stdout)["status"] == "timeout"
        assert json.loads(timed_out.stdout)["delivered"] is True


async def test_v2_device_answers_and_the_caller_gets_the_result(
        api: Api, processes: Processes, tmp_path: Path) -> None:
    _, port = processes.gateway(api.redis_url, tmp_path / "gw", auth="token")
    client = connect(api.redis_url)
    token = Credentials(client).add("v2-1")
    client.close()
    async with websockets.connect(f"ws://127.0.0.1:{port}/?token={token}") as ws:
        assert await asyncio.to_thread(wait_until, lambda: _linked(api, "v2-1"), 10)

        async def device() -> list[dict[str, Any]]:
            seen = []
            for _ in range(2):
                command = json.loads(await asyncio.wait_for(ws.recv(), 20))
                seen.append(command)
                await ws.send(json.dumps({"type": "command_result", "id": command["id"],
                                          "ok": True, "echo": command.get("n")}))
            return seen

        answering = asyncio.create_task(device())
        outcome = await _post(api, "v2-1", {"cmd": "blink", "n": 7, "type": "mine"}, wait=10)
        sent = await asyncio.to_thread(_send, api, "v2-1", '"hello"', "--wait", "10")
        seen = await answering
        assert outcome["status"] == "delivered"
        assert outcome["result"] == {"type": "command_result", "id": outcome["id"], "ok": True, "echo": 7}
        assert seen[0] == {"type": "command", "id": outcome["id"], "cmd": "blink", "n": 7}
        assert sent.returncode == 0, sent.stderr
        printed = json.loads(sent.stdout)
        assert seen[1] == {"type": "command", "id": printed["id"], "body": "hello"}
        assert printed["result"]["ok"] is True
        # No reply was written to the device for its command_result frames.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(ws.recv(), 0.5)


def test_offline_device(api: Api) -> None:
    sent = _send(api, "nobody", "{}")
    assert sent.returncode == 1, sent.stdout + sent.stderr
    assert json.loads(sent.stdout)["status"] == "offline"
    # A link left by a node that died (no heartbeat) is offline too.
    client = connect(api.redis_url)
    client.hset("device:links", "ghost", '{"node": "dead-node", "conn": "dead-node/1"}')
    client.close()
    assert _send(api, "ghost", "{}").returncode == 1
