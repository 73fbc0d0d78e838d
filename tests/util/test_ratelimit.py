"""slimta.util.ratelimit: MemoryCounter with a manual clock, RedisCounter on the local Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from slimta.util.clock import ManualClock
from slimta.util.ratelimit import Counter, MemoryCounter, RedisCounter

REDIS_URL = "redis://127.0.0.1:6379/0"


def run(coro):
    return asyncio.run(coro)


def test_memory_counts_within_window_and_restarts_after():
    async def go():
        clock = ManualClock()
        c = MemoryCounter(clock=clock)
        assert isinstance(c, Counter)
        assert await c.hit("a", 60) == 1
        assert await c.hit("a", 60) == 2
        assert await c.hit("a", 60, amount=3) == 5
        assert await c.hit("b", 60) == 1
        assert await c.get("a") == 5
        await clock.advance(59.9)
        assert await c.hit("a", 60) == 6
        await clock.advance(0.1)  # the window opened at the first hit has ended
        assert await c.get("a") == 0
        assert await c.hit("a", 60) == 1
        assert await c.get("missing") == 0

    run(go())


def test_memory_cooldown_lasts_from_first_hit():
    async def go():
        clock = ManualClock()
        c = MemoryCounter(clock=clock)
        await c.hit("cool", 900)
        await clock.advance(899)
        assert await c.get("cool") == 1
        await clock.advance(1)
        assert await c.get("cool") == 0

    run(go())


def test_memory_sweeps_expired_keys():
    async def go():
        clock = ManualClock()
        c = MemoryCounter(clock=clock, sweep_interval=10)
        for i in range(1000):
            await c.hit(f"k{i}", 5)
        assert len(c) == 1000
        await clock.advance(10)
        await c.hit("new", 5)
        assert len(c) == 1
        assert len(c._ends) == 1

    run(go())


def test_memory_max_keys_bounds_memory():
    async def go():
        clock = ManualClock()
        c = MemoryCounter(clock=clock, max_keys=100)
        for i in range(1000):
            await c.hit(f"k{i}", 60 + i)  # later keys end later
        assert len(c) == 100
        assert await c.get("k999") == 1
        assert await c.get("k0") == 0  # forgotten first: its window ended first

    run(go())


def test_memory_rejects_bad_arguments():
    with pytest.raises(ValueError):
        MemoryCounter(max_keys=0)
    with pytest.raises(ValueError):
        run(MemoryCounter().hit("a", 0))


def test_redis_counts_and_expires(redis_prefix):
    async def go():
        c = RedisCounter(REDIS_URL, prefix=redis_prefix)
        try:
            assert isinstance(c, Counter)
            assert await c.hit("a", 0.4) == 1
            assert await c.hit("a", 0.4, amount=2) == 3
            assert await c.get("a") == 3
            ttl = await c.client.pttl(redis_prefix + "a")
            assert 0 < ttl <= 400
            await asyncio.sleep(0.6)
            assert await c.get("a") == 0
            assert await c.hit("a", 0.4) == 1
        finally:
            await c.aclose()

    run(go())


def test_two_redis_counters_share_counts(redis_prefix):
    async def go():
        client = aioredis.Redis.from_url(REDIS_URL)
        host1 = RedisCounter(REDIS_URL, prefix=redis_prefix)
        host2 = RedisCounter(client, prefix=redis_prefix)
        try:
            assert await host1.hit("ip:192.0.2.7", 60) == 1
            assert await host2.hit("ip:192.0.2.7", 60) == 2
            assert await host1.hit("ip:192.0.2.7", 60) == 3
            assert await host2.get("ip:192.0.2.7") == 3
            # concurrent hits from both are all counted
            counts = await asyncio.gather(*(h.hit("burst", 60) for h in [host1, host2] * 25))
            assert sorted(counts) == list(range(1, 51))
        finally:
            await host1.aclose()
            await host2.aclose()  # a client passed in is left open
            assert await client.ping()
            await client.aclose()

    run(go())


def test_redis_key_without_ttl_gets_one(redis_prefix):
    async def go():
        c = RedisCounter(REDIS_URL, prefix=redis_prefix)
        try:
            await c.client.set(redis_prefix + "stale", 5)
            assert await c.hit("stale", 30) == 6
            assert 0 < await c.client.pttl(redis_prefix + "stale") <= 30_000
        finally:
            await c.aclose()

    run(go())
