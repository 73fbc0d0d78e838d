"""Tests for RedisStorage against the local Redis (127.0.0.1:6379): the QueueStorage
contract, leases (claim, renew, release, expiry) with an injected clock, claims by two
storages at once, pub/sub wake-ups, the layout version, and the connection options.

Each test works under its own key prefix (the ``redis_prefix`` fixture), whose keys
are deleted afterwards. Without a reachable Redis every test fails: none is skipped.
"""

from __future__ import annotations

import asyncio
import json
import os

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from slimta.envelope import Envelope
from slimta.queue.redis import (
    DEFAULT_URL,
    SCHEMA_VERSION,
    NotReplicatedError,
    RedisStorage,
    StorageVersionError,
    _durability_warning,
)

URL = "redis://127.0.0.1:6379/0"

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


@pytest.fixture(autouse=True)
def require_redis():
    """Every test here needs the local Redis: fail (never skip) without it."""
    client = redis.Redis.from_url(URL, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.exceptions.RedisError as exc:
        pytest.fail(f"Redis at {URL} is not reachable ({exc}); these tests need it")
    finally:
        client.close()


@pytest.fixture
async def raw(redis_prefix):
    """A plain client for looking at (and tampering with) the keys directly."""
    client = aioredis.Redis.from_url(URL)
    yield client
    await client.aclose()


@pytest.fixture
async def store(redis_prefix):
    s = RedisStorage(prefix=redis_prefix, owner="host-a", clock=FakeClock())
    await s.open()
    yield s
    await s.close()


@pytest.fixture
async def other(redis_prefix):
    """A second storage on the same prefix: another host sharing the queue."""
    s = RedisStorage(prefix=redis_prefix, owner="host-b", clock=FakeClock(5000.0))
    await s.open()
    yield s
    await s.close()


async def wait_for(event: asyncio.Event, timeout: float = 1.0) -> None:
    await asyncio.wait_for(event.wait(), timeout)
    event.clear()


# --- the QueueStorage contract ------------------------------------------------------


async def test_write_get_round_trip_is_byte_exact(store):
    env = make_envelope()
    qid = await store.write(env, 1234.5)
    assert isinstance(qid, str)
    assert len(qid) == 32 and int(qid, 16) >= 0
    stored = await store.get(qid)
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


async def test_changed_headers_are_stored_and_get_is_fresh(store):
    env = make_envelope()
    env.prepend_header("Received", "from client by mx; Mon, 1 Jan 2024 00:00:00 +0000")
    env.headers["X-Added"] = "ja wöhl"
    qid = await store.write(env, 0)
    expected = b"".join(env.flatten())
    env.recipients.append("late@example.org")
    first = (await store.get(qid)).envelope
    assert b"".join(first.flatten()) == expected
    first.recipients.clear()
    first.rcpt_params["a@example.org"]["notify"].append("DELAY")
    second = (await store.get(qid)).envelope
    assert second.recipients == ["a@example.org", "b@example.org", "c@example.org"]
    assert second.notify("a@example.org") == ["SUCCESS", "FAILURE"]


async def test_key_layout_raw_bytes_and_json_not_pickle(store, raw, redis_prefix):
    qid = await store.write(make_envelope(), 1700000000.123456)
    fields = await raw.hgetall(f"{redis_prefix}msg:{qid}")
    assert fields[b"data"] == RAW
    assert fields[b"meta"].startswith(b'{"v":1,')
    assert json.loads(fields[b"meta"])["recipients"] == [
        "a@example.org", "b@example.org", "c@example.org"]
    assert fields[b"delivered"] == b"[]"
    assert (fields[b"attempts"], fields[b"held"], fields[b"size"], fields[b"rcpts"]) == (
        b"0", b"0", str(len(RAW)).encode(), b"3")
    assert float(fields[b"timestamp"]) == 1700000000.123456
    assert float(fields[b"created"]) == 1001.0
    assert b"owner" not in fields and b"last_reply" not in fields
    assert await raw.zscore(f"{redis_prefix}due", qid) == 1700000000.123456
    assert await raw.zscore(f"{redis_prefix}messages", qid) is not None
    assert await raw.get(f"{redis_prefix}version") == str(SCHEMA_VERSION).encode()
    # an epoch time with microseconds survives every path exactly
    assert (await store.get(qid)).timestamp == 1700000000.123456
    assert await store.load() == [(1700000000.123456, qid)]
    assert await store.next_due(0) == 1700000000.123456


async def test_metadata_that_is_not_json_is_refused(store):
    env = make_envelope()
    env.client["socket"] = object()
    with pytest.raises(TypeError):
        await store.write(env, 0)
    assert await store.list() == []


async def test_schedule_attempts_and_results(store):
    qid = await store.write(make_envelope(), 10.0)
    await store.set_timestamp(qid, 20.0)
    assert await store.increment_attempts(qid) == 1
    assert await store.increment_attempts(qid) == 2
    await store.set_recipients_delivered(qid, [1])
    await store.set_recipients_delivered(qid, [1, 2])
    await store.set_recipients_delivered(qid, [])
    await store.set_last_reply(qid, "451 4.3.0 try later ünïcode")
    stored = await store.get(qid)
    assert stored.timestamp == 20.0
    assert stored.attempts == 2
    assert stored.delivered == {1, 2}
    assert stored.pending == [(0, "a@example.org")]
    assert stored.last_reply == "451 4.3.0 try later ünïcode"
    await store.set_last_reply(qid, None)
    assert (await store.get(qid)).last_reply is None


async def test_record_attempt_does_it_all(store):
    qid = await store.write(make_envelope(), 10.0)
    assert await store.record_attempt(qid, 310.0, [0], "450 4.2.0 busy") == 1
    assert await store.record_attempt(qid, 910.0, [2, 0], "451 4.4.1 no answer") == 2
    stored = await store.get(qid)
    assert (stored.attempts, stored.delivered, stored.timestamp, stored.last_reply) == (
        2, {0, 2}, 910.0, "451 4.4.1 no answer")
    assert await store.record_attempt(qid, 920.0, [], None) == 3
    assert (await store.get(qid)).last_reply is None
    assert await store.load() == [(920.0, qid)]


async def test_hold_and_release(store):
    a = await store.write(make_envelope(), 30.0)
    b = await store.write(make_envelope(), 10.0)
    c = await store.write(make_envelope(), 20.0)
    await store.set_held(b, True)
    assert (await store.get(b)).held is True
    assert await store.load() == [(20.0, c), (30.0, a)]
    assert [e.id for e in await store.list()] == [b, c, a]  # held ones are listed
    assert await store.next_due(0) == 20.0
    assert await store.claim(100.0, 10, 60.0) == [c, a]  # never the held one
    await store.set_held(b, False)
    assert (await store.get(b)).held is False
    assert await store.load() == [(10.0, b), (20.0, c), (30.0, a)]
    assert await store.claim(100.0, 10, 60.0) == [b]


async def test_load_and_list_order_by_next_attempt_then_arrival(store):
    ids = [await store.write(make_envelope(), ts) for ts in (5.0, 1.0, 5.0, 3.0, 5.0)]
    expected = [ids[1], ids[3], ids[0], ids[2], ids[4]]
    assert [qid for _, qid in await store.load()] == expected
    assert [e.id for e in await store.list()] == expected
    await store.set_timestamp(ids[1], 9.0)
    assert (await store.load())[-1] == (9.0, ids[1])


async def test_list_fields(store):
    qid = await store.write(make_envelope(), 50.0)
    bounce = await store.write(make_envelope(b"Subject: x\r\n\r\nbody\r\n", sender=""), 60.0)
    await store.record_attempt(qid, 70.0, [0, 2], "450 4.2.1 mailbox busy")
    await store.set_held(bounce, True)
    entries = await store.list()
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


async def test_stats(store):
    assert await store.stats() == {"messages": 0, "held": 0, "recipients": 0, "bytes": 0}
    a = await store.write(make_envelope(), 0)
    b = await store.write(make_envelope(recipients=("x@example.org",)), 0)
    await store.set_recipients_delivered(a, [0])
    await store.set_held(b, True)
    assert await store.stats() == {
        "messages": 2, "held": 1, "recipients": 3, "bytes": 2 * len(RAW)}


async def test_remove(store, raw, redis_prefix):
    qid = await store.write(make_envelope(), 0)
    other_id = await store.write(make_envelope(), 0)
    leased = await store.write(make_envelope(), 0)
    await store.set_timestamp(other_id, 5.0)
    assert await store.claim(1.0, 1, 30.0) in ([qid], [leased])
    assert await store.remove(qid) is True
    assert await store.remove(qid) is False
    assert await store.remove(leased) is True  # a lease is no obstacle, and ends
    with pytest.raises(KeyError):
        await store.get(qid)
    assert [e.id for e in await store.list()] == [other_id]
    assert await store.load() == [(5.0, other_id)]
    assert await raw.zcard(f"{redis_prefix}leases") == 0
    assert await raw.zrange(f"{redis_prefix}due", 0, -1) == [other_id.encode()]
    assert await raw.exists(f"{redis_prefix}msg:{qid}", f"{redis_prefix}msg:{leased}") == 0


async def test_missing_ids(store):
    missing = "0" * 32
    with pytest.raises(KeyError):
        await store.get(missing)
    for call in (store.set_timestamp(missing, 1.0), store.increment_attempts(missing),
                 store.set_recipients_delivered(missing, [0]),
                 store.set_last_reply(missing, "x"), store.set_last_reply(missing, None),
                 store.set_held(missing, True), store.set_held(missing, False),
                 store.record_attempt(missing, 1.0, [0], "x")):
        with pytest.raises(KeyError):
            await call
    assert await store.remove(missing) is False
    assert await store.release(missing) is None
    assert await store.renew([missing], 1.0, 30.0) == []
    assert await store.list() == []  # no half-made hash was left behind


async def test_concurrent_writes_are_all_readable(store):
    def env(n: int) -> Envelope:
        return make_envelope(b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n),
                             recipients=(f"r{n}@example.org",))

    ids = await asyncio.gather(*(store.write(env(n), float(n)) for n in range(100)))
    assert len(set(ids)) == 100
    stored = await asyncio.gather(*(store.get(qid) for qid in ids))
    for n, message in enumerate(stored):
        assert message.envelope.recipients == [f"r{n}@example.org"]
        assert b"".join(message.envelope.flatten()) == b"Subject: %d\r\n\r\nbody %d\r\n" % (n, n)
    assert [qid for _, qid in await store.load()] == ids
    assert (await store.stats())["messages"] == 100


