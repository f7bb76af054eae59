"""Running one Lua script on Redis: the only Redis the producer sees.

The producer's hot path is one EVALSHA per event-loop turn carrying thousands
of arguments.  :class:`ScriptRunner` is all it needs from Redis, so the
topology stays out of it: :class:`RedisScript` runs the script on a single
Redis (or Valkey); a Redis Cluster client implements the same method per
shard (all of one call's keys must then hash to the same slot).
:class:`RedisAppend` and :class:`ClusterAppend` send the same way a call that
needs no Lua: the plain append of :func:`fleetlog.queue.scripts.plain_append`,
as one ``MULTI``/``EXEC`` transaction.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

import hiredis
import redis.asyncio
import redis.exceptions

from fleetlog.errors import NotReplicated, WriteUnconfirmed
from fleetlog.queue.scripts import ScriptArg, plain_append

__all__ = ["ClusterAppend", "ClusterScript", "RedisAppend", "RedisScript", "ScriptArg", "ScriptRunner"]


class ScriptRunner(Protocol):
    """Runs one fixed Lua script; implementations own connections and script loading."""

    async def run(self, keys: Sequence[ScriptArg], args: Sequence[ScriptArg]) -> Any:
        """Run the script with ``keys`` (KEYS) and ``args`` (ARGV); return its reply.

        Raises a connection or timeout error when Redis cannot be reached
        (nothing was sent), :class:`redis.exceptions.ResponseError` when it
        refuses (OOM, READONLY, a script error: it did not run), and
        :class:`~fleetlog.errors.WriteUnconfirmed` when the call was sent but
        its outcome is unknown or not replicated in time.
        """
        ...


class _Script:
    """What both runners keep: the script, its SHA, and the packed ``WAIT`` for ``replicas``."""

    __slots__ = ("_client", "_script", "_timeout_ms", "_wait", "replicas", "sha")

    #: Replies Redis sends before the one :meth:`_exchange` returns: none for an
    #: ``EVALSHA``; a transaction's ``+OK`` and each command's ``+QUEUED``.
    _queued = 0

    def __init__(self, client: redis.asyncio.Redis, script: str, *, replicas: int = 0,
                 replica_timeout: float = 1.0) -> None:
        self._client = client
        self._script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()
        self._timeout_ms = max(1, int(replica_timeout * 1000))
        self.replicas = 0
        self._wait = b""
        self.wait_for(replicas)

    def wait_for(self, replicas: int) -> None:
        """From the next call on, acknowledge only once ``replicas`` replicas have its writes."""
        self.replicas = replicas
        wait = ("WAIT", replicas, self._timeout_ms)
        self._wait = hiredis.pack_command(wait)  # type: ignore[arg-type]  # hiredis stubs: 1-tuples only

    def _call(self, keys: Sequence[ScriptArg], args: Sequence[ScriptArg]) -> bytes:
        """The call, packed: one ``EVALSHA``."""
        packed: bytes = hiredis.pack_command(
            ("EVALSHA", self.sha, len(keys), *keys, *args))  # type: ignore[arg-type]
        return packed

    def _packed(self, keys: Sequence[ScriptArg], args: Sequence[ScriptArg]) -> bytes:
        packed = self._call(keys, args)
        return packed + self._wait if self.replicas else packed

    async def _exchange(self, connection: Any, packed: bytes) -> Any:
        """Send one packed call (and its ``WAIT``) on a connected ``connection``; its reply.

        What a failure says depends on when it happens, and the producer tells
        devices accordingly (``unavailable`` vs ``unconfirmed``):

        * Redis answered with an error (NOSCRIPT, OOM, READONLY, MOVED, LOADING):
          the script did not run, the error is raised as it is;
        * the connection failed or timed out once the call was on its way: it may
          have run, so :class:`~fleetlog.errors.WriteUnconfirmed`;
        * the script ran but ``WAIT`` saw too few replicas, or its answer was
          lost: :class:`~fleetlog.errors.NotReplicated`.

        The whole exchange has the connection's socket timeout, once.  redis-py
        applies it to each write (a task) and each reply read (a timer), which
        was a third of a small call's CPU in the gateway: an append reads five
        replies.

        On any exception the caller must drop the connection (a reply may be unread).
        """
        deadline = connection.socket_timeout
        connection.socket_timeout = None  # the exchange's own deadline, below, stands for it
        replied = False
        try:
            async with asyncio.timeout(deadline):
                reply = await self._call_and_reply(connection, packed)
                replied = True
                if self.replicas:
                    await self._replicated(connection)
                return reply
        except TimeoutError as exc:  # the deadline's: a socket's own is handled below
            if replied:
                raise NotReplicated(f"written on the master; WAIT's answer did not come within "
                                    f"{deadline} s") from exc
            raise WriteUnconfirmed(f"Redis did not answer within {deadline} s of the call being "
                                   f"sent; it may have been queued") from exc
        finally:
            connection.socket_timeout = deadline

    async def _call_and_reply(self, connection: Any, packed: bytes) -> Any:
        """Send the call; read the replies queued before its own, then its own."""
        try:
            await connection.send_packed_command(packed, check_health=False)
            refused: redis.exceptions.ResponseError | None = None
            for _ in range(self._queued):  # a command refused here (OOM) makes EXEC refuse all
                try:
                    await connection.read_response()
                except redis.exceptions.ResponseError as exc:
                    refused = refused or exc
            try:
                reply = await connection.read_response()
            except redis.exceptions.ResponseError:
                if refused is None:
                    raise
            if refused is not None:
                raise refused  # what Redis said of the command it refused, not EXECABORT
        except redis.exceptions.BusyLoadingError:
            raise  # a LOADING reply: refused before running
        except _LOST as exc:
            raise WriteUnconfirmed(f"the connection to Redis failed after the call was sent "
                                   f"({type(exc).__name__}: {exc}); it may have been queued") from exc
        return reply

    async def _replicated(self, connection: Any) -> None:
        """Read ``WAIT``'s answer: :class:`NotReplicated` unless enough replicas have the call."""
        try:
            confirmed = await connection.read_response()
        except _LOST as exc:
            raise NotReplicated(f"written on the master; WAIT's answer was lost "
                                f"({type(exc).__name__}: {exc})") from exc
        if confirmed < self.replicas:
            raise NotReplicated(f"written on the master but confirmed by {confirmed} of "
                                f"{self.replicas} replicas in time")


