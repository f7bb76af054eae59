"""Operator tokens for the HTTP API: ``read`` or ``admin``, stored only as hashes.

A token is 256 random bits with an ``fla_`` prefix, printed once by
``fleetlog api-token add``; Redis keeps its SHA-256 (a full-entropy token needs
no slow hash, see :mod:`fleetlog.credentials`).  Keys:

* ``fleetlog:api-tokens`` hash: token hash -> JSON ``{"name", "role", "created_at"}``,
  what every request looks up (one HGET);
* ``fleetlog:api-token:<name>`` hash: ``token_hash``, ``role``, ``created_at``.

Adding, revoking and changing a role are each one Lua script over both keys, so a
name never holds two tokens and a revoked token never lingers.  Revoking (or a
new role, ``fleetlog api-token role``) also publishes
the token's hash on :data:`fleetlog.keys.API_TOKEN_CHANGES` (in the same
script): every API process ends the live tails and exports still open with
it (:mod:`fleetlog.api.bus`).  On a Redis Cluster both
keys carry the hash tag ``{api-tokens}``, one slot, so the scripts run there too
(:class:`fleetlog.keys.ApiTokenKeys`).  ``read`` may call every
reading route; ``admin`` may also send commands and manage device tokens.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from fleetlog import keys
from fleetlog.credentials import hash_token
from fleetlog.errors import FleetlogError, UnknownToken
from fleetlog.queue.connection import is_cluster
from fleetlog.records import iso_ms

__all__ = ["ROLES", "OperatorToken", "OperatorTokens", "Role", "UnknownToken", "allows", "known_entry"]

Role = Literal["read", "admin"]
ROLES: Final = ("read", "admin")

_PREFIX: Final = "fla_"

#: KEYS = name record, token table; ARGV = token hash, role, now, JSON entry.  Nil if the name is taken.
_ADD: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
redis.call('HSET', KEYS[1], 'token_hash', ARGV[1], 'role', ARGV[2], 'created_at', ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
return 1
"""

#: KEYS = name record, token table; ARGV = the channel announcing changes.  Nil if there is no such name.
_REVOKE: Final = """
local old = redis.call('HGET', KEYS[1], 'token_hash')
if not old then return false end
redis.call('HDEL', KEYS[2], old)
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[1], old)
return 1
"""

#: KEYS = name record, token table; ARGV = role, JSON entry, the channel.  Nil if there is no such name.
#: A new role ends what is open with the token, as a revocation does: a tail or an export
#: admitted under the old role does not go on under the new one.
_ROLE: Final = """
local old = redis.call('HGET', KEYS[1], 'token_hash')
if not old then return false end
redis.call('HSET', KEYS[1], 'role', ARGV[1])
redis.call('HSET', KEYS[2], old, ARGV[2])
redis.call('PUBLISH', ARGV[3], old)
return 1
"""


@dataclass(frozen=True, slots=True)
class OperatorToken:
    name: str
    role: Role
    created_at: str


def allows(role: str, needed: Role) -> bool:
    """Whether ``role`` may do what needs ``needed`` (admin may do everything read may)."""
    return role == "admin" or (needed == "read" and role == "read")


def _check_name(name: str) -> None:
    if not name or len(name) > 64 or not name.isprintable() or name != name.strip():
        raise FleetlogError("a token name is 1 to 64 printable characters, no surrounding spaces")


def known_entry(raw: bytes | str) -> OperatorToken | None:
    """The operator a token table entry names, or ``None`` if it is not a valid entry."""
    try:
        entry = orjson.loads(raw)
        role = entry["role"]
        if role not in ROLES:
            return None
        return OperatorToken(str(entry["name"]), role, str(entry.get("created_at", "")))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None


class OperatorTokens:
    """The ``api-token`` commands on a blocking Redis client."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self._keys = keys.api_token_keys(is_cluster(client))
        self._add = client.register_script(_ADD)
        self._revoke = client.register_script(_REVOKE)
        self._role = client.register_script(_ROLE)

    def add(self, name: str, role: Role = "read") -> str:
        """Create a token named ``name``; return it (shown once, stored hashed)."""
        _check_name(name)
        if role not in ROLES:
            raise FleetlogError(f"role must be one of {', '.join(ROLES)}")
        token = _PREFIX + secrets.token_urlsafe(32)
        now = iso_ms(int(time.time() * 1000))
        entry = orjson.dumps({"name": name, "role": role, "created_at": now})
        digest = hash_token(token)
        names = self._keys
        if self._add(keys=[names.name(name), names.table], args=[digest, role, now, entry]) is None:
            raise FleetlogError(f"an API token named {name!r} exists already: revoke it first")
        return token

    def revoke(self, name: str) -> None:
        """Delete the token named ``name``; requests with it are refused from now on, and the
        answers still open with it (on every API process) are ended."""
        if self._revoke(keys=[self._keys.name(name), self._keys.table],
                        args=[keys.API_TOKEN_CHANGES]) is None:
            raise UnknownToken(f"no API token named {name!r}")

    def set_role(self, name: str, role: Role) -> None:
        """Give the token named ``name`` another role; its open answers end (on every API process)."""
        if role not in ROLES:
            raise FleetlogError(f"role must be one of {', '.join(ROLES)}")
        record = self._client.hgetall(self._keys.name(name))
        created = (record.get(b"created_at") or b"").decode()
        entry = orjson.dumps({"name": name, "role": role, "created_at": created})
        if self._role(keys=[self._keys.name(name), self._keys.table],
                      args=[role, entry, keys.API_TOKEN_CHANGES]) is None:
            raise UnknownToken(f"no API token named {name!r}")

    def list(self) -> list[OperatorToken]:
        tokens = [known_entry(raw) for raw in self._client.hvals(self._keys.table)]
        return sorted((token for token in tokens if token is not None), key=lambda token: token.name)


async def identify(client: Any, token: str) -> OperatorToken | None:
    """The operator a bearer token belongs to (an asyncio client), or ``None``."""
    raw = await client.hget(keys.api_token_keys(is_cluster(client)).table, hash_token(token))
    return None if raw is None else known_entry(raw)
