"""fleetlog.gateway.handshake: finding a device's token in a request head, with no I/O."""

from __future__ import annotations

import pytest

from fleetlog.gateway.handshake import token_in_head


def _head(target: str = "/", *headers: str) -> bytes:
    return "\r\n".join([f"GET {target} HTTP/1.1", "Host: gw", *headers]).encode("latin-1")


@pytest.mark.parametrize(
    ("head", "token"),
    [
        (_head("/", "Authorization: Bearer abc"), "abc"),
        (_head("/", "authorization:   bearer   abc  "), "abc"),  # any case, any spacing
        (_head("/?token=q1"), "q1"),
        (_head("/?x=1&token=q%2B1"), "q+1"),  # the query is URL-decoded
        (_head("/?token=q1", "Authorization: Bearer h1"), "h1"),  # the header wins
        (_head("/", "Authorization: Basic dXNlcjpwdw=="), None),  # not a bearer token
        (_head("/", "Authorization: Bearer "), None),
        (_head("/?token="), None),
        (_head("/"), None),
        (b"GET /?token=q1", None),  # not METHOD TARGET VERSION: picows refuses it
        (b"", None),
    ],
)
def test_token_in_head(head: bytes, token: str | None) -> None:
    assert token_in_head(head) == token


def test_a_header_named_like_authorization_is_not_it() -> None:
    assert token_in_head(_head("/", "X-Authorization: Bearer nope")) is None
