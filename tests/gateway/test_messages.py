"""fleetlog.gateway.messages.Reassembler: WebSocket frames back into messages."""

from __future__ import annotations

import pytest

from fleetlog.gateway.messages import (
    CloseCode,
    Message,
    MessageError,
    Opcode,
    Reassembler,
    frame_cap,
    read_buffer_for,
)

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


def test_unfinished_messages_of_all_connections_share_one_budget() -> None:
    from fleetlog.gateway.messages import BufferBudget

    budget = BufferBudget(limit=250)
    first, second, third = (Reassembler(max_size=200, budget=budget) for _ in range(3))
    assert first.feed(TEXT, False, b"a" * 100) is None
    assert second.feed(TEXT, False, b"b" * 100) is None
    assert budget.held == 200
    with pytest.raises(MessageError) as info:
        third.feed(TEXT, False, b"c" * 100)  # past the budget: this connection closes
    assert info.value.code == CloseCode.POLICY_VIOLATION
    assert budget.held == 200 and budget.refused == 1
    # A message that ends gives its bytes back, and so does a connection that goes.
    assert first.feed(CONT, True, b"!") == Message(False, b"a" * 100 + b"!")
    assert budget.held == 100
    second.discard()
    assert budget.held == 0 and budget.given == 200
    # A single-frame message never touches the budget.
    assert third.feed(TEXT, True, b"c" * 200) == Message(False, b"c" * 200)
    assert budget.held == 0


def test_too_big_or_broken_messages_give_their_bytes_back() -> None:
    from fleetlog.gateway.messages import BufferBudget

    budget = BufferBudget(limit=10_000)
    reassembler = Reassembler(max_size=150, budget=budget)
    reassembler.feed(TEXT, False, b"x" * 100)
    with pytest.raises(MessageError):
        reassembler.feed(CONT, False, b"x" * 100)  # over max_size
    assert budget.held == 0
    reassembler.feed(TEXT, False, b"y" * 10)
    with pytest.raises(MessageError):
        reassembler.feed(TEXT, True, b"new")  # a new message inside a fragmented one
    assert budget.held == 0


def test_fragments_per_message_are_bounded() -> None:
    reassembler = Reassembler(max_size=1_000_000, max_fragments=100)
    reassembler.feed(TEXT, False, b"{")
    for _ in range(98):
        assert reassembler.feed(CONT, False, b" ") is None
    assert reassembler.feed(CONT, True, b"}") == Message(False, b"{" + b" " * 98 + b"}")
    reassembler.feed(TEXT, False, b"{")
    for _ in range(99):
        reassembler.feed(CONT, False, b" ")
    with pytest.raises(MessageError) as info:
        reassembler.feed(CONT, True, b"}")  # the 101st frame of one message
    assert info.value.code == CloseCode.MESSAGE_TOO_BIG


@pytest.mark.parametrize("limit", [64, 4096, 1024 * 1024, 3_000_000])
def test_picows_reads_every_frame_that_fits_the_buffer_a_frame_at_the_limit_grows(limit: int) -> None:
    """Frames between the limit and the cap are refused by the gateway (too_large after the
    replies owed), at no more memory than a frame at the limit."""
    cap = frame_cap(limit)
    assert cap >= limit
    assert read_buffer_for(cap) == read_buffer_for(limit)
    assert read_buffer_for(cap + 1) > read_buffer_for(limit)
