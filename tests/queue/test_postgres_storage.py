"""Tests for what only PostgresStorage does, against the machine's real PostgreSQL:
its storage format, group commit, NOTIFY channels and the listener, life cycle,
schema versions and migrations, settings, and a SIGKILL of the writing process.
The QueueStorage and SharedQueueStorage contracts run on it in test_storage.py and
test_shared_storage.py.

Each test works in a schema of its own (``t_<random>``), dropped afterwards.
The server is ``postgresql://127.0.0.1:5432/test`` unless ``SLIMTA_TEST_POSTGRES``
names another; when it cannot be reached the tests fail (never skip).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import uuid

import psycopg
import pytest
from storage_helpers import (
    RAW,
    FakeClock,
    Waker,
    assert_every_acknowledged_write_is_stored,
    assert_the_history,
    kill_a_writer_mid_stream,
    make_envelope,
    write_a_history,
)

from slimta.queue.postgres import (
    MIGRATIONS,
    SCHEMA_VERSION,
    PostgresStorage,
    StorageVersionError,
    migrate,
)

DSN = os.environ.get("SLIMTA_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    """The test server's DSN; fails every test that needs it when it is unreachable."""
    try:
        with psycopg.connect(DSN, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        pytest.fail(f"PostgreSQL is not reachable at {DSN} (set SLIMTA_TEST_POSTGRES): {exc}",
                    pytrace=False)
    return DSN


def sql(query: str, params: tuple = ()) -> list[tuple]:
    """Run one statement on a connection of its own (autocommit); its rows, if any."""
    with psycopg.connect(DSN, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


@pytest.fixture
def schema(pg_dsn):
    """A fresh schema name, dropped with everything in it at teardown."""
    names = [f"t_{uuid.uuid4().hex[:12]}"]
    yield names[0]
    for name in names:
        sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


@pytest.fixture
async def make_storage(pg_dsn, schema):
    """``make_storage(**kwargs)``: an open PostgresStorage in the test's schema, closed after."""
    made: list[PostgresStorage] = []

    async def make(open: bool = True, **kwargs) -> PostgresStorage:
        kwargs.setdefault("schema", schema)
        store = PostgresStorage(pg_dsn, **kwargs)
        made.append(store)
        if open:
            await store.open()
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
async def storage(make_storage):
    return await make_storage(clock=FakeClock(), owner="host-a:1:aa")


# --- owners, storage format -------------------------------------------------------------


def test_default_owner_names_host_and_process():
    a, b = PostgresStorage(DSN), PostgresStorage(DSN)
    host, pid, rand = a.owner.rsplit(":", 2)
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    assert rand and a.owner != b.owner


async def test_stores_raw_bytes_and_json_text_not_pickle(storage):
    qid = await storage.write(make_envelope(), 1.0)
    [(meta, data, delivered)] = sql(
        f'SELECT meta, data, delivered FROM "{storage.schema}".messages WHERE id = %s', (qid,))
    assert data == RAW
    assert meta.startswith('{"v":1,') and meta.isascii()
    assert json.loads(meta)["recipients"] == ["a@example.org", "b@example.org", "c@example.org"]
    assert delivered == []


# --- group commit ------------------------------------------------------------------------


async def test_group_commit_batches_concurrent_writes(storage):
    before = (storage.commits, storage.operations)
    ids = await asyncio.gather(*(storage.write(make_envelope(), float(n)) for n in range(100)))
    commits = storage.commits - before[0]
    assert storage.operations - before[1] == 100
    assert 1 <= commits <= 5, commits  # in practice: one transaction for all 100
    assert len(set(ids)) == 100 == len(await storage.load())
    # the server agrees: count the committed transactions that inserted rows
    # (xmin is the inserting transaction's id)
    [(xids,)] = sql(f'SELECT count(DISTINCT xmin::text) FROM "{storage.schema}".messages')
    assert xids == commits


async def test_max_batch_bounds_a_transaction(make_storage):
    store = await make_storage(max_batch=7)
    before = store.commits
    await asyncio.gather(*(store.write(make_envelope(), 0.0) for _ in range(20)))
    assert store.commits - before == 3  # 7 + 7 + 6
    assert store.max_batch_seen == 7
    sized = await make_storage(max_batch_bytes=2 * len(RAW), schema=store.schema)
    before = sized.commits
    await asyncio.gather(*(sized.write(make_envelope(), 0.0) for _ in range(6)))
    assert sized.commits - before == 3
    assert len(await sized.load()) == 26


async def test_several_writers_commit_batches_at_once(make_storage):
    store = await make_storage(writers=3)
    assert len(store._wconns) == 3

    async def writer(n: int) -> list[str]:
        ids = []
        for i in range(10):
            ids.append(await store.write(make_envelope(), float(n * 100 + i)))
            await asyncio.sleep(0.001 * (n % 3))  # arrivals spread out
        return ids

    ids = [qid for batch in await asyncio.gather(*(writer(n) for n in range(20)))
           for qid in batch]
    assert len(set(ids)) == 200 == store.operations
    assert store.commits < 200
    assert sorted(qid for _, qid in await store.load()) == sorted(ids)
    [(xids,)] = sql(f'SELECT count(DISTINCT xmin::text) FROM "{store.schema}".messages')
    assert xids == store.commits


async def test_a_cancelled_write_may_still_be_stored_and_nothing_breaks(storage):
    task = asyncio.ensure_future(storage.write(make_envelope(), 1.0))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    qid = await storage.write(make_envelope(), 2.0)
    assert (await storage.load())[-1] == (2.0, qid)


async def test_a_failed_batch_fails_every_write_in_it(storage):
    # a batch the server refuses (here: a duplicate id) reports an error to every
    # writer in it, and none of its rows is stored; later writes work
    existing = await storage.write(make_envelope(), 1.0)
    orig = storage._run_batch

    async def with_duplicate(batch, slot):
        row, fut = batch[0]
        batch[0] = ((existing, *row[1:]), fut)
        await orig(batch, slot)

    storage._run_batch = with_duplicate
    results = await asyncio.gather(*(storage.write(make_envelope(), 2.0) for _ in range(3)),
                                   return_exceptions=True)
    storage._run_batch = orig
    assert all(isinstance(r, psycopg.errors.UniqueViolation) for r in results), results
    assert await storage.load() == [(1.0, existing)]
    qid = await storage.write(make_envelope(), 3.0)
    assert await storage.load() == [(1.0, existing), (3.0, qid)]


# --- leases --------------------------------------------------------------------------------


def lease_of(store: PostgresStorage, id: str) -> tuple:
    [row] = sql(f'SELECT lease_owner, lease_until FROM "{store.schema}".messages WHERE id = %s',
                (id,))
    return row


async def test_leases_are_kept_in_lease_owner_and_lease_until(make_storage):
    a = await make_storage(owner="host-a:1:aa")
    b = await make_storage(owner="b")
    x = await a.write(make_envelope(), 1.0)
    y = await a.write(make_envelope(), 2.0)
    assert lease_of(a, x) == (None, None)
    assert await a.claim(100.0, 10, 60.0) == [x, y]
    assert lease_of(a, x) == lease_of(a, y) == ("host-a:1:aa", 160.0)
    assert await a.renew([y], 110.0, 60.0) == [y]
    assert (lease_of(a, x), lease_of(a, y)) == (("host-a:1:aa", 160.0), ("host-a:1:aa", 170.0))
    assert await b.record_attempt(x, 20.0, [0], "451 later") == 1  # ends the lease
    assert lease_of(a, x) == (None, None)
    assert await b.claim(25.0, 10, 300.0) == [x]
    assert lease_of(a, x) == ("b", 325.0)
    await a.release(y)
    assert lease_of(a, y) == (None, None)

# --- notifications -----------------------------------------------------------------------


async def test_notify_channel_is_per_schema(make_storage, schema):
    writer = await make_storage(owner="a")
    other_schema = await make_storage(owner="c", open=False, schema=schema + "_x")
    waker, elsewhere = Waker(), Waker()
    watcher = await make_storage(owner="b", open=False)
    watcher.watch(waker)
    other_schema.watch(elsewhere)
    await watcher.open()
    await other_schema.open()
    try:
        assert watcher.channel == writer.channel != other_schema.channel
        qid = await writer.write(make_envelope(), 1.0)
        await waker.wait(1.0)  # within a second
        await writer.set_timestamp(qid, 5.0)
        await waker.wait(1.0)
        assert await elsewhere.quiet()
        assert elsewhere.calls == 0  # a queue in another schema is not woken
    finally:
        await other_schema.close()
        sql(f'DROP SCHEMA IF EXISTS "{schema}_x" CASCADE')


async def test_own_writes_wake_the_own_watcher_and_close_stops_listening(make_storage):
    waker = Waker()
    store = await make_storage(open=False)
    store.watch(waker)
    await store.open()
    await store.write(make_envelope(), 1.0)
    await waker.wait(1.0)
    await store.close()
    assert store._listener is None
    other = await make_storage()
    await other.write(make_envelope(), 1.0)
    assert await waker.quiet()
    listening = sql("SELECT count(*) FROM pg_stat_activity WHERE query = %s",
                    (f'LISTEN "{store.channel}"',))
    assert listening == [(0,)]


async def test_listener_reconnects_after_its_connection_drops(make_storage):
    waker = Waker()
    watcher = await make_storage(open=False, reconnect_delay=0.1)
    watcher.watch(waker)
    await watcher.open()
    writer = await make_storage()
    [(pid,)] = sql("SELECT pid FROM pg_stat_activity WHERE query = %s",
                   (f'LISTEN "{watcher.channel}"',))
    sql("SELECT pg_terminate_backend(%s)", (pid,))
    await waker.wait(3.0)  # the listener is back, and wakes the queue for what it missed
    await writer.write(make_envelope(), 1.0)
    await waker.wait(1.0)
    [(new_pid,)] = sql("SELECT pid FROM pg_stat_activity WHERE query = %s",
                       (f'LISTEN "{watcher.channel}"',))
    assert new_pid != pid


async def test_watch_while_open_starts_listening(make_storage):
    store = await make_storage()
    waker = Waker()
    store.watch(waker)
    for _ in range(50):
        if store._listener is not None and sql(
                "SELECT count(*) FROM pg_stat_activity WHERE query = %s",
                (f'LISTEN "{store.channel}"',)) == [(1,)]:
            break
        await asyncio.sleep(0.05)
    await store.write(make_envelope(), 1.0)
    await waker.wait(1.0)


# --- life cycle, schema --------------------------------------------------------------------


async def test_reopen_after_close_keeps_data_and_closed_storage_refuses(make_storage):
    store = await make_storage()
    qid = await write_a_history(store)
    await store.close()
    await store.close()  # twice is fine
    for call in (store.get(qid), store.write(make_envelope(), 1.0), store.load(),
                 store.claim(1.0, 1, 1.0), store.next_due(1.0), store.stats()):
        with pytest.raises(RuntimeError, match="not open"):
            await call
    await store.open()
    await assert_the_history(store, qid)
    again = await make_storage()
    assert await again.load() == [(300.0, qid)]


async def test_close_finishes_pending_writes(make_storage):
    store = await make_storage()
    writes = [asyncio.ensure_future(store.write(make_envelope(), float(n))) for n in range(20)]
    await asyncio.sleep(0)  # they are queued
    await store.close()
    ids = await asyncio.gather(*writes)
    again = await make_storage()
    assert sorted(qid for _, qid in await again.load()) == sorted(ids)


async def test_schema_tables_and_indexes(storage):
    s = storage.schema
    columns = [r[0] for r in sql(
        "SELECT column_name FROM information_schema.columns WHERE table_schema = %s"
        " AND table_name = 'messages' ORDER BY ordinal_position", (s,))]
    assert columns == ["id", "seq", "timestamp", "attempts", "delivered", "last_reply", "held",
                       "created", "size", "recipients", "lease_owner", "lease_until", "meta",
                       "data", "history"]
    assert sql(f'SELECT application, version FROM "{s}".schema_version') == [
        ("slimta-queue", SCHEMA_VERSION)]
    indexes = {r[0] for r in sql("SELECT indexname FROM pg_indexes WHERE schemaname = %s", (s,))}
    assert {"messages_due", "messages_leased"} <= indexes
    await asyncio.gather(*(storage.write(make_envelope(), float(n)) for n in range(50)))
    sql(f'ANALYZE "{s}".messages')
    with psycopg.connect(DSN, autocommit=True) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = " ".join(r[0] for r in conn.execute(
            f'EXPLAIN SELECT id FROM "{s}".messages WHERE NOT held AND timestamp <= 10'
            " AND (lease_until IS NULL OR lease_until <= 10) ORDER BY timestamp, seq LIMIT 5"
            " FOR UPDATE SKIP LOCKED"))
    assert "messages_due" in plan


async def test_newer_schema_version_is_refused(make_storage, schema):
    store = await make_storage()
    await store.close()
    sql(f'UPDATE "{schema}".schema_version SET version = %s', (SCHEMA_VERSION + 5,))
    newer = await make_storage(open=False)
    with pytest.raises(StorageVersionError) as info:
        await newer.open()
    message = str(info.value)
    assert f"version {SCHEMA_VERSION + 5}" in message
    assert f"version {SCHEMA_VERSION}" in message
    assert repr(schema) in message and "upgrade slimta" in message
    assert (info.value.found, info.value.supported) == (SCHEMA_VERSION + 5, SCHEMA_VERSION)
    assert sql(f'SELECT version FROM "{schema}".schema_version') == [(SCHEMA_VERSION + 5,)]
    with pytest.raises(RuntimeError):
        await newer.write(make_envelope(), 0)


async def test_a_schema_of_something_else_is_refused(make_storage, schema):
    sql(f'CREATE SCHEMA "{schema}"')
    sql(f'CREATE TABLE "{schema}".accounts (x int)')
    with pytest.raises(StorageVersionError, match=r"not a slimta queue.*accounts"):
        await (await make_storage(open=False)).open()
    assert sql("SELECT to_regclass(%s)", (f'"{schema}".messages',)) == [(None,)]


async def test_open_migrates_an_older_schema_and_keeps_its_messages(make_storage, schema):
    old = await make_storage()
    qid = await old.write(make_envelope(), 5.0)
    await old.close()

    async def add_priority(conn, s):
        await conn.execute(psycopg.sql.SQL(
            "ALTER TABLE {}.messages ADD COLUMN priority integer NOT NULL DEFAULT 0").format(s))

    class NextStorage(PostgresStorage):
        migrations = (*MIGRATIONS, add_priority)

    new = NextStorage(DSN, schema=schema)
    await new.open()
    try:
        assert b"".join((await new.get(qid)).envelope.flatten()) == RAW
        assert await new.load() == [(5.0, qid)]
    finally:
        await new.close()
    assert sql(f'SELECT version FROM "{schema}".schema_version') == [(SCHEMA_VERSION + 1,)]
    with pytest.raises(StorageVersionError):  # and now this slimta is the older one
        await (await make_storage(open=False)).open()


async def test_a_version_1_schema_gains_an_empty_history(make_storage, schema):
    assert SCHEMA_VERSION == 2

    class Version1Storage(PostgresStorage):
        migrations = MIGRATIONS[:1]

    old = Version1Storage(DSN, schema=schema)
    await old.open()
    try:
        qid = await old.write(make_envelope(), 5.0)
        await old.record_attempt(qid, 6.0, [1], "451 later")
    finally:
        await old.close()
    assert sql(f'SELECT version FROM "{schema}".schema_version') == [(1,)]
    assert sql("SELECT count(*) FROM information_schema.columns WHERE table_schema = %s"
               " AND table_name = 'messages' AND column_name = 'history'", (schema,)) == [(0,)]

    new = await make_storage()
    stored = await new.get(qid)
    assert (stored.attempts, stored.delivered, stored.last_reply, stored.history) == (
        1, {1}, "451 later", [])
    assert b"".join(stored.envelope.flatten()) == RAW
    await new.record_attempt(qid, 7.0, [], "451 again", attempted_at=6.5)
    assert (await new.get(qid)).history == [(6.5, "451 again")]
    assert sql(f'SELECT version FROM "{schema}".schema_version') == [(SCHEMA_VERSION,)]


async def test_migrate_is_all_or_nothing(pg_dsn, schema):
    async def broken(conn, s):
        await conn.execute(psycopg.sql.SQL("CREATE TABLE {}.half (x int)").format(s))
        raise RuntimeError("step failed")

    conn = await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True)
    try:
        with pytest.raises(RuntimeError, match="step failed"):
            await migrate(conn, schema, (*MIGRATIONS, broken))
        assert sql("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)) == [(0,)]
        assert await migrate(conn, schema) == 0
        assert await migrate(conn, schema) == SCHEMA_VERSION
    finally:
        await conn.close()


async def test_hosts_opening_a_new_schema_at_once_migrate_it_once(make_storage):
    stores = [await make_storage(open=False, owner=str(n)) for n in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    qid = await stores[0].write(make_envelope(), 1.0)
    assert [await s.load() for s in stores] == [[(1.0, qid)]] * 4


async def test_unreachable_server_fails_at_open():
    store = PostgresStorage("postgresql://127.0.0.1:1/test", connect_timeout=2)
    with pytest.raises(psycopg.OperationalError):
        await store.open()
    with pytest.raises(RuntimeError):
        await store.get("x")


def test_bad_arguments():
    with pytest.raises(ValueError):
        PostgresStorage(DSN, schema="")
    with pytest.raises(ValueError):
        PostgresStorage(DSN, schema="x" * 64)
    with pytest.raises(ValueError):
        PostgresStorage(DSN, pool_size=0)
    long = PostgresStorage(DSN, schema="s" * 63)
    assert len(long.channel) <= 63
    assert PostgresStorage(DSN, schema="a").channel != PostgresStorage(DSN, schema="b").channel


async def test_synchronous_commit_setting(make_storage, caplog):
    store = await make_storage(synchronous_commit="remote_apply")
    async with store._pool.connection() as conn:
        cur = await conn.execute("SHOW synchronous_commit")
        assert (await cur.fetchone())[0] == "remote_apply"
    default = await make_storage()
    async with default._pool.connection() as conn:
        cur = await conn.execute("SHOW synchronous_commit")
        assert (await cur.fetchone())[0] == "on"  # the server's default, durable


# --- kill -9 of the writing process -----------------------------------------------------


async def test_sigkill_loses_no_acknowledged_write(pg_dsn, schema, make_storage):
    acknowledged = kill_a_writer_mid_stream(
        "from slimta.queue.postgres import PostgresStorage",
        "PostgresStorage(args[0], schema=args[1])", pg_dsn, schema)
    store = await make_storage()
    await assert_every_acknowledged_write_is_stored(store, acknowledged)