# --- leases ---------------------------------------------------------------------------


async def test_claim_takes_due_messages_oldest_first_up_to_limit(store, raw, redis_prefix):
    late = await store.write(make_envelope(), 300.0)
    first = await store.write(make_envelope(), 100.0)
    second = await store.write(make_envelope(), 200.0)
    assert await store.claim(99.0, 10, 30.0) == []
    assert await store.claim(250.0, 1, 30.0) == [first]
    assert await store.claim(250.0, 0, 30.0) == []
    assert await store.claim(250.0, 10, 30.0) == [second]
    assert await store.claim(250.0, 10, 30.0) == []  # leased already
    assert sorted(await raw.zrange(f"{redis_prefix}leases", 0, -1, withscores=True)) == sorted(
        [(first.encode(), 280.0), (second.encode(), 280.0)])
    assert await raw.hget(f"{redis_prefix}msg:{first}", "owner") == b"host-a"
    # leased messages are still loaded and listed
    assert [qid for _, qid in await store.load()] == [first, second, late]
    assert [e.id for e in await store.list()] == [first, second, late]


async def test_claims_in_parallel_give_each_message_to_one_owner(store, other, raw,
                                                                  redis_prefix):
    ids = await asyncio.gather(*(store.write(make_envelope(), float(n % 7))
                                 for n in range(200)))
    claims = [(s, s.claim(10.0, 7, 60.0)) for _ in range(20) for s in (store, other)]
    results = await asyncio.gather(*(c for _, c in claims))
    claimed = [qid for got in results for qid in got]
    assert sorted(claimed) == sorted(ids)  # each exactly once
    assert len(set(claimed)) == 200
    for (owner, _), got in zip(claims, results, strict=True):
        for qid in got:
            assert await raw.hget(f"{redis_prefix}msg:{qid}", "owner") == owner.owner.encode()
    assert {len(got) for got in results} <= set(range(8))
    assert sum(map(len, results[0::2])) > 0 and sum(map(len, results[1::2])) > 0
    assert await store.claim(10.0, 100, 60.0) == [] == await other.claim(10.0, 100, 60.0)


