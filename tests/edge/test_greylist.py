"""slimta.edge.greylist: the triplet logic with a manual clock, memory and Redis storage,
and on real SmtpEdge sessions."""

from __future__ import annotations

import asyncio
import base64
import smtplib

import pytest

from slimta.edge.greylist import (
    Greylist,
    GreylistStorage,
    MemoryGreylistStorage,
    RedisGreylistStorage,
)
from slimta.edge.smtp import SmtpValidators
from slimta.util.clock import ManualClock

REDIS_URL = "redis://127.0.0.1:6379/0"
GREYLISTED = (451, b"4.7.1 Greylisted, please try again later")
DAY = 86400


def run(coro):
    return asyncio.run(coro)


def test_first_attempt_retry_before_delay_then_pass_then_whitelist():
    async def go():
        clock = ManualClock()
        g = Greylist(delay=300, whitelist_for=36 * DAY, clock=clock)
        assert not await g.check("192.0.2.7", "a@example.test", "b@example.test")
        await clock.advance(299)
        assert not await g.check("192.0.2.7", "a@example.test", "b@example.test")
        await clock.advance(1)
        assert await g.check("192.0.2.7", "a@example.test", "b@example.test")
        # whitelisted: passes at once, even from another host of the /24, any case
        await clock.advance(30 * DAY)
        assert await g.check("192.0.2.200", "A@Example.TEST", "b@example.test")
        # each pass renews the whitelist
        await clock.advance(30 * DAY)
        assert await g.check("192.0.2.7", "a@example.test", "b@example.test")
        await clock.advance(36 * DAY)
        assert not await g.check("192.0.2.7", "a@example.test", "b@example.test")
        # another triplet is greylisted on its own
        assert not await g.check("192.0.2.7", "a@example.test", "c@example.test")
        assert not await g.check("192.0.3.7", "a@example.test", "b@example.test")

    run(go())


def test_networks_ipv4_24_ipv6_64_mapped():
    g = Greylist()
    t = g.triplet
    assert t("192.0.2.1", "", "r@x") == t("192.0.2.254", "", "r@x")
    assert t("192.0.2.1", "", "r@x") != t("192.0.1.1", "", "r@x")
    assert t("::ffff:192.0.2.1", "", "r@x") == t("192.0.2.9", "", "r@x")
    assert t("2001:db8:0:1::1", "", "r@x") == t("2001:db8:0:1:ffff::2", "", "r@x")
    assert t("2001:db8:0:1::1", "", "r@x") != t("2001:db8:0:2::1", "", "r@x")
    assert t("192.0.2.1", "", "r@x") != t("192.0.2.1", "s@x", "r@x")
    g32 = Greylist(ipv4_prefix=32)
    assert g32.triplet("192.0.2.1", "", "r@x") != g32.triplet("192.0.2.2", "", "r@x")


def test_unretried_triplet_is_forgotten_after_retry_window():
    async def go():
        clock = ManualClock()
        g = Greylist(delay=300, retry_window=2 * DAY, clock=clock)
        assert not await g.check("192.0.2.7", "a@x", "b@x")
        await clock.advance(2 * DAY + 1)
        assert not await g.check("192.0.2.7", "a@x", "b@x")  # starts over
        await clock.advance(299)
        assert not await g.check("192.0.2.7", "a@x", "b@x")
        await clock.advance(1)
        assert await g.check("192.0.2.7", "a@x", "b@x")

    run(go())


def test_memory_storage_sweeps_and_bounds():
    async def go():
        clock = ManualClock()
        s = MemoryGreylistStorage(clock=clock, sweep_interval=10, max_keys=50)
        assert isinstance(s, GreylistStorage)
        for i in range(100):
            await s.set(f"k{i}", float(i), 5 + i)
        assert len(s) == 50
        assert await s.get("k99") == 99.0
        assert await s.get("k0") is None
        await clock.advance(200)
        await s.set("new", 1.0, 5)
        assert len(s) == 1
        assert await s.add("new", 2.0, 5) == 1.0
        await s.delete("new")
        assert await s.add("new", 2.0, 5) is None

    run(go())


def test_bad_arguments():
    with pytest.raises(ValueError):
        Greylist(delay=300, retry_window=300)
    with pytest.raises(ValueError):
        Greylist(whitelist_for=0)


def test_redis_storage_shared_by_two_hosts(redis_prefix):
    async def go():
        clock = ManualClock()
        s1 = RedisGreylistStorage(REDIS_URL, prefix=redis_prefix)
        s2 = RedisGreylistStorage(REDIS_URL, prefix=redis_prefix)
        try:
            assert isinstance(s1, GreylistStorage)
            host1 = Greylist(delay=300, storage=s1, clock=clock)
            host2 = Greylist(delay=300, storage=s2, clock=clock)
            assert not await host1.check("192.0.2.7", "a@x", "b@x")
            await clock.advance(100)
            assert not await host2.check("192.0.2.8", "a@x", "b@x")  # the same first sighting
            await clock.advance(200)
            assert await host2.check("192.0.2.7", "a@x", "b@x")
            assert await host1.check("192.0.2.9", "a@x", "b@x")  # whitelisted for both
            keys = [k async for k in s1.client.scan_iter(match=redis_prefix + "*")]
            assert len(keys) == 1 and keys[0].startswith((redis_prefix + "w:").encode())
            ttl = await s1.client.pttl(keys[0])
            assert 35 * DAY * 1000 < ttl <= 36 * DAY * 1000
        finally:
            await s1.aclose()
            await s2.aclose()

    run(go())


