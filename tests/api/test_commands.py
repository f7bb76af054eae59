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


async def _v2_device(api: Api, processes: Processes, tmp_path: Path, device_id: str) -> Any:
    """A v2 device (token at the handshake), connected and linked: the open WebSocket."""
    _, port = processes.gateway(api.redis_url, tmp_path / "gw", auth="token")
    client = connect(api.redis_url)
    token = Credentials(client).add(device_id)
    client.close()
    ws = await websockets.connect(f"ws://127.0.0.1:{port}/?token={token}")
    assert await asyncio.to_thread(wait_until, lambda: _linked(api, device_id), 10)
    return ws


#: Bodies that are not strict JSON, or that a gateway could not read back exactly.
_REFUSED = [
    (b"[" * 300 + b"]" * 300, "nested deeper than 254 levels"),
    (b'"\\ud800"', "not JSON"),
    (b'{"\\udc00": 1}', "not JSON"),
    # A long integer sends the body through the stdlib's reader, which takes a lone surrogate.
    (b'{"n": 12345678901234567890123, "s": "\\ud800"}', "lone surrogate"),
    (b'{"n": 1000000000000000000000000000000}', "beyond 64 bits"),
    (b"NaN", "not JSON"),
    (b"[1, NaN]", "not JSON"),
    (b"-Infinity", "not JSON"),
    (b"1e400", "not JSON"),
    (b"", "not JSON"),
]


async def test_a_body_a_gateway_cannot_carry_is_refused_and_nothing_is_sent(
        api: Api, processes: Processes, tmp_path: Path) -> None:
    ws = await _v2_device(api, processes, tmp_path, "door-1")
    headers = {"Authorization": f"Bearer {api.admin}", "Content-Type": "application/json"}
    async with ws, httpx.AsyncClient(base_url=api.url, timeout=30, headers=headers) as http:
        for body, reason in _REFUSED:
            for device_id in ("door-1", "nobody"):  # refused before the device is looked up
                answer = await http.post(f"/api/devices/{device_id}/commands", content=body)
                assert answer.status_code == 422, (body[:40], answer.text)
                [problem] = answer.json()["detail"]
                assert problem["loc"] == ["body"]
                assert reason in problem["msg"], (body[:40], problem)
        # Nothing reached the device: the first frame it gets is the next good command.
        outcome = await _post(api, "door-1", {"cmd": "blink"})
        assert outcome["status"] == "delivered"
        assert json.loads(await asyncio.wait_for(ws.recv(), 10)) == {
            "type": "command", "id": outcome["id"], "cmd": "blink"}
        metrics = await http.get("/metrics")
        assert 'fleetlog_api_commands_total{status="delivered"} 1.0' in metrics.text


async def test_the_devices_result_comes_back_exactly_or_says_why_not(
        api: Api, processes: Processes, tmp_path: Path) -> None:
    answers = [
        # An integer beyond 64 bits: as the device wrote it, not 1e+30.
        b'{"type": "command_result", "id": "%s", "big": 1000000000000000000000000000000}',
        # Nested deeper than a response can be written: an explicit error, not a timeout.
        b'{"type": "command_result", "id": "%s", "deep": ' + b"[" * 300 + b"]" * 300 + b"}",
    ]
    ws = await _v2_device(api, processes, tmp_path, "v2-big")
    async with ws:
        outcomes = []
        for answer in answers:
            async def device(frame: bytes = answer) -> None:
                command = json.loads(await asyncio.wait_for(ws.recv(), 10))
                await ws.send((frame % command["id"].encode()).decode())

            answering = asyncio.create_task(device())
            outcomes.append(await _post(api, "v2-big", {"cmd": "read"}, wait=10))  # json.loads: exact
            await answering
        # A lone surrogate (with a long integer, read by the stdlib, as without): not JSON to the
        # gateway, which tells the device; the caller's wait ends in a timeout.
        async def unreadable() -> str:
            command = json.loads(await asyncio.wait_for(ws.recv(), 10))
            await ws.send(json.dumps({"type": "command_result", "id": command["id"], "s": "a\ud800b",
                                      "n": 12345678901234567890123}))
            replies = [await asyncio.wait_for(ws.recv(), 10) for _ in range(2)]  # not JSON: legacy
            return str(replies[1])

        told = asyncio.create_task(unreadable())
        surrogate = await _post(api, "v2-big", {"cmd": "read"}, wait=2)
        assert "bad_json" in await told
    big, deep = outcomes
    assert big["status"] == "delivered" and big["error"] is None
    assert big["result"] == {"type": "command_result", "id": big["id"], "big": 10**30}
    assert surrogate["status"] == "timeout" and surrogate["delivered"] is True
    assert deep["status"] == "delivered" and deep["delivered"] is True and deep["result"] is None
    assert deep["error"] == "the device's command_result could not be read: nested deeper than 254 levels"


async def test_a_result_before_delivered_is_the_answer_and_the_command_goes_once(api: Api) -> None:
    """A node's replies could arrive result first (its publishes on separate connections): the
    API took the result for a missed delivery and published the command again, and the device
    ran it twice.  Here a node that answers result, then delivered, on purpose."""
    import redis.asyncio

    from fleetlog import control, keys

    client = redis.asyncio.Redis.from_url(api.redis_url)
    await client.hset(keys.DEVICE_LINKS, "door-9", json.dumps({"node": "odd-node", "conn": "odd-node/1"}))
    await client.set(keys.node_heartbeat("odd-node"), "1", px=60_000)
    pubsub = client.pubsub()
    await pubsub.subscribe(keys.node_control("odd-node"))
    received: list[str] = []

    async def node() -> None:
        async for message in pubsub.listen():
            if message["type"] != "message":
                continue
            command = json.loads(message["data"])
            received.append(command["id"])
            reply_channel = keys.command_reply(command["id"])
            answer = json.dumps({"type": "command_result", "id": command["id"], "ok": True}).encode()
            await client.publish(reply_channel, control.result_reply(command["id"], "door-9", answer))
            await client.publish(reply_channel, control.delivery_reply(command["id"], "door-9", "delivered",
                                                                       "odd-node"))

    serving = asyncio.create_task(node())
    try:
        waited = await _post(api, "door-9", {"cmd": "open"}, wait=5)
        quick = await _post(api, "door-9", {"cmd": "open"})
        await asyncio.sleep(0.5)  # time for a second publish, if one were made
    finally:
        serving.cancel()
        await pubsub.aclose()
        await client.aclose()
    assert waited["status"] == "delivered" and waited["result"] == {
        "type": "command_result", "id": waited["id"], "ok": True}
    assert quick["status"] == "delivered" and quick["delivered"] is True
    assert received == [waited["id"], quick["id"]], "each command published once"
