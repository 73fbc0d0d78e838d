"""Tests for PostgresStorage against the machine's real PostgreSQL.

Each test works in a schema of its own (``t_<random>``), dropped afterwards.
The server is ``postgresql://127.0.0.1:5432/test`` unless ``SLIMTA_TEST_POSTGRES``
names another; when it cannot be reached the tests fail (never skip).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pytest

import slimta
from slimta.envelope import Envelope
from slimta.queue.postgres import (
    MIGRATIONS,
    SCHEMA_VERSION,
    PostgresStorage,
    StorageVersionError,
    migrate,
)
from slimta.queue.storage import SharedQueueStorage

DSN = os.environ.get("SLIMTA_TEST_POSTGRES", "postgresql://127.0.0.1:5432/test")

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


# --- the QueueStorage contract ---------------------------------------------------------


async def test_is_a_shared_storage(storage):
    assert isinstance(storage, SharedQueueStorage)
    assert storage.shared is True
    assert storage.owner == "host-a:1:aa"


def test_default_owner_names_host_and_process():
    a, b = PostgresStorage(DSN), PostgresStorage(DSN)
    host, pid, rand = a.owner.rsplit(":", 2)
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    assert rand and a.owner != b.owner


async def test_write_get_round_trip_is_byte_exact(storage):
    env = make_envelope()
    qid = await storage.write(env, 1234.5)
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


async def test_every_byte_value_and_undecodable_addresses_survive(storage):
    raw = b"Subject: all bytes\r\n\r\n" + bytes(range(256)) + b"\r\n"
    sender = b"s\xe9nder@example.com".decode("utf-8", "surrogateescape")  # a lone surrogate
    env = make_envelope(raw, sender=sender, recipients=("r\u00fc@b\u00fccher.example",))
    qid = await storage.write(env, 1.0)
    back = (await storage.get(qid)).envelope
    assert b"".join(back.flatten()) == b"".join(env.flatten())
    assert back.sender == sender
    assert back.recipients == ["r\u00fc@b\u00fccher.example"]


async def test_stores_raw_bytes_and_json_text_not_pickle(storage):
    qid = await storage.write(make_envelope(), 1.0)
    [(meta, data, delivered)] = sql(
        f'SELECT meta, data, delivered FROM "{storage.schema}".messages WHERE id = %s', (qid,))
    assert data == RAW
    assert meta.startswith('{"v":1,') and meta.isascii()
    assert json.loads(meta)["recipients"] == ["a@example.org", "b@example.org", "c@example.org"]
    assert delivered == []


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
    assert entry.recipients == ["b@example.org"]
    assert entry.attempts == 1
    assert entry.next_attempt == 70.0
    assert entry.last_reply == "450 4.2.1 mailbox busy"
    assert entry.held is False
    assert entry.size == len(RAW)
    assert held.sender == ""
    assert held.held is True
    assert held.size == len(b"Subject: x\r\n\r\nbody\r\n")
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
                 storage.set_held(missing, False),
                 storage.record_attempt(missing, 1.0, [0], "x")):
        with pytest.raises(KeyError):
            await call
    assert await storage.remove(missing) is False
    await storage.release(missing)  # nothing to release: no error
    assert await storage.renew([missing], 1.0, 10.0) == []


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


async def test_claim_takes_due_messages_oldest_first(storage):
    late = await storage.write(make_envelope(), 200.0)
    b = await storage.write(make_envelope(), 20.0)
    a = await storage.write(make_envelope(), 10.0)
    c = await storage.write(make_envelope(), 20.0)
    assert await storage.claim(100.0, 2, 60.0) == [a, b]
    assert await storage.claim(100.0, 10, 60.0) == [c]
    assert await storage.claim(100.0, 10, 60.0) == []
    assert await storage.claim(100.0, 0, 60.0) == []
    [(owner, until)] = sql(f'SELECT lease_owner, lease_until FROM "{storage.schema}".messages'
                           " WHERE id = %s", (a,))
    assert (owner, until) == ("host-a:1:aa", 160.0)
    assert await storage.claim(159.0, 10, 60.0) == []  # leases run until 160, late is not due
    assert await storage.claim(200.0, 10, 60.0) == [a, b, c, late]  # expired leases, due
    # leased messages are still loaded and listed
    assert len(await storage.load()) == 4 and len(await storage.list()) == 4


async def test_held_messages_are_never_claimed(make_storage):
    a = await make_storage(owner="a")
    held = await a.write(make_envelope(), 1.0)
    free = await a.write(make_envelope(), 2.0)
    await a.set_held(held, True)
    assert await a.claim(100.0, 10, 3000.0) == [free]
    assert await a.claim(1000.0, 10, 30.0) == []
    await a.set_held(held, False)
    assert await a.claim(1000.0, 10, 30.0) == [held]


async def test_lease_expires_and_another_owner_takes_over(make_storage):
    a = await make_storage(owner="a")
    b = await make_storage(owner="b")
    t, lease = 1000.0, 60.0
    qid = await a.write(make_envelope(), t - 5)
    assert await a.claim(t, 10, lease) == [qid]
    assert await b.claim(t + lease - 1, 10, lease) == []
    assert await b.claim(t + lease, 10, lease) == [qid]  # a lease is over at its expiry
    # a lost it: its renewal no longer holds it, its release does nothing
    assert await a.renew([qid], t + lease + 1, lease) == []
    await a.release(qid)
    assert await a.claim(t + lease + 1, 10, lease) == []
    assert await b.renew([qid], t + lease + 1, lease) == [qid]


async def test_renew_extends_only_this_owners_leases(make_storage):
    a = await make_storage(owner="a")
    b = await make_storage(owner="b")
    x = await a.write(make_envelope(), 1.0)
    y = await a.write(make_envelope(), 2.0)
    z = await a.write(make_envelope(), 3.0)
    assert await a.claim(10.0, 2, 30.0) == [x, y]
    assert await b.claim(10.0, 2, 300.0) == [z]
    assert await a.renew([y, z, x, "f" * 32], 35.0, 30.0) == [y, x]
    assert await b.claim(50.0, 10, 30.0) == []  # a's leases now last until 65
    assert await b.claim(66.0, 10, 30.0) == [x, y]
    assert await a.renew([], 70.0, 30.0) == []


async def test_release_makes_a_message_due_again(make_storage):
    a = await make_storage(owner="a")
    b = await make_storage(owner="b")
    x = await a.write(make_envelope(), 1.0)
    y = await a.write(make_envelope(), 2.0)
    assert await a.claim(10.0, 10, 300.0) == [x, y]
    await b.release(x)  # not b's lease
    assert await b.claim(11.0, 10, 300.0) == []
    await a.release(x)
    await a.release(y, 500.0)  # with a new next attempt
    assert (await a.get(y)).timestamp == 500.0
    assert await b.claim(12.0, 10, 1000.0) == [x]
    assert await b.claim(499.0, 10, 1000.0) == []
    assert await b.claim(500.0, 10, 1000.0) == [y]


async def test_record_attempt_and_remove_end_any_lease(make_storage):
    a = await make_storage(owner="a")
    b = await make_storage(owner="b")
    x = await a.write(make_envelope(), 1.0)
    y = await a.write(make_envelope(), 2.0)
    assert await a.claim(10.0, 10, 300.0) == [x, y]
    assert await b.record_attempt(x, 20.0, [0], "451 later") == 1  # whoever holds it
    assert await a.renew([x, y], 15.0, 300.0) == [y]
    assert await b.claim(25.0, 10, 300.0) == [x]
    assert await a.remove(y) is True
    assert await a.renew([y], 30.0, 300.0) == []
    [(owner, until)] = sql(f'SELECT lease_owner, lease_until FROM "{a.schema}".messages'
                           " WHERE id = %s", (x,))
    assert (owner, until) == ("b", 325.0)


async def test_next_due(make_storage):
    a = await make_storage(owner="a")
    assert await a.next_due(0.0) is None
    x = await a.write(make_envelope(), 100.0)
    y = await a.write(make_envelope(), 50.0)
    assert await a.next_due(0.0) == 50.0
    assert await a.next_due(60.0) == 50.0  # due already: a claim now succeeds
    await a.set_held(y, True)
    assert await a.next_due(0.0) == 100.0
    assert await a.claim(150.0, 10, 30.0) == [x]
    # the lease runs until 180, and is over then
    assert await a.next_due(150.0) == 180.0
    assert await a.next_due(180.0) == 100.0  # over: due since its next attempt
    b = await make_storage(owner="b")
    assert await b.claim(180.0, 10, 30.0) == [x]  # a claim at next_due succeeds
    await b.set_timestamp(x, 300.0)  # a leased message whose next attempt is later
    assert await a.next_due(200.0) == 300.0
    await b.release(x, 100.0)
    await a.set_held(y, False)
    assert await a.next_due(150.0) == 50.0
    await a.remove(y)
    await a.record_attempt(x, 400.0, [], "451 later")
    assert await a.next_due(150.0) == 400.0
    await a.set_held(x, True)
    assert await a.next_due(150.0) is None


async def test_claims_in_parallel_give_every_message_exactly_once(make_storage):
    a = await make_storage(owner="a", pool_size=4)
    b = await make_storage(owner="b", pool_size=4)
    await asyncio.gather(*(a.write(make_envelope(), float(n % 17)) for n in range(200)))
    claimed: dict[str, list[str]] = {"a": [], "b": []}

    async def claimer(store: PostgresStorage) -> None:
        while True:
            ids = await store.claim(100.0, 7, 600.0)
            if not ids:
                return
            claimed[store.owner].extend(ids)

    await asyncio.gather(*(claimer(s) for s in (a, b, a, b, a, b)))
    every = claimed["a"] + claimed["b"]
    assert len(every) == 200 == len(set(every))
    assert claimed["a"] and claimed["b"], "both owners should have claimed some"
    owners = dict(sql(f'SELECT id, lease_owner FROM "{a.schema}".messages'))
    assert all(owners[i] == "a" for i in claimed["a"])
    assert all(owners[i] == "b" for i in claimed["b"])


# --- notifications -----------------------------------------------------------------------


class Waker:
    """A watch() callback that counts its calls and lets a test wait for the next one."""

    def __init__(self) -> None:
        self.calls = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.calls += 1
        self.event.set()

    async def wait(self, timeout: float = 1.0) -> None:
        await asyncio.wait_for(self.event.wait(), timeout)
        self.event.clear()

    async def quiet(self, seconds: float = 0.3) -> bool:
        """True when no call comes within ``seconds``."""
        self.event.clear()
        await asyncio.sleep(seconds)
        return not self.event.is_set()


async def test_notify_wakes_another_storage_within_a_second(make_storage, schema):
    writer = await make_storage(owner="a")
    other_schema = await make_storage(owner="c", open=False, schema=schema + "_x")
    waker, elsewhere = Waker(), Waker()
    watcher = await make_storage(owner="b", open=False)
    watcher.watch(waker)
    other_schema.watch(elsewhere)
    await watcher.open()
    await other_schema.open()
    try:
        qid = await writer.write(make_envelope(), 1.0)
        await waker.wait(1.0)
        await writer.set_timestamp(qid, 5.0)
        await waker.wait(1.0)
        await writer.set_held(qid, True)
        assert await waker.quiet()  # holding makes nothing due
        await writer.set_held(qid, False)
        await waker.wait(1.0)
        assert await watcher.claim(10.0, 1, 60.0) == [qid]
        await watcher.release(qid)
        await waker.wait(1.0)
        await writer.record_attempt(qid, 500.0, [], "451 later")
        await writer.remove(qid)
        assert await waker.quiet()
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
    qid = await store.write(make_envelope(), 42.0)
    gone = await store.write(make_envelope(), 43.0)
    await store.record_attempt(qid, 300.0, [1], "451 later")
    await store.remove(gone)
    await store.close()
    await store.close()  # twice is fine
    for call in (store.get(qid), store.write(make_envelope(), 1.0), store.load(),
                 store.claim(1.0, 1, 1.0), store.next_due(1.0), store.stats()):
        with pytest.raises(RuntimeError, match="not open"):
            await call
    await store.open()
    stored = await store.get(qid)
    assert b"".join(stored.envelope.flatten()) == RAW
    assert (stored.attempts, stored.delivered, stored.timestamp, stored.last_reply) == (
        1, {1}, 300.0, "451 later")
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
                       "data"]
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

CHILD = r"""
import asyncio, sys, time
from slimta.envelope import Envelope
from slimta.queue.postgres import PostgresStorage

async def main(dsn, schema):
    store = PostgresStorage(dsn, schema=schema)
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

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_sigkill_loses_no_acknowledged_write(pg_dsn, schema, make_storage):
    src = str(Path(slimta.__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, pg_dsn, schema],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    acknowledged: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            qid, tag = line.decode().split()
            acknowledged[qid] = tag
            if len(acknowledged) >= 600 or time.monotonic() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        stderr = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    for line in rest.split(b"\n")[:-1]:
        qid, tag = line.decode().split()
        acknowledged[qid] = tag
    assert len(acknowledged) >= 600
    store = await make_storage()
    stored_ids = {qid for _, qid in await store.load()}
    missing = set(acknowledged) - stored_ids
    assert not missing, f"{len(missing)} acknowledged messages lost"
    for qid, tag in list(acknowledged.items())[::50]:
        message = await store.get(qid)
        assert message.envelope.recipients == [f"{tag}@example.org"]
        assert message.envelope.headers["Subject"] == tag
