"""fleetlog.device_id: the one policy for what a device id may be."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetlog.device_id import MAX_LENGTH, InvalidDeviceId, check_device_id, device_id_problem


@pytest.mark.parametrize(
    "device_id",
    ["D1", "0", "door-1", "site:building:floor:room", "x" * MAX_LENGTH, "Türsensor 7", "門-1",
     "🚪", "a b", "tab-free", "-7", "123456789012345678901234567890"],
)
def test_valid_ids(device_id: str) -> None:
    assert check_device_id(device_id) == device_id
    assert device_id_problem(device_id) is None


@pytest.mark.parametrize(
    ("device_id", "reason"),
    [
        ("", "empty"),
        ("x" * (MAX_LENGTH + 1), "longer than 128"),
        ("x" * 10_000, "longer than 128"),
        ("a\nb", "U+000A"),
        ("a\rb", "U+000D"),
        ("a\tb", "U+0009"),
        ("nul\x00", "U+0000"),
        ("esc\x1b[2J", "U+001B"),
        ("del\x7f", "U+007F"),
        ("c1\x85", "U+0085"),
        ("zero\u200bwidth", "U+200B"),
        ("bidi\u202eevil", "U+202E"),
        ("bom\ufeff", "U+FEFF"),
        ("line\u2028sep", "U+2028"),
        ("para\u2029sep", "U+2029"),
        ("lone\ud800", "U+D800"),
        (" lead", "whitespace"),
        ("trail ", "whitespace"),
        ("\u3000wide", "whitespace"),
        ("trail\u00a0", "whitespace"),
    ],
)
def test_invalid_ids_say_why(device_id: str, reason: str) -> None:
    problem = device_id_problem(device_id)
    assert problem is not None and reason in problem
    with pytest.raises(InvalidDeviceId, match=reason.replace("+", r"\+")):
        check_device_id(device_id)


def test_invalid_id_error_does_not_echo_the_id() -> None:
    """A 10 KB id or a terminal escape is not printed back into logs and terminals."""
    with pytest.raises(InvalidDeviceId) as info:
        check_device_id("\x1b]0;pwned\x07" + "x" * 10_000)
    assert "\x1b" not in str(info.value)
    assert len(str(info.value)) < 200


@settings(max_examples=500, deadline=None, database=None)
@given(st.text(max_size=200))
def test_policy_is_total_and_consistent(device_id: str) -> None:
    problem = device_id_problem(device_id)
    if problem is None:
        assert 1 <= len(device_id) <= MAX_LENGTH
        assert device_id == device_id.strip()
    else:
        with pytest.raises(InvalidDeviceId):
            check_device_id(device_id)


@settings(max_examples=1000, deadline=None, database=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=140))
def test_ascii_fast_path_agrees_with_the_policy(device_id: str) -> None:
    """ASCII ids skip the per-character category lookups; the answer must not change."""
    allowed = (1 <= len(device_id) <= MAX_LENGTH and device_id == device_id.strip()
               and all(unicodedata.category(char) not in {"Cc", "Cf", "Cs", "Zl", "Zp"}
                       for char in device_id))
    assert (device_id_problem(device_id) is None) == allowed
