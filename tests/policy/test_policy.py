"""Tests for slimta.policy: the base classes and apply_queue_policies."""

from __future__ import annotations

import asyncio

import pytest

from slimta.envelope import Envelope
from slimta.policy import QueuePolicy, RelayPolicy, apply_queue_policies
from slimta.queue import QueueError
from slimta.relay import Relay


def envelope(*rcpts: str) -> Envelope:
    env = Envelope("alice@example.com", list(rcpts))
    env.parse(b"Subject: hi\r\n\r\nbody\r\n")
    return env


class Tag(QueuePolicy):
    """Appends its name to every envelope's ``tags``."""

    def __init__(self, name: str):
        self.name = name

    def apply(self, envelope):
        envelope.tags = [*getattr(envelope, "tags", []), self.name]


class AsyncTag(Tag):
    async def apply(self, envelope):
        await asyncio.sleep(0)
        super().apply(envelope)


class SplitAll(QueuePolicy):
    def apply(self, envelope):
        if len(envelope.recipients) > 1:
            return [envelope.copy([r]) for r in envelope.recipients]
        return None


class AsyncSplitAll(SplitAll):
    async def apply(self, envelope):
        await asyncio.sleep(0)
        return super().apply(envelope)


def test_base_classes_must_be_overridden():
    with pytest.raises(NotImplementedError):
        QueuePolicy().apply(envelope("b@example.org"))
    with pytest.raises(NotImplementedError):
        RelayPolicy().apply(envelope("b@example.org"))


async def test_no_policies_keeps_the_envelope():
    env = envelope("b@example.org")
    assert await apply_queue_policies([], env) == [env]


async def test_policies_apply_in_order_in_place():
    env = envelope("b@example.org")
    result = await apply_queue_policies([Tag("one"), AsyncTag("two"), Tag("three")], env)
    assert result == [env]
    assert result[0] is env
    assert env.tags == ["one", "two", "three"]


@pytest.mark.parametrize("splitter", [SplitAll(), AsyncSplitAll()])
async def test_a_returned_list_replaces_the_envelope_and_later_policies_apply_to_each(splitter):
    env = envelope("a@example.org", "b@example.org", "c@example.org")
    result = await apply_queue_policies([Tag("before"), splitter, AsyncTag("after")], env)
    assert [e.recipients for e in result] == [
        ["a@example.org"], ["b@example.org"], ["c@example.org"],
    ]
    assert all(e is not env for e in result)
    for e in result:
        assert e.tags == ["before", "after"]
    assert env.tags == ["before"]


async def test_expansion_keeps_order_across_several_splitting_policies():
    class ByDomainThenTag(QueuePolicy):
        def apply(self, envelope):
            rcpts = envelope.recipients
            if len(rcpts) == 4:
                return [envelope.copy(rcpts[:2]), envelope.copy(rcpts[2:])]
            return None

    env = envelope("a@x.example", "b@x.example", "c@y.example", "d@y.example")
    result = await apply_queue_policies([ByDomainThenTag(), SplitAll()], env)
    assert [e.recipients for e in result] == [
        ["a@x.example"], ["b@x.example"], ["c@y.example"], ["d@y.example"],
    ]


async def test_an_empty_list_keeps_the_envelope():
    class Nothing(QueuePolicy):
        def apply(self, envelope):
            return []

    env = envelope("b@example.org")
    assert await apply_queue_policies([Nothing(), Tag("next")], env) == [env]
    assert env.tags == ["next"]


async def test_any_iterable_result_is_accepted():
    class Gen(QueuePolicy):
        def apply(self, envelope):
            return (envelope.copy([r]) for r in envelope.recipients)

    env = envelope("a@example.org", "b@example.org")
    result = await apply_queue_policies([Gen()], env)
    assert [e.recipients for e in result] == [["a@example.org"], ["b@example.org"]]


async def test_a_result_that_is_not_a_list_is_a_type_error():
    class Wrong(QueuePolicy):
        def apply(self, envelope):
            return True

    with pytest.raises(TypeError, match="not None or a list of envelopes"):
        await apply_queue_policies([Wrong()], envelope("b@example.org"))


async def test_plain_functions_and_coroutine_functions_are_policies():
    seen = []

    def plain(env):
        seen.append(("plain", env.recipients[0]))

    async def coro(env):
        seen.append(("coro", env.recipients[0]))
        return [env.copy(["z@example.org"])]

    result = await apply_queue_policies([plain, coro, plain], envelope("b@example.org"))
    assert [e.recipients for e in result] == [["z@example.org"]]
    assert seen == [("plain", "b@example.org"), ("coro", "b@example.org"),
                    ("plain", "z@example.org")]


async def test_exceptions_propagate_and_stop_the_chain():
    class Refuse(QueuePolicy):
        async def apply(self, envelope):
            raise QueueError()

    env = envelope("b@example.org")
    with pytest.raises(QueueError):
        await apply_queue_policies([Tag("one"), Refuse(), Tag("two")], env)
    assert env.tags == ["one"]


async def test_relay_policies_sync_and_async_run_before_each_attempt():
    calls = []

    class Sync(RelayPolicy):
        def apply(self, envelope):
            calls.append("sync")
            envelope.prepend_header("X-Sync", "1")

    class Async(RelayPolicy):
        async def apply(self, envelope):
            await asyncio.sleep(0)
            calls.append("async")

    class Recorder(Relay):
        def _attempt(self, envelope, attempts):
            calls.append(("attempt", attempts, envelope.flatten()[0].startswith(b"X-Sync: 1")))

    relay = Recorder()
    relay.add_policy(Sync())
    relay.add_policy(Async())
    await relay.attempt(envelope("b@example.org"), 0)
    await relay.attempt(envelope("b@example.org"), 1)
    assert calls == ["sync", "async", ("attempt", 0, True), "sync", "async", ("attempt", 1, True)]