async def test_a_lease_that_ran_out_is_recovered_and_claimed_by_another(store, other, raw,
                                                                         redis_prefix):
    qid = await store.write(make_envelope(), 100.0)
    assert await store.claim(100.0, 10, 30.0) == [qid]
    assert await other.claim(110.0, 10, 30.0) == []
    assert await other.claim(129.5, 10, 30.0) == []
    assert await other.next_due(129.5) == 130.0  # when the lease runs out
    assert await other.claim(130.0, 10, 30.0) == [qid]  # over at its expiry
    assert await raw.hget(f"{redis_prefix}msg:{qid}", "owner") == b"host-b"
    assert await raw.zscore(f"{redis_prefix}leases", qid) == 160.0
    # the first host comes back: its lease is lost
    assert await store.renew([qid], 131.0, 30.0) == []
    await store.release(qid)  # not its lease: nothing happens
    assert await raw.hget(f"{redis_prefix}msg:{qid}", "owner") == b"host-b"
    assert await other.renew([qid], 131.0, 30.0) == [qid]


async def test_recovery_puts_the_message_back_at_its_own_time(store, other):
    qid = await store.write(make_envelope(), 100.0)
    assert await store.claim(100.0, 10, 30.0) == [qid]
    await store.set_timestamp(qid, 500.0)  # stays leased meanwhile
    assert await other.claim(120.0, 10, 30.0) == []
    assert await other.claim(200.0, 10, 30.0) == []  # recovered, but due only at 500
    assert await other.next_due(200.0) == 500.0
    assert await other.claim(500.0, 10, 30.0) == [qid]


