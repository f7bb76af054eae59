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

Each change (add, rotate, revoke) is one Lua script: it reads the device's
current hash, replaces or deletes it in both hashes, bumps the version and
publishes the change (:class:`TokenChange`) on ``fleetlog:tokens:changed``,
all atomically, so parallel rotations can never leave a stale hash behind
that still authenticates.

Gateways never load the whole table (a million devices would cost seconds at
start and hundreds of megabytes per process): :class:`TokenCache` looks a
token up with one ``HGET`` the first time it is seen and keeps a bounded cache
of answers, so a reconnecting device costs Redis nothing. A gateway applies
each published change at once and confirms it on a per-change list; the
command waits (bounded, 2 s) until every gateway that heard the change
confirmed it, so a token printed by ``device add`` is accepted by every live
node the moment the command returns, and a revoked one is refused and its
connections closed. Gateways also poll the version every half second, for a
change they missed while disconnected: they then empty the cache and check
their connected devices' tokens.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from fleetlog import keys
from fleetlog.device_id import check_device_id
from fleetlog.errors import DeviceExists, UnknownDevice
from fleetlog.queue.connection import REDIS_DOWN, is_cluster
from fleetlog.records import iso_ms

__all__ = [
    "Credential", "Credentials", "TokenCache", "TokenChange", "UnknownDevice", "hash_token", "new_token",
]

_PREFIX = "flt_"

#: How long a command waits for the gateways to confirm a change.
CONFIRM_TIMEOUT: Final = 2.0

# Every script: KEYS = device record, token table, version counter;
# ARGV = channel, change id, PUBLISH or SPUBLISH (a cluster), then its own.
# ``announce`` bumps the version and publishes the change; it returns
# {version, gateways that heard it}.
_ANNOUNCE: Final = """
local function announce(set, del)
  local version = redis.call('INCR', KEYS[3])
  local message = cjson.encode({v = version, change = ARGV[2], set = set, del = del})
  return {version, redis.call(ARGV[3], ARGV[1], message)}
end
"""

#: ARGV[4..6] = token hash, device id, now.  Nil if the device has a token already.
_ADD: Final = _ANNOUNCE + """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
redis.call('HSET', KEYS[1], 'token_hash', ARGV[4], 'created_at', ARGV[6])
return announce({[ARGV[4]] = ARGV[5]}, nil)
"""

#: ARGV[4..6] = new token hash, device id, now.  Nil if the device has no token.
_ROTATE: Final = _ANNOUNCE + """
local old = redis.call('HGET', KEYS[1], 'token_hash')
if not old then return false end
redis.call('HDEL', KEYS[2], old)
redis.call('HSET', KEYS[2], ARGV[4], ARGV[5])
redis.call('HSET', KEYS[1], 'token_hash', ARGV[4], 'rotated_at', ARGV[6])
return announce({[ARGV[4]] = ARGV[5]}, {old})
"""

#: Nil if the device has no token.
_REVOKE: Final = _ANNOUNCE + """
local old = redis.call('HGET', KEYS[1], 'token_hash')
if not old then return false end
redis.call('HDEL', KEYS[2], old)
redis.call('DEL', KEYS[1])
return announce(nil, {old})
"""


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


@dataclass(frozen=True, slots=True)
class TokenChange:
    """One credential change as published to the gateways: hashes added and removed."""

    version: int
    change_id: str
    added: dict[str, str] = field(default_factory=dict)  # token hash -> device id
    removed: list[str] = field(default_factory=list)

    @classmethod
    def decode(cls, raw: bytes) -> TokenChange:
        """Parse a published change; raises :class:`ValueError` if it is not one."""
        message = orjson.loads(raw)
        if not isinstance(message, dict):
            raise ValueError("not a credential change")
        version, change_id = message.get("v"), message.get("change")
        # cjson encodes an empty table as {}, so "del" may be a list or an object.
        added, removed = message.get("set") or {}, message.get("del") or []
        if (not isinstance(version, int) or not isinstance(change_id, str)
                or not change_id.isalnum() or len(change_id) > 64
                or not isinstance(added, dict) or not isinstance(removed, list)):
            raise ValueError("not a credential change")
        return cls(version, change_id, {str(k): str(v) for k, v in added.items()},
                   [str(digest) for digest in removed])


