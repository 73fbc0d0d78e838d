"""PostgresStorage: a queue storage in PostgreSQL that several hosts share.

Schema
    Everything lives in one PostgreSQL schema of its own (``slimta`` unless
    told otherwise; created with ``CREATE SCHEMA IF NOT EXISTS``), so several
    queues can share a database under different schema names.

    ``messages``
        ``id`` (uuid4 hex, unique across hosts), ``seq`` (an identity: the
        order of arrival, which breaks ties between equal timestamps),
        ``timestamp`` (the next attempt, ``double precision`` seconds since
        the epoch), ``attempts``, ``delivered`` (``integer[]``, sorted
        indexes into the recipients), ``last_reply``, ``held``, ``created``,
        ``size`` (bytes of ``data``), ``recipients`` (how many recipients
        the message has), ``lease_owner`` and ``lease_until`` (the delivery
        lease, both NULL when there is none), ``meta`` (the JSON metadata of
        :mod:`slimta.queue.record`, as ``text``: its exact ASCII form, which
        keeps escapes such as lone surrogates that ``jsonb`` refuses),
        ``data`` (``bytea``: the raw message) and ``history`` (``jsonb``: a
        list of ``[time, reply]`` of the last attempts, oldest first; added
        by schema version 2). No pickle. The partial index
        ``messages_due`` on ``(timestamp, seq) WHERE NOT held`` serves the
        claim query, ``load`` and ``list``; ``messages_leased`` on
        ``lease_until`` serves :meth:`~PostgresStorage.next_due`.

    ``schema_version``
        One row: ``application`` (``'slimta-queue'``) and ``version``. At
        open, the steps of :data:`MIGRATIONS` the schema lacks (step ``n``
        turns version ``n`` into ``n + 1``; a new schema is version 0) run in
        one transaction, under an advisory lock so that hosts starting
        together migrate once. A schema written by a newer slimta, or one
        that holds tables but is not a slimta queue, is refused with
        :class:`~slimta.queue.sqlite.StorageVersionError` (the class that
        SqliteStorage raises in the same cases).

Leases
    Queues sharing the storage take due messages with
    :meth:`~PostgresStorage.claim`: one ``UPDATE`` whose sub-select picks the
    oldest due rows with ``FOR UPDATE SKIP LOCKED``, so concurrent claimers
    never wait for each other and never get the same message. A claimed row
    carries ``lease_owner`` (:attr:`PostgresStorage.owner`) and
    ``lease_until``. Due means: not held, ``timestamp <= now`` and no lease
    or ``lease_until <= now`` (a lease is over at its expiry).
    ``record_attempt`` and ``remove`` end the lease
    of whoever holds it; ``release`` and ``renew`` act only on this owner's
    leases. A host that dies leaves leases that expire, and another host
    claims those messages then: delivery is at least once.

Clocks
    Every time (``now``, timestamps, lease ends) comes from the caller, never
    from the database's ``now()``: tests inject a clock, and the leases of
    hosts sharing the storage are only as good as the agreement of their
    clocks. Run NTP (or similar) on every host; keep the lease well above the
    worst clock skew.

Notifications
    ``write``, ``set_timestamp``, ``set_held(id, False)`` and ``release``
    send ``NOTIFY`` on a channel named after the schema (:attr:`channel`), in
    the same transaction as their change, so it is heard only once the
    change is committed. When a queue asked to be woken
    (:meth:`~PostgresStorage.watch`), one connection outside the pool
    listens and calls the callback for each notification; if that
    connection drops, it is opened again after ``reconnect_delay`` seconds
    (and the callback is called once then, for whatever was missed).

Group commit and durability
    ``write`` hands its row to the writer tasks; a free writer sends *all*
    rows waiting as one statement (a multi-row ``INSERT`` with the
    ``NOTIFY``) on a connection of its own, in one transaction: one round
    trip and one commit (one WAL flush) per batch, so concurrent enqueues
    share the cost of the flush. With ``writers=2`` or more, another batch
    can be on its way while one waits for its flush (on the benchmark's
    machine this made batches smaller and the rate no higher, so the
    default is one writer). A batch
    travels as two parameters, whatever its size: the rows as JSON and the
    messages concatenated in one ``bytea``.
    ``write`` returns only after that commit. With PostgreSQL's
    ``synchronous_commit = on`` (its default; checked at open, see the
    ``synchronous_commit`` argument) a commit is acknowledged only once its
    WAL is flushed to stable storage, so a message the edge acknowledged
    survives a crash of the slimta host and of the database server (with
    synchronous replication, per the server's own settings). If the
    connection is lost while a batch commits, its writes fail although they
    may have been committed: the client retries, and the message may be
    delivered twice, never lost. The other operations are single statements
    on connections of the pool (``psycopg_pool.AsyncConnectionPool``, in
    autocommit mode), so each is its own transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from slimta.envelope import Envelope
from slimta.queue.record import envelope_from_record, envelope_to_record
from slimta.queue.sqlite import StorageVersionError
from slimta.queue.storage import HISTORY_LIMIT, QueueEntry, SharedQueueStorage, StoredMessage

__all__ = ["APPLICATION", "MIGRATIONS", "SCHEMA_VERSION", "PostgresStorage",
           "StorageVersionError", "migrate"]

log = logging.getLogger(__name__)

#: The ``application`` of the ``schema_version`` row of a slimta queue schema.
APPLICATION = "slimta-queue"

_Step = Callable[[psycopg.AsyncConnection, sql.Identifier], Awaitable[None]]


async def _create_v1(conn: psycopg.AsyncConnection, schema: sql.Identifier) -> None:
    """Version 0 (a new schema) to 1: the messages table and its indexes."""
    await conn.execute(sql.SQL(
        "CREATE TABLE {s}.messages ("
        " id text PRIMARY KEY,"
        " seq bigint GENERATED ALWAYS AS IDENTITY,"
        " timestamp double precision NOT NULL,"
        " attempts integer NOT NULL DEFAULT 0,"
        " delivered integer[] NOT NULL DEFAULT '{{}}',"
        " last_reply text,"
        " held boolean NOT NULL DEFAULT false,"
        " created double precision NOT NULL,"
        " size bigint NOT NULL,"
        " recipients integer NOT NULL,"
        " lease_owner text,"
        " lease_until double precision,"
        " meta text NOT NULL,"
        " data bytea NOT NULL)"
    ).format(s=schema))
    await conn.execute(sql.SQL(
        "CREATE INDEX messages_due ON {s}.messages (timestamp, seq) WHERE NOT held"
    ).format(s=schema))
    await conn.execute(sql.SQL(
        "CREATE INDEX messages_leased ON {s}.messages (lease_until)"
        " WHERE lease_until IS NOT NULL"
    ).format(s=schema))


async def _add_history_v2(conn: psycopg.AsyncConnection, schema: sql.Identifier) -> None:
    """Version 1 to 2: the attempt history (an empty list for the messages already queued)."""
    await conn.execute(sql.SQL(
        "ALTER TABLE {s}.messages ADD COLUMN history jsonb NOT NULL DEFAULT '[]'"
    ).format(s=schema))


#: The schema migrations: ``MIGRATIONS[n]`` turns a version ``n`` schema into
#: version ``n + 1``. Each is a coroutine function ``step(conn, schema)`` run
#: inside the one transaction of the upgrade (``schema`` is the quoted name).
MIGRATIONS: Sequence[_Step] = (_create_v1, _add_history_v2)

#: The schema version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(conn: psycopg.AsyncConnection, schema: str,
                  migrations: Sequence[_Step] = MIGRATIONS) -> int:
    """Create ``schema`` if needed and bring it up to ``len(migrations)``, in one transaction.

    Returns the version found (0 for a new schema). Raises
    :class:`~slimta.queue.sqlite.StorageVersionError` for a newer version, or
    for a schema that holds tables but is not a slimta queue; on any error
    nothing is changed. ``conn`` must be in autocommit mode.
    """
    target = len(migrations)
    ident = sql.Identifier(schema)
    where = f"PostgreSQL schema {schema!r}"
    async with conn.transaction():
        # hosts opening the same schema at once: one migrates, the others wait
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))",
                           (f"slimta.queue:{schema}",))
        cur = await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        if await cur.fetchone() is None:  # a role without CREATE may use a schema made for it
            await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        cur = await conn.execute("SELECT to_regclass(%s)",
                                 (f"{ident.as_string(conn)}.schema_version",))
        row = await cur.fetchone()
        if row is None or row[0] is None:
            cur = await conn.execute(
                "SELECT string_agg(table_name, ', ' ORDER BY table_name)"
                " FROM information_schema.tables WHERE table_schema = %s", (schema,))
            tables = (await cur.fetchone())[0]
            if tables:
                raise StorageVersionError(
                    where, 0, target,
                    f"{where} is not a slimta queue (it has tables {tables} but no"
                    " schema_version); choose another schema",
                )
            await conn.execute(sql.SQL(
                "CREATE TABLE {}.schema_version (application text NOT NULL,"
                " version integer NOT NULL)").format(ident))
            await conn.execute(sql.SQL(
                "INSERT INTO {}.schema_version (application, version) VALUES (%s, 0)"
            ).format(ident), (APPLICATION,))
        cur = await conn.execute(
            sql.SQL("SELECT application, version FROM {}.schema_version").format(ident))
        rows = await cur.fetchall()
        if len(rows) != 1 or rows[0][0] != APPLICATION:
            raise StorageVersionError(
                where, 0, target,
                f"{where} is not a slimta queue (its schema_version table holds {rows!r})",
            )
        found = rows[0][1]
        if found > target:
            raise StorageVersionError(
                where, found, target,
                f"{where} has queue schema version {found}, newer than version {target},"
                " the newest this slimta knows; upgrade slimta to use it",
            )
        for step in migrations[found:]:
            await step(conn, ident)
        if found != target:
            await conn.execute(
                sql.SQL("UPDATE {}.schema_version SET version = %s").format(ident), (target,))
    return found


def _channel(schema: str) -> str:
    """The NOTIFY channel of ``schema``: at most 63 bytes, as PostgreSQL's names."""
    name = f"slimta_queue_{schema}"
    if len(name.encode()) > 63:
        name = "slimta_queue_" + hashlib.sha256(schema.encode()).hexdigest()[:32]
    return name


