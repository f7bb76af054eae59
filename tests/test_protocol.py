"""fleetlog.protocol: the legacy wire protocol, with no I/O."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from fleetlog.device_id import device_id_problem
from fleetlog.errors import ErrorCode, FrameError
from fleetlog.exactjson import MAX_DEPTH
from fleetlog.exactjson import dumps as encode_json
from fleetlog.exactjson import loads as decode_json
from fleetlog.protocol import (
    LOG_UPLOAD_RESPONSE,
    SERVER_RECEIVED,
    LegacyFrame,
    error_frame,
    owned_record,
    parse_frame,
    parse_legacy,
    server_text_frame,
)


def frame(**fields: Any) -> bytes:
    return json.dumps(fields, ensure_ascii=False).encode()


def rejected(payload: bytes) -> ErrorCode:
    with pytest.raises(FrameError) as info:
        parse_legacy(payload)
    assert info.value.message, "an error frame always says why"
    return info.value.code


# -- type and deviceId ---------------------------------------------------------


@pytest.mark.parametrize("type_", [4, "4"])
def test_type_4_as_number_or_string_carries_a_record(type_: int | str) -> None:
    parsed = parse_legacy(frame(deviceId="D1", type=type_, data={"msg": "hi"}))
    assert parsed == LegacyFrame("D1", b'{"msg":"hi"}')


@pytest.mark.parametrize(("device_id", "expected"), [("D1", "D1"), (42, "42"), (0, "0"), (-7, "-7")])
def test_device_id_string_or_integer(device_id: str | int, expected: str) -> None:
    assert parse_legacy(frame(deviceId=device_id, type=4, data=1)).device_id == expected


def test_device_id_integer_beyond_64_bits_is_kept_exact() -> None:
    parsed = parse_legacy(b'{"deviceId": 123456789012345678901234567890, "type": 4, "data": 1}')
    assert parsed.device_id == "123456789012345678901234567890"


@pytest.mark.parametrize("device_id", [True, False, 1.5, 2.0, {"id": 1}, ["D1"]])
def test_device_id_of_another_type_is_bad_frame(device_id: Any) -> None:
    assert rejected(frame(deviceId=device_id, type=4, data=1)) == ErrorCode.BAD_FRAME


def test_device_id_over_128_characters_is_bad_frame() -> None:
    assert parse_legacy(frame(deviceId="x" * 128, type=1)).device_id == "x" * 128
    assert rejected(frame(deviceId="x" * 129, type=1)) == ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "device_id", ["a\nb", "nul\u0000", "\u001b[2J", "bidi\u202e", " lead", "trail ", "x" * 10_000]
)
def test_device_id_against_the_policy_is_bad_frame(device_id: str) -> None:
    assert rejected(frame(deviceId=device_id, type=4, data=1)) == ErrorCode.BAD_FRAME
    with pytest.raises(FrameError) as info:
        parse_frame(frame(type="log", id="f1", deviceId=device_id, records=[1]), 10)
    assert (info.value.code, info.value.frame_id, info.value.v2) == (ErrorCode.BAD_FRAME, "f1", True)


@pytest.mark.parametrize("device_id", [None, ""])
def test_missing_or_empty_device_id_names_no_device(device_id: str | None) -> None:
    assert parse_legacy(frame(deviceId=device_id, type=4, data=1)) == LegacyFrame(None, b"1")
    assert parse_legacy(frame(type=4, data=1)) == LegacyFrame(None, b"1")


@pytest.mark.parametrize(
    "fields",
    [
        {"deviceId": "D1"},
        {"deviceId": "D1", "type": 3, "data": {"x": 1}},
        {"deviceId": "D1", "type": "log", "data": {"x": 1}},
        {"deviceId": "D1", "type": None, "data": {"x": 1}},
        {"deviceId": "D1", "data": {"x": 1}},
    ],
)
def test_frames_without_type_4_produce_no_record(fields: dict[str, Any]) -> None:
    assert parse_legacy(frame(**fields)) == LegacyFrame("D1", None)


# -- malformed input -----------------------------------------------------------


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"text"', b"4", b"null", b"true", b"[]"])
def test_json_that_is_not_an_object_is_bad_frame(payload: bytes) -> None:
    assert rejected(payload) == ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"{",
        b"not json",
        b"{'type': 4}",
        b'{"type": 4, "data": NaN}',
        b'{"type": 4, "data": Infinity}',
        b'{"type": 4, "data": 1e400}',
        b'{"type": 4, "data": 1} trailing',
        b"\xef\xbb\xbf{}",
    ],
)
def test_invalid_json_is_bad_json(payload: bytes) -> None:
    assert rejected(payload) == ErrorCode.BAD_JSON


@pytest.mark.parametrize(
    "payload",
    [
        b'{"type": 4, "data": "\xff\xfe"}',
        b'{"type": 4, "data": "\xc3"}',
        b'{"type": 4, "data": "\xed\xa0\x80"}',  # an encoded surrogate
        # The exact (stdlib) path taken for long integers must reject it too.
        b'{"type": 4, "data": ["\xff", 123456789012345678901234567890]}',
    ],
)
def test_invalid_utf8_is_bad_json(payload: bytes) -> None:
    assert rejected(payload) == ErrorCode.BAD_JSON


@pytest.mark.parametrize("long_tail", [b"", b'123456789012345678901234567890'])
def test_deep_nesting_is_bad_json_not_a_crash(long_tail: bytes) -> None:
    depth = 100_000
    payload = b'{"type": 4, "data": ' + b"[" * depth + long_tail + b"]" * depth + b"}"
    assert rejected(payload) == ErrorCode.BAD_JSON


@pytest.mark.parametrize("long_tail", [b"1", b"123456789012345678901234567890"])
def test_a_lone_surrogate_is_bad_json_whichever_reader_reads_it(long_tail: bytes) -> None:
    """orjson refused ``"\\ud800"``; with a long integer in the frame the stdlib read it, and the
    record was acked, then refused by every store (no UTF-8 form)."""
    frame = b'{"type": 4, "data": {"s": "a\\ud800b", "n": ' + long_tail + b"}}"
    assert rejected(frame) == ErrorCode.BAD_JSON
    with pytest.raises(ValueError, match="surrogate"):
        decode_json(frame)
    pair = b'{"s": "\\ud83d\\ude00", "n": ' + long_tail + b"}"  # a pair is a character: kept
    assert decode_json(pair)["s"] == "\U0001f600"


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 990, 1024])
@pytest.mark.parametrize("long_tail", [b"1", b"123456789012345678901234567890"])
def test_nesting_orjson_reads_but_cannot_write_is_bad_json(depth: int, long_tail: bytes) -> None:
    """Between orjson's write limit (254) and its read limit (1,024): refused, never a crash."""
    nested = b"[" * depth + long_tail + b"]" * depth
    assert rejected(b'{"type": 4, "data": ' + nested + b"}") == ErrorCode.BAD_JSON
    with pytest.raises(FrameError) as info:
        parse_frame(b'{"type": "log", "id": "f1", "records": [' + nested + b"]}", 100)
    assert info.value.code == ErrorCode.BAD_JSON
    if depth < 1000:  # deeper, orjson's reader refuses it first, in its own words
        assert f"nested deeper than {MAX_DEPTH} levels" in info.value.message


