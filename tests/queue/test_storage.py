"""Tests for the queue storages: the QueueStorage contract, run against DictStorage and
SqliteStorage alike, then what only SqliteStorage promises (durability, WAL and
synchronous=FULL, group commit, schema versions, a SIGKILL mid-stream)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import slimta
from slimta.envelope import Envelope
from slimta.queue.dict import DictStorage
from slimta.queue.sqlite import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA_VERSION,
    SqliteStorage,
    StorageVersionError,
    migrate,
)

RAW = (
    "From: Jörg <jörg@exämple.de>\r\n".encode()
    + b"Subject: caf\xe9 (latin-1 bytes)\r\n"
    + b"\r\n"
    + b"8-bit body \xff\xfe\x00\r\n.\r\nend\r\n"
)


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        self.now += 1
        return self.now


def make_envelope(raw: bytes = RAW, sender: str = "sender@example.com",
                  recipients: tuple[str, ...] = ("a@example.org", "b@example.org",
                                                 "c@example.org")) -> Envelope:
    env = Envelope(sender, [])
    for rcpt in recipients:
        env.add_recipient(rcpt)
    env.rcpt_params[recipients[0]] = {"notify": ["SUCCESS", "FAILURE"],
                                      "orcpt": f"rfc822;{recipients[0]}"}
    env.parse(raw)
    env.client.update(ip="192.0.2.1", host="client.example.com", name="client",
                      protocol="ESMTPS", auth=None)
    env.receiver = "mx.example.net"
    env.timestamp = 1700000000.5
    env.ret = "FULL"
    env.envid = "envid+1"
    env.smtputf8 = True
    env.body = "8BITMIME"
    return env


@pytest.fixture(params=["dict", "sqlite"])
async def storage(request, tmp_path):
    clock = FakeClock()
    if request.param == "dict":
        store = DictStorage(clock=clock)
    else:
        store = SqliteStorage(tmp_path / "sub" / "queue.db", clock=clock)
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def sqlite_storage(tmp_path):
    store = SqliteStorage(tmp_path / "queue.db")
    await store.open()
    yield store
    await store.close()


# --- the contract, for every storage --------------------------------------------


async def test_write_get_round_trip_is_byte_exact(storage):
    env = make_envelope()
    qid = await storage.write(env, 1234.5)
    assert isinstance(qid, str)
    assert len(qid) == 32 and int(qid, 16) >= 0
    stored = await storage.get(qid)
    back = stored.envelope
    assert back is not env
    assert b"".join(back.flatten()) == RAW
    for attr in ("sender", "recipients", "client", "receiver", "timestamp", "ret", "envid",
                 "auth", "rcpt_params", "smtputf8", "body", "message"):
        assert getattr(back, attr) == getattr(env, attr), attr
    assert back.headers["From"] == "Jörg <jörg@exämple.de>"
    assert (stored.attempts, stored.delivered, stored.timestamp) == (0, set(), 1234.5)
    assert (stored.last_reply, stored.held) == (None, False)
    assert stored.pending == [(0, "a@example.org"), (1, "b@example.org"), (2, "c@example.org")]


async def test_changed_headers_are_stored(storage):
    env = make_envelope()
    env.prepend_header("Received", "from client by mx; Mon, 1 Jan 2024 00:00:00 +0000")
    env.headers["X-Added"] = "ja wöhl"
    qid = await storage.write(env, 0)
    back = (await storage.get(qid)).envelope
    assert b"".join(back.flatten()) == b"".join(env.flatten())


async def test_get_returns_a_fresh_envelope(storage):
    env = make_envelope()
    qid = await storage.write(env, 0)
    env.recipients.append("late@example.org")
    env.client["ip"] = "198.51.100.7"
    env.headers["X-Later"] = "1"
    first = (await storage.get(qid)).envelope
    assert first.recipients == ["a@example.org", "b@example.org", "c@example.org"]
    assert first.client["ip"] == "192.0.2.1"
    first.recipients.clear()
    first.rcpt_params["a@example.org"]["notify"].append("DELAY")
    first.headers["Subject"] = "changed"
    second = (await storage.get(qid)).envelope
    assert second is not first
    assert second.recipients == ["a@example.org", "b@example.org", "c@example.org"]
    assert second.notify("a@example.org") == ["SUCCESS", "FAILURE"]
    assert b"".join(second.flatten()) == RAW


async def test_metadata_that_is_not_json_is_refused(storage):
    env = make_envelope()
    env.client["socket"] = object()
    with pytest.raises(TypeError):
        await storage.write(env, 0)
    assert await storage.list() == []


async def test_schedule_attempts_and_results(storage):
    qid = await storage.write(make_envelope(), 10.0)
    await storage.set_timestamp(qid, 20.0)
    assert await storage.increment_attempts(qid) == 1
    assert await storage.increment_attempts(qid) == 2
    await storage.set_recipients_delivered(qid, [1])
    await storage.set_recipients_delivered(qid, [1, 2])
    await storage.set_last_reply(qid, "451 4.3.0 try later")
    stored = await storage.get(qid)
    assert stored.timestamp == 20.0
    assert stored.attempts == 2
    assert stored.delivered == {1, 2}
    assert stored.pending == [(0, "a@example.org")]
    assert stored.last_reply == "451 4.3.0 try later"
    await storage.set_last_reply(qid, None)
    assert (await storage.get(qid)).last_reply is None


async def test_record_attempt_does_it_all(storage):
    qid = await storage.write(make_envelope(), 10.0)
    assert await storage.record_attempt(qid, 310.0, [0], "450 4.2.0 busy") == 1
    assert await storage.record_attempt(qid, 910.0, [], "451 4.4.1 no answer") == 2
    stored = await storage.get(qid)
    assert (stored.attempts, stored.delivered, stored.timestamp, stored.last_reply) == (
        2, {0}, 910.0, "451 4.4.1 no answer")


async def test_hold_and_release(storage):
    a = await storage.write(make_envelope(), 30.0)
    b = await storage.write(make_envelope(), 10.0)
    c = await storage.write(make_envelope(), 20.0)
    await storage.set_held(b, True)
    assert (await storage.get(b)).held is True
    assert await storage.load() == [(20.0, c), (30.0, a)]
    assert [e.id for e in await storage.list()] == [b, c, a]  # held ones are listed
    await storage.set_held(b, False)
    assert (await storage.get(b)).held is False
    assert await storage.load() == [(10.0, b), (20.0, c), (30.0, a)]


async def test_load_and_list_order_by_next_attempt_then_arrival(storage):
    ids = [await storage.write(make_envelope(), ts) for ts in (5.0, 1.0, 5.0, 3.0, 5.0)]
    expected = [ids[1], ids[3], ids[0], ids[2], ids[4]]
    assert [qid for _, qid in await storage.load()] == expected
    assert [e.id for e in await storage.list()] == expected
    await storage.set_timestamp(ids[1], 9.0)
    assert (await storage.load())[-1] == (9.0, ids[1])


async def test_list_fields(storage):
    qid = await storage.write(make_envelope(), 50.0)
    bounce = await storage.write(make_envelope(b"Subject: x\r\n\r\nbody\r\n", sender=""), 60.0)
    await storage.record_attempt(qid, 70.0, [0, 2], "450 4.2.1 mailbox busy")
    await storage.set_held(bounce, True)
    entries = await storage.list()
    assert [e.id for e in entries] == [bounce, qid]
    held, entry = entries
    assert entry.sender == "sender@example.com"
    assert entry.recipients == ["b@example.org"]  # only those not yet delivered
    assert entry.attempts == 1
    assert entry.next_attempt == 70.0
    assert entry.last_reply == "450 4.2.1 mailbox busy"
    assert entry.held is False
    assert entry.size == len(RAW)
    assert held.sender == ""
    assert held.held is True
    assert held.size == len(b"Subject: x\r\n\r\nbody\r\n")
    assert held.attempts == 0
    assert held.created > entry.created > 1000.0  # from the injected clock, in order


async def test_stats(storage):
    assert await storage.stats() == {"messages": 0, "held": 0, "recipients": 0, "bytes": 0}
    a = await storage.write(make_envelope(), 0)
    b = await storage.write(make_envelope(recipients=("x@example.org",)), 0)
    await storage.set_recipients_delivered(a, [0])
    await storage.set_held(b, True)
    assert await storage.stats() == {
        "messages": 2, "held": 1, "recipients": 3, "bytes": 2 * len(RAW)}


async def test_remove(storage):
    qid = await storage.write(make_envelope(), 0)
    other = await storage.write(make_envelope(), 0)
    assert await storage.remove(qid) is True
    assert await storage.remove(qid) is False
    with pytest.raises(KeyError):
        await storage.get(qid)
    assert [e.id for e in await storage.list()] == [other]
    assert await storage.load() == [(0.0, other)]


async def test_missing_ids_raise_key_error(storage):
    missing = "0" * 32
    with pytest.raises(KeyError):
        await storage.get(missing)
    for call in (storage.set_timestamp(missing, 1.0), storage.increment_attempts(missing),
                 storage.set_recipients_delivered(missing, [0]),
                 storage.set_last_reply(missing, "x"), storage.set_held(missing, True),
                 storage.record_attempt(missing, 1.0, [0], "x")):
        with pytest.raises(KeyError):
            await call
    assert await storage.remove(missing) is False


async def test_concurrent_writes_are_all_readable(storage):
    def env(n: int) -> Envelope:
        return make_envelope(b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n),
                             recipients=(f"r{n}@example.org",))

    ids = await asyncio.gather(*(storage.write(env(n), float(n)) for n in range(100)))
    assert len(set(ids)) == 100
    stored = await asyncio.gather(*(storage.get(qid) for qid in ids))
    for n, message in enumerate(stored):
        assert message.envelope.recipients == [f"r{n}@example.org"]
        assert b"".join(message.envelope.flatten()) == b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n)
    assert [qid for _, qid in await storage.load()] == ids
    assert (await storage.stats())["messages"] == 100


# --- SqliteStorage ---------------------------------------------------------------------


async def test_sqlite_data_survives_close_and_reopen(tmp_path):
    path = tmp_path / "queue.db"
    store = SqliteStorage(path)
    await store.open()
    qid = await store.write(make_envelope(), 42.0)
    gone = await store.write(make_envelope(), 43.0)
    await store.record_attempt(qid, 300.0, [1], "451 later")
    await store.remove(gone)
    await store.close()
    with pytest.raises(RuntimeError, match="not open"):
        await store.get(qid)

    again = SqliteStorage(path)
    await again.open()
    try:
        stored = await again.get(qid)
        assert b"".join(stored.envelope.flatten()) == RAW
        assert stored.envelope.rcpt_params == make_envelope().rcpt_params
        assert (stored.attempts, stored.delivered, stored.timestamp, stored.last_reply) == (
            1, {1}, 300.0, "451 later")
        assert await again.load() == [(300.0, qid)]
    finally:
        await again.close()


async def test_sqlite_creates_directories_and_is_wal_and_synchronous_full(tmp_path):
    path = tmp_path / "var" / "spool" / "queue.db"
    store = SqliteStorage(path)
    await store.open()
    try:
        assert path.exists()
        sync = await store._write(lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0])
        assert sync == 2  # FULL
        schema = sqlite3.connect(path)
        try:
            assert schema.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert schema.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
            assert schema.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
            columns = [row[1] for row in schema.execute("PRAGMA table_info(messages)")]
            assert columns == ["id", "timestamp", "attempts", "delivered", "last_reply",
                               "held", "created", "size", "meta", "data"]
            indexes = [row[1] for row in schema.execute("PRAGMA index_list(messages)")]
            assert "messages_schedule" in indexes
            plan = " ".join(str(r) for r in schema.execute(
                "EXPLAIN QUERY PLAN SELECT timestamp, id FROM messages WHERE held = 0"
                " ORDER BY timestamp, rowid"))
            assert "messages_schedule" in plan
        finally:
            schema.close()
    finally:
        await store.close()


async def test_sqlite_synchronous_is_configurable(tmp_path):
    store = SqliteStorage(tmp_path / "q.db", synchronous="normal")
    await store.open()
    try:
        assert await store._write(
            lambda conn: conn.execute("PRAGMA synchronous").fetchone()[0]) == 1
    finally:
        await store.close()
    with pytest.raises(ValueError):
        SqliteStorage(tmp_path / "q.db", synchronous="sometimes")
    with pytest.raises(ValueError):
        SqliteStorage(":memory:")


async def test_sqlite_stores_raw_bytes_and_json_not_pickle(sqlite_storage, tmp_path):
    qid = await sqlite_storage.write(make_envelope(), 1.0)
    conn = sqlite3.connect(tmp_path / "queue.db")
    try:
        meta, data, delivered = conn.execute(
            "SELECT meta, data, delivered FROM messages WHERE id = ?", (qid,)).fetchone()
    finally:
        conn.close()
    assert data == RAW
    assert meta.startswith('{"v":1,')
    assert delivered == "[]"


class Blocker:
    """An operation that keeps the writer busy (inside its transaction) until released.

    ``await blocker.start(store)`` returns once the writer is inside it.
    """

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.done: asyncio.Future | None = None

    def __call__(self, conn):
        self.entered.set()
        assert self.release.wait(10)

    async def start(self, store: SqliteStorage, op=None) -> None:
        self.done = store._write(op or self)
        assert await asyncio.to_thread(self.entered.wait, 10)

    async def finish(self) -> None:
        self.release.set()
        await self.done


async def test_group_commit_batches_concurrent_writes(sqlite_storage):
    store = sqlite_storage
    blocker = Blocker()
    await blocker.start(store)  # the writer is inside that transaction now
    before = store.commits
    writes = asyncio.gather(*(store.write(make_envelope(), float(n)) for n in range(50)))
    await asyncio.sleep(0.05)  # every write is queued
    await blocker.finish()
    ids = await writes
    # the blocked transaction, then all 50 writes together in one more
    assert store.commits - before == 2
    assert len(await store.load()) == 50 == len(set(ids))

    # without any help, 50 concurrent writers still share transactions
    before = store.commits
    await asyncio.gather(*(store.write(make_envelope(), 0.0) for _ in range(50)))
    assert store.commits - before < 25


async def test_max_batch_bounds_a_transaction(tmp_path):
    store = SqliteStorage(tmp_path / "q.db", max_batch=5)
    await store.open()
    try:
        blocker = Blocker()
        await blocker.start(store)
        before = store.commits
        writes = asyncio.gather(*(store.write(make_envelope(), 0.0) for _ in range(12)))
        await asyncio.sleep(0.05)
        await blocker.finish()
        assert len(set(await writes)) == 12
        assert store.commits - before == 1 + 3  # the blocker, then 5 + 5 + 2
    finally:
        await store.close()


async def test_a_cancelled_write_may_still_be_stored_and_nothing_breaks(sqlite_storage):
    store = sqlite_storage
    blocker = Blocker()
    await blocker.start(store)
    task = asyncio.ensure_future(store.write(make_envelope(), 1.0))
    await asyncio.sleep(0)
    task.cancel()
    await blocker.finish()
    with pytest.raises(asyncio.CancelledError):
        await task
    qid = await store.write(make_envelope(), 2.0)
    # at least once: the cancelled caller's message was committed all the same
    assert [ts for ts, _ in await store.load()] == [1.0, 2.0]
    assert (await store.load())[1] == (2.0, qid)


async def test_one_failing_operation_fails_alone(sqlite_storage):
    store = sqlite_storage
    existing = await store.write(make_envelope(), 1.0)
    blocker = Blocker()
    await blocker.start(store)
    before = store.commits

    def half_done_then_fails(conn):
        conn.execute("UPDATE messages SET attempts = 99 WHERE id = ?", (existing,))
        raise ValueError("boom")

    def sql_error(conn):
        conn.execute("INSERT INTO messages (id, timestamp, created, size, meta, data)"
                     " VALUES (?, 0, 0, 0, '{}', x'')", (existing,))  # duplicate id

    first = asyncio.ensure_future(store.write(make_envelope(), 2.0))
    failing = store._write(half_done_then_fails)
    missing = asyncio.ensure_future(store.set_timestamp("f" * 32, 5.0))
    duplicate = store._write(sql_error)
    attempts = asyncio.ensure_future(store.increment_attempts(existing))
    last = asyncio.ensure_future(store.write(make_envelope(), 3.0))
    await asyncio.sleep(0.05)
    await blocker.finish()
    results = await asyncio.gather(first, failing, missing, duplicate, attempts, last,
                                   return_exceptions=True)
    assert store.commits - before == 2  # the blocker's transaction, then one for all six
    assert isinstance(results[1], ValueError)
    assert isinstance(results[2], KeyError)
    assert isinstance(results[3], sqlite3.IntegrityError)
    assert results[4] == 1  # the failed UPDATE to 99 was rolled back to its savepoint
    stored = await store.get(existing)
    assert stored.attempts == 1
    assert [qid for _, qid in await store.load()] == [existing, results[0], results[5]]


async def test_a_lost_transaction_fails_every_operation_in_it(sqlite_storage):
    """When SQLite rolls the whole transaction back, nobody may hear 'done'."""
    store = sqlite_storage
    blocker = Blocker()
    await blocker.start(store)

    def transaction_lost(conn):
        conn.execute("ROLLBACK")  # what SQLite does itself on SQLITE_FULL or an I/O error
        raise sqlite3.OperationalError("database or disk is full")

    before = store.commits
    first = asyncio.ensure_future(store.write(make_envelope(), 1.0))
    lost = store._write(transaction_lost)
    after = asyncio.ensure_future(store.write(make_envelope(), 2.0))
    await asyncio.sleep(0.05)
    await blocker.finish()
    results = await asyncio.gather(first, lost, after, return_exceptions=True)
    assert all(isinstance(r, sqlite3.OperationalError) for r in results), results
    assert store.commits - before == 1  # the blocker's transaction only
    assert await store.load() == []
    # and the writer goes on
    qid = await store.write(make_envelope(), 3.0)
    assert await store.load() == [(3.0, qid)]


async def test_readers_are_not_blocked_by_the_writer(sqlite_storage):
    store = sqlite_storage
    qid = await store.write(make_envelope(), 1.0)
    blocker = Blocker()

    def hold_write_lock(conn):
        conn.execute("UPDATE messages SET attempts = 7 WHERE id = ?", (qid,))
        blocker(conn)

    await blocker.start(store, hold_write_lock)
    try:
        stored = await asyncio.wait_for(store.get(qid), 2)
        assert stored.attempts == 0  # the uncommitted change is not seen
        assert await asyncio.wait_for(store.load(), 2) == [(1.0, qid)]
        assert len(await asyncio.wait_for(store.list(), 2)) == 1
    finally:
        await blocker.finish()
    assert (await store.get(qid)).attempts == 7


async def test_close_finishes_pending_operations(tmp_path):
    store = SqliteStorage(tmp_path / "q.db")
    await store.open()
    writes = [asyncio.ensure_future(store.write(make_envelope(), float(n))) for n in range(20)]
    await asyncio.sleep(0)  # they are queued
    await store.close()
    ids = await asyncio.gather(*writes)
    again = SqliteStorage(tmp_path / "q.db")
    await again.open()
    try:
        assert sorted(qid for _, qid in await again.load()) == sorted(ids)
    finally:
        await again.close()


# --- schema versions ------------------------------------------------------------------


async def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "q.db"
    store = SqliteStorage(path)
    await store.open()
    await store.close()
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    newer = SqliteStorage(path)
    with pytest.raises(StorageVersionError) as info:
        await newer.open()
    message = str(info.value)
    assert f"version {SCHEMA_VERSION + 5}" in message
    assert f"version {SCHEMA_VERSION}" in message
    assert str(path) in message
    assert (info.value.found, info.value.supported) == (SCHEMA_VERSION + 5, SCHEMA_VERSION)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 5  # untouched
    conn.close()
    with pytest.raises(RuntimeError):
        await newer.write(make_envelope(), 0)


async def test_a_database_of_another_application_is_refused(tmp_path):
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA application_id = 1234")
    conn.execute("CREATE TABLE theirs (x)")
    conn.commit()
    conn.close()
    with pytest.raises(StorageVersionError, match="not a slimta queue"):
        await SqliteStorage(path).open()


def test_migrate_runs_each_missing_step_in_one_transaction(tmp_path):
    calls = []

    def step(n):
        def run(conn):
            assert conn.in_transaction
            calls.append(n)
            conn.execute(f"CREATE TABLE t{n} (x)")
        return run

    conn = sqlite3.connect(tmp_path / "m.db", isolation_level=None)
    try:
        assert migrate(conn, [step(0), step(1)]) == 0
        assert calls == [0, 1]
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
        assert migrate(conn, [step(0), step(1), step(2)]) == 2
        assert calls == [0, 1, 2]

        def broken(conn):
            conn.execute("CREATE TABLE t_half (x)")
            raise RuntimeError("step failed")

        with pytest.raises(RuntimeError, match="step failed"):
            migrate(conn, [step(0), step(1), step(2), step(3), broken])
        # all or nothing: neither t3 nor t_half, and still version 3
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert tables == {"t0", "t1", "t2"}
        assert not conn.in_transaction
    finally:
        conn.close()


async def test_open_migrates_an_older_database_and_keeps_its_messages(tmp_path):
    path = tmp_path / "q.db"
    old = SqliteStorage(path)
    await old.open()
    qid = await old.write(make_envelope(), 5.0)
    await old.close()

    def add_priority(conn):
        conn.execute("ALTER TABLE messages ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")

    class NextStorage(SqliteStorage):
        migrations = (*MIGRATIONS, add_priority)

    new = NextStorage(path)
    await new.open()
    try:
        assert b"".join((await new.get(qid)).envelope.flatten()) == RAW
        assert await new.load() == [(5.0, qid)]
        qid2 = await new.write(make_envelope(), 6.0)
        assert len(await new.list()) == 2 and qid2
    finally:
        await new.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    assert "priority" in [r[1] for r in conn.execute("PRAGMA table_info(messages)")]
    conn.close()
    # and now this slimta is the older one
    with pytest.raises(StorageVersionError):
        await SqliteStorage(path).open()


# --- kill -9 ----------------------------------------------------------------------------

CHILD = r"""
import asyncio, sys, time
from slimta.envelope import Envelope
from slimta.queue.sqlite import SqliteStorage

