"""RedisStorage: a queue storage in Redis that several hosts share, with delivery leases.

A :class:`~slimta.queue.storage.SharedQueueStorage` on redis-py's asyncio
client. Every queue (process, host) pointed at the same Redis and prefix sees
one queue: :meth:`RedisStorage.claim` gives each due message to one of them
only, for a lease that the holder renews while it delivers.

Key layout
    Every key starts with ``prefix`` (default ``slimta:``):

    ``<prefix>version``
        The layout version (:data:`SCHEMA_VERSION`), written at the first
        :meth:`~RedisStorage.open`. A newer version than this code knows (or
        a value that is not a number) is refused with
        :class:`StorageVersionError`: upgrade slimta rather than let it guess.
    ``<prefix>msg:<id>``
        A hash per message (``id`` is uuid4 hex, unique across hosts):
        ``data`` (the raw message bytes) and ``meta`` (its JSON metadata),
        both as :mod:`slimta.queue.record` makes them, never pickle;
        ``timestamp`` (next attempt), ``attempts``, ``delivered`` (JSON list
        of recipient indexes), ``last_reply`` (absent for none), ``held``
        (``0``/``1``), ``created``, ``size`` (of ``data``), ``rcpts`` (number
        of recipients), ``seq`` (arrival order), ``history`` (a JSON list of
        ``[time, reply]`` of the last attempts, oldest first; absent until the
        first attempt recorded with a time, which reads as an empty history,
        so layout version 1 holds it without a new version) and, while it is
        leased, ``owner``.
    ``<prefix>due``
        Sorted set of the messages that may be claimed: score = next attempt.
        A held or leased message is not in it.
    ``<prefix>leases``
        Sorted set of leased messages: score = lease expiry; the holder is the
        ``owner`` field of the message's hash.
    ``<prefix>messages``
        Sorted set of every message, score = ``seq`` (arrival): what
        ``load``, ``list`` and ``stats`` read.
    ``<prefix>seq``
        The counter behind ``seq``.
    ``<prefix>wake`` (a pub/sub channel, not a key)
        ``write``, ``set_timestamp``, ``set_held(id, False)`` and ``release``
        publish the message id on it; every storage that was given a
        :meth:`~RedisStorage.watch` callback subscribes and calls it.

    Every change that touches more than one key runs in one Lua script (or a
    ``MULTI``/``EXEC`` transaction), so other users never see half of it.
    The scripts build message keys from the prefix, so Redis Cluster is not
    supported; a single server (with replicas, Sentinel) is.

Leases
    ``claim(now, limit, lease)`` first recovers the leases that ran out (score
    at or before ``now``: the holder's host died or stalled); their messages
    go back to ``due`` at their own next attempt time unless they are held.
    Then it moves up to ``limit`` members of ``due`` with a score at or before
    ``now`` to ``leases`` with score ``now + lease``, records the owner, and
    returns their ids, earliest next attempt first. ``renew`` extends only
    leases that this owner holds and that have not run out; ``release`` ends
    only this owner's lease; ``record_attempt`` and ``remove`` end any lease.
    All times come from the callers (the queue's clock), never from Redis's
    ``TIME``, so hosts sharing a Redis need synchronised clocks (NTP) and
    tests can inject any time. A lease is over *at* its expiry (not after
    it): ``next_due`` reports that moment as the time a claim can succeed.

Durability
    When :meth:`RedisStorage.write` returns, Redis has the message in memory.
    Whether an acknowledged message survives a crash depends on how Redis is
    configured, not on slimta:

    * ``appendonly yes`` with ``appendfsync always``: Redis fsyncs the
      append-only file before it replies, so an acknowledged message survives
      a crash of Redis, of the kernel, or a power loss (given a disk that
      honours flushes). This is the slowest setting.
    * ``appendonly yes`` with ``appendfsync everysec`` (the Redis default for
      AOF): the file is fsynced about once a second, so a crash can lose
      roughly the last second (at worst about two) of acknowledged mail.
      Redis normally writes the file before it replies, so it is mostly a
      crash of the host (kernel, power) that loses mail, rarely a crash of
      Redis alone. ``appendfsync no`` leaves flushing to the kernel (tens of
      seconds).
    * No AOF, RDB snapshots only (``save ...``): everything since the last
      snapshot is lost when Redis stops uncleanly. With neither (``save ""``
      and no AOF) a restart of Redis loses the whole queue.
    * Replication is asynchronous: a message acknowledged by the primary may
      not have reached a replica when the primary dies and the replica is
      promoted. ``wait_replicas=n`` makes ``write`` issue ``WAIT n`` and fail
      (the client gets a temporary error and retries; at worst the message is
      delivered twice) when fewer replicas confirm within ``wait_timeout``.
      ``WAIT`` confirms that replicas *received* the write, not that they
      fsynced it (Redis 7.2's ``WAITAOF`` would; it is not used here).
    * ``maxmemory`` with an ``allkeys-*`` eviction policy silently deletes
      queued mail when memory runs short. Use ``noeviction`` (then a full
      Redis refuses writes, and the client is told to try again later).
    At :meth:`~RedisStorage.open` the storage reads ``CONFIG GET appendonly``,
    ``appendfsync``, ``save`` and ``maxmemory-policy`` and logs a warning
    when acknowledged mail could be lost (nothing is logged if ``CONFIG`` is
    disabled or renamed; it never refuses to open).
    Where every acknowledged message must survive any crash, use PostgreSQL
    (or SQLite on one host): Redis is the choice for speed and sharing when
    losing the last moments of mail in a power cut is acceptable, or with
    ``appendfsync always``. (The Redis that slimta's own tests run against has
    no persistence at all.)

Delivery is at least once: a message whose lease ran out while its holder was
still delivering is delivered again by another host, and a ``write`` whose
reply was lost may be retried by the client's sender.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from slimta.envelope import Envelope
from slimta.queue.record import envelope_from_record, envelope_to_record
from slimta.queue.storage import (
    HISTORY_LIMIT,
    QueueEntry,
    SharedQueueStorage,
    StorageVersionError,
    StoredMessage,
)

__all__ = ["DEFAULT_URL", "SCHEMA_VERSION", "NotReplicatedError", "RedisStorage",
           "StorageVersionError"]

log = logging.getLogger(__name__)

#: The server used when neither ``url`` nor ``host``/``port``/``db``/``password`` is given.
DEFAULT_URL = "redis://127.0.0.1:6379/0"

#: The version of the key layout this code writes (the ``<prefix>version`` key).
SCHEMA_VERSION = 1

#: How many messages ``load``, ``list`` and ``stats`` read per round trip.
_CHUNK = 500


class NotReplicatedError(RedisError):
    """Fewer replicas than ``wait_replicas`` confirmed a write within ``wait_timeout``.

    The message is stored on the primary (it may still be delivered), but it is
    not acknowledged: the sender is told to try again later.
    """


def _num(value: float) -> str:
    """A float as the exact text Redis and Lua parse back to the same double."""
    return repr(float(value))


def _id(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


# --- Lua scripts ---------------------------------------------------------------------
#
# Times arrive as text made by _num() and are stored as given: Lua numbers turn
# into text with only 14 significant digits, which would round epoch times.

# KEYS: msg, due, messages, seq. ARGV: id, data, meta, timestamp, created, size, rcpts,
# channel. 0 if the id exists already (a retry of this very write: uuid4 does not collide).
_WRITE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local seq = redis.call('INCR', KEYS[4])
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'meta', ARGV[3], 'timestamp', ARGV[4],
           'created', ARGV[5], 'size', ARGV[6], 'rcpts', ARGV[7], 'attempts', 0,
           'delivered', '[]', 'held', 0, 'seq', seq)
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('ZADD', KEYS[3], seq, ARGV[1])
redis.call('PUBLISH', ARGV[8], ARGV[1])
return 1
"""

