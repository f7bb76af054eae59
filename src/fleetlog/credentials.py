"""Device credentials: random tokens, stored only as hashes, in Redis.

A token is 32 random bytes (256 bits) in URL-safe base64 with an ``flt_``
prefix, shown once by ``fleetlog device add``/``rotate`` and never stored.
Redis keeps ``SHA-256(token)``; a plain fast hash is the right one here
because the token has full entropy, so there is nothing for a slow KDF to
protect, and a gateway checks it on every handshake.

Keys (every gateway node reads them):

* ``fleetlog:tokens`` hash: token hash -> device id (the handshake lookup);
* ``fleetlog:device:<id>`` hash: ``token_hash``, ``created_at``, ``rotated_at``;
* ``fleetlog:tokens:version`` counter, bumped on every change.

Gateways keep the whole table in memory (:class:`TokenTable`) and reload it
when the version moves, polled every half second.  Checking a token is then a
dict lookup with no I/O, which is what lets the handshake stay synchronous and
a reconnect storm cost Redis nothing; a revoked or rotated token stops
working, and its connections are closed, within a second on every node.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Any

from fleetlog import keys
from fleetlog.errors import FleetlogError
from fleetlog.records import iso_ms

__all__ = ["Credential", "Credentials", "TokenTable", "hash_token", "new_token"]

_PREFIX = "flt_"


class UnknownDevice(FleetlogError):
    """Raised when a credential command names a device that has none."""


def new_token() -> str:
    """A fresh token: 256 random bits."""
    return _PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Credential:
    device_id: str
    created_at: str
    rotated_at: str | None


class Credentials:
    """Credential commands (``fleetlog device ...``) on a blocking Redis client."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def _install(self, device_id: str, *, rotate: bool) -> str:
        token = new_token()
        digest = hash_token(token)
        device_key = keys.device_credential(device_id)
        now = iso_ms(int(time.time() * 1000))
        old = self._client.hget(device_key, "token_hash")
        with self._client.pipeline(transaction=True) as pipe:
            if old is not None:
                pipe.hdel(keys.TOKENS, old)
            pipe.hset(keys.TOKENS, digest, device_id)
            fields = {"token_hash": digest, "rotated_at" if rotate else "created_at": now}
            pipe.hset(device_key, mapping=fields)
            pipe.incr(keys.TOKENS_VERSION)
            pipe.execute()
        return token

    def add(self, device_id: str) -> str:
        """Create the device's credential; return the token (shown once)."""
        if self._client.exists(keys.device_credential(device_id)):
            raise FleetlogError(f"device {device_id!r} already has a token: use `device rotate`")
        return self._install(device_id, rotate=False)

    def rotate(self, device_id: str) -> str:
        """Replace the device's token; the old one stops working at once."""
        if not self._client.exists(keys.device_credential(device_id)):
            raise UnknownDevice(f"device {device_id!r} has no token: use `device add`")
        return self._install(device_id, rotate=True)

    def revoke(self, device_id: str) -> None:
        device_key = keys.device_credential(device_id)
        old = self._client.hget(device_key, "token_hash")
        if old is None:
            raise UnknownDevice(f"device {device_id!r} has no token")
        with self._client.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.TOKENS, old)
            pipe.delete(device_key)
            pipe.incr(keys.TOKENS_VERSION)
            pipe.execute()

    def list(self) -> list[Credential]:
        result = []
        for device_id in sorted(set(self._client.hvals(keys.TOKENS))):
            info = self._client.hgetall(keys.device_credential(device_id.decode()))
            rotated = info.get(b"rotated_at")
            result.append(
                Credential(
                    device_id.decode(),
                    info.get(b"created_at", b"").decode(),
                    rotated.decode() if rotated else None,
                )
            )
        return result


class TokenTable:
    """A gateway's in-memory copy of ``fleetlog:tokens``; see the module docstring."""

    def __init__(self) -> None:
        self._devices: dict[str, str] = {}
        self.version: int | None = None

    def device_for(self, token: str) -> tuple[str, str] | None:
        """``(device_id, token_hash)`` for a valid token, else ``None``."""
        # Looking up the SHA-256 leaks no timing an attacker can use: to steer
        # the hash they would need preimages.
        digest = hash_token(token)
        device_id = self._devices.get(digest)
        return None if device_id is None else (device_id, digest)

    def valid(self, token_hash: str) -> bool:
        return token_hash in self._devices

    async def refresh(self, client: Any) -> bool:
        """Reload if the version moved; return whether the table changed."""
        raw = await client.get(keys.TOKENS_VERSION)
        version = int(raw or 0)
        if version == self.version:
            return False
        table = await client.hgetall(keys.TOKENS)
        self._devices = {digest.decode(): device.decode() for digest, device in table.items()}
        self.version = version
        return True
