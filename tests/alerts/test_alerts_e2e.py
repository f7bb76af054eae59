"""Alerts end to end: a real gateway, workers, alerters and Redis, and a real HTTP receiver.

Each scenario sends legacy frames through the gateway, lets the worker store
them and the alerter evaluate the stored records, and counts what reaches the
receiver: one notification per firing, never more, never none.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import socket
import threading
import time

import pytest
import websockets

from tests.alerts.conftest import Stack
from tests.alerts.receiver import Receiver
from tests.helpers import send_legacy, wait_until

pytestmark = pytest.mark.slow

SECRET = "a-secret-of-at-least-16-bytes"


def settle(receiver: Receiver, seconds: float = 3.0) -> None:
    """Give a duplicate, if any, the time to arrive."""
    time.sleep(seconds)


def test_a_matching_record_reaches_the_receiver_once_with_the_documented_body_and_signature(
        stack: Stack, receiver: Receiver) -> None:
    stack.start()
    stack.add("door-forced", "--when", 'message.contains("door forced")', "--devices", "door-*",
              "--group-wait", "0s", "--to", receiver.url, "--secret", SECRET)
    stack.wait_lease()
    stack.send("door-1", [{"msg": "door closed"}, {"msg": "door forced", "level": "warn", "zone": 3},
                          {"msg": "door closed"}])
    stack.send("kiosk-1", [{"msg": "door forced"}])  # not selected
    bodies = receiver.wait(1, 20)
    settle(receiver)
    assert len(receiver.received) == 1, receiver.bodies(None)
    got = receiver.received[0]
    body = got.body
    assert got.signature_ok(SECRET)
    assert got.headers["x-fleetlog-id"] == body["id"]
    assert got.headers["x-fleetlog-event"] == "firing"
    assert got.headers["content-type"] == "application/json"
    assert body["version"] == 1 and body["event"] == "firing"
    assert body["rule"]["name"] == "door-forced" and body["rule"]["kind"] == "records"
    assert body["rule"]["devices"] == "door-*"
    firing = body["firing"]
    assert firing["group"] == "door-1" and firing["count"] == 1 and firing["state"] == "firing"
    assert firing["first_at"] == firing["last_at"] == firing["started_at"]
    [sample] = firing["samples"]
    assert sample["device_id"] == "door-1" and sample["message"] == "door forced"
    assert sample["level"] == "warn" and sample["data"] == {"msg": "door forced", "level": "warn", "zone": 3}
    assert body["text"].startswith("door-forced: 1 matching record from door-1 between ")
    assert bodies == [body]
    # History: one firing, its one notification delivered.
    shown = stack.show("door-forced")
    [entry] = shown["firings"]
    assert [(n["event"], n["status"], n["attempts"]) for n in entry["notifications"]] == [
        ("firing", "delivered", 1)]


def test_200_matching_records_in_10_s_are_one_notification_with_count_200(
        stack: Stack, receiver: Receiver) -> None:
    stack.start()
    stack.add("kiosk-errors", "--when", 'level == "error"', "--devices", "kiosk-*", "--within", "1m",
              "--group-wait", "12s", "--to", receiver.url)
    stack.wait_lease()
    started = time.time()
    stack.send("kiosk-7", [{"level": "error", "msg": f"jam {n}", "n": n} for n in range(200)], per_second=20)
    assert time.time() - started < 12
    bodies = receiver.wait(1, 40)
    settle(receiver)
    assert len(receiver.received) == 1, [b["firing"]["count"] for b in receiver.bodies(None)]
    firing = bodies[0]["firing"]
    assert firing["count"] == 200
    assert [s["data"]["n"] for s in firing["samples"]] == [0, 1, 2, 3, 4]
    assert firing["first_at"] < firing["last_at"]


def test_a_receiver_down_for_30_s_gets_the_notification_once_when_back(
        stack: Stack, receiver: Receiver) -> None:
    receiver.down()
    stack.start()
    stack.add("hot", "--when", "data.temp > 80", "--group-wait", "0s", "--to", receiver.url)
    stack.wait_lease()
    stack.send("boiler-1", [{"temp": 75}, {"temp": 92}])
    down_since = time.monotonic()
    # While it is down: the notification is pending, tried again with backoff, its error kept.
    assert wait_until(lambda: stack.show("hot")["firings"] and
                      stack.show("hot")["firings"][0]["notifications"][0]["attempts"] >= 2, 20)
    note = stack.show("hot")["firings"][0]["notifications"][0]
    assert note["status"] == "pending" and "Connect" in (note["last_error"] or ""), note
    time.sleep(max(0.0, 30 - (time.monotonic() - down_since)))
    receiver.up()
    bodies = receiver.wait(1, 15)
    settle(receiver)
    assert len(receiver.received) == 1 and bodies[0]["firing"]["count"] == 1
    note = stack.show("hot")["firings"][0]["notifications"][0]
    assert note["status"] == "delivered" and note["attempts"] >= 5, note


def test_a_destination_that_keeps_failing_is_recorded_as_failed(stack: Stack, receiver: Receiver) -> None:
    receiver.status = 503
    stack.env["FLEETLOG_ALERT_GIVE_UP"] = "4"
    stack.start()
    stack.add("hot", "--when", "data.temp > 80", "--group-wait", "0s", "--to", receiver.url)
    stack.wait_lease()
    stack.send("boiler-1", [{"temp": 92}])
    assert wait_until(lambda: stack.show("hot")["firings"] and
                      stack.show("hot")["firings"][0]["notifications"][0]["status"] == "failed", 20)
    note = stack.show("hot")["firings"][0]["notifications"][0]
    assert note["last_error"].startswith("HTTP 503") and note["attempts"] == len(receiver.received) >= 2
    client = stack.client()
    try:
        assert int(client.hget("fleetlog:{alerts}:stats", "deliveries:failed")) == 1
    finally:
        client.close()


class Drip:
    """A webhook receiver that reads the request, then sends its answer a byte every 0.5 s."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}/drip"
        self.ids: list[tuple[str, float, float]] = []  # note id, arrival, end (time.monotonic())
        self.lock = threading.Lock()
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        arrived = time.monotonic()
        head = b""
        with conn:
            while b"\r\n\r\n" not in head and len(head) < 65536:
                head += conn.recv(4096)
            found = re.search(rb"(?i)x-fleetlog-id: *([^\r]+)", head)
            try:
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"[:30]:  # never whole
                    if self.closed.wait(0.5):
                        break
                    conn.sendall(bytes([byte]))
            except OSError:
                pass
        with self.lock:
            self.ids.append((found.group(1).decode() if found else "?", arrived, time.monotonic()))

    def close(self) -> None:
        self.closed.set()
        self.server.close()


