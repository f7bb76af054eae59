"""Who is connecting: the handshake's credentials checked, with no I/O.

Firmware often cannot set headers, so a token is taken from
``Authorization: Bearer TOKEN`` or, failing that, the ``token`` query
parameter.  Three modes:

* ``none``: anyone may connect and claim any ``deviceId`` (the original's
  behaviour, for legacy fleets; the gateway warns loudly at start);
* ``token``: the token must be in Redis, and names the device; it is read
  from the :class:`~fleetlog.credentials.TokenCache`, which the server fills
  (one ``HGET``) before letting picows decide the upgrade;
* ``jwt``: an HS256 or RS256 JSON Web Token whose ``sub`` names the device and
  whose ``exp`` has not passed, for fleets that mint their own credentials.
  An HS256 secret must have at least 32 bytes (RFC 7518 §3.2: a key as long
  as the hash), and ``exp``, ``nbf`` and ``iat`` must be JSON numbers: PyJWT
  would otherwise take ``"exp": "9999999999"`` through ``int()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

import jwt

from fleetlog.credentials import TokenCache
from fleetlog.device_id import device_id_problem
from fleetlog.errors import ConfigError, Refused

__all__ = ["MIN_HS256_SECRET_BYTES", "Authenticator", "Identity", "Refused", "token_from"]

#: RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
MIN_HS256_SECRET_BYTES: Final = 32

#: Registered claims that are NumericDate values (RFC 7519 §4.1.4-6).
_TIME_CLAIMS: Final = ("exp", "nbf", "iat")


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated device; ``token_hash`` lets a revocation find its connections."""

    device_id: str
    token_hash: str | None = None


def token_from(authorization: str | None, path: bytes) -> str | None:
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    query = urlsplit(path.decode("latin-1")).query
    values = parse_qs(query).get("token")
    return values[0] if values else None


class Authenticator:
    def __init__(
        self,
        mode: str,
        tokens: TokenCache,
        *,
        jwt_secret: str | None = None,
        jwt_public_key: Path | None = None,
    ) -> None:
        self.mode = mode
        self.tokens = tokens
        self._jwt_key: str | None = None
        self._jwt_algorithms: list[str] = []
        if mode == "jwt":
            if jwt_public_key is not None:
                self._jwt_key = jwt_public_key.read_text()
                self._jwt_algorithms = ["RS256"]
            elif jwt_secret:
                size = len(jwt_secret.encode())
                if size < MIN_HS256_SECRET_BYTES:
                    raise ConfigError(
                        f"--jwt-secret has {size} bytes; HS256 needs at least "
                        f"{MIN_HS256_SECRET_BYTES} bytes (RFC 7518 §3.2), e.g. "
                        "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
                self._jwt_key = jwt_secret
                self._jwt_algorithms = ["HS256"]
            else:
                raise ConfigError("--auth jwt needs --jwt-secret (HS256) or --jwt-public-key (RS256)")

    def identify(self, authorization: str | None, path: bytes) -> Identity | None:
        """The device a handshake authenticates as (``None`` in mode ``none``).

        Raises :class:`Refused` with the reason when credentials are missing or bad.
        """
        if self.mode == "none":
            return None
        token = token_from(authorization, path)
        if not token:
            raise Refused("missing credentials: send Authorization: Bearer TOKEN or ?token=TOKEN")
        if self.mode == "token":
            found = self.tokens.device_for(token)
            if found is None:
                raise Refused("unknown or revoked token")
            return Identity(*found)
        try:
            claims = jwt.decode(
                token, self._jwt_key, algorithms=self._jwt_algorithms,  # type: ignore[arg-type]
                options={"require": ["sub", "exp"]},
            )
        except jwt.PyJWTError as exc:
            raise Refused(f"invalid token: {exc}") from None
        return Identity(_subject(claims))


def _subject(claims: dict[str, Any]) -> str:
    """The device a verified JWT names; raises :class:`Refused` for ill-typed claims."""
    for name in _TIME_CLAIMS:
        value = claims.get(name)
        if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise Refused(f"invalid token: {name} must be a number (seconds since the epoch)")
    subject = claims["sub"]
    if not isinstance(subject, str):
        raise Refused("invalid token: sub must be a string naming the device")
    problem = device_id_problem(subject)
    if problem is not None:
        raise Refused(f"invalid token: sub is not a valid device id: {problem}")
    return subject
