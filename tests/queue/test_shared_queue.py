"""Several queues on one shared storage: claims, leases, renewal and recovery, on a test clock.

The same tests run on every SharedQueueStorage: the in-process
SharedDictStorage, and PostgreSQL and Redis (see ``shared_pair``).
"""

from __future__ import annotations

import asyncio
import collections

import pytest
from test_queue import make_envelope

from slimta.queue import Queue
from slimta.queue.dict import SharedDictStorage
from slimta.relay import Relay, TransientRelayError
from slimta.smtp.reply import Reply
from slimta.util.clock import ManualClock

LEASE = 60.0


class CountingRelay(Relay):
    """Delivers after ``delay`` real seconds (or when ``gate`` opens); counts each subject."""

    def __init__(self, name: str, delivered: collections.Counter, delay: float = 0.0,
                 gate: asyncio.Event | None = None, fail_first: int = 0):
        super().__init__()
        self.name = name
        self.delivered = delivered
        self.delay = delay
        self.gate = gate
        self.fail_first = fail_first
        self.started = 0

    async def _attempt(self, envelope, attempts):
        self.started += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail_first > 0:
            self.fail_first -= 1
            raise TransientRelayError(reply=Reply("451", "4.4.1 try later"))
        self.delivered[envelope.headers["Subject"]] += 1
        self.delivered[self.name] += 1
        return Reply("250", "2.0.0 Ok")


def message(n: int):
    env = make_envelope()
    del env.headers["Subject"]
    env.headers["Subject"] = f"m{n}"
    return env


@pytest.fixture(params=["dict", "postgres", "redis"])
def shared_pair(request):
    """Two users (owners ``a`` and ``b``) of one new, empty shared storage."""
    if request.param == "postgres":
        from conftest import PG_DSN
        from slimta.queue.postgres import PostgresStorage

        schema = request.getfixturevalue("pg_schema")
        return tuple(PostgresStorage(PG_DSN, schema=schema, owner=o) for o in "ab")
    if request.param == "redis":
        from slimta.queue.redis import RedisStorage

        prefix = request.getfixturevalue("redis_prefix")
        return tuple(RedisStorage("redis://127.0.0.1:6379/0", prefix=prefix, owner=o)
                     for o in "ab")
    first = SharedDictStorage(owner="a")
    return first, first.peer("b")


@pytest.fixture
def clock():
    return ManualClock()


async def settle(*queues, rounds: int = 200):
    """Let the queues run until none is attempting anything and nothing more starts."""
    for _ in range(rounds):
        await asyncio.sleep(0.01)
        if all(not q._attempting for q in queues):
            await asyncio.sleep(0.02)
            if all(not q._attempting for q in queues):
                return
    raise AssertionError("the queues never settled")


async def test_two_queues_deliver_each_message_once_and_share_the_work(shared_pair, clock):
    delivered = collections.Counter()
    store_a, store_b = shared_pair
    a = Queue(store_a, CountingRelay("a", delivered, delay=0.005), clock=clock, relay_pool=4,
              lease=LEASE)
    b = Queue(store_b, CountingRelay("b", delivered, delay=0.005), clock=clock, relay_pool=4,
              lease=LEASE)
    async with a, b:
        for n in range(60):
            await (a if n % 2 else b).enqueue(message(n))
        for _ in range(500):
            if sum(delivered[f"m{n}"] for n in range(60)) == 60:
                break
            await asyncio.sleep(0.01)
        await settle(a, b)
        assert await store_a.load() == []
    assert all(delivered[f"m{n}"] == 1 for n in range(60)), delivered
    assert delivered["a"] > 0 and delivered["b"] > 0


async def test_an_edge_only_queue_wakes_a_delivering_one(shared_pair, clock):
    """The storage's notification starts delivery at once, without waiting for a poll."""
    delivered = collections.Counter()
    store_edge, store_relay = shared_pair
    edge = Queue(store_edge, None, clock=clock, lease=LEASE)
    relay = Queue(store_relay, CountingRelay("r", delivered), clock=clock, lease=LEASE,
                  poll_interval=3600)
    async with edge, relay:
        await asyncio.sleep(0.05)  # the relay queue is asleep until a notification
        await edge.enqueue(message(1))
        for _ in range(300):
            if delivered["m1"]:
                break
            await asyncio.sleep(0.01)
    assert delivered["m1"] == 1