def test_nesting_at_the_limit_is_accepted_and_written_back_the_same() -> None:
    for tail in (b"1", b"123456789012345678901234567890"):
        nested = b"[" * MAX_DEPTH + tail + b"]" * MAX_DEPTH
        assert parse_legacy(b'{"type": 4, "data": ' + nested + b"}").record == nested


def test_an_integer_no_double_can_hold_is_kept_exact() -> None:
    number = int("9" * 400)
    record = parse_legacy(b'{"type": 4, "data": {"n": ' + str(number).encode() + b"}}").record
    assert record is not None
    assert decode_json(record) == {"n": number}
    assert encode_json(decode_json(record)) == record


def test_nesting_within_reason_is_accepted() -> None:
    data: Any = "leaf"
    for _ in range(200):
        data = {"child": data}
    parsed = parse_legacy(frame(type=4, data=data))
    assert parsed.record is not None
    assert decode_json(parsed.record) == data


def test_overflowing_float_next_to_a_long_integer_is_bad_json() -> None:
    payload = b'{"type": 4, "data": {"x": 1e400, "id": 123456789012345678901234567890}}'
    assert rejected(payload) == ErrorCode.BAD_JSON


def test_lone_surrogate_next_to_a_long_integer_is_bad_json() -> None:
    payload = b'{"type": 4, "data": ["\\ud800", 123456789012345678901234567890]}'
    assert rejected(payload) == ErrorCode.BAD_JSON