async def test_recovery_of_a_held_message_leaves_it_held(store, other):
    qid = await store.write(make_envelope(), 100.0)
    assert await store.claim(100.0, 10, 30.0) == [qid]
    await store.set_held(qid, True)
    assert await other.claim(1000.0, 10, 30.0) == []
    assert await other.next_due(1000.0) is None  # the lease was recovered, the message held
    await store.set_held(qid, False)
    assert await other.claim(1000.0, 10, 30.0) == [qid]


async def test_renew_extends_only_this_owners_live_leases(store, other, raw, redis_prefix):
    ids = [await store.write(make_envelope(), 100.0) for _ in range(3)]
    mine = await store.claim(100.0, 2, 10.0)
    theirs = await other.claim(100.0, 10, 10.0)
    assert len(mine) == 2 and len(theirs) == 1
    assert sorted([*mine, *theirs]) == sorted(ids)
    assert await store.renew([], 105.0, 10.0) == []
    assert sorted(await store.renew([*mine, *theirs], 105.0, 10.0)) == sorted(mine)
    assert await raw.zscore(f"{redis_prefix}leases", mine[0]) == 115.0
    assert await raw.zscore(f"{redis_prefix}leases", theirs[0]) == 110.0  # untouched
    assert await other.claim(112.0, 10, 10.0) == [theirs[0]]  # its own ran out: reclaimed
    assert await other.claim(114.9, 10, 10.0) == []  # ours were extended
    assert await other.claim(115.0, 10, 10.0) == sorted(mine)
    assert await store.renew(mine, 116.0, 10.0) == []
    await other.remove(mine[0])
    assert await other.renew(mine, 116.0, 10.0) == [mine[1]]


async def test_renew_of_a_lease_that_ran_out_fails_even_if_nobody_took_it(store):
    qid = await store.write(make_envelope(), 100.0)
    assert await store.claim(100.0, 1, 10.0) == [qid]
    assert await store.renew([qid], 109.0, 10.0) == [qid]  # now until 119
    assert await store.renew([qid], 119.0, 10.0) == []
    assert await store.claim(119.0, 1, 10.0) == [qid]


