"""fleetlog.control: each control-channel message built, sent as JSON, and read back."""

from __future__ import annotations

import json
import time
from typing import Any

import orjson
import pytest
import redis

from fleetlog import control, keys
from fleetlog.queue import scripts


def _wire(message: bytes) -> dict[str, Any]:
    """What a subscriber decodes (the registry, the API's bus; json: a 24-digit integer too)."""
    decoded = json.loads(message)
    assert isinstance(decoded, dict)
    return decoded


def test_a_command_round_trips() -> None:
    body = {"open": True, "n": [1, 2.5, None], "text": "é\u2028"}
    message = control.command_message("c1", "door:1", "node-a/7", body)
    assert message == (b'{"op":"command","id":"c1","device":"door:1","conn":"node-a/7",'
                       b'"body":{"open":true,"n":[1,2.5,null],"text":"\xc3\xa9\xe2\x80\xa8"}}')
    assert control.parse_control(_wire(message)) == control.Command("c1", "door:1", "node-a/7", body)


def test_a_command_whose_link_named_no_connection_is_still_delivered() -> None:
    """A link without ``conn``: ``null`` on the wire, and no connection of that name on the node."""
    message = control.command_message("c2", "kiosk", None, [])
    assert b'"conn":null' in message
    assert control.parse_control(_wire(message)) == control.Command("c2", "kiosk", "None", [])


@pytest.mark.parametrize("message", [
    {"op": "command", "id": 7, "device": "door", "body": {}},
    {"op": "command", "id": "c4", "device": "door"},
    {"op": "command", "id": "c4", "device": None, "body": {}},
])
def test_a_malformed_command_is_refused(message: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="a command needs"):
        control.parse_control(message)


def test_another_op_is_none_of_the_nodes_business() -> None:
    assert control.parse_control({"op": "reload"}) is None
    assert control.parse_control({}) is None


def test_the_takeover_the_link_script_publishes_is_read(redis_url: str) -> None:
    """The take-over is built in Lua (LINK): run it, and read what it published."""
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(keys.node_control("node-old"))
        client.hdel(keys.DEVICE_LINKS, "control:meter")
        for node, conn in (("node-old", "node-old/7"), ("node-new", "node-new/1")):
            link = orjson.dumps({"node": node, "conn": conn, "since": "2024-01-01T00:00:00.000Z"})
            client.eval(scripts.LINK, 1, keys.DEVICE_LINKS, "control:meter", link, node, conn,
                        keys.node_control(""), "1")
        deadline = time.monotonic() + 5
        while (message := pubsub.get_message(timeout=0.5)) is None:  # None: the subscription's
            assert time.monotonic() < deadline, "no take-over published"
        assert control.parse_control(_wire(message["data"])) == control.Takeover(
            "control:meter", "node-old/7")
    finally:
        client.hdel(keys.DEVICE_LINKS, "control:meter")
        pubsub.close()
        client.close()


def test_a_takeover_without_conn_names_no_connection() -> None:
    assert control.parse_control({"op": "takeover"}) == control.Takeover(None, "None")


@pytest.mark.parametrize("status", ["delivered", "offline"])
def test_a_delivery_reply_round_trips(status: control.DeliveryStatus) -> None:
    message = control.delivery_reply("c1", "door:1", status, "node-a")
    assert message == b'{"id":"c1","device":"door:1","status":"%s","node":"node-a"}' % status.encode()
    assert control.parse_reply(_wire(message)) == control.Reply("c1", "door:1", status, "node-a")


def test_a_result_reply_carries_the_device_frame_verbatim() -> None:
    payload = b'{"type":"command_result","id":"c5","ok":true,"n":123456789012345678901234}'
    message = control.result_reply("c5", "door", payload)
    assert message == b'{"id":"c5","device":"door","status":"result","result":' + payload + b"}"
    assert control.parse_reply(_wire(message)) == control.Reply(
        "c5", "door", "result", None, {"type": "command_result", "id": "c5", "ok": True,
                                       "n": 123456789012345678901234})


def test_a_reply_of_the_wrong_types_reads_none() -> None:
    assert control.parse_reply({"id": 1, "device": ["door"], "status": 2, "node": {}}) == \
        control.Reply(None, None, None, None)