class Credentials:
    """Credential commands (``fleetlog device ...``) on a blocking Redis client.

    Each command returns once every live gateway confirmed the change, or
    after ``confirm_timeout``; :attr:`unconfirmed` then says how many did not
    (they apply it within half a second of reaching Redis again).
    """

    def __init__(self, client: Any, *, confirm_timeout: float = CONFIRM_TIMEOUT) -> None:
        self._client = client
        self._keys = keys.credential_keys(is_cluster(client))
        self._confirm_timeout = confirm_timeout
        self._add = client.register_script(_ADD)
        self._rotate = client.register_script(_ROTATE)
        self._revoke = client.register_script(_REVOKE)
        #: Gateways that heard the last change but did not confirm it in time.
        self.unconfirmed = 0

    def _change(self, script: Any, device_id: str, *args: str) -> bool:
        """Run one change script; ``False`` if it refused (nothing changed)."""
        change_id = secrets.token_hex(8)
        result = script(
            keys=[self._keys.device(device_id), self._keys.tokens, self._keys.version],
            args=[self._keys.changed, change_id, self._keys.publish, *args],
        )
        if result is None:
            return False
        _version, listeners = result
        self.unconfirmed = self._await_confirmations(change_id, int(listeners))
        return True

    def _await_confirmations(self, change_id: str, listeners: int) -> int:
        """Wait until ``listeners`` gateways confirmed ``change_id``; return how many did not."""
        # The change is made: nothing here may raise, or the new token would
        # never be printed.  A Redis error just means "not confirmed".
        key = keys.token_change_acks(change_id)
        deadline = time.monotonic() + self._confirm_timeout
        confirmed = 0
        try:
            while confirmed < listeners:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                # Short waits stay within the client's socket timeout; never 0,
                # which BLPOP takes as "forever" (it counts in milliseconds).
                if self._client.blpop([key], timeout=min(max(left, 0.01), 0.5)) is not None:
                    confirmed += 1
            self._client.delete(key)
        except REDIS_DOWN:
            pass  # the list expires by itself
        return listeners - confirmed

    def _install_args(self, device_id: str) -> tuple[str, list[str]]:
        token = new_token()
        return token, [hash_token(token), device_id, iso_ms(int(time.time() * 1000))]

    def add(self, device_id: str) -> str:
        """Create the device's credential; return the token (shown once).

        Raises :class:`~fleetlog.device_id.InvalidDeviceId` for an id against
        the policy, :class:`~fleetlog.errors.DeviceExists` if the device has a token already.
        """
        check_device_id(device_id)
        token, args = self._install_args(device_id)
        if not self._change(self._add, device_id, *args):
            raise DeviceExists(f"device {device_id!r} already has a token: use `device rotate`")
        return token

    def rotate(self, device_id: str) -> str:
        """Replace the device's token; the old one stops working at once."""
        token, args = self._install_args(device_id)
        if not self._change(self._rotate, device_id, *args):
            raise UnknownDevice(f"device {device_id!r} has no token: use `device add`")
        return token

    def revoke(self, device_id: str) -> None:
        """Delete the device's token; its connections are closed on every node."""
        if not self._change(self._revoke, device_id):
            raise UnknownDevice(f"device {device_id!r} has no token")

    def list(self) -> list[Credential]:
        result = []
        for device_id in sorted(set(self._client.hvals(self._keys.tokens))):
            info = self._client.hgetall(self._keys.device(device_id.decode()))
            rotated = info.get(b"rotated_at")
            result.append(
                Credential(
                    device_id.decode(),
                    info.get(b"created_at", b"").decode(),
                    rotated.decode() if rotated else None,
                )
            )
        return result


#: Tokens a gateway remembers: a device reconnecting is answered with no I/O.
#: 266 bytes an entry (tracemalloc), so 51 MB when full (a gateway process holds
#: about 20,000 connections; the rest serves reconnect churn).
CACHE_CAPACITY: Final = 200_000
#: Unknown tokens remembered, so one device retrying a bad token costs Redis once.
NEGATIVE_CAPACITY: Final = 20_000
#: Lookups in a row that a concurrent change can spoil before the gateway gives up.
_LOOKUP_ATTEMPTS: Final = 5


