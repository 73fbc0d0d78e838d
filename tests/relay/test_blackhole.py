"""Tests for slimta.relay.blackhole: BlackholeRelay."""

from __future__ import annotations

import asyncio

from slimta.envelope import Envelope
from slimta.relay import Relay
from slimta.relay.blackhole import BlackholeRelay


def envelope(*rcpts: str) -> Envelope:
    env = Envelope("alice@example.com", list(rcpts))
    env.parse(b"Subject: hi\r\n\r\nbody\r\n")
    return env


async def test_accepts_everything_and_counts():
    relay = BlackholeRelay()
    assert isinstance(relay, Relay)
    assert (relay.count, relay.recipient_count) == (0, 0)
    assert await relay.attempt(envelope("a@example.net", "b@example.net"), 0) is None
    assert await relay.attempt(envelope("c@example.net"), 3) is None
    assert (relay.count, relay.recipient_count) == (2, 3)


async def test_concurrent_attempts_are_all_counted():
    relay = BlackholeRelay()
    results = await asyncio.gather(*(relay.attempt(envelope("a@x"), 0) for _ in range(500)))
    assert results == [None] * 500
    assert relay.count == 500


async def test_relay_policies_still_run():
    seen = []

    class Record:
        def apply(self, env):
            seen.append(env.recipients)

    relay = BlackholeRelay()
    relay.add_policy(Record())
    await relay.attempt(envelope("a@example.net"), 0)
    assert seen == [["a@example.net"]]
    assert relay.count == 1
