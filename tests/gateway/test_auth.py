"""fleetlog.gateway.auth: handshake credentials, checked with no I/O."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest

from fleetlog.credentials import TokenCache
from fleetlog.errors import ConfigError
from fleetlog.gateway.auth import MIN_HS256_SECRET_BYTES, Authenticator, Identity, Refused

SECRET = "k" * MIN_HS256_SECRET_BYTES


def _jwt_auth() -> Authenticator:
    return Authenticator("jwt", TokenCache(), jwt_secret=SECRET)


def _identify(claims: dict[str, Any]) -> Identity | None:
    return _jwt_auth().identify(f"Bearer {jwt.encode(claims, SECRET)}", b"/")


def _refusal(claims: dict[str, Any]) -> str:
    with pytest.raises(Refused) as refused:
        _identify(claims)
    return str(refused.value)


@pytest.mark.parametrize("secret", ["x", "s3cret", "k" * (MIN_HS256_SECRET_BYTES - 1)])
def test_a_short_hs256_secret_is_a_config_error(secret: str) -> None:
    with pytest.raises(ConfigError, match="at least 32 bytes"):
        Authenticator("jwt", TokenCache(), jwt_secret=secret)


def test_secret_length_counts_bytes_not_characters() -> None:
    with pytest.raises(ConfigError):
        Authenticator("jwt", TokenCache(), jwt_secret="é" * 15)  # 30 bytes
    Authenticator("jwt", TokenCache(), jwt_secret="é" * 16)  # 32 bytes


def test_a_valid_token_names_its_device() -> None:
    now = int(time.time())
    assert _identify({"sub": "cam-1", "exp": now + 60, "iat": now, "nbf": now - 1}) == Identity("cam-1")
    assert _identify({"sub": "cam-1", "exp": now + 60.5}) == Identity("cam-1")


@pytest.mark.parametrize("claim", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["9999999999", "1", True, None, [1], {"t": 1}])
def test_time_claims_must_be_numbers(claim: str, value: Any) -> None:
    claims: dict[str, Any] = {"sub": "cam-1", "exp": int(time.time()) + 60, claim: value}
    assert claim in _refusal(claims)


@pytest.mark.parametrize("subject", ["", "a\nb", "esc\x1b[2J", " padded", "x" * 129, 42])
def test_sub_must_be_a_valid_device_id(subject: Any) -> None:
    reason = _refusal({"sub": subject, "exp": int(time.time()) + 60})
    assert "sub" in reason.lower()