#: A connection lost or timed out mid-call: whether the call ran is unknown.
_LOST: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError, OSError,
)


class ClusterScript(_Script):
    """:class:`ScriptRunner` on a Redis Cluster: EVALSHA sent to the master holding the keys' slot.

    The call (and, with ``replicas`` > 0, its ``WAIT``) goes in one write on one
    connection to the slot's master, found from the client's slot map; all of a
    call's keys hash to one slot (the producer's calls are one shard each, one
    hash tag).  redis-py's own routing is not used: it retries a command that
    may have run, and it cannot say whether a failed call left Redis.  After a
    connection error or a redirection the slot map is read again before the
    next call (a failover moved the slot); the call that saw it fails, so the
    device resends.  A node that has not seen the script (new, restarted, a
    replica promoted) gets it loaded and the call sent once more.
    """

    __slots__ = ("_stale",)

    def __init__(self, client: redis.asyncio.Redis, script: str, *, replicas: int = 0,
                 replica_timeout: float = 1.0) -> None:
        super().__init__(client, script, replicas=replicas, replica_timeout=replica_timeout)
        self._stale = False

    async def run(self, keys: Sequence[ScriptArg], args: Sequence[ScriptArg]) -> Any:
        cluster: Any = self._client  # redis.asyncio.cluster.RedisCluster
        if self._stale:
            await cluster.nodes_manager.initialize()
            self._stale = False
        packed = self._packed(keys, args)
        first = keys[0]
        for attempt in (1, 2):
            node = cluster.get_node_from_key(first.decode() if isinstance(first, bytes) else str(first))
            connection = node.acquire_connection()
            try:
                await _connected(connection)  # before this, nothing has left
                return await self._exchange(connection, packed)
            except redis.exceptions.NoScriptError:
                await connection.disconnect()  # WAIT's reply may still be unread
                if attempt == 2:
                    raise
                await cluster.script_load(self._script)
            except BaseException as exc:
                await connection.disconnect()  # a half-read reply would poison the next call
                if isinstance(exc, (*_TOPOLOGY_CHANGED, WriteUnconfirmed)):
                    self._stale = True
                raise
            finally:
                node.release(connection)
        raise AssertionError("unreachable")