# KEYS: msg, due. ARGV: id, timestamp, channel. 0 for a missing message.
_SET_TIMESTAMP = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'timestamp', ARGV[2])
local st = redis.call('HMGET', KEYS[1], 'held', 'owner')
if st[1] == '0' and not st[2] then redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1]) end
redis.call('PUBLISH', ARGV[3], ARGV[1])
return 1
"""

# KEYS: msg. The new count, or false (None) for a missing message.
_INCREMENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
return redis.call('HINCRBY', KEYS[1], 'attempts', 1)
"""

# Merges the JSON list of indexes ARGV[n] into the hash's 'delivered'.
_MERGE = """
local function merge(key, added)
  local seen, out = {}, {}
  for _, list in ipairs({cjson.decode(redis.call('HGET', key, 'delivered')),
                         cjson.decode(added)}) do
    for _, i in ipairs(list) do
      if not seen[i] then seen[i] = true; out[#out + 1] = i end
    end
  end
  table.sort(out)
  redis.call('HSET', key, 'delivered', '[' .. table.concat(out, ',') .. ']')
end
"""

# KEYS: msg. ARGV: JSON list of indexes. 0 for a missing message.
_SET_DELIVERED = _MERGE + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
merge(KEYS[1], ARGV[1])
return 1
"""

# KEYS: msg. ARGV: '1' and the reply, or '0' for none. 0 for a missing message.
_SET_LAST_REPLY = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] == '1' then redis.call('HSET', KEYS[1], 'last_reply', ARGV[2])
else redis.call('HDEL', KEYS[1], 'last_reply') end
return 1
"""

