"""Tests for the queue storages: the QueueStorage contract, run against DictStorage,
SqliteStorage, PostgresStorage and RedisStorage alike (the shared storages' own
contract is in test_shared_storage.py), then what only SqliteStorage promises
(durability, WAL and synchronous=FULL, group commit, schema versions, a SIGKILL
mid-stream). PostgreSQL and Redis are the local test servers: without them the
tests on them fail, never skip."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest
from storage_helpers import (
    PG_DSN,
    RAW,
    REDIS_URL,
    FakeClock,
    assert_every_acknowledged_write_is_stored,
    assert_the_history,
    kill_a_writer_mid_stream,
    make_envelope,
    write_a_history,
)

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
from slimta.queue.storage import HISTORY_LIMIT, QueueStorage


@pytest.fixture(params=["dict", "sqlite", "postgres", "redis"])
async def storage(request, tmp_path):
    clock = FakeClock()
    if request.param == "dict":
        store = DictStorage(clock=clock)
    elif request.param == "sqlite":
        store = SqliteStorage(tmp_path / "sub" / "queue.db", clock=clock)
    elif request.param == "postgres":
        from slimta.queue.postgres import PostgresStorage

        store = PostgresStorage(PG_DSN, schema=request.getfixturevalue("pg_schema"),
                                clock=clock)
    else:
        from slimta.queue.redis import RedisStorage

        store = RedisStorage(REDIS_URL, prefix=request.getfixturevalue("redis_prefix"),
                             clock=clock)
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


async def test_every_byte_value_and_undecodable_addresses_survive(storage):
    raw = b"Subject: all bytes\r\n\r\n" + bytes(range(256)) + b"\r\n"
    sender = b"s\xe9nder@example.com".decode("utf-8", "surrogateescape")  # a lone surrogate
    env = make_envelope(raw, sender=sender, recipients=("r\u00fc@b\u00fccher.example",))
    qid = await storage.write(env, 1.0)
    back = (await storage.get(qid)).envelope
    assert b"".join(back.flatten()) == b"".join(env.flatten())
    assert back.sender == sender
    assert back.recipients == ["r\u00fc@b\u00fccher.example"]


async def test_epoch_times_survive_exactly(storage):
    qid = await storage.write(make_envelope(), 1700000000.123456)
    assert (await storage.get(qid)).timestamp == 1700000000.123456
    assert await storage.load() == [(1700000000.123456, qid)]
    await storage.record_attempt(qid, 1700000300.654321, [], None)
    assert [e.next_attempt for e in await storage.list()] == [1700000300.654321]


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
    await storage.set_recipients_delivered(qid, [2, 1])
    await storage.set_recipients_delivered(qid, [])
    await storage.set_last_reply(qid, "451 4.3.0 try later ünïcode")
    stored = await storage.get(qid)
    assert stored.timestamp == 20.0
    assert stored.attempts == 2
    assert stored.delivered == {1, 2}
    assert stored.pending == [(0, "a@example.org")]
    assert stored.last_reply == "451 4.3.0 try later ünïcode"
    await storage.set_last_reply(qid, None)
    assert (await storage.get(qid)).last_reply is None


async def test_record_attempt_does_it_all(storage):
    qid = await storage.write(make_envelope(), 10.0)
    assert await storage.record_attempt(qid, 310.0, [0], "450 4.2.0 busy") == 1
    assert await storage.record_attempt(qid, 910.0, [2, 0], "451 4.4.1 no answer") == 2
    stored = await storage.get(qid)
    assert (stored.attempts, stored.delivered, stored.timestamp, stored.last_reply) == (
        2, {0, 2}, 910.0, "451 4.4.1 no answer")
    assert await storage.record_attempt(qid, 920.0, [], None) == 3
    assert (await storage.get(qid)).last_reply is None
    assert await storage.load() == [(920.0, qid)]


async def test_a_new_message_has_an_empty_history(storage):
    qid = await storage.write(make_envelope(), 10.0)
    assert (await storage.get(qid)).history == []


async def test_record_attempt_with_a_time_appends_to_the_history(storage):
    qid = await storage.write(make_envelope(), 10.0)
    await storage.record_attempt(qid, 310.0, [0], "450 4.2.0 busy",
                                 attempted_at=1700000010.123456)
    await storage.record_attempt(qid, 910.0, [], None, attempted_at=1700000310.5)
    await storage.record_attempt(qid, 920.0, [], "451 4.4.1 über/\"quoted\"\n",
                                 attempted_at=1700000910.0)
    stored = await storage.get(qid)
    assert stored.history == [(1700000010.123456, "450 4.2.0 busy"), (1700000310.5, None),
                              (1700000910.0, "451 4.4.1 über/\"quoted\"\n")]
    assert all(isinstance(t, float) for t, _ in stored.history)
    assert (stored.attempts, stored.last_reply) == (3, "451 4.4.1 über/\"quoted\"\n")


async def test_record_attempt_without_a_time_leaves_the_history_alone(storage):
    qid = await storage.write(make_envelope(), 10.0)
    await storage.record_attempt(qid, 310.0, [], "450 first", attempted_at=300.0)
    assert await storage.record_attempt(qid, 910.0, [1], "451 second") == 2
    stored = await storage.get(qid)
    assert stored.history == [(300.0, "450 first")]
    assert (stored.attempts, stored.delivered, stored.last_reply) == (2, {1}, "451 second")


async def test_the_history_keeps_the_most_recent_attempts(storage):
    qid = await storage.write(make_envelope(), 10.0)
    other = await storage.write(make_envelope(), 10.0)
    for n in range(HISTORY_LIMIT + 5):
        await storage.record_attempt(qid, 1000.0 + n, [], f"451 try {n}",
                                     attempted_at=1700000000.25 + n)
    await storage.record_attempt(other, 50.0, [], "450 other", attempted_at=40.0)
    stored = await storage.get(qid)
    assert stored.attempts == HISTORY_LIMIT + 5
    assert stored.history == [(1700000000.25 + n, f"451 try {n}")
                              for n in range(5, HISTORY_LIMIT + 5)]
    assert (await storage.get(other)).history == [(40.0, "450 other")]


async def test_the_default_record_attempt_appends_through_the_hook():
    class Plain(DictStorage):
        async def record_attempt(self, *args, **kwargs):
            return await QueueStorage.record_attempt(self, *args, **kwargs)

    store = Plain()
    qid = await store.write(make_envelope(), 1.0)
    assert await store.record_attempt(qid, 2.0, [0], "451 a", attempted_at=1.5) == 1
    assert await store.record_attempt(qid, 3.0, [], "451 b") == 2
    stored = await store.get(qid)
    assert stored.history == [(1.5, "451 a")]
    assert (stored.timestamp, stored.delivered, stored.last_reply) == (3.0, {0}, "451 b")


async def test_the_history_survives_close_and_open(storage):
    qid = await storage.write(make_envelope(), 10.0)
    await storage.record_attempt(qid, 310.0, [], "450 busy", attempted_at=1700000300.654321)
    await storage.close()
    await storage.open()
    assert (await storage.get(qid)).history == [(1700000300.654321, "450 busy")]


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
    assert held.last_reply is None
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
                 storage.set_last_reply(missing, "x"), storage.set_last_reply(missing, None),
                 storage.set_held(missing, True), storage.set_held(missing, False),
                 storage.record_attempt(missing, 1.0, [0], "x")):
        with pytest.raises(KeyError):
            await call
    assert await storage.remove(missing) is False
    assert await storage.list() == []  # no half-made record was left behind


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
    qid = await write_a_history(store)
    await store.close()
    with pytest.raises(RuntimeError, match="not open"):
        await store.get(qid)

    again = SqliteStorage(path)
    await again.open()
    try:
        await assert_the_history(again, qid)
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
                               "held", "created", "size", "meta", "data", "history"]
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


async def test_a_version_1_database_gains_an_empty_history(tmp_path):
    assert SCHEMA_VERSION == 2
    path = tmp_path / "q.db"

    class Version1Storage(SqliteStorage):
        migrations = MIGRATIONS[:1]

    old = Version1Storage(path)
    await old.open()
    qid = await old.write(make_envelope(), 5.0)
    await old.record_attempt(qid, 6.0, [1], "451 later")
    await old.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "history" not in [r[1] for r in conn.execute("PRAGMA table_info(messages)")]
    conn.close()

    new = SqliteStorage(path)
    await new.open()
    try:
        stored = await new.get(qid)
        assert (stored.attempts, stored.delivered, stored.last_reply, stored.history) == (
            1, {1}, "451 later", [])
        assert b"".join(stored.envelope.flatten()) == RAW
        await new.record_attempt(qid, 7.0, [], "451 again", attempted_at=6.5)
        assert (await new.get(qid)).history == [(6.5, "451 again")]
    finally:
        await new.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


# --- kill -9 ----------------------------------------------------------------------------


async def test_sigkill_loses_no_acknowledged_write(tmp_path):
    path = tmp_path / "q.db"
    acknowledged = kill_a_writer_mid_stream(
        "from slimta.queue.sqlite import SqliteStorage", "SqliteStorage(args[0])", str(path))
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    check.close()
    store = SqliteStorage(path)
    await store.open()
    try:
        await assert_every_acknowledged_write_is_stored(store, acknowledged)
    finally:
        await store.close()