async def main(path):
    store = SqliteStorage(path)
    await store.open()
    out = sys.stdout

    async def writer(n):
        for i in range(1_000_000):
            env = Envelope("a@example.com", [f"{n}.{i}@example.org"])
            env.parse(b"Subject: %d.%d\r\n\r\n" % (n, i) + b"x" * 1000 + b"\r\n")
            qid = await store.write(env, time.time())
            out.write(f"{qid} {n}.{i}\n")
            out.flush()

    await asyncio.gather(*(writer(n) for n in range(20)))

asyncio.run(main(sys.argv[1]))
"""


async def test_sigkill_loses_no_acknowledged_write(tmp_path):
    path = tmp_path / "q.db"
    src = str(Path(slimta.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    acknowledged: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:  # kill it mid-stream
            qid, tag = line.decode().split()
            acknowledged[qid] = tag
            if len(acknowledged) >= 600 or time.monotonic() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()  # what it printed before it died was acknowledged too
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        stderr = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    for line in rest.split(b"\n")[:-1]:  # complete lines only
        qid, tag = line.decode().split()
        acknowledged[qid] = tag
    assert len(acknowledged) >= 600

    check = sqlite3.connect(path)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()
    store = SqliteStorage(path)
    await store.open()
    try:
        stored_ids = {qid for _, qid in await store.load()}
        missing = set(acknowledged) - stored_ids
        assert not missing, f"{len(missing)} acknowledged messages lost"
        for qid, tag in itertools.islice(acknowledged.items(), 0, None, 50):
            message = await store.get(qid)
            assert message.envelope.recipients == [f"{tag}@example.org"]
            assert message.envelope.headers["Subject"] == tag
    finally:
        await store.close()
