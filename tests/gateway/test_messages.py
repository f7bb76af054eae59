"""fleetlog.gateway.messages.Reassembler: WebSocket frames back into messages."""

from __future__ import annotations

import pytest

from fleetlog.gateway.messages import CloseCode, Message, MessageError, Opcode, Reassembler

TEXT, BINARY, CONT = Opcode.TEXT, Opcode.BINARY, Opcode.CONTINUATION


def test_single_text_and_binary_frames() -> None:
    reassembler = Reassembler(max_size=100)
    assert reassembler.feed(TEXT, True, b"hello") == Message(False, b"hello")
    assert reassembler.feed(BINARY, True, b"\x00\x01") == Message(True, b"\x00\x01")
    assert reassembler.feed(TEXT, True, b"") == Message(False, b"")


def test_fragmented_text_message() -> None:
    reassembler = Reassembler(max_size=100)
    assert reassembler.feed(TEXT, False, b'{"type"') is None
    assert reassembler.feed(CONT, False, b": 4, ") is None
    assert reassembler.feed(CONT, False, b"") is None
    assert reassembler.feed(CONT, True, b'"data": 1}') == Message(False, b'{"type": 4, "data": 1}')
    # The next message starts afresh.
    assert reassembler.feed(TEXT, True, b"next") == Message(False, b"next")


def test_fragment_split_inside_a_utf8_character() -> None:
    encoded = "中文".encode()
    reassembler = Reassembler(max_size=100)
    assert reassembler.feed(TEXT, False, encoded[:1]) is None
    message = reassembler.feed(CONT, True, encoded[1:])
    assert message is not None
    assert message.payload.decode() == "中文"


def test_fragmented_binary_message_keeps_the_binary_flag() -> None:
    reassembler = Reassembler(max_size=100)
    assert reassembler.feed(BINARY, False, b"\x01") is None
    assert reassembler.feed(CONT, True, b"\x02") == Message(True, b"\x01\x02")
    assert reassembler.feed(TEXT, False, b"a") is None
    assert reassembler.feed(CONT, True, b"b") == Message(False, b"ab"), "the flag is per message"


@pytest.mark.parametrize("fin", [True, False])
def test_continuation_without_a_message_is_a_protocol_error(fin: bool) -> None:
    reassembler = Reassembler(max_size=100)
    with pytest.raises(MessageError) as info:
        reassembler.feed(CONT, fin, b"x")
    assert info.value.code == CloseCode.PROTOCOL_ERROR == 1002


def test_continuation_after_a_finished_message_is_a_protocol_error() -> None:
    reassembler = Reassembler(max_size=100)
    assert reassembler.feed(TEXT, False, b"a") is None
    assert reassembler.feed(CONT, True, b"b") == Message(False, b"ab")
    with pytest.raises(MessageError) as info:
        reassembler.feed(CONT, True, b"c")
    assert info.value.code == 1002


@pytest.mark.parametrize(("opcode", "fin"), [(TEXT, True), (TEXT, False), (BINARY, True)])
def test_new_message_inside_a_fragmented_one_is_a_protocol_error(opcode: Opcode, fin: bool) -> None:
    reassembler = Reassembler(max_size=100)
    reassembler.feed(TEXT, False, b"start")
    with pytest.raises(MessageError) as info:
        reassembler.feed(opcode, fin, b"again")
    assert info.value.code == CloseCode.PROTOCOL_ERROR


def test_size_limit_counts_every_fragment() -> None:
    reassembler = Reassembler(max_size=10)
    assert reassembler.feed(TEXT, False, b"1234") is None
    assert reassembler.feed(CONT, False, b"5678") is None
    with pytest.raises(MessageError) as info:
        reassembler.feed(CONT, True, b"901")  # 11 bytes in all
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG == 1009
    assert "10" in info.value.reason


def test_message_of_exactly_the_limit_is_accepted() -> None:
    reassembler = Reassembler(max_size=10)
    assert reassembler.feed(TEXT, False, b"12345") is None
    assert reassembler.feed(CONT, True, b"67890") == Message(False, b"1234567890")


def test_first_fragment_over_the_limit() -> None:
    reassembler = Reassembler(max_size=10)
    with pytest.raises(MessageError) as info:
        reassembler.feed(BINARY, False, b"x" * 11)
    assert info.value.code == 1009


def test_size_is_counted_per_message_not_per_connection() -> None:
    reassembler = Reassembler(max_size=10)
    for _ in range(5):
        assert reassembler.feed(TEXT, False, b"12345") is None
        assert reassembler.feed(CONT, True, b"67890") == Message(False, b"1234567890")


def test_after_too_big_the_fragments_are_dropped() -> None:
    reassembler = Reassembler(max_size=4)
    reassembler.feed(TEXT, False, b"abc")
    with pytest.raises(MessageError):
        reassembler.feed(CONT, False, b"de")
    # Nothing of the oversized message is left: its continuation is out of place.
    with pytest.raises(MessageError) as info:
        reassembler.feed(CONT, True, b"f")
    assert info.value.code == 1002


@pytest.mark.parametrize("opcode", [TEXT, BINARY])
def test_unfragmented_message_over_the_limit(opcode: Opcode) -> None:
    """One frame is one message: the limit holds for it as for fragments."""
    reassembler = Reassembler(max_size=10)
    with pytest.raises(MessageError) as info:
        reassembler.feed(opcode, True, b"x" * 11)
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG
    assert reassembler.feed(TEXT, True, b"x" * 10) == Message(False, b"x" * 10)


@pytest.mark.parametrize("reserved", [0b100, 0b010, 0b001])
@pytest.mark.parametrize(("opcode", "fin"), [(TEXT, True), (TEXT, False), (BINARY, True)])
def test_reserved_bits_are_a_protocol_error(opcode: Opcode, fin: bool, reserved: int) -> None:
    """No extension is negotiated, so a compressed (RSV1) frame is refused, not decoded or stored."""
    reassembler = Reassembler(max_size=100)
    with pytest.raises(MessageError) as info:
        reassembler.feed(opcode, fin, b"x", reserved)
    assert info.value.code == CloseCode.PROTOCOL_ERROR


def test_reserved_bits_on_a_continuation_drop_the_message() -> None:
    reassembler = Reassembler(max_size=100)
    reassembler.feed(TEXT, False, b"abc")
    with pytest.raises(MessageError):
        reassembler.feed(CONT, True, b"def", 0b100)
    with pytest.raises(MessageError) as info:
        reassembler.feed(CONT, True, b"f")
    assert info.value.code == CloseCode.PROTOCOL_ERROR