async def test_release_makes_the_message_due_again(store, other):
    qid = await store.write(make_envelope(), 100.0)
    assert await store.claim(100.0, 1, 60.0) == [qid]
    await other.release(qid)  # not other's lease
    assert await other.claim(101.0, 1, 60.0) == []
    await store.release(qid)
    assert await other.next_due(101.0) == 100.0
    assert await other.claim(101.0, 1, 60.0) == [qid]
    await other.release(qid, 400.0)
    assert (await other.get(qid)).timestamp == 400.0
    assert await store.claim(399.0, 1, 60.0) == []
    assert await store.claim(400.0, 1, 60.0) == [qid]
    await store.set_held(qid, True)
    await store.release(qid)
    assert await store.next_due(1000.0) is None  # released but held


async def test_record_attempt_and_remove_end_any_lease(store, other, raw, redis_prefix):
    qid = await store.write(make_envelope(), 100.0)
    assert await store.claim(100.0, 1, 60.0) == [qid]
    assert await other.record_attempt(qid, 200.0, [1], "451 later") == 1
    assert await raw.zcard(f"{redis_prefix}leases") == 0
    assert await raw.hget(f"{redis_prefix}msg:{qid}", "owner") is None
    assert await store.renew([qid], 101.0, 60.0) == []
    assert await other.next_due(101.0) == 200.0
    assert await other.claim(200.0, 1, 60.0) == [qid]
    await store.set_held(qid, True)  # held during the attempt
    assert await other.record_attempt(qid, 300.0, [], "451 again") == 2
    assert await store.next_due(1000.0) is None
    assert await store.claim(1000.0, 10, 60.0) == []


async def test_set_timestamp_of_a_leased_message_keeps_the_lease(store, other):
    qid = await store.write(make_envelope(), 100.0)
    assert await store.claim(100.0, 1, 60.0) == [qid]
    await other.set_timestamp(qid, 50.0)
    assert await other.claim(100.0, 1, 60.0) == []
    assert await other.load() == [(50.0, qid)]


async def test_next_due(store):
    assert await store.next_due(0.0) is None
    a = await store.write(make_envelope(), 300.0)
    b = await store.write(make_envelope(), 200.0)
    assert await store.next_due(0.0) == 200.0
    assert await store.next_due(250.0) == 200.0  # overdue: claim at once
    assert await store.claim(250.0, 1, 500.0) == [b]
    assert await store.next_due(250.0) == 300.0  # b's lease runs until 750
    assert await store.claim(300.0, 1, 100.0) == [a]
    assert await store.next_due(300.0) == 400.0  # a's lease expiry
    await store.set_held(b, True)
    assert await store.next_due(300.0) == 400.0
    await store.remove(a)
    assert await store.next_due(300.0) == 750.0  # b's lease, though b is held
    await store.record_attempt(b, 900.0, [], None)
    assert await store.next_due(300.0) is None


# --- wake-ups -------------------------------------------------------------------------


async def test_changes_by_another_storage_wake_the_watcher(redis_prefix, other):
    woke = asyncio.Event()
    watcher = RedisStorage(prefix=redis_prefix, owner="watcher")
    watcher.watch(woke.set)
    await watcher.open()
    try:
        qid = await other.write(make_envelope(), 100.0)
        await wait_for(woke)
        await other.set_timestamp(qid, 50.0)
        await wait_for(woke)
        await other.set_held(qid, True)
        await other.set_held(qid, False)
        await wait_for(woke)
        assert await other.claim(100.0, 1, 30.0) == [qid]
        await asyncio.sleep(0.1)
        woke.clear()
        await other.release(qid)
        await wait_for(woke)
        # its own changes wake it too
        await watcher.write(make_envelope(), 0.0)
        await wait_for(woke)
        # what does not make a message due does not publish
        await asyncio.sleep(0.1)
        woke.clear()
        await other.record_attempt(qid, 500.0, [], None)
        await other.increment_attempts(qid)
        await other.set_held(qid, True)
        await other.remove(qid)
        with pytest.raises(asyncio.TimeoutError):
            await wait_for(woke, 0.3)
    finally:
        await watcher.close()
    assert watcher._watcher is None