def _default_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


# A pending write: (row, future).
_Pending = tuple[tuple, asyncio.Future]


class PostgresStorage(SharedQueueStorage):
    """A :class:`~slimta.queue.storage.SharedQueueStorage` in PostgreSQL (psycopg 3).

    ``PostgresStorage('postgresql://mta@db.example.net/mail')``: the schema
    (``schema``, default ``'slimta'``) and its tables are created or migrated
    at :meth:`open`. ``owner`` names this queue in its leases (default
    ``host:pid:random``); ``pool_size`` bounds the pool of connections for
    reads and changes (the writers of new messages and the listener have a
    connection each besides); ``writers`` is how many batches of new
    messages may be committing at once; ``max_batch`` and
    ``max_batch_bytes`` bound how many new messages share one transaction;
    ``connect_timeout`` (seconds) bounds each connection attempt at open;
    ``reconnect_delay`` is the wait before the listener connects again after
    losing its connection; ``clock`` gives the creation time of messages.
    ``synchronous_commit``: ``None`` (the default) keeps the server's
    setting and logs a warning at open if it is ``off`` (acknowledged
    messages could then be lost in a crash of the database); a value
    (``'on'``, ``'remote_apply'``, ...) is set on every connection.

    Ids are uuid4 hex. Operations on an id that is not stored raise
    :class:`KeyError`, except :meth:`remove` (False) and :meth:`release`
    (nothing). After :meth:`close`, operations raise :class:`RuntimeError`.
    See the module documentation for the schema, leases and durability.
    """

    #: The schema steps this storage applies at open (see :data:`MIGRATIONS`).
    migrations: Sequence[_Step] = MIGRATIONS

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "slimta",
        owner: str | None = None,
        pool_size: int = 10,
        writers: int = 1,
        max_batch: int = 1000,
        max_batch_bytes: int = 32 * 1024 * 1024,
        connect_timeout: float = 10.0,
        reconnect_delay: float = 1.0,
        synchronous_commit: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not schema or len(schema.encode()) > 63 or "\x00" in schema:
            raise ValueError("schema must be a PostgreSQL name of 1 to 63 bytes")
        if min(pool_size, writers, max_batch, max_batch_bytes) < 1:
            raise ValueError(
                "pool_size, writers, max_batch and max_batch_bytes must be at least 1")
        self.dsn = dsn
        self.schema = schema
        #: The NOTIFY/LISTEN channel, derived from the schema name.
        self.channel = _channel(schema)
        self.owner = owner if owner is not None else _default_owner()
        self.pool_size = pool_size
        self.writers = writers
        self.max_batch = max_batch
        self.max_batch_bytes = max_batch_bytes
        self.connect_timeout = connect_timeout
        self.reconnect_delay = reconnect_delay
        self.synchronous_commit = synchronous_commit
        self._clock = clock
        #: Transactions committed by the writer (one per batch of new messages).
        self.commits = 0
        #: New messages those transactions carried.
        self.operations = 0
        #: The largest batch so far.
        self.max_batch_seen = 0
        self._pool: AsyncConnectionPool | None = None
        self._open = False
        self._pending: list[_Pending] = []
        self._pending_event = asyncio.Event()
        self._writers: list[asyncio.Task] = []
        self._wconns: list[psycopg.AsyncConnection | None] = []
        self._wake: Callable[[], None] | None = None
        self._listener: asyncio.Task | None = None
        self._sql = self._statements(sql.Identifier(schema))

    # --- SQL ----------------------------------------------------------------------

    @staticmethod
    def _statements(s: sql.Identifier) -> dict[str, sql.Composed]:
        cols = "meta, data, attempts, delivered, timestamp, last_reply, held, history"
        due = ("NOT held AND timestamp <= %(now)s"
               " AND (lease_until IS NULL OR lease_until <= %(now)s)")
        text = {
            # the batch's rows as a JSON array of objects and their messages
            # concatenated in one bytea: two parameters whatever the batch size
            # (psycopg dumps arrays in Python; this costs far less per row)
            "insert": (
                "WITH ins AS (INSERT INTO {s}.messages"
                " (id, timestamp, created, size, recipients, meta, data)"
                " SELECT i, t, c, s, r, m, substring(%b::bytea FROM o + 1 FOR s)"
                " FROM ROWS FROM (json_to_recordset(%b::json) AS"
                " (i text, t float8, c float8, o int4, s int4, r int4, m text))"
                " WITH ORDINALITY AS x(i, t, c, o, s, r, m, n)"
                " ORDER BY n RETURNING 1)"
                " SELECT pg_notify(%b, 'write') FROM (SELECT count(*) FROM ins) AS done"
            ),
            "get": f"SELECT {cols} FROM {{s}}.messages WHERE id = %s",
            "set_timestamp": (
                "WITH u AS (UPDATE {s}.messages SET timestamp = %s WHERE id = %s RETURNING id)"
                " SELECT id, pg_notify(%s, 'timestamp') FROM u"
            ),
            "increment_attempts": (
                "UPDATE {s}.messages SET attempts = attempts + 1 WHERE id = %s RETURNING attempts"
            ),
            "set_delivered": (
                "UPDATE {s}.messages SET delivered = ARRAY(SELECT DISTINCT i FROM"
                " unnest(delivered || %s::int4[]) AS i ORDER BY i) WHERE id = %s RETURNING id"
            ),
            "set_last_reply": "UPDATE {s}.messages SET last_reply = %s WHERE id = %s RETURNING id",
            "hold": "UPDATE {s}.messages SET held = true WHERE id = %s RETURNING id",
            "unhold": (
                "WITH u AS (UPDATE {s}.messages SET held = false WHERE id = %s RETURNING id)"
                " SELECT id, pg_notify(%s, 'release') FROM u"
            ),
            "record_attempt": (
                "UPDATE {s}.messages SET delivered = ARRAY(SELECT DISTINCT i FROM"
                " unnest(delivered || %s::int4[]) AS i ORDER BY i),"
                " attempts = attempts + 1, last_reply = %s, timestamp = %s,"
                " lease_owner = NULL, lease_until = NULL WHERE id = %s RETURNING attempts"
            ),
            # the same, appending the entry (a one-entry jsonb list) to the history
            # and keeping its last HISTORY_LIMIT entries
            "record_attempt_history": (
                "UPDATE {s}.messages SET delivered = ARRAY(SELECT DISTINCT i FROM"
                " unnest(delivered || %s::int4[]) AS i ORDER BY i),"
                " attempts = attempts + 1, last_reply = %s, timestamp = %s,"
                " lease_owner = NULL, lease_until = NULL,"
                " history = (SELECT coalesce(jsonb_agg(e ORDER BY n), '[]'::jsonb) FROM"
                " jsonb_array_elements(history || %s::jsonb) WITH ORDINALITY AS h(e, n)"
                f" WHERE n > jsonb_array_length(history) + 1 - {int(HISTORY_LIMIT)})"
                " WHERE id = %s RETURNING attempts"
            ),
            "remove": "DELETE FROM {s}.messages WHERE id = %s RETURNING id",
            "load": (
                "SELECT timestamp, id FROM {s}.messages WHERE NOT held ORDER BY timestamp, seq"
            ),
            "list": (
                "SELECT id, meta, delivered, attempts, timestamp, last_reply, held, size, created"
                " FROM {s}.messages ORDER BY timestamp, seq"
            ),
            "stats": (
                "SELECT count(*), count(*) FILTER (WHERE held),"
                " coalesce(sum(recipients - cardinality(delivered)), 0),"
                " coalesce(sum(size), 0) FROM {s}.messages"
            ),
            "claim": (
                "WITH due AS (SELECT id FROM {s}.messages WHERE " + due +
                " ORDER BY timestamp, seq LIMIT %(limit)s FOR UPDATE SKIP LOCKED),"
                " claimed AS (UPDATE {s}.messages AS m"
                " SET lease_owner = %(owner)s, lease_until = %(until)s"
                " FROM due WHERE m.id = due.id RETURNING m.id, m.timestamp, m.seq)"
                " SELECT id FROM claimed ORDER BY timestamp, seq"
            ),
            # only live leases: one is over at its expiry, even if nobody took it since
            "renew": (
                "UPDATE {s}.messages SET lease_until = %s"
                " WHERE id = ANY(%s) AND lease_owner = %s AND lease_until > %s RETURNING id"
            ),
            "release": (
                "WITH u AS (UPDATE {s}.messages SET lease_owner = NULL, lease_until = NULL,"
                " timestamp = coalesce(%s, timestamp) WHERE id = %s AND lease_owner = %s"
                " RETURNING id) SELECT id, pg_notify(%s, 'release') FROM u"
            ),
            # unleased (or expired) messages: their next attempt; leased ones:
            # the end of the lease, or their next attempt if that comes later
            "next_due": (
                "SELECT (SELECT timestamp FROM {s}.messages WHERE NOT held AND"
                " (lease_until IS NULL OR lease_until <= %(now)s) ORDER BY timestamp, seq LIMIT 1),"
                " (SELECT min(lease_until) FROM {s}.messages"
                " WHERE NOT held AND lease_until > %(now)s AND timestamp <= lease_until),"
                " (SELECT min(timestamp) FROM {s}.messages"
                " WHERE NOT held AND lease_until > %(now)s AND timestamp > lease_until)"
            ),
        }
        return {name: sql.SQL(q).format(s=s) for name, q in text.items()}

    # --- life cycle ---------------------------------------------------------------

    async def _connect(self) -> psycopg.AsyncConnection:
        """A new autocommit connection outside the pool (migration, writers, listener)."""
        conn = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, connect_timeout=max(1, round(self.connect_timeout)))
        if self.synchronous_commit is not None:
            await conn.execute("SELECT set_config('synchronous_commit', %s, false)",
                               (self.synchronous_commit,))
        return conn

    async def _configure(self, conn: psycopg.AsyncConnection) -> None:
        """The pool's hook for each new connection."""
        if self.synchronous_commit is not None:
            await conn.execute("SELECT set_config('synchronous_commit', %s, false)",
                               (self.synchronous_commit,))

    async def open(self) -> None:
        """Create or migrate the schema, open the pool, start the writer and the listener."""
        if self._open:
            return
        conn = await self._connect()
        try:
            await migrate(conn, self.schema, self.migrations)
            cur = await conn.execute("SHOW synchronous_commit")
            setting = (await cur.fetchone())[0]
        finally:
            await conn.close()
        if setting == "off":
            log.warning("PostgreSQL synchronous_commit is off: acknowledged messages may be"
                        " lost if the database server crashes (schema %s)", self.schema)
        pool = AsyncConnectionPool(
            self.dsn, min_size=1, max_size=self.pool_size, open=False,
            kwargs={"autocommit": True}, configure=self._configure,
            name=f"slimta-queue-{self.schema}",
        )
        wconns: list[psycopg.AsyncConnection | None] = []
        try:
            await pool.open(wait=True, timeout=self.connect_timeout)
            for _ in range(self.writers):
                wconns.append(await self._connect())
        except BaseException:
            for conn in wconns:
                await conn.close()
            await pool.close()
            raise
        self._pool = pool
        self._wconns = wconns
        self._pending = []
        self._pending_event = asyncio.Event()
        self._open = True
        loop = asyncio.get_running_loop()
        self._writers = [loop.create_task(self._writer_main(slot),
                                          name=f"slimta-postgres-writer-{slot}")
                         for slot in range(self.writers)]
        if self._wake is not None:
            try:
                await self._start_listener(fail_first=True)
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        """Finish the writes already submitted, stop the listener, close every connection."""
        if not self._open:
            return
        self._open = False
        self._pending_event.set()
        for writer in self._writers:
            with contextlib.suppress(asyncio.CancelledError):
                await writer
        self._writers = []
        for conn in self._wconns:
            if conn is not None:
                await conn.close()
        self._wconns = []
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def __aenter__(self) -> PostgresStorage:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _check_open(self) -> AsyncConnectionPool:
        if not self._open or self._pool is None:
            raise RuntimeError("PostgresStorage is not open")
        return self._pool

    # --- notifications ------------------------------------------------------------

    def watch(self, wake: Callable[[], None]) -> None:
        """Have ``wake()`` called on the event loop for each NOTIFY on :attr:`channel`.

        Called before :meth:`open` (the listener starts there, and ``open``
        returns once it listens); when called while open, the listener starts
        in the background.
        """
        self._wake = wake
        if self._open and self._listener is None:
            self._start_listener(fail_first=False)

    def _start_listener(self, fail_first: bool) -> asyncio.Future:
        """Start the listener task; the future completes once it listens.

        With ``fail_first``, a failure of the first connection ends the task
        and is set on the future; otherwise the listener keeps trying.
        """
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        self._listener = loop.create_task(self._listen(ready, fail_first),
                                          name="slimta-postgres-listener")
        return ready

    def _notify(self) -> None:
        wake = self._wake
        if wake is None:
            return
        try:
            wake()
        except Exception:
            log.exception("queue wake-up callback failed")

    async def _listen(self, ready: asyncio.Future, fail_first: bool) -> None:
        """Listen on :attr:`channel` until cancelled; connect again when the connection is lost."""
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(self.channel))
        first = True
        while True:
            try:
                conn = await self._connect()
                try:
                    await conn.execute(listen)
                    if first:
                        first = False
                        if not ready.done():
                            ready.set_result(None)
                    else:
                        log.info("listening for queue notifications again (schema %s)",
                                 self.schema)
                        self._notify()  # for what was missed while disconnected
                    async for _ in conn.notifies():
                        self._notify()
                finally:
                    with contextlib.suppress(Exception):
                        await conn.close()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if first and fail_first:
                    ready.set_exception(exc)
                    return
                log.warning("queue notification listener lost its PostgreSQL connection (%s);"
                            " connecting again in %.1f s", exc, self.reconnect_delay)
            await asyncio.sleep(self.reconnect_delay)

    # --- the writer ---------------------------------------------------------------

    async def _writer_main(self, slot: int) -> None:
        """Commit the pending writes, all that are waiting in one transaction, until closed.

        ``slot`` is this writer's index into the writers' connections. With
        several writers, one sends the next batch while another waits for its
        commit (the server flushes their WAL together when it can).
        """
        event = self._pending_event
        while True:
            if not self._pending:
                if not self._open:
                    return
                event.clear()
                await event.wait()
                continue
            pending = self._pending
            n, size = 0, 0
            limit = min(len(pending), self.max_batch)
            while n < limit and (n == 0 or size + pending[n][0][3] <= self.max_batch_bytes):
                size += pending[n][0][3]
                n += 1
            batch = pending[:n]
            del pending[:n]
            await self._run_batch(batch, slot)

    async def _run_batch(self, batch: list[_Pending], slot: int) -> None:
        """Insert ``batch`` in one statement (one transaction) and hand every writer the outcome."""
        rows, datas, offset = [], [], 0
        for (id, ts, created, size, rcpts, meta, data), _ in batch:
            rows.append({"i": id, "t": ts, "c": created, "o": offset, "s": size, "r": rcpts,
                         "m": meta})
            datas.append(data)
            offset += size
        params = (b"".join(datas), json.dumps(rows, separators=(",", ":")), self.channel)
        try:
            conn = self._wconns[slot]
            if conn is None or conn.closed:
                self._wconns[slot] = conn = await self._connect()
            await conn.execute(self._sql["insert"], params, prepare=True)
        except Exception as exc:
            conn = self._wconns[slot]
            if conn is not None and conn.closed:
                self._wconns[slot] = None  # connect again for the next batch
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        self.commits += 1
        self.operations += len(batch)
        if len(batch) > self.max_batch_seen:
            self.max_batch_seen = len(batch)
        for row, fut in batch:
            if not fut.done():
                fut.set_result(row[0])

    # --- helpers ------------------------------------------------------------------

    async def _fetch(self, name: str, params: Any = None) -> list[tuple]:
        """Run one statement (its own transaction) and return its rows."""
        pool = self._check_open()
        async with pool.connection() as conn:
            cur = await conn.execute(self._sql[name], params)
            return await cur.fetchall()

    async def _one(self, name: str, id: str, params: Any) -> tuple:
        """Run one statement about ``id``; its first row, or KeyError if it found none."""
        rows = await self._fetch(name, params)
        if not rows:
            raise KeyError(id)
        return rows[0]

    # --- QueueStorage -------------------------------------------------------------

    async def write(self, envelope: Envelope, timestamp: float) -> str:
        """Store a new message due at ``timestamp``; return its id once committed."""
        self._check_open()
        meta, data = envelope_to_record(envelope)
        row = (uuid.uuid4().hex, float(timestamp), float(self._clock()), len(data),
               len(meta["recipients"]), json.dumps(meta, separators=(",", ":")), data)
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((row, fut))
        self._pending_event.set()
        return await fut

    async def get(self, id: str) -> StoredMessage:
        """The message ``id``; KeyError if there is none."""
        meta, data, attempts, delivered, timestamp, last_reply, held, history = await self._one(
            "get", id, (id,))
        return StoredMessage(
            envelope=envelope_from_record(json.loads(meta), data),
            attempts=attempts,
            delivered=set(delivered),
            timestamp=timestamp,
            last_reply=last_reply,
            held=held,
            history=[(float(t), reply) for t, reply in history],
        )

    async def set_timestamp(self, id: str, timestamp: float) -> None:
        """When the next attempt is due (and NOTIFY the listeners)."""
        await self._one("set_timestamp", id, (float(timestamp), id, self.channel))

    async def increment_attempts(self, id: str) -> int:
        """Count one more attempt; return the new count."""
        return (await self._one("increment_attempts", id, (id,)))[0]

    async def set_recipients_delivered(self, id: str, indexes: list[int]) -> None:
        """Add ``indexes`` to the delivered recipients."""
        await self._one("set_delivered", id, ([int(i) for i in indexes], id))

    async def set_last_reply(self, id: str, reply: str | None) -> None:
        """The last relay reply, for operators."""
        await self._one("set_last_reply", id, (reply, id))

    async def set_held(self, id: str, held: bool) -> None:
        """Hold a message or release it (a release is NOTIFYed)."""
        if held:
            await self._one("hold", id, (id,))
        else:
            await self._one("unhold", id, (id, self.channel))

    async def record_attempt(self, id: str, timestamp: float, delivered: list[int],
                             last_reply: str | None, attempted_at: float | None = None) -> int:
        """Record an attempt's results in one statement and end any lease; the new count.

        With ``attempted_at``, ``(attempted_at, last_reply)`` joins the history.
        """
        indexes = [int(i) for i in delivered]
        if attempted_at is None:
            return (await self._one("record_attempt", id, (
                indexes, last_reply, float(timestamp), id)))[0]
        entry = json.dumps([[float(attempted_at), last_reply]])
        return (await self._one("record_attempt_history", id, (
            indexes, last_reply, float(timestamp), entry, id)))[0]

    async def remove(self, id: str) -> bool:
        """Delete the message (and so its lease); False if there was none."""
        return bool(await self._fetch("remove", (id,)))

    async def load(self) -> list[tuple[float, str]]:
        """(next attempt, id) of every message not held, leased ones included."""
        return [(ts, id) for ts, id in await self._fetch("load")]

    async def list(self) -> list[QueueEntry]:
        """Every message, held and leased ones included, ordered by next attempt."""
        entries = []
        for id, meta, delivered, attempts, ts, last_reply, held, size, created in (
                await self._fetch("list")):
            info = json.loads(meta)
            done = set(delivered)
            entries.append(QueueEntry(
                id=id,
                sender=info.get("sender") or "",
                recipients=[r for i, r in enumerate(info.get("recipients") or []) if i not in done],
                attempts=attempts,
                next_attempt=ts,
                last_reply=last_reply,
                held=held,
                size=size,
                created=created,
            ))
        return entries

    async def stats(self) -> dict:
        """``{'messages': n, 'held': n, 'recipients': n, 'bytes': n}``, counted by the database."""
        messages, held, recipients, size = (await self._fetch("stats"))[0]
        return {"messages": messages, "held": held, "recipients": int(recipients),
                "bytes": int(size)}

    # --- SharedQueueStorage -------------------------------------------------------

    async def claim(self, now: float, limit: int, lease: float) -> list[str]:
        """Lease up to ``limit`` due messages, oldest first, until ``now + lease``; their ids."""
        if limit < 1:
            return []
        rows = await self._fetch("claim", {
            "now": float(now), "limit": int(limit), "owner": self.owner,
            "until": float(now) + float(lease)})
        return [id for id, in rows]

    async def renew(self, ids: list[str], now: float, lease: float) -> list[str]:
        """Extend this owner's leases on ``ids`` to ``now + lease``; the ids still held.

        A lease that ran out (expiry at or before ``now``) is not renewed, even
        when nobody claimed the message since.
        """
        if not ids:
            return []
        rows = await self._fetch("renew", (float(now) + float(lease), list(ids), self.owner,
                                           float(now)))
        held = {id for id, in rows}
        return [id for id in ids if id in held]

    async def release(self, id: str, timestamp: float | None = None) -> None:
        """End this owner's lease on ``id`` (next attempt at ``timestamp`` if given); NOTIFY."""
        await self._fetch("release", (None if timestamp is None else float(timestamp), id,
                                      self.owner, self.channel))

    async def next_due(self, now: float) -> float | None:
        """When a claim could next succeed: the earliest next attempt or lease expiry.

        A lease is over at its expiry, so a claim at the time this returns
        succeeds. None when nothing is queued that is not held.
        """
        free, lease_end, later = (await self._fetch("next_due", {"now": float(now)}))[0]
        times = [t for t in (free, lease_end, later) if t is not None]
        return min(times) if times else None
