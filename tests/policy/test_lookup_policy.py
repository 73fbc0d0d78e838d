"""Tests for slimta.policy.lookup.LookupPolicy: aliases, VERP, added headers, failures."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from slimta.envelope import Envelope
from slimta.lookup import LookupError
from slimta.lookup.dict import DictLookup
from slimta.lookup.redis import RedisLookup
from slimta.lookup.regex import RegexLookup
from slimta.policy import apply_queue_policies
from slimta.policy.lookup import LookupPolicy
from slimta.queue import QueueError

DATA = b"From: alice@example.com\r\nSubject: hi\r\n\r\nbody\r\n"


def envelope(sender="alice@example.com", *rcpts: str) -> Envelope:
    env = Envelope(sender)
    for rcpt in rcpts:
        env.add_recipient(rcpt, notify=["FAILURE"], orcpt=f"rfc822;{rcpt}")
    env.parse(DATA)
    return env


def header_block(env: Envelope) -> bytes:
    return env.flatten()[0]


async def test_recipient_alias_with_templates():
    lookup = DictLookup({
        "info@example.com": {"alias": "helpdesk@example.net"},
        "example.org": {"alias": "{localpart}@mail.example.org"},
        "sales@example.com": {"alias": "{localpart}-team@{domain}"},
    }, "{address}")
    domain_lookup = DictLookup({"example.org": {"alias": "{localpart}@mail.example.org"}},
                               "{domain}")
    env = envelope("alice@example.com", "info@example.com", "bob@example.org",
                   "sales@example.com", "other@example.com")
    assert await LookupPolicy(lookup).apply(env) is None
    assert env.recipients == ["helpdesk@example.net", "bob@example.org",
                              "sales-team@example.com", "other@example.com"]
    # DSN parameters follow the rewritten address
    assert env.rcpt_params["helpdesk@example.net"] == {
        "notify": ["FAILURE"], "orcpt": "rfc822;info@example.com"}
    assert "info@example.com" not in env.rcpt_params
    await LookupPolicy(domain_lookup).apply(env)
    assert env.recipients[1] == "bob@mail.example.org"
    assert env.sender == "alice@example.com"  # on_sender is off by default


async def test_alias_expands_to_several_and_drops_duplicates():
    lookup = DictLookup({
        "team@example.com": {"alias": "a@example.com, b@example.com"},
        "all@example.com": {"alias": ["b@example.com", "C@example.com", "{localpart}@x.example"]},
    }, "{address}")
    env = envelope("s@example.com", "team@example.com", "all@example.com", "C@EXAMPLE.com",
                   "c@example.com")
    await LookupPolicy(lookup).apply(env)
    assert env.recipients == ["a@example.com", "b@example.com", "C@example.com",
                              "all@x.example", "c@example.com"]


async def test_sender_alias_only_with_on_sender():
    lookup = DictLookup({"alice@example.com": {"alias": "{localpart}@public.example"}},
                        "{address}")
    env = envelope("alice@example.com", "alice@example.com")
    await LookupPolicy(lookup, on_sender=True, on_recipients=False).apply(env)
    assert env.sender == "alice@public.example"
    assert env.recipients == ["alice@example.com"]


async def test_null_sender_is_not_looked_up():
    seen = []

    class Recording(DictLookup):
        async def lookup(self, **kwargs):
            seen.append(kwargs)
            return None

    env = envelope("", "bob@example.com")
    await LookupPolicy(Recording({}, "{address}"), on_sender=True).apply(env)
    assert seen == [{"address": "bob@example.com", "localpart": "bob",
                     "domain": "example.com", "role": "recipient"}]


async def test_verp_from_record():
    lookup = DictLookup({"list@example.com": {"verp": "bounces.example.com"}}, "{address}")
    env = envelope("list@example.com", "a@x.example", "b@y.example")
    result = await LookupPolicy(lookup, on_sender=True, on_recipients=False).apply(env)
    assert [(e.sender, e.recipients) for e in result] == [
        ("list+a=x.example@bounces.example.com", ["a@x.example"]),
        ("list+b=y.example@bounces.example.com", ["b@y.example"]),
    ]
    assert result[0].rcpt_params == {"a@x.example": {"notify": ["FAILURE"],
                                                     "orcpt": "rfc822;a@x.example"}}


async def test_verp_option_and_own_domain():
    lookup = RegexLookup([(r"@lists\.example$", {})])
    policy = LookupPolicy(lookup, on_sender=True, on_recipients=False, verp=True)
    env = envelope("news@lists.example", "a@x.example")
    result = await apply_queue_policies([policy], env)
    assert [e.sender for e in result] == ["news+a=x.example@lists.example"]
    # a sender without a record is left alone
    env = envelope("alice@example.com", "a@x.example", "b@x.example")
    assert await policy.apply(env) is None
    assert env.sender == "alice@example.com"
    # verp "yes" as a Redis hash would store it, and alias before VERP
    lookup = DictLookup({"a@example.com": {"verp": "yes", "alias": "list@example.net"}},
                        "{address}")
    env = envelope("a@example.com", "r@x.example")
    result = await LookupPolicy(lookup, on_sender=True).apply(env)
    assert [e.sender for e in result] == ["list+r=x.example@example.net"]


async def test_add_headers():
    lookup = DictLookup({
        "bob@example.com": {"add_headers": {"X-Customer": "42", "X-Evil": "a\r\nBcc: x@y"}},
        "alice@example.com": {"add_headers": json.dumps({"X-Sender-Class": "staff"})},
        "carol@example.com": {"add_headers": {"Bad Name": "x", "X-Ok": "1"}},
    }, "{address}")
    env = envelope("alice@example.com", "bob@example.com", "carol@example.com")
    await LookupPolicy(lookup, on_sender=True).apply(env)
    block = header_block(env)
    assert b"X-Customer: 42\r\n" in block
    assert b"X-Evil: a Bcc: x@y\r\n" in block
    assert b"X-Sender-Class: staff\r\n" in block
    assert b"X-Ok: 1\r\n" in block
    assert b"Bad Name" not in block
    assert block.endswith(b"From: alice@example.com\r\nSubject: hi\r\n\r\n")
    # one record's fields keep their order
    assert block.index(b"X-Customer:") < block.index(b"X-Evil:")


async def test_lookup_failure_is_451():
    class Failing(DictLookup):
        async def lookup(self, **kwargs):
            raise LookupError("backend down")

    env = envelope("alice@example.com", "bob@example.com")
    with pytest.raises(QueueError) as info:
        await LookupPolicy(Failing({}, "{address}")).apply(env)
    assert (info.value.reply.code, info.value.reply.message) == (
        "451", "4.3.0 Lookup failed, try again later")


@pytest.mark.parametrize("record", [
    {"alias": "{nosuchname}@example.com"},
    {"alias": 42},
])
async def test_unusable_record_is_451(record):
    lookup = DictLookup({"bob@example.com": record}, "{address}")
    with pytest.raises(QueueError) as info:
        await LookupPolicy(lookup).apply(envelope("a@example.com", "bob@example.com"))
    assert (info.value.reply.code, info.value.reply.message) == (
        "451", "4.3.0 Lookup failed, try again later")


async def test_sender_alias_to_several_is_451():
    lookup = DictLookup({"a@example.com": {"alias": "x@example.com, y@example.com"}},
                        "{address}")
    with pytest.raises(QueueError) as info:
        await LookupPolicy(lookup, on_sender=True).apply(envelope("a@example.com", "r@x.example"))
    assert info.value.reply.code == "451"


async def test_with_redis_hash_records():
    prefix = f"slimta-test:{uuid.uuid4().hex}:"
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0", decode_responses=True)
    try:
        client.hset(prefix + "info@example.com", mapping={
            "alias": "{localpart}@support.example.com",
            "add_headers": json.dumps({"X-Routed": "support"}),
        })
        lookup = RedisLookup("redis://127.0.0.1:6379/0", prefix + "{address}", kind="hash")
        async with lookup:
            env = envelope("alice@example.com", "info@example.com", "bob@example.com")
            await apply_queue_policies([LookupPolicy(lookup)], env)
        assert env.recipients == ["info@support.example.com", "bob@example.com"]
        assert header_block(env).startswith(b"X-Routed: support\r\n")
    finally:
        keys = list(client.scan_iter(match=prefix + "*"))
        if keys:
            client.delete(*keys)
        client.close()
