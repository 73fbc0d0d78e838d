"""Tests for what only RedisStorage does, against the local Redis (127.0.0.1:6379): its
key layout (messages, the due and leases sets, owners), pub/sub wake-ups and their
connection, open/close and the layout version, the connection options (the original
app's keys among them) and the durability warnings. The QueueStorage and
SharedQueueStorage contracts run on it in test_storage.py and test_shared_storage.py.

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
from storage_helpers import RAW, FakeClock, assert_the_history, make_envelope, write_a_history

from slimta.queue.redis import (
    DEFAULT_URL,
    SCHEMA_VERSION,
    NotReplicatedError,
    RedisStorage,
    StorageVersionError,
    _durability_warning,
)

URL = "redis://127.0.0.1:6379/0"

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


# --- key layout ----------------------------------------------------------------------


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


async def test_the_history_is_a_json_field_absent_in_older_messages(store, raw, redis_prefix):
    qid = await store.write(make_envelope(), 1.0)
    key = f"{redis_prefix}msg:{qid}"
    assert not await raw.hexists(key, "history")  # as in messages of older slimtas
    assert (await store.get(qid)).history == []
    await store.record_attempt(qid, 2.0, [], None)
    assert not await raw.hexists(key, "history")
    await store.record_attempt(qid, 3.0, [], "451 sp\u00e4ter", attempted_at=1700000000.123456)
    await store.record_attempt(qid, 4.0, [], None, attempted_at=1700000001.5)
    assert [(float(t), r) for t, r in json.loads(await raw.hget(key, "history"))] == [
        (1700000000.123456, "451 sp\u00e4ter"), (1700000001.5, None)]
    assert await raw.get(f"{redis_prefix}version") == str(SCHEMA_VERSION).encode() == b"1"


# --- leases ---------------------------------------------------------------------------


async def test_leases_are_kept_in_the_leases_set_and_the_owner_field(store, other, raw,
                                                                     redis_prefix):
    def key(name: str) -> str:
        return f"{redis_prefix}{name}"

    first = await store.write(make_envelope(), 100.0)
    second = await store.write(make_envelope(), 200.0)
    assert await store.claim(250.0, 10, 30.0) == [first, second]
    assert sorted(await raw.zrange(key("leases"), 0, -1, withscores=True)) == sorted(
        [(first.encode(), 280.0), (second.encode(), 280.0)])
    assert await raw.hget(key(f"msg:{first}"), "owner") == b"host-a"
    assert await raw.zcard(key("due")) == 0  # a leased message is not in due
    # renew moves the expiry of this owner's live leases only
    assert await store.renew([first], 270.0, 30.0) == [first]
    assert await raw.zscore(key("leases"), first) == 300.0
    assert await raw.zscore(key("leases"), second) == 280.0
    # another owner takes a lease that ran out over; the old holder's release does nothing
    assert await other.claim(280.0, 10, 30.0) == [second]
    await store.release(second)
    assert await raw.hget(key(f"msg:{second}"), "owner") == b"host-b"
    assert await raw.zscore(key("leases"), second) == 310.0
    # record_attempt ends it: no owner, out of leases, back in due at its next attempt
    assert await other.record_attempt(second, 400.0, [1], "451 later") == 1
    assert await raw.hget(key(f"msg:{second}"), "owner") is None
    assert await raw.zscore(key("leases"), second) is None
    assert await raw.zscore(key("due"), second) == 400.0
    # remove deletes every key of a leased message
    assert await store.remove(first) is True
    assert await raw.zcard(key("leases")) == 0
    assert await raw.exists(key(f"msg:{first}")) == 0
    assert await raw.zscore(key("messages"), first) is None
    assert await raw.zrange(key("due"), 0, -1) == [second.encode()]

# --- wake-ups -------------------------------------------------------------------------


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
    assert watcher._watcher is None  # close stops the watcher


# --- open, close, versions ---------------------------------------------------------------


async def test_data_survives_close_and_reopen(redis_prefix):
    first = RedisStorage(prefix=redis_prefix, owner="a")
    await first.open()
    qid = await write_a_history(first)
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
        await assert_the_history(again, qid)
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