# KEYS: msg, due. ARGV: id, '1' (hold) or '0' (release), channel. 0 for a missing message.
_SET_HELD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'held', ARGV[2])
if ARGV[2] == '1' then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  local st = redis.call('HMGET', KEYS[1], 'timestamp', 'owner')
  if not st[2] then redis.call('ZADD', KEYS[2], st[1], ARGV[1]) end
  redis.call('PUBLISH', ARGV[3], ARGV[1])
end
return 1
"""

# Appends an entry to the hash's 'history' (a JSON list of [time, reply]), keeping the
# last `limit`. The new entry arrives as JSON text made by Python (its time exact, as
# _num() makes it); older entries are written again with their times as '%.17g' (cjson
# would keep only 14 digits) and their replies as cjson makes them.
_HISTORY = """
local function append_history(key, entry, limit)
  local raw = redis.call('HGET', key, 'history')
  local old = raw and cjson.decode(raw) or {}
  local parts = {}
  for n = math.max(1, #old - limit + 2), #old do
    parts[#parts + 1] = '[' .. string.format('%.17g', old[n][1]) .. ','
                        .. cjson.encode(old[n][2]) .. ']'
  end
  parts[#parts + 1] = entry
  redis.call('HSET', key, 'history', '[' .. table.concat(parts, ',') .. ']')
end
"""

# KEYS: msg, due, leases. ARGV: id, timestamp, JSON list of delivered indexes,
# '1' and the reply or '0' and '', then the history entry as JSON text ('' for none)
# and the history limit. The new attempt count, or false for a missing message.
_RECORD_ATTEMPT = _MERGE + _HISTORY + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
merge(KEYS[1], ARGV[3])
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'last_reply', ARGV[5])
else redis.call('HDEL', KEYS[1], 'last_reply') end
if ARGV[6] ~= '' then append_history(KEYS[1], ARGV[6], tonumber(ARGV[7])) end
redis.call('HSET', KEYS[1], 'timestamp', ARGV[2])
redis.call('HDEL', KEYS[1], 'owner')
redis.call('ZREM', KEYS[3], ARGV[1])
if redis.call('HGET', KEYS[1], 'held') == '0' then
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
return attempts
"""

# KEYS: due, leases. ARGV: now, limit, lease expiry, owner, message key prefix.
# Recovers the leases that ran out, then leases up to `limit` due messages.
_CLAIM = """
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])) do
  redis.call('ZREM', KEYS[2], id)
  local key = ARGV[5] .. id
  local st = redis.call('HMGET', key, 'timestamp', 'held')
  if st[1] then
    redis.call('HDEL', key, 'owner')
    if st[2] == '0' then redis.call('ZADD', KEYS[1], st[1], id) end
  end
end
local claimed = {}
local limit = tonumber(ARGV[2])
if limit < 1 then return claimed end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, limit)) do
  redis.call('ZREM', KEYS[1], id)
  local key = ARGV[5] .. id
  if redis.call('EXISTS', key) == 1 then
    redis.call('HSET', key, 'owner', ARGV[4])
    redis.call('ZADD', KEYS[2], ARGV[3], id)
    claimed[#claimed + 1] = id
  end
end
return claimed
"""

# KEYS: leases. ARGV: now, new expiry, owner, message key prefix, ids...
_RENEW = """
local now = tonumber(ARGV[1])
local renewed = {}
for n = 5, #ARGV do
  local id = ARGV[n]
  local expiry = redis.call('ZSCORE', KEYS[1], id)
  if expiry and tonumber(expiry) > now
     and redis.call('HGET', ARGV[4] .. id, 'owner') == ARGV[3] then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[2], id)
    renewed[#renewed + 1] = id
  end
end
return renewed
"""

# KEYS: msg, due, leases. ARGV: id, owner, '1' and a timestamp or '0', channel.
# 1 if this owner's lease was ended.
_RELEASE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
redis.call('HDEL', KEYS[1], 'owner')
redis.call('ZREM', KEYS[3], ARGV[1])
if ARGV[3] == '1' then redis.call('HSET', KEYS[1], 'timestamp', ARGV[4]) end
local st = redis.call('HMGET', KEYS[1], 'timestamp', 'held')
if st[2] == '0' then
  redis.call('ZADD', KEYS[2], st[1], ARGV[1])
  redis.call('PUBLISH', ARGV[5], ARGV[1])
end
return 1
"""

# KEYS: due, leases. ARGV: now, message key prefix. When a claim can next succeed,
# as the stored text of that time (exact), or false: the earliest next attempt of
# a message in `due`; for a leased message that is not held, its next attempt if
# the lease ran out (not yet recovered), else the later of expiry and next attempt.
# Leases are read in expiry order, only until one expires after the best time.
_NEXT_DUE = """
local now = tonumber(ARGV[1])
local best, best_text = nil, false
local function offer(text)
  local t = tonumber(text)
  if best == nil or t < best then best, best_text = t, text end
end
local due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if due[2] then offer(due[2]) end
local start = 0
while true do
  local leases = redis.call('ZRANGE', KEYS[2], start, start + 99, 'WITHSCORES')
  if #leases == 0 then break end
  for n = 1, #leases, 2 do
    local expiry = tonumber(leases[n + 1])
    if expiry > now and best ~= nil and expiry >= best then return best_text end
    local st = redis.call('HMGET', ARGV[2] .. leases[n], 'timestamp', 'held')
    if st[1] and st[2] == '0' then
      if expiry > now and expiry > tonumber(st[1]) then offer(leases[n + 1])
      else offer(st[1]) end
    end
  end
  start = start + 100
end
return best_text
"""


def _default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class RedisStorage(SharedQueueStorage):
    """A :class:`~slimta.queue.storage.SharedQueueStorage` in Redis (see the module docs).

    The server is ``url`` (default :data:`DEFAULT_URL`), or, as in the
    original python-slimta's ``redisstorage``, ``host``, ``port``, ``db`` and
    ``password`` (any of them given: the others default to ``127.0.0.1``,
    ``6379``, ``0`` and none; together with a ``url`` other than the default
    they are an error), or an existing ``redis.asyncio.Redis`` as ``client``
    (made without ``decode_responses``; :meth:`close` leaves it open).
    ``socket_timeout`` (seconds, None for none) bounds every command;
    ``socket_connect_timeout`` bounds connecting. At most ``max_connections``
    connections are open (one of them for the :meth:`watch` subscription);
    a command that finds them all busy waits up to ``pool_timeout`` seconds
    (None: for ever) for one. Every key starts with
    ``prefix``; storages share a queue when they share server and prefix.

    ``owner`` names this storage in its leases (default
    ``<hostname>:<pid>:<random>``); it must differ between the queues sharing
    a prefix. ``clock`` gives the creation time of new messages.
    ``wait_replicas`` > 0 makes :meth:`write` wait for that many replicas
    (``WAIT``, at most ``wait_timeout`` seconds) and fail with
    :class:`NotReplicatedError` if fewer confirm. ``retry_delay`` is the
    pause before the pub/sub subscription reconnects. ``check_durability``
    logs a warning at :meth:`open` when the server's persistence settings can
    lose acknowledged mail.

    Operations on an id that is not stored raise :class:`KeyError`, except
    :meth:`remove` (False) and :meth:`release` (nothing happens). Before
    :meth:`open` and after :meth:`close` they raise :class:`RuntimeError`.
    """

    def __init__(
        self,
        url: str | None = DEFAULT_URL,
        *,
        prefix: str = "slimta:",
        owner: str | None = None,
        client: Any = None,
        host: str | None = None,
        port: int | None = None,
        db: int | None = None,
        password: str | None = None,
        socket_timeout: float | None = None,
        socket_connect_timeout: float | None = 10.0,
        max_connections: int = 32,
        pool_timeout: float | None = 30.0,
        clock: Callable[[], float] = time.time,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        retry_delay: float = 1.0,
        check_durability: bool = True,
    ) -> None:
        keys_given = any(v is not None for v in (host, port, db, password))
        if keys_given and url not in (None, DEFAULT_URL):
            raise ValueError("give RedisStorage a url or host/port/db/password, not both")
        if client is not None and (keys_given or url not in (None, DEFAULT_URL)):
            raise ValueError("give RedisStorage a client or connection settings, not both")
        if client is not None and _decodes(client):
            raise ValueError("RedisStorage needs a client made without decode_responses")
        if wait_replicas < 0 or wait_timeout < 0 or retry_delay < 0:
            raise ValueError("wait_replicas, wait_timeout and retry_delay must not be negative")
        if max_connections < 2:
            raise ValueError("max_connections must be at least 2 (one is for pub/sub)")
        self.url = None if keys_given or client is not None else (url or DEFAULT_URL)
        self.host = host if host is not None else "127.0.0.1"
        self.port = int(port) if port is not None else 6379
        self.db = int(db) if db is not None else 0
        self.password = password
        self.socket_timeout = socket_timeout
        self.socket_connect_timeout = socket_connect_timeout
        self.max_connections = int(max_connections)
        self.pool_timeout = pool_timeout
        self._use_keys = keys_given
        self.prefix = prefix
        self.owner = owner if owner is not None else _default_owner()
        self.clock = clock
        self.wait_replicas = int(wait_replicas)
        self.wait_timeout = float(wait_timeout)
        self.retry_delay = float(retry_delay)
        self.check_durability = check_durability
        self.channel = f"{prefix}wake"
        self._due = f"{prefix}due"
        self._leases = f"{prefix}leases"
        self._messages = f"{prefix}messages"
        self._seq = f"{prefix}seq"
        self._version = f"{prefix}version"
        self._msg_prefix = f"{prefix}msg:"
        self._given_client = client
        self.client: Any = None
        self._open = False
        self._wake: Callable[[], None] | None = None
        self._watcher: asyncio.Task | None = None
        self._pubsub: Any = None
        self._scripts: dict[str, Any] = {}
        #: The warning about the server's settings logged at :meth:`open` (None: none).
        self.durability: str | None = None

    def __repr__(self) -> str:
        return f"<RedisStorage {self._where()} prefix={self.prefix!r} owner={self.owner!r}>"

    def _where(self) -> str:
        if self._given_client is not None:
            return "(given client)"
        if self._use_keys:
            return f"redis://{self.host}:{self.port}/{self.db}"
        return _hide_password(self.url or DEFAULT_URL)

    def _key(self, id: str) -> str:
        return self._msg_prefix + id

    def _client(self) -> Any:
        if not self._open:
            raise RuntimeError("RedisStorage is not open")
        return self.client

    def _script(self, name: str) -> Any:
        self._client()
        return self._scripts[name]

    # --- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the layout version (writing it to a new prefix), subscribe for
        :meth:`watch`, and warn about the server's durability settings.

        Raises :class:`StorageVersionError` for a prefix written by a newer slimta,
        and redis-py's ``ConnectionError`` when the server cannot be reached.
        """
        if self._open:
            return
        if self._given_client is not None:
            client = self._given_client
        else:
            client = self._make_client()
            if _decodes(client):
                await _close_client(client)
                raise ValueError("RedisStorage cannot use decode_responses")
        try:
            await self._check_version(client)
            if self.check_durability:
                self.durability = await _durability_warning(client)
                if self.durability:
                    log.warning("queue storage %s: %s", self._where(), self.durability)
        except BaseException:
            if self._given_client is None:
                await _close_client(client)
            raise
        self.client = client
        self._scripts = {
            name: client.register_script(text) for name, text in (
                ("write", _WRITE), ("set_timestamp", _SET_TIMESTAMP),
                ("increment", _INCREMENT), ("set_delivered", _SET_DELIVERED),
                ("set_last_reply", _SET_LAST_REPLY), ("set_held", _SET_HELD),
                ("record_attempt", _RECORD_ATTEMPT), ("claim", _CLAIM),
                ("renew", _RENEW), ("release", _RELEASE), ("next_due", _NEXT_DUE),
            )
        }
        self._open = True
        if self._wake is not None:
            try:
                await self._start_watcher()
            except BaseException:
                await self.close()
                raise

    @property
    def client_name(self) -> str:
        """The ``CLIENT SETNAME`` of this storage's connections (``CLIENT LIST`` shows it)."""
        return "slimta-queue:" + "".join(c if c.isprintable() and not c.isspace() else "_"
                                         for c in self.owner)

    async def _check_version(self, client: Any) -> None:
        await client.set(self._version, SCHEMA_VERSION, nx=True)
        raw = await client.get(self._version)
        where = f"{self._where()} prefix {self.prefix!r}"
        try:
            found = int(raw)
        except (TypeError, ValueError):
            raise StorageVersionError(
                where, -1, SCHEMA_VERSION,
                f"{self._version!r} on {self._where()} holds {raw!r}, not a slimta queue "
                "layout version; is the prefix used by something else?",
            ) from None
        if found > SCHEMA_VERSION:
            raise StorageVersionError(
                where, found, SCHEMA_VERSION,
                f"the queue in Redis at {where} has layout version {found}, newer than "
                f"version {SCHEMA_VERSION}, the newest this slimta knows; upgrade slimta "
                "to use it",
            )

    async def close(self) -> None:
        """Stop the subscription and close the connections (not a ``client`` given)."""
        if not self._open:
            return
        self._open = False
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await watcher
        client, self.client = self.client, None
        if self._given_client is None and client is not None:
            await _close_client(client)

    def _make_client(self) -> Any:
        """A client on a pool that waits for a free connection (rather than fail) when
        ``max_connections`` commands are already running."""
        options: dict[str, Any] = {
            "max_connections": self.max_connections,
            "timeout": self.pool_timeout,
            "socket_timeout": self.socket_timeout,
            "socket_connect_timeout": self.socket_connect_timeout,
            "socket_keepalive": True,
            "client_name": self.client_name,
        }
        if self._use_keys:
            pool = aioredis.BlockingConnectionPool(
                host=self.host, port=self.port, db=self.db, password=self.password, **options)
        else:
            pool = aioredis.BlockingConnectionPool.from_url(self.url or DEFAULT_URL, **options)
        return aioredis.Redis(connection_pool=pool)

    # --- wake-ups ----------------------------------------------------------------------

    def watch(self, wake: Callable[[], None]) -> None:
        """Call ``wake()`` whenever any user of this prefix publishes on ``<prefix>wake``.

        One subscription task per storage; it reconnects (logging, after
        ``retry_delay`` seconds) when the connection drops, and calls ``wake()``
        once after every reconnect, since notifications may have been missed.
        """
        self._wake = wake
        if self._open and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(
                self._watch_loop(None), name=f"RedisStorage watch {self.channel}")

    async def _start_watcher(self) -> None:
        """Subscribe (so that nothing published after :meth:`open` is missed), then
        hand the subscription to the task that reads it."""
        pubsub = await self._subscribe()
        self._watcher = asyncio.get_running_loop().create_task(
            self._watch_loop(pubsub), name=f"RedisStorage watch {self.channel}")

    async def _subscribe(self) -> Any:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            if pubsub.connection is not None:
                pubsub.connection.register_connect_callback(self._on_reconnect)
        except BaseException:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            raise
        return pubsub

    def _call_wake(self) -> None:
        wake = self._wake
        if wake is None or not self._open:
            return
        try:
            wake()
        except Exception:
            log.exception("queue storage %s: the wake-up callback failed", self._where())

    def _on_reconnect(self, connection: Any) -> None:
        """redis-py reconnected the subscription by itself (and subscribed again)."""
        log.info("queue storage %s: pub/sub connection re-established", self._where())
        asyncio.get_running_loop().call_soon(self._call_wake)

    async def _watch_loop(self, pubsub: Any) -> None:
        while self._open:
            try:
                if pubsub is None:
                    pubsub = await self._subscribe()
                    log.info("queue storage %s: subscribed to %s", self._where(), self.channel)
                    self._call_wake()  # what was published meanwhile is lost
                self._pubsub = pubsub
                while self._open:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._call_wake()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # RedisError, OSError; anything else must not end it
                log.warning("queue storage %s: pub/sub connection lost (%s); "
                            "reconnecting in %.1f s", self._where(), exc, self.retry_delay)
            finally:
                if pubsub is not None:
                    await self._unsubscribe(pubsub)
                pubsub = self._pubsub = None
            await asyncio.sleep(self.retry_delay)

    async def _unsubscribe(self, pubsub: Any) -> None:
        with contextlib.suppress(Exception):
            if pubsub.connection is not None:
                pubsub.connection.deregister_connect_callback(self._on_reconnect)
        with contextlib.suppress(Exception):
            await pubsub.aclose()

    # --- QueueStorage ------------------------------------------------------------------

    async def write(self, envelope: Envelope, timestamp: float) -> str:
        """Store a new message due at ``timestamp``; return its id (uuid4 hex).

        Publishes on ``<prefix>wake``. With ``wait_replicas``, returns only once
        that many replicas have it (else :class:`NotReplicatedError`).
        """
        meta, data = envelope_to_record(envelope)
        meta_text = json.dumps(meta, separators=(",", ":"))
        script = self._script("write")
        id = uuid.uuid4().hex
        await script(
            keys=[self._key(id), self._due, self._messages, self._seq],
            args=[id, data, meta_text, _num(timestamp), _num(self.clock()), len(data),
                  len(meta["recipients"]), self.channel],
        )
        if self.wait_replicas:
            acked = await self.client.execute_command(
                "WAIT", self.wait_replicas, max(1, int(self.wait_timeout * 1000)))
            if int(acked) < self.wait_replicas:
                raise NotReplicatedError(
                    f"id={id}: {acked} of {self.wait_replicas} replicas confirmed the write "
                    f"within {self.wait_timeout} s")
        return id

    async def get(self, id: str) -> StoredMessage:
        """The message ``id`` with its delivery state; ``KeyError`` if there is none."""
        data, meta, attempts, delivered, timestamp, last_reply, held, history = (
            await self._client().hmget(self._key(id), "data", "meta", "attempts", "delivered",
                                       "timestamp", "last_reply", "held", "history"))
        if data is None or meta is None:
            raise KeyError(id)
        return StoredMessage(
            envelope=envelope_from_record(json.loads(meta), data),
            attempts=int(attempts),
            delivered=set(json.loads(delivered)),
            timestamp=float(timestamp),
            last_reply=_text(last_reply),
            held=held == b"1",
            history=[] if history is None else [
                (float(t), reply) for t, reply in json.loads(history)],
        )

    async def set_timestamp(self, id: str, timestamp: float) -> None:
        """When the next attempt is due (a leased message stays leased). Publishes a wake-up."""
        if not await self._script("set_timestamp")(
                keys=[self._key(id), self._due], args=[id, _num(timestamp), self.channel]):
            raise KeyError(id)

    async def increment_attempts(self, id: str) -> int:
        """Count one more attempt; return the new count."""
        count = await self._script("increment")(keys=[self._key(id)])
        if count is None:
            raise KeyError(id)
        return int(count)

    async def set_recipients_delivered(self, id: str, indexes: list[int]) -> None:
        """Add ``indexes`` (into the original recipients) to those delivered."""
        if not await self._script("set_delivered")(
                keys=[self._key(id)], args=[json.dumps([int(i) for i in indexes])]):
            raise KeyError(id)

    async def set_last_reply(self, id: str, reply: str | None) -> None:
        """The last relay reply, for operators (None clears it)."""
        args = ["0"] if reply is None else ["1", reply]
        if not await self._script("set_last_reply")(keys=[self._key(id)], args=args):
            raise KeyError(id)

    async def set_held(self, id: str, held: bool) -> None:
        """Hold (never claimed, not in ``load()``) or release a message.

        Releasing publishes a wake-up; a message held while leased stays leased
        until its holder records the attempt, and is not due afterwards.
        """
        if not await self._script("set_held")(
                keys=[self._key(id), self._due], args=[id, "1" if held else "0", self.channel]):
            raise KeyError(id)

    async def record_attempt(self, id: str, timestamp: float, delivered: list[int],
                             last_reply: str | None, attempted_at: float | None = None) -> int:
        """Record an attempt at once: delivered indexes, one more attempt, the reply (and
        with ``attempted_at`` a history entry), the next attempt time; ends any lease
        (whoever holds it). Returns the attempt count."""
        args = [id, _num(timestamp), json.dumps([int(i) for i in delivered])]
        args += ["0", ""] if last_reply is None else ["1", last_reply]
        entry = "" if attempted_at is None else (
            f"[{_num(attempted_at)},{json.dumps(last_reply, ensure_ascii=False)}]")
        args += [entry, HISTORY_LIMIT]
        count = await self._script("record_attempt")(
            keys=[self._key(id), self._due, self._leases], args=args)
        if count is None:
            raise KeyError(id)
        return int(count)

    async def remove(self, id: str) -> bool:
        """Delete the message and any lease on it; False if there was none."""
        async with self._client().pipeline(transaction=True) as pipe:
            pipe.delete(self._key(id))
            pipe.zrem(self._due, id)
            pipe.zrem(self._leases, id)
            pipe.zrem(self._messages, id)
            deleted, *_ = await pipe.execute()
        return bool(deleted)

    async def _read_all(self, *fields: str) -> list[tuple[str, list[Any]]]:
        """(id, values of ``fields``) of every message, in arrival order, plus ``seq``."""
        client = self._client()
        ids = [_id(i) for i in await client.zrange(self._messages, 0, -1)]
        rows: list[tuple[str, list[Any]]] = []
        for start in range(0, len(ids), _CHUNK):
            chunk = ids[start:start + _CHUNK]
            async with client.pipeline(transaction=False) as pipe:
                for id in chunk:
                    pipe.hmget(self._key(id), *fields)
                values = await pipe.execute()
            rows.extend((id, v) for id, v in zip(chunk, values, strict=True)
                        if v[0] is not None)  # removed meanwhile
        return rows

    async def load(self) -> list[tuple[float, str]]:
        """(next attempt, id) of every message not held, leased ones included, ordered by
        next attempt, then arrival."""
        rows = await self._read_all("timestamp", "held")
        return [(float(ts), id) for id, (ts, held) in
                sorted(rows, key=lambda r: float(r[1][0])) if held != b"1"]

    async def list(self) -> list[QueueEntry]:
        """Every message, held and leased ones included, ordered by next attempt, then arrival."""
        rows = await self._read_all("timestamp", "meta", "delivered", "attempts", "last_reply",
                                    "held", "size", "created")
        entries = []
        for id, (ts, meta, delivered, attempts, last_reply, held, size, created) in sorted(
                rows, key=lambda r: float(r[1][0])):
            info = json.loads(meta)
            done = set(json.loads(delivered))
            entries.append(QueueEntry(
                id=id,
                sender=info.get("sender") or "",
                recipients=[r for i, r in enumerate(info.get("recipients") or [])
                            if i not in done],
                attempts=int(attempts),
                next_attempt=float(ts),
                last_reply=_text(last_reply),
                held=held == b"1",
                size=int(size),
                created=float(created),
            ))
        return entries

    async def stats(self) -> dict:
        """``{'messages': n, 'held': n, 'recipients': n, 'bytes': n}`` without reading
        message metadata (recipients: those not yet delivered)."""
        rows = await self._read_all("held", "size", "rcpts", "delivered")
        stats = {"messages": len(rows), "held": 0, "recipients": 0, "bytes": 0}
        for _id, (held, size, rcpts, delivered) in rows:
            stats["held"] += held == b"1"
            stats["bytes"] += int(size)
            stats["recipients"] += int(rcpts) - len(json.loads(delivered))
        return stats

    # --- SharedQueueStorage ------------------------------------------------------------

    async def claim(self, now: float, limit: int, lease: float) -> list[str]:
        """Lease up to ``limit`` due messages to this owner until ``now + lease``.

        Due: not held, next attempt at or before ``now``, not leased or with a
        lease that ran out (at or before ``now``; such leases are recovered
        here). Earliest next attempt first; one Lua script, so atomic across
        every user of the prefix.
        """
        claimed = await self._script("claim")(
            keys=[self._due, self._leases],
            args=[_num(now), int(limit), _num(now + lease), self.owner, self._msg_prefix])
        return [_id(i) for i in claimed]

    async def renew(self, ids: list[str], now: float, lease: float) -> list[str]:
        """Extend this owner's leases on ``ids`` to ``now + lease``; return those renewed.

        A lease that ran out (expiry at or before ``now``), was taken over, or
        whose message was removed or recorded, is not renewed.
        """
        ids = list(ids)
        if not ids:
            self._client()
            return []
        renewed = await self._script("renew")(
            keys=[self._leases],
            args=[_num(now), _num(now + lease), self.owner, self._msg_prefix, *ids])
        return [_id(i) for i in renewed]

    async def release(self, id: str, timestamp: float | None = None) -> None:
        """End this owner's lease on ``id`` without recording an attempt; the message is
        due again (at ``timestamp`` when given) and a wake-up is published. Does
        nothing when this owner holds no lease on ``id``."""
        args = [id, self.owner] + (["0", ""] if timestamp is None else ["1", _num(timestamp)])
        await self._script("release")(
            keys=[self._key(id), self._due, self._leases], args=[*args, self.channel])

    async def next_due(self, now: float) -> float | None:
        """When the next claim could succeed: the earliest next attempt of a message that
        is not held, or for a leased one the end of its lease if its next attempt comes
        earlier; None when every queued message is held (leased or not). A time
        before ``now`` is returned as it is (claim at once)."""
        due = await self._script("next_due")(
            keys=[self._due, self._leases], args=[_num(now), self._msg_prefix])
        return None if due is None else float(due)


async def _close_client(client: Any) -> None:
    """Close a client made by :meth:`RedisStorage._make_client`, and its pool."""
    try:
        await client.aclose()
    finally:
        await client.connection_pool.disconnect()


def _decodes(client: Any) -> bool:
    """Whether a redis-py client decodes replies to str (this storage needs bytes)."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None) or {}
    return bool(kwargs.get("decode_responses"))


def _hide_password(url: str) -> str:
    """``url`` without the password, for logs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    auth, _, host = rest.partition("@")
    user = auth.split(":", 1)[0]
    return f"{scheme}://{user + ':***' if ':' in auth else '***'}@{host}"


async def _durability_warning(client: Any) -> str | None:
    """What the server's settings can lose of acknowledged mail, or None when every
    acknowledged write is fsynced (``appendonly yes``, ``appendfsync always``) and
    nothing is evicted (``maxmemory-policy`` ``noeviction`` or ``volatile-*``:
    queue keys have no expiry).

    None also when ``CONFIG`` is disabled or renamed (then nothing is known).
    """
    try:
        config: dict[Any, Any] = {}
        for pattern in ("appendonly", "appendfsync", "save", "maxmemory-policy"):
            config.update(await client.config_get(pattern))
    except ResponseError as exc:
        log.debug("cannot read the Redis persistence settings: %s", exc)
        return None
    values = {_text(k): (_text(v) or "").strip().lower() for k, v in config.items()}
    problems = []
    if values.get("appendonly") == "yes":
        fsync = values.get("appendfsync") or "?"
        if fsync == "everysec":
            problems.append(
                "Redis has appendfsync everysec: a crash (of the host, mostly) can lose about "
                "the last second of acknowledged mail; use appendfsync always where that is "
                "not acceptable")
        elif fsync != "always":
            problems.append(
                f"Redis has appendfsync {fsync}: a crash of the host can lose the "
                "acknowledged mail the kernel had not yet written; use appendfsync always "
                "where that is not acceptable")
    elif values.get("save"):
        problems.append(
            "Redis has no append-only file (appendonly no), only RDB snapshots: an unclean "
            "stop loses all mail acknowledged since the last snapshot; set appendonly yes "
            "and appendfsync always")
    else:
        problems.append(
            "Redis has no persistence (appendonly no, save \"\"): a restart of Redis loses "
            "the whole queue; set appendonly yes and appendfsync always")
    if values.get("maxmemory-policy", "noeviction").startswith("allkeys-"):
        problems.append(
            f"Redis has maxmemory-policy {values['maxmemory-policy']}: queued mail can be "
            "evicted when memory runs short; use noeviction")
    return "; ".join(problems) or None