# --- on real SmtpEdge sessions ----------------------------------------------------

def validators_for(greylist: Greylist):
    class V(SmtpValidators):
        @greylist
        def handle_rcpt(self, reply, recipient, params):
            if recipient.startswith("unknown@"):
                reply.code = "550"
                reply.message = "5.1.1 No such user"

        def handle_auth(self, reply, creds):
            if not (creds.authcid == "alice" and creds.check_secret("secret")):
                reply.code = "535"
                reply.message = "5.7.8 Authentication credentials invalid"

    return V


def start(run_edge, greylist):
    return run_edge(validator_class=validators_for(greylist), auth=True, auth_require_tls=False)


MSG = b"Subject: hi\r\n\r\nhello\r\n"


def attempt(port, sender="a@example.test", recipient="b@example.test"):
    """One delivery attempt: the RCPT reply (and the message sent if it was accepted)."""
    with smtplib.SMTP("127.0.0.1", port) as c:
        c.ehlo()
        assert c.mail(sender)[0] == 250
        reply = c.rcpt(recipient)
        if reply[0] == 250:
            assert c.data(MSG)[0] == 250
        return reply


def test_greylisting_on_edge(run_edge):
    clock = ManualClock()
    greylist = Greylist(delay=300, clock=clock, exempt_loopback=False)
    edge = start(run_edge, greylist)
    assert attempt(edge.port) == GREYLISTED
    edge.call(clock.advance(120))
    assert attempt(edge.port) == GREYLISTED
    edge.call(clock.advance(180))
    assert attempt(edge.port)[0] == 250
    # whitelisted for the next messages
    edge.call(clock.advance(10 * DAY))
    assert attempt(edge.port)[0] == 250
    assert len(edge.queue.envelopes) == 2
    # another recipient or sender is a new triplet
    assert attempt(edge.port, recipient="c@example.test") == GREYLISTED
    assert attempt(edge.port, sender="") == GREYLISTED


def test_mixed_recipients_in_one_message(run_edge):
    clock = ManualClock()
    edge = start(run_edge, Greylist(delay=300, clock=clock, exempt_loopback=False))
    assert attempt(edge.port, recipient="b@example.test") == GREYLISTED
    edge.call(clock.advance(300))
    with smtplib.SMTP("127.0.0.1", edge.port) as c:
        c.ehlo()
        c.mail("a@example.test")
        assert c.rcpt("b@example.test")[0] == 250
        assert c.rcpt("new@example.test") == GREYLISTED
        assert c.data(MSG)[0] == 250
    assert edge.queue.envelopes[0].recipients == ["b@example.test"]


def test_refused_recipient_is_not_greylisted(run_edge):
    edge = start(run_edge, Greylist(exempt_loopback=False))
    assert attempt(edge.port, recipient="unknown@example.test") == (550, b"5.1.1 No such user")


def test_exemptions(run_edge):
    # loopback exempt by default
    edge = start(run_edge, Greylist())
    assert attempt(edge.port)[0] == 250
    # authenticated sessions exempt
    edge = start(run_edge, Greylist(exempt_loopback=False))
    with smtplib.SMTP("127.0.0.1", edge.port) as c:
        c.ehlo()
        auth = base64.b64encode(b"\0alice\0secret").decode()
        assert c.docmd("AUTH", "PLAIN " + auth)[0] == 235
        c.mail("alice@example.test")
        assert c.rcpt("b@example.test")[0] == 250
    # exempt networks
    edge = start(run_edge, Greylist(exempt_loopback=False, exempt_networks=["127.0.0.0/8"]))
    assert attempt(edge.port)[0] == 250


class BrokenStorage:
    async def get(self, key):
        raise ConnectionError("down")

    async def set(self, key, value, ttl):
        raise ConnectionError("down")

    async def add(self, key, value, ttl):
        raise ConnectionError("down")

    async def delete(self, key):
        raise ConnectionError("down")


def test_failing_storage_fails_open(run_edge, caplog):
    edge = start(run_edge, Greylist(storage=BrokenStorage(), exempt_loopback=False))
    assert attempt(edge.port)[0] == 250
    assert "greylist storage failed" in caplog.text


def test_greylisting_on_edge_with_redis(run_edge, redis_prefix):
    clock = ManualClock()
    storage = RedisGreylistStorage(REDIS_URL, prefix=redis_prefix)
    edge = start(run_edge, Greylist(delay=300, clock=clock, storage=storage,
                                    exempt_loopback=False))
    try:
        assert attempt(edge.port) == GREYLISTED
        edge.call(clock.advance(299))
        assert attempt(edge.port) == GREYLISTED
        edge.call(clock.advance(1))
        assert attempt(edge.port)[0] == 250
        assert attempt(edge.port)[0] == 250
    finally:
        edge.call(storage.aclose())