async def test_a_dead_hosts_message_is_delivered_by_another_after_its_lease(shared_pair, clock):
    delivered = collections.Counter()
    store_a, store_b = shared_pair
    hang = asyncio.Event()  # never set: host a dies mid-delivery
    a = Queue(store_a, CountingRelay("a", delivered, gate=hang), clock=clock, lease=LEASE)
    a.start()
    await a.started()
    await a.enqueue(message(1))
    for _ in range(100):
        if a.relay.started:
            break
        await asyncio.sleep(0.01)
    assert a.relay.started == 1
    # "kill -9": the scheduler, the lease renewal and the attempt just stop
    for task in (a._scheduler, a._renewer, *a._attempting.values()):
        task.cancel()
    b = Queue(store_b, CountingRelay("b", delivered), clock=clock, lease=LEASE)
    async with b:
        await clock.advance(LEASE - 1)
        await settle(b)
        assert delivered["m1"] == 0, "claimed while a's lease still held"
        await clock.advance(2)
        for _ in range(300):
            if delivered["m1"]:
                break
            await asyncio.sleep(0.01)
        await settle(b)
        assert await store_b.load() == []
    assert delivered["m1"] == 1 and delivered["b"] == 1
    await a.stop()


async def test_a_live_host_renews_its_lease_through_a_long_delivery(shared_pair, clock):
    delivered = collections.Counter()
    store_a, store_b = shared_pair
    slow = asyncio.Event()
    a = Queue(store_a, CountingRelay("a", delivered, gate=slow), clock=clock, lease=LEASE)
    b = Queue(store_b, CountingRelay("b", delivered), clock=clock, lease=LEASE)
    async with a:
        await a.enqueue(message(1))
        for _ in range(100):
            if a.relay.started:
                break
            await asyncio.sleep(0.01)
        async with b:
            for _ in range(12):  # 4 leases long, in steps of a sixth of a lease
                await clock.advance(LEASE / 6)
                await asyncio.sleep(0.02)
            assert b.relay.started == 0, "the other queue claimed a message being delivered"
            slow.set()
            await settle(a, b)
    assert delivered["m1"] == 1 and delivered["a"] == 1


async def test_a_deferred_message_is_retried_by_either_queue_after_its_backoff(
        shared_pair, clock):
    delivered = collections.Counter()
    store_a, store_b = shared_pair

    def backoff(envelope, attempts):
        return 300.0

    relay = CountingRelay("either", delivered, fail_first=1)  # one relay, used by both
    a = Queue(store_a, relay, clock=clock, lease=LEASE, backoff=backoff)
    b = Queue(store_b, relay, clock=clock, lease=LEASE, backoff=backoff)
    async with a, b:
        await a.enqueue(message(1))
        await settle(a, b)
        [entry] = await store_a.list()
        assert entry.attempts == 1 and entry.next_attempt == clock.time() + 300
        await clock.advance(299)
        await settle(a, b)
        assert delivered["m1"] == 0
        await clock.advance(2)
        for _ in range(300):
            if delivered["m1"]:
                break
            await asyncio.sleep(0.01)
        await settle(a, b)
        assert await store_a.load() == []
    assert delivered["m1"] == 1 and relay.started == 2


async def test_held_messages_are_not_claimed_until_released(shared_pair, clock):
    delivered = collections.Counter()
    store_a, store_b = shared_pair
    edge = Queue(store_a, None, clock=clock, lease=LEASE)
    relay = Queue(store_b, CountingRelay("b", delivered), clock=clock, lease=LEASE)
    async with edge:
        [(_, qid)] = await edge.enqueue(message(1))
        await edge.hold(qid)
        async with relay:
            await settle(relay)
            await clock.advance(3600)
            await settle(relay)
            assert delivered["m1"] == 0
            await edge.release(qid)
            for _ in range(300):
                if delivered["m1"]:
                    break
                await asyncio.sleep(0.01)
    assert delivered["m1"] == 1


async def test_a_full_queue_claims_again_as_soon_as_one_attempt_ends(shared_pair, clock):
    """With every slot busy, one finished attempt lets the next message start at once."""
    delivered = collections.Counter()
    store, _ = shared_pair
    turns = asyncio.Semaphore(0)  # each release lets one attempt finish

    class OneAtATime(CountingRelay):
        async def _attempt(self, envelope, attempts):
            self.started += 1
            await turns.acquire()
            self.delivered[envelope.headers["Subject"]] += 1
            return Reply("250", "2.0.0 Ok")

    queue = Queue(store, OneAtATime("a", delivered), clock=clock, relay_pool=2, lease=LEASE,
                  poll_interval=3600)

    async def started(count):
        for _ in range(300):
            if queue.relay.started == count:
                return True
            await asyncio.sleep(0.01)
        return False

    async with queue:
        for n in range(3):
            await queue.enqueue(message(n))
        assert await started(2)
        turns.release()  # one ends, the other still runs
        third = await started(3)
        turns.release()
        turns.release()
        assert third, "the third waited for every attempt to end"
        for _ in range(300):
            if sum(delivered[f"m{n}"] for n in range(3)) == 3:
                break
            await asyncio.sleep(0.01)
    assert all(delivered[f"m{n}"] == 1 for n in range(3))
