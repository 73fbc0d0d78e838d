"""Tests for slimta.lookup.redis.RedisLookup against the Redis server on this machine.

Redis runs on 127.0.0.1:6379; the tests fail, never skip, when it cannot be
reached. Each test writes under a key prefix of its own and deletes it.
"""

from __future__ import annotations

import json
import uuid

import pytest
import redis
import redis.asyncio

from slimta.lookup import LookupError
from slimta.lookup.redis import RedisLookup

URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def prefix():
    prefix = f"slimta-test:{uuid.uuid4().hex}:"
    client = redis.Redis.from_url(URL)
    client.ping()
    yield prefix
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture
def rclient():
    client = redis.Redis.from_url(URL, decode_responses=True)
    yield client
    client.close()


async def test_string_json(prefix, rclient):
    rclient.set(prefix + "alice@example.com",
                json.dumps({"alias": "al@example.net", "add_headers": {"X-A": "1"}}))
    lookup = RedisLookup(URL, prefix + "{address}")
    async with lookup:
        assert await lookup.lookup_address("alice@example.com") == {
            "alias": "al@example.net", "add_headers": {"X-A": "1"}}
        assert await lookup.lookup_address("bob@example.com") is None


async def test_hash(prefix, rclient):
    rclient.hset(prefix + "user:bob", mapping={"password": "{PLAIN}x", "quota": "10"})
    lookup = RedisLookup(URL, prefix + "user:{localpart}", kind="hash")
    async with lookup:
        assert await lookup.lookup_address("bob@example.com") == {
            "password": "{PLAIN}x", "quota": "10"}
        assert await lookup.lookup_address("carol@example.com") is None


async def test_domain_template(prefix, rclient):
    rclient.set(prefix + "domain:example.com", '{"relay": "mx"}')
    async with RedisLookup(URL, prefix + "domain:{domain}") as lookup:
        assert await lookup.lookup_address("anyone@example.com") == {"relay": "mx"}


async def test_bad_values_raise_lookup_error(prefix, rclient):
    rclient.set(prefix + "notjson", "alias=x")
    rclient.set(prefix + "list", "[1, 2]")
    rclient.hset(prefix + "hash", "a", "b")
    async with RedisLookup(URL, prefix + "{address}") as lookup:
        with pytest.raises(LookupError, match="does not hold JSON"):
            await lookup.lookup(address="notjson")
        with pytest.raises(LookupError, match="not a mapping"):
            await lookup.lookup(address="list")
        with pytest.raises(LookupError, match="WRONGTYPE"):
            await lookup.lookup(address="hash")
    async with RedisLookup(URL, prefix + "{address}", kind="hash") as lookup:
        with pytest.raises(LookupError, match="WRONGTYPE"):
            await lookup.lookup(address="notjson")


async def test_given_client_is_not_closed(prefix, rclient):
    rclient.set(prefix + "k", '{"v": 1}')
    client = redis.asyncio.Redis.from_url(URL, decode_responses=True)
    try:
        async with RedisLookup(key_template=prefix + "{address}", client=client) as lookup:
            assert await lookup.lookup(address="k") == {"v": 1}
        assert await client.ping()
    finally:
        await client.aclose()


async def test_unreachable_server_raises_lookup_error():
    async with RedisLookup("redis://127.0.0.1:1/0", "{address}", timeout=1.0) as lookup:
        with pytest.raises(LookupError, match="Redis lookup"):
            await lookup.lookup(address="a")


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="kind"):
        RedisLookup(URL, kind="list")
    with pytest.raises(ValueError, match="url or a client"):
        RedisLookup()