async def test_watch_after_open_subscribes_too(store, other):
    woke = asyncio.Event()
    store.watch(woke.set)
    await wait_for(woke)  # a first wake-up once subscribed: nothing published is missed
    await other.write(make_envelope(), 0.0)
    await wait_for(woke)


async def test_the_watcher_reconnects_after_its_connection_is_killed(redis_prefix, other, raw):
    woke = asyncio.Event()
    watcher = RedisStorage(prefix=redis_prefix, owner="watcher-kill", retry_delay=0.05)
    watcher.watch(woke.set)
    await watcher.open()
    try:
        clients = [c for c in await raw.client_list(_type="pubsub")
                   if c["name"] == watcher.client_name]
        assert len(clients) == 1, clients
        await raw.client_kill_filter(_id=clients[0]["id"])
        # woken once after the reconnect (notifications may have been missed meanwhile)
        await wait_for(woke, 5.0)
        for _ in range(50):
            if any(c["name"] == watcher.client_name
                   for c in await raw.client_list(_type="pubsub")):
                break
            await asyncio.sleep(0.05)
        await other.write(make_envelope(), 0.0)
        await wait_for(woke)
    finally:
        await watcher.close()


async def test_a_failing_wake_callback_does_not_stop_the_watcher(redis_prefix, other):
    calls = []

    def wake():
        calls.append(1)
        raise ValueError("oops")

    watcher = RedisStorage(prefix=redis_prefix, owner="watcher-fail")
    watcher.watch(wake)
    await watcher.open()
    try:
        await other.write(make_envelope(), 0.0)
        await other.write(make_envelope(), 0.0)
        for _ in range(100):
            if len(calls) >= 2:
                break
            await asyncio.sleep(0.01)
        assert len(calls) == 2
    finally:
        await watcher.close()


# --- open, close, versions ---------------------------------------------------------------


async def test_data_survives_close_and_reopen(redis_prefix):
    first = RedisStorage(prefix=redis_prefix, owner="a")
    await first.open()
    qid = await first.write(make_envelope(), 42.0)
    gone = await first.write(make_envelope(), 43.0)
    await first.record_attempt(qid, 300.0, [1], "451 later")
    await first.remove(gone)
    leased = await first.write(make_envelope(), 10.0)
    assert await first.claim(10.0, 1, 100.0) == [leased]
    await first.close()
    await first.close()  # twice is fine
    for call in (first.get(qid), first.write(make_envelope(), 0), first.load(),
                 first.list(), first.stats(), first.remove(qid), first.claim(0, 1, 1),
                 first.renew([qid], 0, 1), first.release(qid), first.next_due(0),
                 first.set_timestamp(qid, 1), first.set_held(qid, True),
                 first.increment_attempts(qid), first.record_attempt(qid, 1, [], None),
                 first.set_last_reply(qid, None), first.set_recipients_delivered(qid, [])):
        with pytest.raises(RuntimeError, match="not open"):
            await call

    again = RedisStorage(prefix=redis_prefix, owner="a")
    await again.open()
    try:
        stored = await again.get(qid)
        assert b"".join(stored.envelope.flatten()) == RAW
        assert stored.envelope.rcpt_params == make_envelope().rcpt_params
        assert (stored.attempts, stored.delivered, stored.timestamp, stored.last_reply) == (
            1, {1}, 300.0, "451 later")
        assert await again.load() == [(10.0, leased), (300.0, qid)]
        assert await again.renew([leased], 50.0, 100.0) == [leased]  # the lease is kept
    finally:
        await again.close()


async def test_operations_before_open_raise(redis_prefix):
    store = RedisStorage(prefix=redis_prefix)
    with pytest.raises(RuntimeError, match="not open"):
        await store.get("0" * 32)
    with pytest.raises(RuntimeError, match="not open"):
        await store.claim(0.0, 1, 1.0)


