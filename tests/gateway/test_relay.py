"""fleetlog.gateway.relay: commands delivered to this node's connections, outcomes published.

The relay runs against a real Redis; the connections are small stand-ins that
record what they were asked to write (the relay's side of the connection
interface, :class:`~fleetlog.gateway.relay.Recipient`).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio

from fleetlog import keys
from fleetlog.config import Settings
from fleetlog.control import Command, parse_control
from fleetlog.embedded import RedisServer
from fleetlog.gateway.connection import CommandAnswer
from fleetlog.gateway.relay import CommandRelay, Recipient
from fleetlog.gateway.server import Gateway
from fleetlog.gateway.wiring import wire
from fleetlog.queue.connection import connect_async


@dataclass
class Device:
    device_id: str | None
    v2: bool = True
    open: bool = True
    written: list[bytes] = field(default_factory=list)

    def send_command(self, wire: bytes) -> bool:
        if self.open:
            self.written.append(wire)
        return self.open


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    connection = connect_async(redis_url)
    yield connection
    await connection.aclose()


async def _replies(client: redis.asyncio.Redis, command_id: str, count: int,
                   act: Any) -> list[dict[str, Any]]:
    """Subscribe to the command's reply channel, ``act()``, and collect ``count`` replies."""
    pubsub = client.pubsub()
    await pubsub.subscribe(keys.command_reply(command_id))
    try:
        act()
        got: list[dict[str, Any]] = []
        async with asyncio.timeout(5):
            while len(got) < count:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    got.append(json.loads(message["data"]))
        return got
    finally:
        await pubsub.aclose()


def _command(message: dict[str, Any]) -> Command:
    """A command as the node reads it off its control channel."""
    command = parse_control(message)
    assert isinstance(command, Command)
    return command


def _relay(client: redis.asyncio.Redis, devices: dict[str, Device],
           by_conn: dict[str, Device] | None = None) -> CommandRelay:
    def find(conn_id: str, device_id: str) -> Recipient | None:
        return (by_conn or {}).get(conn_id) or devices.get(device_id)

    return CommandRelay(client, "node-a", find)


async def test_a_command_reaches_a_v2_device_and_delivered_is_published(
        client: redis.asyncio.Redis) -> None:
    door = Device("door:1")
    relay = _relay(client, {"door:1": door})
    replies = await _replies(client, "c1", 1, lambda: relay.deliver(_command(
        {"op": "command", "id": "c1", "device": "door:1", "conn": "x", "body": {"open": True}})))
    assert replies == [{"id": "c1", "device": "door:1", "status": "delivered", "node": "node-a"}]
    assert len(door.written) == 1
    assert b'"type":"command"' in door.written[0] and b'"id":"c1"' in door.written[0]
    assert relay.counts == {"delivered": 1}


async def test_a_legacy_device_gets_the_body_as_it_is(client: redis.asyncio.Redis) -> None:
    kiosk = Device("kiosk", v2=False)
    relay = _relay(client, {"kiosk": kiosk})
    await _replies(client, "c2", 1, lambda: relay.deliver(_command(
        {"op": "command", "id": "c2", "device": "kiosk", "conn": "x", "body": {"reboot": 1}})))
    assert kiosk.written and kiosk.written[0].endswith(b'{"reboot":1}')


@pytest.mark.parametrize(
    ("devices", "by_conn"),
    [
        ({}, {}),  # not on this node
        ({}, {"conn-1": Device("another")}),  # the link's connection is now another device's
        ({"door": Device("door", open=False)}, {}),  # closing: nothing more is written
    ],
)
async def test_offline_when_nothing_was_written(client: redis.asyncio.Redis,
                                                devices: dict[str, Device],
                                                by_conn: dict[str, Device]) -> None:
    relay = _relay(client, devices, by_conn)
    replies = await _replies(client, "c3", 1, lambda: relay.deliver(_command(
        {"op": "command", "id": "c3", "device": "door", "conn": "conn-1", "body": {}})))
    assert [reply["status"] for reply in replies] == ["offline"]
    assert not any(device.written for device in [*devices.values(), *by_conn.values()])
    assert relay.counts == {"offline": 1}