def test_lone_surrogate_is_bad_json() -> None:
    assert rejected(b'{"type": 4, "data": "\\ud800"}') == ErrorCode.BAD_JSON


# -- data ----------------------------------------------------------------------


@pytest.mark.parametrize("data", [None, "", [], {}, False])
def test_empty_data_is_bad_frame(data: Any) -> None:
    assert rejected(frame(deviceId="D1", type=4, data=data)) == ErrorCode.BAD_FRAME


def test_type_4_without_data_is_bad_frame() -> None:
    assert rejected(frame(deviceId="D1", type=4)) == ErrorCode.BAD_FRAME


@pytest.mark.parametrize(
    ("data", "record"),
    [(0, b"0"), ("0", b'"0"'), (0.0, b"0.0"), (True, b"true"), (" ", b'" "'), ([0], b"[0]")],
)
def test_zero_and_other_falsy_looking_data_is_stored(data: Any, record: bytes) -> None:
    assert parse_legacy(frame(deviceId="D1", type=4, data=data)).record == record


def test_unicode_is_kept_unescaped() -> None:
    text = "設備日誌：门已打开 🚪"
    for ensure_ascii in (True, False):
        payload = json.dumps({"type": 4, "data": {"msg": text}}, ensure_ascii=ensure_ascii).encode()
        record = parse_legacy(payload).record
        assert record == '{"msg":"設備日誌：门已打开 🚪"}'.encode()
        assert b"\\u" not in record


@pytest.mark.parametrize(
    "number",
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30, -(10**40), 123456789012345678901234567890],
)
def test_integers_beyond_64_bits_are_kept_exact(number: int) -> None:
    payload = b'{"type": 4, "data": {"n": ' + str(number).encode() + b', "s": "\xe4\xb8\xad"}}'
    record = parse_legacy(payload).record
    assert record == b'{"n":' + str(number).encode() + b',"s":"\xe4\xb8\xad"}'
    assert decode_json(record) == {"n": number, "s": "中"}


def test_record_is_compact_and_keeps_key_order() -> None:
    payload = b'{"type": 4, "data": {"z": 1,  "a": [1, 2, {"m": null}], "b": 1.5}}'
    assert parse_legacy(payload).record == b'{"z":1,"a":[1,2,{"m":null}],"b":1.5}'


# -- encode/decode and error frames ---------------------------------------------


def test_encode_json_is_compact_and_unescaped() -> None:
    assert encode_json({"a": "é中", "b": [1, None]}) == '{"a":"é中","b":[1,null]}'.encode()
    assert encode_json(2**100) == str(2**100).encode()
    assert encode_json({"big": -(2**70), "t": "中"}) == f'{{"big":{-(2**70)},"t":"中"}}'.encode()


def test_decode_json_rejects_what_is_not_json() -> None:
    for payload in (b"NaN", b"[Infinity, 12345678901234567890123]", b"{", b"\xff"):
        with pytest.raises(ValueError):  # noqa: PT011 - any ValueError is the contract
            decode_json(payload)


def test_error_frame() -> None:
    body = orjson.loads(error_frame(ErrorCode.BAD_JSON, "frame is not valid JSON"))
    assert body == {"type": "error", "code": "bad_json", "message": "frame is not valid JSON"}
    extra = orjson.loads(error_frame(ErrorCode.BUSY, "later", id="m-1"))
    assert extra == {"type": "error", "code": "busy", "message": "later", "id": "m-1"}