def test_a_receiver_that_never_finishes_its_answer_holds_no_sender_and_gets_no_copy_at_once(
        stack: Stack, receiver: Receiver) -> None:
    """A receiver sending its answer a byte every 2 s kept a send (httpx's timeouts are per
    read), with one sender held per notification: another rule's notification waited 92 s,
    and each of the slow one's notifications was claimed again and sent while still open."""
    drip = Drip()
    try:
        stack.env.update({"FLEETLOG_ALERT_SEND_TIMEOUT": "1", "FLEETLOG_ALERT_SENDERS": "1",
                          "FLEETLOG_ALERT_RETRY_INITIAL": "2", "FLEETLOG_ALERT_RETRY_CAP": "2"})
        stack.start()
        stack.add("slow", "--when", 'message == "drip"', "--group-wait", "0s", "--to", drip.url)
        stack.add("fast", "--when", 'message == "fast"', "--group-wait", "0s", "--to", receiver.url)
        stack.wait_lease()
        stack.send("dev-a", [{"msg": "drip"}])
        stack.send("dev-b", [{"msg": "drip"}])
        assert wait_until(lambda: len(drip.ids) >= 2, 20)
        sent_at = time.monotonic()
        stack.send("dev-c", [{"msg": "fast"}])
        receiver.wait(1, 20)
        assert receiver.received[0].body["rule"]["name"] == "fast"
        assert time.monotonic() - sent_at < 8  # not behind the slow sends (each cut at 1 s)
        time.sleep(3)
        notes = stack.show("slow")["firings"][0]["notifications"]
        assert notes[0]["last_error"].startswith("no whole answer within 1 s"), notes
    finally:
        drip.close()
    with drip.lock:
        sends = list(drip.ids)
    # Each try ended within its second (the connection cut), and no note was sent twice at once.
    assert all(end - start < 2.5 for _, start, end in sends), sends
    for note in {note for note, _, _ in sends}:
        tries = sorted((start, end) for n, start, end in sends if n == note)
        assert all(later[0] >= earlier[1] - 0.2 for earlier, later in itertools.pairwise(tries)), tries