async def test_a_malformed_command_is_logged_and_ignored(redis_url: str,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """The node's control handler reads it (:func:`fleetlog.control.parse_control`); no reply."""
    gateway = Gateway(wire(Settings(host="127.0.0.1", ws_port=0), redis_url))
    try:
        for message in ({"op": "command", "id": 7, "device": "door", "body": {}},
                        {"op": "command", "id": "c4", "device": "door"},
                        {"op": "command", "id": "c4", "device": None, "body": {}}):
            gateway.on_control(message)
        assert caplog.text.count("ignoring a malformed command") == 3
        assert gateway.parts.relay.counts == {} and gateway.parts.relay.in_flight == 0
    finally:
        await gateway.parts.client.aclose()
        await gateway.parts.lookup_client.aclose()


async def test_a_command_result_is_published_verbatim(client: redis.asyncio.Redis) -> None:
    relay = _relay(client, {})
    payload = b'{"type":"command_result","id":"c5","ok":true,"n":123456789012345678901234}'
    replies = await _replies(client, "c5", 1, lambda: relay.answer(CommandAnswer("door", "c5", payload)))
    assert replies == [{"id": "c5", "device": "door", "status": "result",
                        "result": {"type": "command_result", "id": "c5", "ok": True,
                                   "n": 123456789012345678901234}}]
    assert relay.counts == {"answered": 1}


async def test_a_commands_replies_are_published_in_the_order_they_were_made(
        client: redis.asyncio.Redis) -> None:
    """A device's quick result overtook its delivered (separate connections of the pool, the
    first one still connecting): the API took the result for a missed delivery and sent the
    command again.  With a cold pool and many commands at once, order is kept per command."""
    devices = {f"d{n}": Device(f"d{n}") for n in range(50)}
    relay = _relay(client, devices)
    pubsub = client.pubsub()
    await pubsub.subscribe(*(keys.command_reply(f"k{n}") for n in range(50)))
    try:
        for n in range(50):
            relay.deliver(_command({"op": "command", "id": f"k{n}", "device": f"d{n}", "conn": "x",
                                    "body": {}}))
            relay.answer(CommandAnswer(f"d{n}", f"k{n}", b'{"type":"command_result","id":"k%d"}' % n))
        order: dict[str, list[str]] = {}
        async with asyncio.timeout(10):
            while sum(map(len, order.values())) < 100:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message is not None:
                    reply = json.loads(message["data"])
                    order.setdefault(reply["id"], []).append(reply["status"])
    finally:
        await pubsub.aclose()
    assert order == {f"k{n}": ["delivered", "result"] for n in range(50)}
    assert relay._last == {}, "nothing kept once published"


async def test_redis_down_loses_the_reply_not_the_relay(private_redis: RedisServer,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    client = connect_async(private_redis.url, timeout=1)
    door = Device("door")
    relay = _relay(client, {"door": door})
    private_redis.stop()
    try:
        relay.deliver(_command({"op": "command", "id": "c6", "device": "door", "conn": "x",
                                "body": {}}))
        await asyncio.sleep(1.5)
        assert len(door.written) == 1, "the device got its command even though the reply was lost"
        assert "publishing a command reply failed: Redis unavailable" in caplog.text
    finally:
        await client.aclose()


async def test_replies_over_the_in_flight_limit_are_dropped_not_the_commands(
        private_redis: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """With Redis stalled, replies pile up: past the limit one is dropped (logged), the device
    still gets its command, and once Redis answers again the next reply goes out."""
    client = connect_async(private_redis.url, timeout=5)
    listener = connect_async(private_redis.url, timeout=5)
    door = Device("door")
    relay = CommandRelay(client, "node-a", lambda conn, device: door, max_publishing=1)
    pubsub = listener.pubsub()
    await pubsub.subscribe(*(keys.command_reply(c) for c in ("c1", "c2", "c3")))
    assert private_redis.process is not None
    try:
        private_redis.process.send_signal(signal.SIGSTOP)
        try:
            for command_id in ("c1", "c2"):
                relay.deliver(_command({"op": "command", "id": command_id, "device": "door",
                                        "conn": "x", "body": {}}))
            await asyncio.sleep(0.2)
        finally:
            private_redis.process.send_signal(signal.SIGCONT)
        assert "dropping one for fleetlog:command:c2" in caplog.text
        heard: list[str] = []

        async def hear(command_id: str) -> None:
            async with asyncio.timeout(5):
                while command_id not in heard:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                    if message is not None:
                        heard.append(json.loads(message["data"])["id"])

        await hear("c1")  # the stalled reply goes out once Redis answers
        for _ in range(500):  # its publisher has Redis' answer too (bounded: 5 s)
            if not relay.in_flight:
                break
            await asyncio.sleep(0.01)
        assert relay.in_flight == 0
        relay.deliver(_command({"op": "command", "id": "c3", "device": "door", "conn": "x",
                                "body": {}}))
        await hear("c3")  # room again: the next reply is published
        await asyncio.sleep(0.2)
        while (message := await pubsub.get_message(ignore_subscribe_messages=True)) is not None:
            heard.append(json.loads(message["data"])["id"])
        assert heard == ["c1", "c3"], "c2's reply was the one dropped, and only it"
        assert len(door.written) == 3, "every command reached the device"
        assert relay.counts == {"delivered": 3}
    finally:
        await pubsub.aclose()
        await listener.aclose()
        await client.aclose()
