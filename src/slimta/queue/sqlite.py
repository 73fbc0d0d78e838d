"""SqliteStorage: the durable queue storage embedded in one file (the default).

Durability
    The database runs in WAL mode with ``synchronous=FULL`` (and ``fullfsync``
    where the platform has it): the write-ahead log is flushed to stable
    storage at every commit, and :meth:`SqliteStorage.write` returns only
    after the commit that holds the message. So a message the edge
    acknowledged survives a crash of the process, of the kernel, or a power
    loss (given a disk that honours flushes). ``synchronous='NORMAL'`` trades
    that away: after a power loss the last commits may be missing (the
    database stays consistent); after a crash of the process alone nothing is
    lost either way.

Group commit
    One writer thread owns the only connection that writes. Every change
    (write, set_timestamp, record_attempt, remove, ...) is put on its queue
    and awaited. The writer takes *all* operations waiting and runs them in one
    transaction: ``BEGIN IMMEDIATE``, each operation inside its own
    ``SAVEPOINT`` (except those of one SQL statement, such as the insert of a
    new message: SQLite undoes a failed statement by itself), one ``COMMIT``
    (one flush). So the cost of the flush is shared by every concurrent
    enqueue, and durable throughput grows with concurrency (Postfix flushes
    once per message). An operation that fails (an unknown id, say) is
    undone and fails alone; if the commit itself fails, every operation of
    that transaction fails and none is reported as done. ``commits`` counts
    the transactions committed.

Readers
    ``get``, ``load``, ``list`` and ``stats`` run on reader threads, each with
    its own read-only connection; in WAL mode they neither wait for the
    writer nor block it, and they see every change whose call has returned.

Format
    One table, ``messages``: ``id`` (uuid4 hex), ``timestamp`` (next attempt),
    ``attempts``, ``delivered`` (JSON list of recipient indexes),
    ``last_reply``, ``held``, ``created``, ``size``, ``meta`` (the JSON
    metadata of :mod:`slimta.queue.record`), ``data`` (the raw message) and
    ``history`` (a JSON list of ``[time, reply]``, the last attempts; added by
    schema version 2).
    No pickle. The schema version is ``PRAGMA user_version`` and the file is
    marked with ``PRAGMA application_id`` (:data:`APPLICATION_ID`). At open,
    the steps of :data:`MIGRATIONS` that the file lacks (step ``n`` turns
    version ``n`` into ``n + 1``; an empty file is version 0) are applied in
    one transaction. A file from a newer slimta is refused with
    :class:`StorageVersionError`, and so is a file of another application.

Usually one process uses a database file. Two may share it, as the daemon's
``--no-relay`` (edge-only) and ``--no-edge`` (delivering) processes do:
SQLite's locks serialise their writers (each waits up to ``busy_timeout``),
and the delivering queue finds what the other stored by polling
(:attr:`slimta.queue.Queue.poll_interval`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from slimta.envelope import Envelope
from slimta.queue.record import envelope_from_record, envelope_to_record
from slimta.queue.storage import (
    QueueEntry,
    QueueStorage,
    StorageVersionError,
    StoredMessage,
    history_with,
)

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_VERSION", "SqliteStorage",
           "StorageVersionError", "migrate"]

#: ``PRAGMA application_id`` of a slimta queue file ("slQ1").
APPLICATION_ID = 0x736C5131

_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


def _create_v1(conn: sqlite3.Connection) -> None:
    """Version 0 (an empty file) to 1: the messages table and its schedule index."""
    conn.execute(
        "CREATE TABLE messages ("
        " id TEXT PRIMARY KEY,"
        " timestamp REAL NOT NULL,"
        " attempts INTEGER NOT NULL DEFAULT 0,"
        " delivered TEXT NOT NULL DEFAULT '[]',"
        " last_reply TEXT,"
        " held INTEGER NOT NULL DEFAULT 0,"
        " created REAL NOT NULL,"
        " size INTEGER NOT NULL,"
        " meta TEXT NOT NULL,"
        " data BLOB NOT NULL)"
    )
    conn.execute("CREATE INDEX messages_schedule ON messages (held, timestamp)")


def _add_history_v2(conn: sqlite3.Connection) -> None:
    """Version 1 to 2: the attempt history, a JSON list of ``[time, reply]`` (empty for old
    messages)."""
    conn.execute("ALTER TABLE messages ADD COLUMN history TEXT NOT NULL DEFAULT '[]'")


#: The schema migrations: ``MIGRATIONS[n]`` turns a version ``n`` database into
#: version ``n + 1``. Each step runs inside the one transaction of the
#: upgrade, so it must use ``execute`` only (``executescript`` would commit).
MIGRATIONS: Sequence[Callable[[sqlite3.Connection], None]] = (_create_v1, _add_history_v2)

#: The schema version this code writes.
SCHEMA_VERSION = len(MIGRATIONS)


def migrate(conn: sqlite3.Connection, migrations: Sequence[Callable[[sqlite3.Connection], None]],
            path: str = "") -> int:
    """Bring the database of ``conn`` up to ``len(migrations)``, in one transaction.

    Returns the version found. Raises :class:`StorageVersionError` for a newer
    version or a foreign ``application_id``; on any error nothing is changed.
    ``conn`` must be in autocommit mode (``isolation_level=None``).
    """
    target = len(migrations)
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        if app_id not in (0, APPLICATION_ID):
            raise StorageVersionError(
                path, found, target,
                f"{path!r} is not a slimta queue database (application_id {app_id:#x})",
            )
        if found > target:
            raise StorageVersionError(path, found, target)
        for step in migrations[found:]:
            step(conn)
        if found != target:
            conn.execute(f"PRAGMA user_version = {int(target)}")
        if app_id != APPLICATION_ID:
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return found


# --- operations, run on the writer thread with its connection ----------------

def _op_insert(conn: sqlite3.Connection, row: tuple) -> None:
    conn.execute(
        "INSERT INTO messages (id, timestamp, created, size, meta, data) VALUES (?, ?, ?, ?, ?, ?)",
        row,
    )


def _check(cur: sqlite3.Cursor, id: str) -> None:
    if cur.rowcount == 0:
        raise KeyError(id)


def _op_set_timestamp(conn: sqlite3.Connection, id: str, timestamp: float) -> None:
    _check(conn.execute("UPDATE messages SET timestamp = ? WHERE id = ?", (timestamp, id)), id)


def _op_set_last_reply(conn: sqlite3.Connection, id: str, reply: str | None) -> None:
    _check(conn.execute("UPDATE messages SET last_reply = ? WHERE id = ?", (reply, id)), id)


def _op_set_held(conn: sqlite3.Connection, id: str, held: bool) -> None:
    _check(conn.execute("UPDATE messages SET held = ? WHERE id = ?", (int(held), id)), id)


def _op_increment_attempts(conn: sqlite3.Connection, id: str) -> int:
    _check(conn.execute("UPDATE messages SET attempts = attempts + 1 WHERE id = ?", (id,)), id)
    return conn.execute("SELECT attempts FROM messages WHERE id = ?", (id,)).fetchone()[0]


def _merge_delivered(conn: sqlite3.Connection, id: str, indexes: list[int]) -> tuple[str, int]:
    row = conn.execute("SELECT delivered, attempts FROM messages WHERE id = ?", (id,)).fetchone()
    if row is None:
        raise KeyError(id)
    delivered = set(json.loads(row[0]))
    delivered.update(indexes)
    return json.dumps(sorted(delivered)), row[1]


def _op_set_delivered(conn: sqlite3.Connection, id: str, indexes: list[int]) -> None:
    delivered, _ = _merge_delivered(conn, id, indexes)
    conn.execute("UPDATE messages SET delivered = ? WHERE id = ?", (delivered, id))


def _history(text: str) -> list[tuple[float, str | None]]:
    return [(float(t), reply) for t, reply in json.loads(text)]


def _op_record_attempt(conn: sqlite3.Connection, id: str, timestamp: float, indexes: list[int],
                       last_reply: str | None, attempted_at: float | None) -> int:
    delivered, attempts = _merge_delivered(conn, id, indexes)
    attempts += 1
    if attempted_at is None:
        conn.execute(
            "UPDATE messages SET delivered = ?, attempts = ?, last_reply = ?, timestamp = ?"
            " WHERE id = ?",
            (delivered, attempts, last_reply, timestamp, id),
        )
        return attempts
    old = conn.execute("SELECT history FROM messages WHERE id = ?", (id,)).fetchone()[0]
    history = json.dumps(history_with(_history(old), attempted_at, last_reply))
    conn.execute(
        "UPDATE messages SET delivered = ?, attempts = ?, last_reply = ?, timestamp = ?,"
        " history = ? WHERE id = ?",
        (delivered, attempts, last_reply, timestamp, history, id),
    )
    return attempts


def _op_remove(conn: sqlite3.Connection, id: str) -> bool:
    return conn.execute("DELETE FROM messages WHERE id = ?", (id,)).rowcount > 0


#: Operations that run exactly one SQL statement: the writer runs them without a
#: savepoint of their own. SQLite itself undoes a statement that fails; or, after
#: SQLITE_FULL, an I/O error and the like, it may roll back the whole transaction,
#: which the writer sees (``in_transaction`` is false) either way. So a failed
#: single statement never leaves part of its work behind, and the SAVEPOINT and
#: RELEASE around it (two more statements per enqueued message) would buy nothing.
_ONE_STATEMENT = frozenset(
    {_op_insert, _op_set_timestamp, _op_set_last_reply, _op_set_held, _op_remove}
)


# --- reads, run on a reader thread with its connection -------------------------

def _read_get(conn: sqlite3.Connection, id: str) -> StoredMessage:
    row = conn.execute(
        "SELECT meta, data, attempts, delivered, timestamp, last_reply, held, history"
        " FROM messages WHERE id = ?",
        (id,),
    ).fetchone()
    if row is None:
        raise KeyError(id)
    meta, data, attempts, delivered, timestamp, last_reply, held, history = row
    return StoredMessage(
        envelope=envelope_from_record(json.loads(meta), data),
        attempts=attempts,
        delivered=set(json.loads(delivered)),
        timestamp=timestamp,
        last_reply=last_reply,
        held=bool(held),
        history=_history(history),
    )


def _read_load(conn: sqlite3.Connection) -> list[tuple[float, str]]:
    return [
        (ts, id)
        for ts, id in conn.execute(
            "SELECT timestamp, id FROM messages WHERE held = 0 ORDER BY timestamp, rowid"
        )
    ]


def _read_list(conn: sqlite3.Connection) -> list[QueueEntry]:
    entries = []
    for id, meta, delivered, attempts, ts, last_reply, held, size, created in conn.execute(
        "SELECT id, meta, delivered, attempts, timestamp, last_reply, held, size, created"
        " FROM messages ORDER BY timestamp, rowid"
    ):
        info = json.loads(meta)
        done = set(json.loads(delivered))
        entries.append(
            QueueEntry(
                id=id,
                sender=info.get("sender") or "",
                recipients=[r for i, r in enumerate(info.get("recipients") or []) if i not in done],
                attempts=attempts,
                next_attempt=ts,
                last_reply=last_reply,
                held=bool(held),
                size=size,
                created=created,
            )
        )
    return entries


def _read_stats(conn: sqlite3.Connection) -> dict:
    messages, held, recipients, size = conn.execute(
        "SELECT count(*), total(held),"
        " total(json_array_length(meta, '$.recipients') - json_array_length(delivered)),"
        " total(size) FROM messages"
    ).fetchone()
    return {"messages": messages, "held": int(held), "recipients": int(recipients),
            "bytes": int(size)}


# --- threads ---------------------------------------------------------------------

_STOP = object()

# An operation: (function, args, future, loop).
_Op = tuple[Callable[..., Any], tuple, asyncio.Future, asyncio.AbstractEventLoop]
# A result to hand back: (future, exception or None, value).
_Result = tuple[asyncio.Future, BaseException | None, Any]


def _resolve(results: list[_Result]) -> None:
    """On the event loop: complete the futures (those whose caller gave up are skipped)."""
    for fut, exc, value in results:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(value)
        else:
            fut.set_exception(exc)


def _hand_back(results: list[_Result], loops: list[asyncio.AbstractEventLoop]) -> None:
    """From a worker thread: one wake-up per event loop for a whole batch of results."""
    if len(loops) == 1 or all(loop is loops[0] for loop in loops):
        groups = {loops[0]: results} if loops else {}
    else:
        groups = {}
        for loop, result in zip(loops, results, strict=True):
            groups.setdefault(loop, []).append(result)
    for loop, items in groups.items():
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
            loop.call_soon_threadsafe(_resolve, items)


class SqliteStorage(QueueStorage):
    """A durable :class:`~slimta.queue.storage.QueueStorage` in one SQLite file.

    ``SqliteStorage('var/queue.db')``: the directory and file are created at
    :meth:`open`. ``synchronous`` is the SQLite setting (``'FULL'``, the
    default, makes every acknowledged message survive power loss; see the
    module documentation); ``busy_timeout`` (seconds) is how long a
    connection waits for a lock held by another process; ``readers`` is the
    number of reader threads; ``max_batch`` bounds how many operations share
    one transaction; ``clock`` gives the creation time of messages.

    Ids are uuid4 hex. Operations on an id that is not stored raise
    :class:`KeyError`, except :meth:`remove`, which returns False. After
    :meth:`close`, operations raise :class:`RuntimeError`.

    A caller that is cancelled while its change waits for the writer does not
    withdraw the change: it may still be committed (a message may then be
    delivered although its sender got no reply, never lost).
    """

    #: The schema steps this storage applies at open (see :data:`MIGRATIONS`).
    migrations: Sequence[Callable[[sqlite3.Connection], None]] = MIGRATIONS

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        busy_timeout: float = 30.0,
        readers: int = 2,
        max_batch: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = os.fspath(path)
        if self.path == ":memory:" or self.path.startswith("file:") or not self.path:
            raise ValueError("SqliteStorage needs a file path (use DictStorage for memory)")
        sync = str(synchronous).upper()
        if sync not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}")
        if readers < 1 or max_batch < 1:
            raise ValueError("readers and max_batch must be at least 1")
        self.synchronous = sync
        self.busy_timeout = busy_timeout
        self.max_batch = max_batch
        self._n_readers = readers
        self._clock = clock
        #: Transactions committed by the writer (one per batch of operations).
        self.commits = 0
        #: Operations those transactions carried.
        self.operations = 0
        self._wq: queue.SimpleQueue = queue.SimpleQueue()
        self._rq: queue.SimpleQueue = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._readers: list[threading.Thread] = []
        self._open = False
        self._failed: BaseException | None = None

    # --- life cycle --------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout)
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        return conn

    @staticmethod
    def _start_thread(target: Callable[..., None], name: str,
                      loop: asyncio.AbstractEventLoop) -> tuple[threading.Thread, asyncio.Future]:
        """Start ``target(ready, loop)``; ``ready`` completes once its connection is set up."""
        ready = loop.create_future()
        thread = threading.Thread(target=target, args=(ready, loop), name=name, daemon=True)
        thread.start()
        return thread, ready

    async def open(self) -> None:
        """Create the directory, file and tables (or migrate them); start the threads."""
        if self._open:
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._failed = None
        self._wq = queue.SimpleQueue()
        self._rq = queue.SimpleQueue()
        self._writer, ready = self._start_thread(self._writer_main, "slimta-sqlite-writer", loop)
        await ready  # the schema is in place (or the error is raised here)
        started = [
            self._start_thread(self._reader_main, f"slimta-sqlite-reader-{n}", loop)
            for n in range(self._n_readers)
        ]
        self._readers = [thread for thread, _ in started]
        self._open = True
        try:
            await asyncio.gather(*(ready for _, ready in started))
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Finish the operations already submitted, then stop the threads."""
        if not self._open:
            return
        self._open = False
        self._wq.put(_STOP)
        for _ in self._readers:
            self._rq.put(_STOP)
        threads = [t for t in (self._writer, *self._readers) if t is not None]
        await asyncio.to_thread(lambda: [t.join() for t in threads])
        self._writer = None
        self._readers = []

    async def __aenter__(self) -> SqliteStorage:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- the writer ---------------------------------------------------------------

    def _writer_main(self, ready: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        try:
            conn = self._connect()
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL journal mode on {self.path!r}")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            if self.synchronous in ("FULL", "EXTRA"):
                conn.execute("PRAGMA fullfsync = ON")
                conn.execute("PRAGMA checkpoint_fullfsync = ON")
            migrate(conn, self.migrations, self.path)
        except BaseException as exc:
            _hand_back([(ready, exc, None)], [loop])
            return
        _hand_back([(ready, None, None)], [loop])
        try:
            self._writer_loop(conn)
        except BaseException as exc:  # a bug: fail what waits rather than hang it
            self._failed = exc
            self._drain(self._wq, exc)
            raise
        finally:
            conn.close()

    def _writer_loop(self, conn: sqlite3.Connection) -> None:
        get, get_nowait, max_batch = self._wq.get, self._wq.get_nowait, self.max_batch
        while True:
            op = get()
            if op is _STOP:
                return
            batch = [op]
            stop = False
            while len(batch) < max_batch:
                try:
                    op = get_nowait()
                except queue.Empty:
                    break
                if op is _STOP:
                    stop = True
                    break
                batch.append(op)
            self._run_batch(conn, batch)
            if stop:
                return

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        """Run ``batch`` in one transaction and hand every caller its own outcome."""
        execute = conn.execute
        results: list[_Result] = []
        loops = [op[3] for op in batch]
        try:
            execute("BEGIN IMMEDIATE")
        except BaseException as exc:
            _hand_back([(op[2], exc, None) for op in batch], loops)
            return
        lost: BaseException | None = None
        one_statement = _ONE_STATEMENT
        for fn, args, fut, _loop in batch:
            if lost is not None:
                results.append((fut, lost, None))
                continue
            savepoint = fn not in one_statement
            if savepoint:
                execute("SAVEPOINT op")
            try:
                value = fn(conn, *args)
            except Exception as exc:
                if not conn.in_transaction:  # SQLite rolled it all back (disk full, I/O error)
                    lost = exc
                elif savepoint:
                    try:
                        execute("ROLLBACK TO op")
                        execute("RELEASE op")
                    except sqlite3.Error as rollback_exc:
                        lost = rollback_exc
                results.append((fut, exc, None))
            else:
                if savepoint:
                    execute("RELEASE op")
                results.append((fut, None, value))
        if lost is None:
            try:
                execute("COMMIT")
            except BaseException as exc:
                lost = exc
        if lost is not None:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    execute("ROLLBACK")
            # Nothing of this transaction is durable: nobody may hear otherwise.
            results = [(fut, exc if exc is not None else lost, None) for fut, exc, _ in results]
        else:
            self.commits += 1
            self.operations += len(batch)
        _hand_back(results, loops)

    def _drain(self, q: queue.SimpleQueue, exc: BaseException) -> None:
        while True:
            try:
                op = q.get_nowait()
            except queue.Empty:
                return
            if op is not _STOP:
                _hand_back([(op[2], exc, None)], [op[3]])

    def _submit(self, q: queue.SimpleQueue, fn: Callable[..., Any], args: tuple) -> asyncio.Future:
        if not self._open:
            raise RuntimeError("SqliteStorage is not open")
        if self._failed is not None:
            raise RuntimeError("SqliteStorage failed") from self._failed
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        q.put((fn, args, fut, loop))
        return fut

    def _write(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Queue ``fn(conn, *args)`` for the writer; the future completes after the commit."""
        return self._submit(self._wq, fn, args)

    # --- the readers --------------------------------------------------------------

    def _reader_main(self, ready: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        try:
            conn = self._connect()
            conn.execute("PRAGMA query_only = ON")
        except BaseException as exc:
            _hand_back([(ready, exc, None)], [loop])
            return
        _hand_back([(ready, None, None)], [loop])
        get = self._rq.get
        try:
            while True:
                op = get()
                if op is _STOP:
                    return
                fn, args, fut, op_loop = op
                try:
                    result: _Result = (fut, None, fn(conn, *args))
                except Exception as exc:
                    result = (fut, exc, None)
                _hand_back([result], [op_loop])
        finally:
            conn.close()

    def _read(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        return self._submit(self._rq, fn, args)

    # --- QueueStorage --------------------------------------------------------------

    async def write(self, envelope: Envelope, timestamp: float) -> str:
        meta, data = envelope_to_record(envelope)
        id = uuid.uuid4().hex
        row = (id, float(timestamp), self._clock(), len(data),
               json.dumps(meta, separators=(",", ":")), data)
        await self._write(_op_insert, row)
        return id

    async def get(self, id: str) -> StoredMessage:
        return await self._read(_read_get, id)

    async def set_timestamp(self, id: str, timestamp: float) -> None:
        await self._write(_op_set_timestamp, id, float(timestamp))

    async def increment_attempts(self, id: str) -> int:
        return await self._write(_op_increment_attempts, id)

    async def set_recipients_delivered(self, id: str, indexes: list[int]) -> None:
        await self._write(_op_set_delivered, id, [int(i) for i in indexes])

    async def set_last_reply(self, id: str, reply: str | None) -> None:
        await self._write(_op_set_last_reply, id, reply)

    async def set_held(self, id: str, held: bool) -> None:
        await self._write(_op_set_held, id, bool(held))

    async def record_attempt(self, id: str, timestamp: float, delivered: list[int],
                             last_reply: str | None, attempted_at: float | None = None) -> int:
        return await self._write(_op_record_attempt, id, float(timestamp),
                                 [int(i) for i in delivered], last_reply,
                                 None if attempted_at is None else float(attempted_at))

    async def remove(self, id: str) -> bool:
        return await self._write(_op_remove, id)

    async def load(self) -> list[tuple[float, str]]:
        return await self._read(_read_load)

    async def list(self) -> list[QueueEntry]:
        return await self._read(_read_list)

    async def stats(self) -> dict:
        return await self._read(_read_stats)