def test_an_alerter_killed_during_a_firing_delivers_it_once(stack: Stack, receiver: Receiver) -> None:
    """Two alerters, one active: the active one is SIGKILLed while its firing waits to be sent;
    the standby takes the lease over and sends it, once."""
    stack.start(alerters=2)
    stack.add("burst", "--when", 'level == "error"', "--group-wait", "4s", "--to", receiver.url)
    holder = stack.wait_lease()
    active = stack.alerters[int(holder[1:])]
    stack.send("kiosk-1", [{"level": "error", "msg": "e1"}, {"level": "error", "msg": "e2"}])
    client = stack.client()
    try:  # the firing is committed (in the outbox's future), not sent yet
        assert wait_until(lambda: client.hlen("fleetlog:{alerts}:firings") == 1, 10)
    finally:
        client.close()
    assert not receiver.received
    active.send_signal(signal.SIGKILL)
    active.wait()
    bodies = receiver.wait(1, 20)
    settle(receiver, 4)
    assert len(receiver.received) == 1
    assert bodies[0]["firing"]["count"] == 2
    assert stack.lease_holder() not in (None, holder)


def test_a_device_that_disconnects_is_reported_offline_after_d_and_resolved_when_back(
        stack: Stack, receiver: Receiver) -> None:
    stack.start()
    stack.add("door-offline", "--offline", "3s", "--devices", "door-*", "--to", receiver.url)
    stack.wait_lease()

    async def visit(seconds: float) -> None:
        async with websockets.connect(stack.url) as ws:
            await send_legacy(ws, json.dumps({"deviceId": "door-9", "type": 4, "data": {"msg": "hi"}}))
            await asyncio.sleep(seconds)

    asyncio.run(visit(2.0))  # seen online (the alerter looks twice a second)
    gone = time.time()
    [firing] = receiver.wait(1, 15)
    assert firing["firing"]["group"] == "door-9" and firing["rule"]["kind"] == "offline"
    assert receiver.received[0].at - gone >= 3.0, "not before D"
    assert receiver.received[0].at - gone < 3.0 + 3.0
    assert not receiver.bodies("resolved")
    asyncio.run(visit(1.5))
    [resolved] = receiver.wait(1, 10, event="resolved")
    assert resolved["firing"]["id"] == firing["firing"]["id"]
    assert resolved["firing"]["state"] == "resolved"
    assert "back online" in resolved["text"]
    settle(receiver)
    assert [body["event"] for body in receiver.bodies(None)] == ["firing", "resolved"]


def test_two_workers_on_four_shards_make_one_notification(stack: Stack, receiver: Receiver) -> None:
    stack.start(shards=4, workers=2)
    stack.add("boom", "--when", 'message == "boom"', "--per", "fleet", "--group-wait", "5s",
              "--to", receiver.url)
    stack.wait_lease()

    async def fleet() -> None:
        await asyncio.gather(*(
            asyncio.to_thread(stack.send, f"dev-{n}", [{"msg": "ok"}, {"msg": "boom", "n": n}, {"msg": "ok"}])
            for n in range(20)))

    asyncio.run(fleet())
    bodies = receiver.wait(1, 30)
    settle(receiver)
    assert len(receiver.received) == 1
    assert bodies[0]["firing"]["count"] == 20 and bodies[0]["firing"]["group"] == "*"


def test_records_sent_before_the_rule_existed_fire_only_with_backfill(
        stack: Stack, receiver: Receiver) -> None:
    stack.start()
    stack.send("door-1", [{"msg": "door forced"}])
    time.sleep(1.5)  # stored
    for name, extra in (("plain", ()), ("backfilled", ("--backfill", "1h"))):
        stack.add(name, "--when", 'message.contains("forced")', "--group-wait", "0s", "--to", receiver.url,
                  *extra)
    bodies = receiver.wait(1, 20)
    settle(receiver)
    assert [body["rule"]["name"] for body in bodies] == ["backfilled"]
    stack.send("door-1", [{"msg": "door forced again"}])
    receiver.wait(2, 20)
    settle(receiver)
    assert sorted(body["rule"]["name"] for body in receiver.bodies()) == ["backfilled", "plain"]