class TokenCache:
    """A gateway's bounded cache of ``fleetlog:tokens``: lookups on demand, never a full load.

    With a million devices provisioned, loading the whole hash at start (and
    again on every missed change) took seconds and hundreds of megabytes in
    every gateway process.  Instead a handshake whose token is not cached is
    answered by one ``HGET`` (:meth:`fetch`, which the server awaits before
    letting picows decide the upgrade), and its answer, positive or negative,
    is kept in a least-recently-used cache.  Published changes drop the hashes
    they touch (:meth:`apply`); a change missed (a version gap, a lost
    subscription) empties the cache (:meth:`clear`), which costs lookups, not
    correctness.

    A lookup racing a change could otherwise cache the answer from before it:
    every change bumps :attr:`generation`, and a lookup that saw it move asks
    again.
    """

    def __init__(self, capacity: int = CACHE_CAPACITY, negative_capacity: int = NEGATIVE_CAPACITY) -> None:
        self._known: OrderedDict[str, str] = OrderedDict()  # token hash -> device id
        self._unknown: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity
        self._negative_capacity = negative_capacity
        #: The last change applied; ``None`` until the watcher read it from Redis.
        self.version: int | None = None
        #: Bumped by every change: a lookup started before one cannot be cached.
        self.generation = 0

    def __len__(self) -> int:
        return len(self._known) + len(self._unknown)

    def cached(self, token_hash: str) -> bool:
        """Whether :meth:`device_for` can answer for this hash with no lookup."""
        return token_hash in self._known or token_hash in self._unknown

    def device_for(self, token: str) -> tuple[str, str] | None:
        """``(device_id, token_hash)`` for a valid cached token, else ``None`` (unknown or not cached)."""
        # Looking up the SHA-256 leaks no timing an attacker can use: to steer
        # the hash they would need preimages.
        digest = hash_token(token)
        device_id = self._known.get(digest)
        if device_id is None:
            return None
        self._known.move_to_end(digest)
        return device_id, digest

    def store(self, token_hash: str, device_id: str | None, generation: int) -> bool:
        """Remember a lookup's answer; ``False`` (nothing kept) if a change came since it started."""
        if generation != self.generation:
            return False
        if device_id is None:
            self._unknown[token_hash] = None
            if len(self._unknown) > self._negative_capacity:
                self._unknown.popitem(last=False)
        else:
            self._known[token_hash] = device_id
            if len(self._known) > self._capacity:
                self._known.popitem(last=False)
        return True

    async def fetch(self, client: Any, token_hash: str) -> str | None:
        """Look one hash up in Redis and cache the answer; the device id or ``None``.

        Raises what the client raises when Redis is down (nothing cached then).
        """
        tokens = keys.credential_keys(is_cluster(client)).tokens
        device_id: str | None = None
        for _ in range(_LOOKUP_ATTEMPTS):
            generation = self.generation
            raw = await client.hget(tokens, token_hash)
            device_id = None if raw is None else raw.decode()
            if self.store(token_hash, device_id, generation):
                return device_id
        # Changes kept landing during the lookup: answer from the last one, uncached.
        return device_id

    def apply(self, change: TokenChange) -> bool:
        """Apply a published change; ``False`` if the cache missed one before it.

        A change the cache already holds is a no-op.  After ``False`` the
        caller must :meth:`clear` the cache and check the connected devices.
        """
        if self.version is None or change.version > self.version + 1:
            return False
        if change.version == self.version + 1:
            self.generation += 1
            for digest in change.removed:
                self._known.pop(digest, None)
            for digest, device_id in change.added.items():
                self._unknown.pop(digest, None)
                self._known[digest] = device_id
            while len(self._known) > self._capacity:
                self._known.popitem(last=False)
            self.version = change.version
        return True

    def clear(self, version: int) -> None:
        """Forget every answer (changes were missed); ``version`` is the one Redis holds now."""
        self.generation += 1
        self._known.clear()
        self._unknown.clear()
        self.version = version

    async def refresh(self, client: Any) -> bool:
        """Clear the cache if the version in Redis moved behind pub/sub's back; return whether it did."""
        version = await current_version(client)
        if version == self.version:
            return False
        self.clear(version)
        return True


async def current_version(client: Any) -> int:
    """The credential version in Redis (0 before any change)."""
    raw = await client.get(keys.credential_keys(is_cluster(client)).version)
    return int(raw or 0)


async def missing(client: Any, token_hashes: list[str], *, chunk: int = 1000) -> set[str]:
    """The hashes among ``token_hashes`` that no longer name a device (revoked or rotated)."""
    tokens = keys.credential_keys(is_cluster(client)).tokens
    gone: set[str] = set()
    for start in range(0, len(token_hashes), chunk):
        part = token_hashes[start:start + chunk]
        values = await client.hmget(tokens, part)
        gone.update(digest for digest, value in zip(part, values, strict=True) if value is None)
    return gone
