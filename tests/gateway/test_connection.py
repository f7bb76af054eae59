"""fleetlog.gateway.connection.Connection: a device connection's rules, with no socket.

Events go in (frames, producer outcomes, a delay elapsing, close), actions come
out; each test checks the actions, which are everything the gateway does for
the connection (what is written, what reaches the producer, links, refusals,
reading paused or resumed, close).
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from fleetlog.errors import QueueClosed, QueueFull, QueueUnavailable
from fleetlog.gateway.auth import Identity
from fleetlog.gateway.connection import (
    MAX_IN_FLIGHT,
    MAX_IN_FLIGHT_BYTES,
    RECEIVED,
    RECEIVED_AND_STORED,
    Action,
    Close,
    Connection,
    Link,
    Reading,
    Refusal,
    SetTimer,
    Submission,
    Unlink,
)
from fleetlog.gateway.limits import DeviceLimiters
from fleetlog.gateway.messages import Opcode
from fleetlog.queue.producer import IngestResult

STORED = IngestResult()
MiB = 1024 * 1024


def connect(identity: Identity | None = None, *, records_per_s: float = 1e9, burst: float = 10.0,
            max_delay: float = 5.0, max_message_bytes: int = MiB) -> Connection:
    limiters = DeviceLimiters(records_per_s=records_per_s, bytes_per_s=1e12, burst=burst,
                              max_delay=max_delay)
    return Connection(identity, max_message_bytes=max_message_bytes, max_records_per_frame=100,
                      limiter_for=limiters.get, now=0.0)


def legacy(device_id: str | None, seq: int = 0) -> bytes:
    frame: dict[str, Any] = {"type": 4, "data": {"seq": seq}}
    if device_id is not None:
        frame["deviceId"] = device_id
    return orjson.dumps(frame)


def v2(frame_id: str, count: int, device_id: str | None = None, **extra: Any) -> bytes:
    frame: dict[str, Any] = {"type": "log", "id": frame_id,
                             "records": [{"seq": n, "msg": "x"} for n in range(count)], **extra}
    if device_id is not None:
        frame["deviceId"] = device_id
    return orjson.dumps(frame)


def send(conn: Connection, payload: bytes, now: float = 0.0, *, binary: bool = False) -> list[Action]:
    """One unfragmented message; the actions it caused."""
    conn.receive_frame(Opcode.BINARY if binary else Opcode.TEXT, True, payload, 0, now)
    return conn.actions_to_take()


def answer(conn: Connection, submission: Action, outcome: Any = STORED) -> list[Action]:
    assert isinstance(submission, Submission)
    conn.receive_outcome(submission, outcome)
    return conn.actions_to_take()


def submissions(actions: list[Action]) -> list[Submission]:
    return [action for action in actions if isinstance(action, Submission)]


def writes(actions: list[Action]) -> list[bytes]:
    return [action for action in actions if isinstance(action, bytes)]


def timers(actions: list[Action]) -> list[float]:
    return [action.delay for action in actions if isinstance(action, SetTimer)]


def frames(wire: bytes) -> list[Any]:
    """Decode unmasked server text frames: JSON ones as objects, the legacy texts as bytes."""
    out: list[Any] = []
    while wire:
        assert wire[0] == 0x81, "a final text frame"
        size, start = wire[1], 2
        if size == 126:
            size, start = int.from_bytes(wire[2:4], "big"), 4
        payload, wire = wire[start:start + size], wire[start + size:]
        out.append(orjson.loads(payload) if payload.startswith(b"{") else payload)
    return out


def one_write(actions: list[Action]) -> list[Any]:
    """The frames of the one write among ``actions`` (each frame's replies go in one write)."""
    (wire,) = writes(actions)
    return frames(wire)


# -- legacy ------------------------------------------------------------------------


def test_legacy_pair_goes_out_only_after_redis_acked() -> None:
    conn = connect()
    actions = send(conn, legacy("dev-1"))
    assert actions[0] == Link("dev-1")
    (submission,) = submissions(actions)
    assert (submission.device_id, submission.records, submission.frame_id) == (
        "dev-1", [b'{"seq":0}'], None)
    assert writes(actions) == [], "nothing is said before Redis has the record"
    assert answer(conn, submission) == [RECEIVED_AND_STORED], "both replies in one write"
    assert one_write([RECEIVED_AND_STORED]) == [b"server receive a message!", b"log_upload_response"]


def test_legacy_frame_without_a_record_is_answered_at_once() -> None:
    conn = connect()
    assert send(conn, b'{"deviceId": "dev-1"}') == [Link("dev-1"), RECEIVED]


def test_legacy_refused_by_redis_gets_received_then_the_error() -> None:
    conn = connect()
    (submission,) = submissions(send(conn, legacy("dev-1")))
    received, error = one_write(answer(conn, submission, QueueUnavailable("Redis unavailable")))
    assert received == b"server receive a message!"
    assert error["code"] == "unavailable" and "send it again" in error["message"]


def test_bad_json_and_binary_get_received_then_an_error() -> None:
    conn = connect()
    actions = send(conn, b"{nope")
    assert actions[0] == Refusal(None, "bad_json")
    received, error = one_write(actions)
    assert (received, error["code"]) == (b"server receive a message!", "bad_json")
    actions = send(conn, b"\x00\x01", binary=True)
    assert actions[0] == Refusal(None, "bad_frame")
    assert [reply if isinstance(reply, bytes) else reply["code"] for reply in one_write(actions)] == [
        b"server receive a message!", "bad_frame"]


# -- order -------------------------------------------------------------------------


def test_replies_leave_in_frame_order_whatever_order_redis_answers_in() -> None:
    conn = connect()
    first, second, third = (submissions(send(conn, v2(f"f{n}", 1, "dev-1")))[0] for n in range(3))
    assert conn.in_flight == 3
    assert answer(conn, third) == [], "the third waits for the first two"
    assert [ack["id"] for ack in one_write(answer(conn, first))] == ["f0"]
    # The second's outcome releases it and the third's, in one write.
    assert [ack["id"] for ack in one_write(answer(conn, second))] == ["f1", "f2"]
    assert conn.in_flight == 0


def test_an_immediate_error_waits_behind_a_frame_awaiting_redis() -> None:
    conn = connect()
    (pending,) = submissions(send(conn, legacy("dev-1", 0)))
    assert writes(send(conn, b"[1]")) == [], "the error must not overtake the pending reply"
    replies = one_write(answer(conn, pending))
    assert replies[:2] == [b"server receive a message!", b"log_upload_response"]
    assert replies[2] == b"server receive a message!" and replies[3]["code"] == "bad_frame"


# -- v2 ----------------------------------------------------------------------------


def test_v2_ack_says_what_redis_kept() -> None:
    conn = connect()
    (submission,) = submissions(send(conn, v2("f1", 4, "dev-1", session="boot-7")))
    assert (submission.frame_id, submission.seqs, submission.session) == ("f1", [0, 1, 2, 3], "boot-7")
    outcome = IngestResult(duplicates=[1], stored_through=3, missing=[(5, 6)])
    (ack,) = one_write(answer(conn, submission, outcome))
    assert ack == {"type": "ack", "id": "f1", "stored": 3, "duplicates": [1], "stored_through": 3,
                   "missing": [[5, 6]]}
    (submission,) = submissions(send(conn, v2("f1", 4, "dev-1")))
    (ack,) = one_write(answer(conn, submission, IngestResult(duplicate_frame=True)))
    assert ack == {"type": "ack", "id": "f1", "stored": 0, "duplicate": True}


@pytest.mark.parametrize(("outcome", "code"), [
    (QueueFull("backlog"), "busy"), (QueueUnavailable("down"), "unavailable"),
    (QueueClosed("shutting down"), "unavailable"),
])
def test_v2_queue_errors_carry_the_frame_id(outcome: Exception, code: str) -> None:
    conn = connect()
    (submission,) = submissions(send(conn, v2("f9", 2, "dev-1")))
    (error,) = one_write(answer(conn, submission, outcome))
    assert (error["type"], error["code"], error["id"]) == ("error", code, "f9")


def test_v2_bad_frame_error_carries_its_id_and_no_legacy_reply() -> None:
    conn = connect()
    actions = send(conn, orjson.dumps({"type": "log", "id": "f3", "deviceId": "dev-1", "records": []}))
    assert submissions(actions) == []
    (error,) = one_write(actions)
    assert (error["code"], error["id"]) == ("bad_frame", "f3")


# -- identity ----------------------------------------------------------------------


def test_an_authenticated_connection_cannot_write_as_another_device() -> None:
    conn = connect(Identity("dev-a", "hash"))
    actions = send(conn, legacy("dev-b"))
    assert submissions(actions) == [] and actions[0] == Refusal("dev-a", "forbidden")
    received, error = one_write(actions)
    assert (received, error["code"]) == (b"server receive a message!", "forbidden")
    actions = send(conn, v2("f1", 1, "dev-b"))
    assert submissions(actions) == []
    (error,) = one_write(actions)
    assert (error["code"], error["id"]) == ("forbidden", "f1")
    # Its own id, or none at all, is its own device; no link (the gateway linked it at connect).
    for payload in (legacy("dev-a"), legacy(None), v2("f2", 1)):
        actions = send(conn, payload)
        assert [type(action) for action in actions] == [Submission]
        assert submissions(actions)[0].device_id == "dev-a"


def test_auth_none_claims_and_reclaims_the_connection_with_links() -> None:
    conn = connect()
    actions = send(conn, legacy(None))
    assert [type(action) for action in actions] == [Submission], "no device named yet: no link"
    assert submissions(actions)[0].device_id == "unknown"
    actions = send(conn, legacy("dev-1"))
    assert actions[0] == Link("dev-1") and conn.device_id == "dev-1"
    assert [type(action) for action in send(conn, legacy("dev-1"))] == [Submission], "linked already"
    actions = send(conn, v2("f1", 1, "dev-2"))
    assert actions[:2] == [Unlink("dev-1"), Link("dev-2")]
    assert submissions(actions)[0].device_id == "dev-2"
    assert submissions(send(conn, legacy(None)))[0].device_id == "dev-2", "the last claim holds"


def test_auth_none_v2_frame_needs_a_device_id() -> None:
    conn = connect()
    actions = send(conn, v2("f1", 1))
    assert submissions(actions) == [] and actions[0] == Refusal(None, "bad_frame")
    (error,) = one_write(actions)
    assert (error["code"], error["id"]) == ("bad_frame", "f1")


# -- rate limits ---------------------------------------------------------------------


def test_a_rate_limit_delay_queues_later_messages_in_the_inbox_in_order() -> None:
    # 10 records/s, one second of burst: the first 10 records pass at once.
    conn = connect(records_per_s=10, burst=1, max_delay=5)
    (first,) = submissions(send(conn, v2("f0", 10, "dev-1")))
    # 5 more at once: they fit in 0.5 s, so the frame is slowed, not refused.
    assert send(conn, v2("f1", 5, "dev-1")) == [Reading.PAUSE, SetTimer(0.5)]
    # Meanwhile (reading is paused, but frames already read still arrive) a
    # legacy record, a binary message and a bad frame wait in the inbox.
    assert send(conn, legacy("dev-1", 7), 0.1) == []
    assert send(conn, b"\x00", 0.1, binary=True) == []
    assert send(conn, b"[]", 0.1) == []
    assert conn.last_activity == 0.1
    # The delay ends: the delayed frame goes; the legacy record needs 0.1 s more.
    conn.delay_elapsed(0.5)
    actions = conn.actions_to_take()
    assert timers(actions) == [pytest.approx(0.1)]
    (delayed,) = submissions(actions)
    assert delayed.frame_id == "f1" and len(delayed.records) == 5
    conn.delay_elapsed(0.6)
    actions = conn.actions_to_take()
    (record,) = submissions(actions)
    assert record.records == [b'{"seq":7}']
    assert actions[-1] == Reading.RESUME, "reading resumes once the inbox is empty"
    assert writes(actions) == [], "both errors wait behind the frames before them"
    # The replies come out in the order the messages arrived.
    assert [ack["id"] for ack in one_write(answer(conn, first))] == ["f0"]
    assert [ack["id"] for ack in one_write(answer(conn, delayed))] == ["f1"]
    replies = one_write(answer(conn, record))
    assert [reply if isinstance(reply, bytes) else reply["code"] for reply in replies] == [
        b"server receive a message!", b"log_upload_response",
        b"server receive a message!", "bad_frame",  # the binary message
        b"server receive a message!", "bad_frame",  # the array
    ]


def test_a_second_delay_after_the_first_ended_queues_in_order_again() -> None:
    # The inbox exists only while a delay runs: a later delay starts a new one.
    conn = connect(records_per_s=10, burst=1, max_delay=5)
    (first,) = submissions(send(conn, v2("f0", 10, "dev-1")))
    assert send(conn, v2("f1", 5, "dev-1")) == [Reading.PAUSE, SetTimer(0.5)]
    conn.delay_elapsed(0.5)
    (delayed,) = submissions(conn.actions_to_take())
    assert send(conn, v2("f2", 5, "dev-1"), 0.5) == [Reading.PAUSE, SetTimer(0.5)]
    assert send(conn, b"[]", 0.6) == [], "waits behind the delayed frame"
    conn.delay_elapsed(1.0)
    actions = conn.actions_to_take()
    (again,) = submissions(actions)
    assert again.frame_id == "f2" and actions[-1] == Reading.RESUME
    for submission, frame_id in ((first, "f0"), (delayed, "f1")):
        assert [ack["id"] for ack in one_write(answer(conn, submission))] == [frame_id]
    acked, received, refused = one_write(answer(conn, again))
    assert (acked["id"], received, refused["code"]) == ("f2", b"server receive a message!",
                                                        "bad_frame")


def test_over_the_delay_allowance_is_refused_with_retry_after() -> None:
    conn = connect(records_per_s=10, burst=1, max_delay=0.2)
    (first,) = submissions(send(conn, v2("f0", 10, "dev-1")))
    answer(conn, first)
    actions = send(conn, v2("f1", 5, "dev-1"))
    assert submissions(actions) == [] and Refusal("dev-1", "rate_limited") in actions
    (error,) = one_write(actions)
    assert (error["code"], error["id"], error["retry_after_ms"]) == ("rate_limited", "f1", 501)
    actions = send(conn, legacy("dev-1"))  # 1 record: 0.1 s, within the allowance
    assert submissions(actions) == [] and timers(actions) == [pytest.approx(0.1)]
    # Sent again after retry_after_ms, the refused frame is admitted.
    conn.delay_elapsed(0.1)
    conn.actions_to_take()
    assert len(submissions(send(conn, v2("f1", 5, "dev-1"), 0.7))) == 1


# -- flow control ------------------------------------------------------------------------


def test_too_many_frames_in_flight_pause_reading_until_half_drained() -> None:
    conn = connect()
    pending: list[Submission] = []
    for seq in range(MAX_IN_FLIGHT):
        actions = send(conn, legacy("dev-1", seq))
        pending += submissions(actions)
        assert (Reading.PAUSE in actions) == (seq == MAX_IN_FLIGHT - 1)
    resumed = []
    for n, submission in enumerate(pending):
        actions = answer(conn, submission)
        assert len(writes(actions)) == 1
        if Reading.RESUME in actions:
            resumed.append(n)
    assert resumed == [MAX_IN_FLIGHT // 2], "resumed once fewer than half are left, and only once"


def test_too_many_bytes_in_flight_pause_reading_until_half_drained() -> None:
    """Frames of ~1 MiB: reading stops once 8 MiB await Redis, far below 256 frames."""
    conn = connect(max_message_bytes=2 * MiB)
    frame = legacy("dev-1")[:-1] + b', "blob": "' + b"x" * MiB + b'"}'
    pending: list[Submission] = []
    while Reading.PAUSE not in (actions := send(conn, frame)):
        pending += submissions(actions)
    pending += submissions(actions)
    assert len(pending) == MAX_IN_FLIGHT_BYTES // len(frame) + 1
    resumed = [n for n, submission in enumerate(pending) if Reading.RESUME in answer(conn, submission)]
    assert len(resumed) == 1
    left = sum(len(frame) for _ in pending[resumed[0] + 1:])
    assert left < MAX_IN_FLIGHT_BYTES // 2 <= left + len(frame)


def test_a_device_that_does_not_read_is_not_read_from() -> None:
    conn = connect()
    (submission,) = submissions(send(conn, legacy("dev-1")))
    conn.writing_blocked()
    assert conn.actions_to_take() == [Reading.PAUSE]
    assert answer(conn, submission) == [RECEIVED_AND_STORED], "replies still go out"
    conn.writing_unblocked()
    assert conn.actions_to_take() == [Reading.RESUME]


def test_stop_reading_holds_until_close_which_resumes_reading_for_the_close_frame() -> None:
    conn = connect()
    (submission,) = submissions(send(conn, legacy("dev-1")))
    conn.stop_reading()
    assert conn.actions_to_take() == [Reading.PAUSE]
    assert answer(conn, submission) == [RECEIVED_AND_STORED], "drained, but still not reading"
    conn.close(1001, "gateway shutting down")
    assert conn.actions_to_take() == [Close(1001, "gateway shutting down"), Reading.RESUME]


# -- close ---------------------------------------------------------------------------------


def test_too_large_is_answered_then_closed_and_nothing_more_is_read() -> None:
    conn = connect(max_message_bytes=100)
    actions = send(conn, legacy("dev-1", 0)[:-1] + b', "blob": "' + b"x" * 200 + b'"}')
    assert actions[0] == Refusal(None, "too_large")
    assert one_write(actions)[0]["code"] == "too_large"
    assert actions[-1] == Close(1009, "message over the 100-byte limit")
    assert send(conn, legacy("dev-1", 1)) == [], "frames after the close are dropped"


def test_a_message_too_large_in_fragments_is_closed_too() -> None:
    conn = connect(max_message_bytes=100)
    conn.receive_frame(Opcode.TEXT, False, b"x" * 60, 0, 0.0)
    assert conn.actions_to_take() == []
    conn.receive_frame(Opcode.CONTINUATION, True, b"x" * 60, 0, 0.0)
    assert conn.actions_to_take()[-1] == Close(1009, "message over the 100-byte limit")


def test_reserved_bits_close_with_protocol_error_and_no_reply() -> None:
    conn = connect()
    conn.receive_frame(Opcode.TEXT, True, legacy("dev-1"), 4, 0.0)
    assert conn.actions_to_take() == [Close(1002, "reserved bits set; no extension was negotiated")]


def test_a_close_for_a_bad_message_waits_for_the_replies_owed_to_earlier_frames() -> None:
    """A stored frame, then one over the limit: its ack, then ``too_large``, then the close."""
    conn = connect(max_message_bytes=100)
    (stored,) = submissions(send(conn, legacy("dev-1", 0)))
    conn.receive_frame(Opcode.TEXT, False, b"x" * 60, 0, 0.0)
    conn.receive_frame(Opcode.CONTINUATION, True, b"x" * 60, 0, 0.0)
    assert conn.actions_to_take() == [Refusal("dev-1", "too_large")], "nothing written yet"
    assert send(conn, legacy("dev-1", 1)) == [], "frames after the bad one are dropped"
    actions = answer(conn, stored)
    assert len(actions) == 2 and isinstance(actions[0], bytes)
    assert actions[0].startswith(RECEIVED_AND_STORED)
    assert orjson.loads(actions[0][len(RECEIVED_AND_STORED) + 2:])["code"] == "too_large"
    assert actions[1] == Close(1009, "message over the 100-byte limit")


def test_a_protocol_error_closes_after_the_acks_owed() -> None:
    conn = connect()
    (first,) = submissions(send(conn, v2("f0", 3, "dev-1")))
    conn.receive_frame(Opcode.TEXT, True, legacy("dev-1"), 4, 0.0)
    assert conn.actions_to_take() == []
    conn.close(1001, "gateway shutting down")  # a second close changes nothing
    actions = answer(conn, first)
    assert one_write(actions[:1])[0]["type"] == "ack"
    assert actions[1:] == [Close(1002, "reserved bits set; no extension was negotiated")]


def test_a_close_drops_frames_waiting_out_a_delay_unanswered() -> None:
    """Not handed to the producer, so not stored: no reply, and nothing submitted later."""
    conn = connect(records_per_s=10, burst=1)
    (first,) = submissions(send(conn, v2("f0", 10, "dev-1")))
    assert SetTimer(0.5) in send(conn, v2("f1", 5, "dev-1"))
    conn.close(1008, "revoked")
    assert conn.actions_to_take() == [Reading.RESUME]
    assert one_write(answer(conn, first)[:1])[0]["id"] == "f0"
    conn.delay_elapsed(0.5)
    assert conn.actions_to_take() == []


def test_after_close_replies_are_not_written_but_admitted_records_are_submitted() -> None:
    conn = connect(records_per_s=10, burst=1)
    (first,) = submissions(send(conn, v2("f0", 10, "dev-1")))
    assert SetTimer(0.5) in send(conn, v2("f1", 5, "dev-1"))
    conn.connection_lost()
    assert answer(conn, first) == []
    conn.delay_elapsed(0.5)
    actions = conn.actions_to_take()
    assert [type(action) for action in actions] == [Submission], "read, so queued; nothing written"