async def test_a_newer_layout_version_is_refused(redis_prefix, raw):
    await raw.set(f"{redis_prefix}version", SCHEMA_VERSION + 1)
    store = RedisStorage(prefix=redis_prefix)
    with pytest.raises(StorageVersionError, match="newer") as info:
        await store.open()
    assert (info.value.found, info.value.supported) == (SCHEMA_VERSION + 1, SCHEMA_VERSION)
    assert not store._open
    await raw.set(f"{redis_prefix}version", "not a number")
    with pytest.raises(StorageVersionError, match="not a slimta queue"):
        await store.open()
    await raw.set(f"{redis_prefix}version", SCHEMA_VERSION)
    await store.open()
    await store.close()


async def test_a_new_prefix_gets_the_current_version(redis_prefix, raw):
    store = RedisStorage(prefix=redis_prefix)
    await store.open()
    await store.close()
    assert await raw.get(f"{redis_prefix}version") == str(SCHEMA_VERSION).encode()


async def test_prefixes_are_separate_queues(redis_prefix, store):
    elsewhere = RedisStorage(prefix=redis_prefix + "other:")
    await elsewhere.open()
    try:
        await store.write(make_envelope(), 0.0)
        assert await elsewhere.load() == []
        assert await elsewhere.claim(10.0, 10, 10.0) == []
    finally:
        await elsewhere.close()


# --- connection options ----------------------------------------------------------------


async def test_the_original_apps_connection_keys(redis_prefix):
    store = RedisStorage(host="127.0.0.1", port=6379, db=0, password=None,
                         socket_timeout=5.0, prefix=redis_prefix)
    assert store.url is None
    await store.open()
    try:
        kwargs = store.client.connection_pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["socket_timeout"]) == (
            "127.0.0.1", 6379, 0, 5.0)
        qid = await store.write(make_envelope(), 1.0)
        assert b"".join((await store.get(qid)).envelope.flatten()) == RAW
    finally:
        await store.close()
    # the keys' defaults
    only_port = RedisStorage(port=6379, prefix=redis_prefix)
    assert (only_port.host, only_port.port, only_port.db) == ("127.0.0.1", 6379, 0)


async def test_the_password_key_is_sent(redis_prefix):
    """AUTH with the password (this Redis's default user has none, so any is accepted)."""
    store = RedisStorage(host="127.0.0.1", password="s3cret", prefix=redis_prefix)
    await store.open()
    try:
        assert store.client.connection_pool.connection_kwargs["password"] == "s3cret"
        assert "s3cret" not in repr(store)
        qid = await store.write(make_envelope(), 0.0)
        assert (await store.get(qid)).envelope.recipients[0] == "a@example.org"
    finally:
        await store.close()
    hidden = RedisStorage("redis://user:s3cret@127.0.0.1:6379/0", prefix=redis_prefix)
    assert "s3cret" not in repr(hidden) and "user:***@127.0.0.1" in repr(hidden)


async def test_the_db_key_selects_the_database(redis_prefix):
    store = RedisStorage(host="127.0.0.1", db=3, prefix=redis_prefix)
    await store.open()
    try:
        await store.write(make_envelope(), 0.0)
        info = await store.client.client_info()
        assert int(info["db"]) == 3
    finally:
        keys = [k async for k in store.client.scan_iter(match=redis_prefix + "*")]
        if keys:
            await store.client.delete(*keys)
        await store.close()


async def test_url_and_connection_keys_do_not_mix():
    with pytest.raises(ValueError, match="not both"):
        RedisStorage("redis://127.0.0.1:6380/1", host="127.0.0.1")
    # the default url with keys (as a config with defaults would pass): the keys win
    store = RedisStorage(DEFAULT_URL, host="127.0.0.2", port=6390)
    assert (store.url, store.host, store.port) == (None, "127.0.0.2", 6390)


async def test_url_with_socket_timeout(redis_prefix):
    store = RedisStorage("redis://127.0.0.1:6379/0", prefix=redis_prefix, socket_timeout=2.5)
    await store.open()
    try:
        kwargs = store.client.connection_pool.connection_kwargs
        assert kwargs["socket_timeout"] == 2.5
        assert kwargs["client_name"] == store.client_name
        assert store.client_name.startswith("slimta-queue:")
    finally:
        await store.close()