# -- server frames (RFC 6455 §5.2) ----------------------------------------------


def parse_with_websockets(wire: bytes) -> Frame:
    """Decode ``wire`` with an independent implementation: websockets' frame parser."""
    reader = StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        result: Frame = done.value
        return result
    raise AssertionError("frame incomplete")


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (0, b"\x81\x00"),
        (1, b"\x81\x01"),
        (125, b"\x81\x7d"),
        (126, b"\x81\x7e\x00\x7e"),
        (65535, b"\x81\x7e\xff\xff"),
        (65536, b"\x81\x7f\x00\x00\x00\x00\x00\x01\x00\x00"),
        (70000, b"\x81\x7f" + (70000).to_bytes(8, "big")),
    ],
)
def test_server_text_frame_header(size: int, header: bytes) -> None:
    payload = bytes(ord("a") + n % 26 for n in range(size))
    wire = server_text_frame(payload)
    assert wire == header + payload
    parsed = parse_with_websockets(wire)
    assert parsed.opcode is Opcode.TEXT
    assert parsed.fin
    assert parsed.data == payload


def test_server_text_frames_for_the_legacy_replies() -> None:
    assert server_text_frame(SERVER_RECEIVED) == b"\x81\x19server receive a message!"
    assert server_text_frame(LOG_UPLOAD_RESPONSE) == b"\x81\x13log_upload_response"


# -- property --------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=25,
)


def _is_empty(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, str | list | dict) and not value)


@settings(max_examples=300, deadline=None, database=None)
@given(data=json_values, ensure_ascii=st.booleans(), device=st.text(min_size=1, max_size=20) | st.integers())
def test_any_json_data_round_trips(data: Any, ensure_ascii: bool, device: str | int) -> None:
    payload = json.dumps({"deviceId": device, "type": 4, "data": data}, ensure_ascii=ensure_ascii)
    if _is_empty(data) or device_id_problem(str(device)) is not None:
        with pytest.raises(FrameError):
            parse_legacy(payload.encode())
        return
    parsed = parse_legacy(payload.encode())
    assert parsed.device_id == str(device)
    assert parsed.record is not None
    assert decode_json(parsed.record) == data
    assert json.loads(parsed.record) == data, "the record is standard JSON"


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children,
                                                                      max_size=5),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None, database=None)
@given(_JSON_VALUES)
def test_decode_json_keeps_every_integer_exact(value: object) -> None:
    """Whatever the digits around it, an integer beyond 64 bits is never turned into a float."""
    payload = json.dumps(value).encode()
    assert json.dumps(decode_json(payload)) == json.dumps(json.loads(payload))  # types too: 1 is not 1.0


# -- list mode under device authentication ------------------------------------------


@pytest.mark.parametrize(
    ("record", "pushed"),
    [
        (b'{"msg":"m"}', b'{"deviceId":"door-1","msg":"m"}'),
        (b"{}", b'{"deviceId":"door-1"}'),
        (b'{"deviceId":"door-1","msg":"m"}', b'{"deviceId":"door-1","msg":"m"}'),
        (b'"text"', b'"text"'),
        (b"[1,2]", b"[1,2]"),
    ],
)
def test_an_owned_record_names_its_device(record: bytes, pushed: bytes) -> None:
    assert owned_record(record, "door-1") == pushed
    assert decode_json(pushed) is not None


def test_an_owned_record_keeps_a_numeric_id_of_the_same_device() -> None:
    assert owned_record(b'{"deviceId":42}', "42") == b'{"deviceId":42}'
    assert owned_record(b'{"n":1}', "x:{y}") == b'{"deviceId":"x:{y}","n":1}'


@pytest.mark.parametrize("named", [b'"door-2"', b"2", b"null", b'""', b"true", b'["door-1"]'])
def test_a_record_naming_another_device_is_forbidden(named: bytes) -> None:
    with pytest.raises(FrameError) as info:
        owned_record(b'{"deviceId":' + named + b',"msg":"m"}', "door-1")
    assert info.value.code == ErrorCode.FORBIDDEN
