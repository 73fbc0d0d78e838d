"""MxSmtpRelay against real peers: dnsmasq for DNS, Postfix's smtp-sink as every MX host.

Each MX host is an smtp-sink on its own loopback address (127.0.0.2,
127.0.0.3, ...), all on one port, since an MX relay connects to the same port
on every host. dnsmasq serves the MX and address records; a scripted server
gives the replies dnsmasq cannot (SERVFAIL), a silent port a dead name server.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time

import dns.rcode
import pytest

from daemons import shared_port
from dnsmasq import ScriptedDnsServer, silent_udp_port, zone
from slimta.envelope import Envelope
from slimta.relay import PermanentRelayError, TransientRelayError
from slimta.relay.smtp.mx import MxSmtpRelay
from slimta.smtp.reply import Reply
from slimta.util.dns import Resolver

MX1, MX2, MX3, HOST4, HOST5 = (f"127.0.0.{i}" for i in range(2, 7))
HOSTS = (MX1, MX2, MX3, HOST4, HOST5)

RECORDS = [
    # multi.test: three MX hosts by preference (listed out of order on purpose)
    "--mx-host=multi.test,mx3.multi.test,30",
    "--mx-host=multi.test,mx1.multi.test,10",
    "--mx-host=multi.test,mx2.multi.test,20",
    f"--host-record=mx1.multi.test,{MX1}",
    f"--host-record=mx2.multi.test,{MX2}",
    f"--host-record=mx3.multi.test,{MX3}",
    # a.test, b.test, c.test: one MX host each, on MX1, MX2, MX3
    "--mx-host=a.test,mx.a.test,10",
    "--mx-host=b.test,mx.b.test,10",
    "--mx-host=c.test,mx.c.test,10",
    f"--host-record=mx.a.test,{MX1}",
    f"--host-record=mx.b.test,{MX2}",
    f"--host-record=mx.c.test,{MX3}",
    # implicit.test: no MX, an A record (the implicit MX, RFC 5321 §5.1)
    f"--host-record=implicit.test,{HOST4}",
    # null.test: RFC 7505
    "--mx-host=null.test,.,0",
    # equal.test: two MX hosts of equal preference
    "--mx-host=equal.test,one.equal.test,10",
    "--mx-host=equal.test,two.equal.test,10",
    f"--host-record=one.equal.test,{MX1}",
    f"--host-record=two.equal.test,{MX2}",
]

MSG = (b"From: sender@example.test\r\nTo: whoever@example.test\r\nSubject: mx test\r\n\r\n"
       b"hello over MX\r\n")

FAST = {"connect_timeout": 2.0, "command_timeout": 5.0, "data_timeout": 5.0,
        "ehlo_as": "relay.test"}


def envelope(*rcpts: str) -> Envelope:
    env = Envelope("sender@example.test", list(rcpts))
    env.parse(MSG)
    return env


def delivered(results, rcpts):
    assert set(results) == set(rcpts), results
    for rcpt in rcpts:
        assert isinstance(results[rcpt], Reply) and results[rcpt].code == "250", results


def transactions(sink) -> list[list[str]]:
    """The recipients of each transaction a sink received (sorted: dump names are not in order)."""
    return sorted(msg["recipients"] for msg in sink.messages())


@pytest.fixture
def dns_server(dnsmasq):
    return dnsmasq(RECORDS)


@pytest.fixture
def resolver(dns_server):
    return dns_server.resolver(timeout=0.3, lifetime=0.8)


@pytest.fixture
def port():
    return shared_port(HOSTS)


@pytest.fixture
def sinks(smtp_sink, port):
    """``sinks(host, *options)``: an smtp-sink on ``host`` and the shared port."""

    def start(host, *options):
        return smtp_sink(*options, host=host, port=port)

    return start


@pytest.fixture
async def make_relay(resolver, port):
    """``make_relay(**options)``: an MxSmtpRelay on the shared port; closed at teardown."""
    relays = []

    def make(**options):
        options = {"resolver": resolver, "port": port, **FAST, **options}
        relay = MxSmtpRelay(**options)
        relays.append(relay)
        return relay

    yield make
    for relay in relays:
        await relay.close()


# --- MX hosts by preference -----------------------------------------------------


async def test_delivers_to_the_best_mx(sinks, make_relay):
    mx1, mx2, mx3 = sinks(MX1), sinks(MX2), sinks(MX3)
    relay = make_relay()
    rcpts = ["x@multi.test", "y@multi.test"]
    delivered(await relay.attempt(envelope(*rcpts), 0), rcpts)
    await relay.close()
    [msg] = mx1.messages()
    assert msg["sender"] == "sender@example.test"
    assert msg["recipients"] == rcpts
    assert msg["data"].rstrip(b"\r\n") == MSG.rstrip(b"\r\n")
    assert mx2.messages() == [] and mx3.messages() == []


async def test_best_mx_down_the_next_one_takes_it_in_the_same_attempt(sinks, make_relay):
    # nothing listens on MX1: connection refused
    mx2, mx3 = sinks(MX2), sinks(MX3)
    relay = make_relay()
    delivered(await relay.attempt(envelope("x@multi.test"), 0), ["x@multi.test"])
    # and again: the dead host is tried first each time, and skipped each time
    delivered(await relay.attempt(envelope("y@multi.test"), 1), ["y@multi.test"])
    await relay.close()
    assert transactions(mx2) == [["x@multi.test"], ["y@multi.test"]]
    assert mx3.messages() == []


async def test_two_mx_hosts_down_the_third_takes_it(sinks, make_relay):
    mx3 = sinks(MX3)
    relay = make_relay()
    delivered(await relay.attempt(envelope("x@multi.test"), 0), ["x@multi.test"])
    assert transactions(mx3) == [["x@multi.test"]]


@pytest.mark.parametrize(
    "fault",
    [
        pytest.param(("-r", "connect"), id="4xx-banner"),
        pytest.param(("-Q", "connect"), id="421-banner-and-disconnect"),
        pytest.param(("-q", "connect"), id="disconnect-before-banner"),
        pytest.param(("-r", "ehlo"), id="4xx-ehlo"),
        pytest.param(("-Q", "ehlo"), id="421-ehlo"),
        # Postfix skips a 5xx greeting too (smtp_skip_5xx_greeting = yes)
        pytest.param(("-f", "connect"), id="5xx-banner"),
    ],
)
async def test_best_mx_refusing_the_greeting_the_next_one_takes_it(sinks, make_relay, fault):
    mx1, mx2 = sinks(MX1, *fault), sinks(MX2)
    relay = make_relay()
    delivered(await relay.attempt(envelope("x@multi.test"), 0), ["x@multi.test"])
    await relay.close()
    assert mx1.messages() == []
    assert transactions(mx2) == [["x@multi.test"]]


async def test_a_5xx_greeting_from_the_last_mx_defers_instead_of_bouncing(sinks, make_relay):
    # MX1 and MX2 down, MX3 greets with 5xx: the outcome must not depend on
    # which host came last (Postfix's smtp_skip_5xx_greeting)
    sinks(MX3, "-f", "connect")
    relay = make_relay()
    results = await relay.attempt(envelope("x@multi.test"), 0)
    assert isinstance(results["x@multi.test"], TransientRelayError)
    await relay.close()


async def test_best_mx_silent_after_connect_times_out_then_the_next_one(sinks, make_relay,
                                                                         port):
    # MX1 accepts the TCP connection (the kernel does) but never sends a banner
    with socket.socket() as silent:
        silent.bind((MX1, port))
        silent.listen(5)
        mx2 = sinks(MX2)
        relay = make_relay(command_timeout=0.5)
        started = time.monotonic()
        delivered(await relay.attempt(envelope("x@multi.test"), 0), ["x@multi.test"])
        assert time.monotonic() - started < 3
        await relay.close()
    assert transactions(mx2) == [["x@multi.test"]]


async def test_every_mx_host_down_is_transient(make_relay):
    relay = make_relay()
    rcpts = ["x@multi.test", "y@multi.test"]
    results = await relay.attempt(envelope(*rcpts), 0)
    assert set(results) == set(rcpts)
    for rcpt in rcpts:
        error = results[rcpt]
        assert isinstance(error, TransientRelayError)
        assert (error.reply.code, error.reply.enhanced_status_code) == ("451", "4.4.1")
        assert MX3 in str(error)  # the last host tried


@pytest.mark.parametrize(
    ("fault", "error_class", "command"),
    [
        (("-r", "mail"), TransientRelayError, "MAIL"),
        (("-f", "rcpt"), PermanentRelayError, "RCPT"),
        (("-r", "data"), TransientRelayError, "DATA"),
    ],
)
async def test_a_failure_after_the_greeting_does_not_try_the_next_mx(
        sinks, make_relay, fault, error_class, command):
    mx1, mx2 = sinks(MX1, *fault), sinks(MX2)
    relay = make_relay()
    results = await relay.attempt(envelope("x@multi.test"), 0)
    error = results["x@multi.test"]
    assert type(error) is error_class, results
    assert f"{command} failure" in str(error)
    assert error.reply.code[0] == ("5" if error_class is PermanentRelayError else "4")
    await relay.close()
    assert mx1.messages() == [] and mx2.messages() == []


async def test_equal_preferences_share_the_load(sinks, make_relay):
    one, two = sinks(MX1), sinks(MX2)
    relay = make_relay(rng=random.Random(7))
    for n in range(12):
        rcpt = f"r{n}@equal.test"
        delivered(await relay.attempt(envelope(rcpt), n), [rcpt])
    await relay.close()
    counts = len(one.messages()), len(two.messages())
    assert sum(counts) == 12
    assert min(counts) > 0, counts


# --- what DNS says ------------------------------------------------------------------


async def test_null_mx_is_permanent_5_1_10(make_relay):
    relay = make_relay()
    rcpts = ["x@null.test", "y@null.test"]
    results = await relay.attempt(envelope(*rcpts), 0)
    assert set(results) == set(rcpts)
    for rcpt in rcpts:
        error = results[rcpt]
        assert isinstance(error, PermanentRelayError)
        assert (error.reply.code, error.reply.enhanced_status_code) == ("556", "5.1.10")


async def test_implicit_mx_delivers_to_the_address_record(sinks, make_relay):
    host = sinks(HOST4)
    relay = make_relay()
    delivered(await relay.attempt(envelope("x@implicit.test"), 0), ["x@implicit.test"])
    await relay.close()
    assert transactions(host) == [["x@implicit.test"]]


async def test_nxdomain_is_permanent_5_1_2(make_relay):
    relay = make_relay()
    results = await relay.attempt(envelope("x@nosuch.test"), 0)
    error = results["x@nosuch.test"]
    assert isinstance(error, PermanentRelayError)
    assert (error.reply.code, error.reply.enhanced_status_code) == ("550", "5.1.2")
    assert "nosuch.test" in error.reply.message


async def test_servfail_is_transient_4_4_3_for_that_domain_only(sinks, port):
    records = {("good.test", "MX"): ["10 mx.good.test."], ("mx.good.test", "A"): [MX1]}
    rcodes = {"bad.test": dns.rcode.SERVFAIL}
    mx = sinks(MX1)
    with ScriptedDnsServer(zone(records, rcodes=rcodes)) as scripted:
        resolver = Resolver([scripted.nameserver], timeout=0.3, lifetime=0.8)
        relay = MxSmtpRelay(resolver=resolver, port=port, **FAST)
        results = await relay.attempt(envelope("x@good.test", "y@bad.test"), 0)
        await relay.close()
    delivered({"x@good.test": results["x@good.test"]}, ["x@good.test"])
    error = results["y@bad.test"]
    assert isinstance(error, TransientRelayError)
    assert (error.reply.code, error.reply.enhanced_status_code) == ("451", "4.4.3")
    assert "bad.test" in error.reply.message
    assert transactions(mx) == [["x@good.test"]]


async def test_dead_nameserver_is_transient_4_4_3(port):
    with silent_udp_port() as dns_port:
        resolver = Resolver([f"127.0.0.1:{dns_port}"], timeout=0.1, lifetime=0.3)
        relay = MxSmtpRelay(resolver=resolver, port=port, **FAST)
        started = time.monotonic()
        results = await relay.attempt(envelope("x@multi.test", "y@a.test"), 0)
        assert time.monotonic() - started < 2
    for rcpt in ("x@multi.test", "y@a.test"):
        error = results[rcpt]
        assert isinstance(error, TransientRelayError)
        assert error.reply.enhanced_status_code == "4.4.3"


async def test_lookups_are_cached_up_to_their_ttl(dnsmasq, sinks, port):
    server = dnsmasq(["--local-ttl=300", *RECORDS])
    mx1 = sinks(MX1)
    relay = MxSmtpRelay(resolver=server.resolver(timeout=0.2, lifetime=0.5), port=port, **FAST)
    delivered(await relay.attempt(envelope("x@multi.test"), 0), ["x@multi.test"])
    server.stop()  # no DNS any more: the second attempt lives on the cache
    delivered(await relay.attempt(envelope("y@multi.test"), 1), ["y@multi.test"])
    # a domain not looked up before has nothing cached
    results = await relay.attempt(envelope("z@a.test"), 0)
    assert results["z@a.test"].reply.enhanced_status_code == "4.4.3"
    await relay.close()
    assert transactions(mx1) == [["x@multi.test"], ["y@multi.test"]]


# --- several domains in one envelope ------------------------------------------------


async def test_three_domains_in_one_attempt(sinks, make_relay):
    a, b, c = sinks(MX1), sinks(MX2), sinks(MX3)
    relay = make_relay()
    rcpts = ["a1@a.test", "b1@b.test", "c1@c.test", "a2@A.Test", "c2@c.test"]
    results = await relay.attempt(envelope(*rcpts), 0)
    delivered(results, rcpts)
    await relay.close()
    # one transaction per domain, each with only its own recipients, in envelope order
    assert transactions(a) == [["a1@a.test", "a2@A.Test"]]
    assert transactions(b) == [["b1@b.test"]]
    assert transactions(c) == [["c1@c.test", "c2@c.test"]]
    for sink in (a, b, c):
        assert sink.messages()[0]["data"].rstrip(b"\r\n") == MSG.rstrip(b"\r\n")


async def test_rcpt_5xx_for_one_domain_does_not_affect_the_others(sinks, make_relay):
    a, b, c = sinks(MX1), sinks(MX2, "-f", "rcpt"), sinks(MX3)
    relay = make_relay()
    results = await relay.attempt(envelope("a1@a.test", "b1@b.test", "b2@b.test", "c1@c.test"),
                                  0)
    delivered({r: results[r] for r in ("a1@a.test", "c1@c.test")}, ["a1@a.test", "c1@c.test"])
    for rcpt in ("b1@b.test", "b2@b.test"):
        error = results[rcpt]
        assert isinstance(error, PermanentRelayError)
        assert error.reply.code[0] == "5"
        assert "RCPT failure" in str(error)
    await relay.close()
    assert transactions(a) == [["a1@a.test"]]
    assert b.messages() == []
    assert transactions(c) == [["c1@c.test"]]


async def test_rcpt_4xx_for_one_domain_does_not_affect_the_others(sinks, make_relay):
    a, b = sinks(MX1), sinks(MX2, "-r", "rcpt")
    relay = make_relay()
    results = await relay.attempt(envelope("a1@a.test", "b1@b.test"), 0)
    delivered({"a1@a.test": results["a1@a.test"]}, ["a1@a.test"])
    error = results["b1@b.test"]
    assert isinstance(error, TransientRelayError) and error.reply.code[0] == "4"
    await relay.close()
    assert transactions(a) == [["a1@a.test"]]
    assert b.messages() == []


async def test_every_kind_of_outcome_in_one_envelope(sinks, make_relay):
    a = sinks(MX1)
    relay = make_relay()
    rcpts = ["ok@a.test", "x@null.test", "x@nosuch.test", "x@b.test", "x@implicit.test"]
    results = await relay.attempt(envelope(*rcpts), 0)
    assert set(results) == set(rcpts)
    delivered({"ok@a.test": results["ok@a.test"]}, ["ok@a.test"])
    outcomes = {rcpt: (isinstance(results[rcpt], PermanentRelayError),
                       isinstance(results[rcpt], TransientRelayError),
                       results[rcpt].reply.enhanced_status_code)
                for rcpt in rcpts[1:]}
    assert outcomes == {
        "x@null.test": (True, False, "5.1.10"),
        "x@nosuch.test": (True, False, "5.1.2"),
        "x@b.test": (False, True, "4.4.1"),  # its MX host is down
        "x@implicit.test": (False, True, "4.4.1"),
    }
    await relay.close()
    assert transactions(a) == [["ok@a.test"]]


async def test_connections_are_reused_per_mx_host(sinks, make_relay, port):
    a = sinks(MX1)
    relay = make_relay()
    for n in range(3):
        delivered(await relay.attempt(envelope(f"x{n}@a.test"), n), [f"x{n}@a.test"])
    # multi.test's best MX is the same host: the same connection
    delivered(await relay.attempt(envelope("y@multi.test"), 0), ["y@multi.test"])
    [session] = relay._pools[(MX1, port)]._idle
    assert session.deliveries == 4
    await relay.close()
    assert len(a.messages()) == 4


# --- routing by configuration -------------------------------------------------------


async def test_force_mx(sinks, smtp_sink, make_relay, port):
    forced = sinks(HOST5)
    elsewhere_port = shared_port((HOST5,))
    other_port = smtp_sink(host=HOST5, port=elsewhere_port)
    mx1 = sinks(MX1)
    relay = make_relay(force_mx={
        "unlisted.test": HOST5,  # not in DNS at all
        "Ported.test": f"{HOST5}:{elsewhere_port}",
        "null.test": "mx.a.test",  # a name, resolved; wins over the null MX
    })
    relay.force_mx("multi.test", HOST5)  # wins over the MX records
    rcpts = ["x@unlisted.test", "x@ported.test", "x@null.test", "x@multi.test", "x@a.test"]
    delivered(await relay.attempt(envelope(*rcpts), 0), rcpts)
    await relay.close()
    assert transactions(forced) == [["x@multi.test"], ["x@unlisted.test"]]
    assert transactions(other_port) == [["x@ported.test"]]
    # null.test forced to mx.a.test (MX1); a.test has its own MX record (MX1)
    assert transactions(mx1) == [["x@a.test"], ["x@null.test"]]


async def test_force_mx_to_a_dead_host_is_transient(make_relay):
    relay = make_relay(force_mx={"a.test": HOST5})
    results = await relay.attempt(envelope("x@a.test"), 0)
    assert isinstance(results["x@a.test"], TransientRelayError)


async def test_override_mx(sinks, make_relay):
    mx1, replacement = sinks(MX1), sinks(HOST5)
    relay = make_relay(override_mx={"mx1.multi.test": HOST5})
    relay.override_mx("implicit.test", HOST5)  # the implicit MX can be overridden too
    rcpts = ["x@multi.test", "x@implicit.test"]
    delivered(await relay.attempt(envelope(*rcpts), 0), rcpts)
    await relay.close()
    assert mx1.messages() == []
    assert transactions(replacement) == [["x@implicit.test"], ["x@multi.test"]]


# --- pooled connections ---------------------------------------------------------------


class DroppingServer:
    """A minimal SMTP server on ``host:port`` that takes one transaction per connection.

    At the next MAIL on the same connection it closes the connection without a
    reply, as a server does whose idle timer fired just as the client reused it.
    """

    def __init__(self, host: str, port: int, pipelining: bool = False):
        self.host, self.port = host, port
        self.ehlo = b"250-drop.test\r\n250 PIPELINING\r\n" if pipelining else b"250 drop.test\r\n"
        self.connections = 0
        self.transactions: list[list[str]] = []
        self.server = None

    async def __aenter__(self):
        self.server = await asyncio.start_server(self._serve, self.host, self.port)
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader, writer):
        self.connections += 1
        done, rcpts = 0, []
        writer.write(b"220 drop.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"MAIL" and done:
                    return
                if verb == b"RCPT":
                    rcpts.append(line.split(b"<", 1)[1].split(b">", 1)[0].decode())
                if verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    while await reader.readline() not in (b".\r\n", b""):
                        pass
                    self.transactions.append(rcpts)
                    done, rcpts = done + 1, []
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == b"EHLO":
                    writer.write(self.ehlo)
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:
                    writer.write(b"250 ok\r\n")
                await writer.drain()
        finally:
            writer.close()


@pytest.mark.parametrize("pipelining", [False, True])
async def test_a_pooled_connection_dropped_at_mail_is_replaced(make_relay, port, pipelining):
    async with DroppingServer(MX1, port, pipelining) as server:
        relay = make_relay()
        delivered(await relay.attempt(envelope("x@a.test"), 0), ["x@a.test"])
        # the pooled connection is reused; the server drops it at MAIL: a new one takes over
        delivered(await relay.attempt(envelope("y@a.test"), 1), ["y@a.test"])
        await relay.close()
    assert server.transactions == [["x@a.test"], ["y@a.test"]]
    assert server.connections == 2