async def _connected(connection: Any) -> None:
    """Connect ``connection``, or check an open one is clean, as redis-py's pools do.

    A pooled socket whose server went away would otherwise take the call and
    fail after it: a failure nothing can tell from a call that ran.
    """
    await connection.connect()
    try:
        clean = not await connection.can_read_destructive()
    except (redis.ConnectionError, ConnectionError, OSError):
        clean = False
    if not clean:
        await connection.disconnect()
        await connection.connect()


#: Errors after which a cluster's slot map may be out of date.
_TOPOLOGY_CHANGED: tuple[type[BaseException], ...] = (
    redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError,
    redis.exceptions.MovedError, redis.exceptions.AskError, redis.exceptions.ClusterDownError,
    redis.exceptions.ReadOnlyError, redis.exceptions.TryAgainError,
)


class RedisScript(_Script):
    """:class:`ScriptRunner` on one Redis: EVALSHA packed by hiredis on a pooled connection.

    This is redis-py's ``Script`` made fast for huge calls: hiredis packs the
    whole command in C, seven times faster than redis-py's per-argument packer,
    and the packed bytes go straight to a connection of the client's pool
    (which connects it, or checks a pooled one is clean, before anything is
    sent).  A Redis that restarted empty (NOSCRIPT) gets the script loaded
    again and the call sent once more.

    With ``replicas`` > 0 every call is followed, on the same connection and
    in the same write, by ``WAIT replicas timeout``: the reply is returned only
    once that many replicas have the call's writes, else :class:`NotReplicated`
    is raised (the writes stay on the master; the caller must not ack them).
    """

    __slots__ = ()

    async def run(self, keys: Sequence[ScriptArg], args: Sequence[ScriptArg]) -> Any:
        packed = self._packed(keys, args)
        pool = self._client.connection_pool
        for attempt in (1, 2):
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                return await self._exchange(connection, packed)
            except redis.exceptions.NoScriptError:
                if self.replicas:
                    await connection.disconnect()  # WAIT's reply is still unread
                if attempt == 2:
                    raise
                await self._client.script_load(self._script)  # Redis restarted empty
            except BaseException:
                await connection.disconnect()  # a half-read reply would poison the next call
                raise
            finally:
                await pool.release(connection)
        raise AssertionError("unreachable")


class _Append(_Script):
    """The plain append (:func:`~fleetlog.queue.scripts.plain_append`) in place of a script.

    One ``MULTI``/``EXEC`` with the call's keys (the stream, its backlog
    counter) and arguments (records, devices, counts, the records' string); the
    reply is ``EXEC``'s (a command that failed as it ran is an exception in it,
    as redis-py reads it).  Sent, failed and confirmed exactly as a script call is.
    """

    __slots__ = ()

    #: ``MULTI``'s ``+OK`` and the ``+QUEUED`` of its three commands.
    _queued = 4

    def __init__(self, client: redis.asyncio.Redis, *, replicas: int = 0,
                 replica_timeout: float = 1.0) -> None:
        super().__init__(client, "", replicas=replicas, replica_timeout=replica_timeout)

    def _call(self, keys: Sequence[ScriptArg], args: Sequence[ScriptArg]) -> bytes:
        stream, counter = keys
        count, devices, counts, records = args
        return b"".join(hiredis.pack_command(command)  # type: ignore[arg-type]
                        for command in plain_append(stream, counter, count, devices, counts, records))


class RedisAppend(_Append, RedisScript):
    """:class:`ScriptRunner` for the plain append on one Redis."""

    __slots__ = ()


class ClusterAppend(_Append, ClusterScript):
    """:class:`ScriptRunner` for the plain append on a Redis Cluster (the stream's slot)."""

    __slots__ = ()