async def test_a_given_client_is_used_and_left_open(redis_prefix):
    client = aioredis.Redis.from_url(URL)
    try:
        store = RedisStorage(client=client, prefix=redis_prefix)
        await store.open()
        qid = await store.write(make_envelope(), 0.0)
        await store.close()
        assert await client.exists(f"{redis_prefix}msg:{qid}") == 1  # still usable
    finally:
        await client.aclose()
    decoding = aioredis.Redis.from_url(URL, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses"):
            RedisStorage(client=decoding)
    finally:
        await decoding.aclose()
    with pytest.raises(ValueError):
        RedisStorage("redis://10.0.0.1/", client=object())


async def test_an_unreachable_server_fails_open(redis_prefix):
    store = RedisStorage("redis://127.0.0.1:1/0", prefix=redis_prefix,
                         socket_connect_timeout=1.0)
    with pytest.raises(redis.exceptions.ConnectionError):
        await store.open()
    with pytest.raises(RuntimeError):
        await store.get("0" * 32)


async def test_the_owner_defaults_to_host_and_pid(redis_prefix):
    a, b = RedisStorage(prefix=redis_prefix), RedisStorage(prefix=redis_prefix)
    assert a.owner != b.owner
    assert f":{os.getpid()}:" in a.owner


# --- durability ----------------------------------------------------------------------------


async def test_durability_warning_matches_the_servers_settings(store, raw):
    config = {}
    for key in ("appendonly", "appendfsync", "save"):
        for k, v in (await raw.config_get(key)).items():
            config[k.decode() if isinstance(k, bytes) else k] = (
                v.decode() if isinstance(v, bytes) else v)
    if config["appendonly"] == "yes" and config["appendfsync"] == "always":
        assert store.durability is None
    else:
        assert store.durability and "lose" in store.durability
    if config["appendonly"] == "no" and not config["save"]:  # this machine's Redis
        assert "no persistence" in store.durability


class FakeConfigClient:
    def __init__(self, values=None, error=None):
        self.values = values or {}
        self.error = error

    async def config_get(self, pattern):
        if self.error:
            raise self.error
        return {pattern.encode(): self.values.get(pattern, "noeviction").encode()}


@pytest.mark.parametrize(("values", "expected"), [
    ({"appendonly": "yes", "appendfsync": "always", "save": ""}, None),
    ({"appendonly": "yes", "appendfsync": "everysec", "save": "3600 1"}, "last second"),
    ({"appendonly": "yes", "appendfsync": "no", "save": ""}, "appendfsync no"),
    ({"appendonly": "no", "appendfsync": "everysec", "save": "3600 1 300 100"},
     "since the last snapshot"),
    ({"appendonly": "no", "appendfsync": "everysec", "save": ""}, "no persistence"),
    ({"appendonly": "yes", "appendfsync": "always", "save": "",
      "maxmemory-policy": "allkeys-lru"}, "can be evicted"),
    ({"appendonly": "yes", "appendfsync": "always", "save": "",
      "maxmemory-policy": "volatile-lru"}, None),
])
async def test_durability_warnings(values, expected):
    warning = await _durability_warning(FakeConfigClient(values))
    if expected is None:
        assert warning is None
    else:
        assert expected in warning


async def test_durability_check_without_config_command():
    client = FakeConfigClient(error=ResponseError("unknown command 'CONFIG'"))
    assert await _durability_warning(client) is None


async def test_wait_replicas_fails_a_write_no_replica_confirmed(redis_prefix, raw):
    replicas = int((await raw.info("replication"))["connected_slaves"])
    store = RedisStorage(prefix=redis_prefix, wait_replicas=replicas + 1, wait_timeout=0.05,
                         check_durability=False)
    await store.open()
    try:
        with pytest.raises(NotReplicatedError, match="replicas confirmed"):
            await store.write(make_envelope(), 0.0)
        # stored on the primary all the same: at worst delivered twice, never lost
        assert len(await store.load()) == 1
    finally:
        await store.close()
    assert store.durability is None  # not checked
