"""slimta.util.ptr: FCrDNS against a real dnsmasq, and PtrValidators on real SmtpEdge sessions."""

from __future__ import annotations

import asyncio
import smtplib
import threading
import time

import dns.rdatatype
import pytest

from dnsmasq import ScriptedDnsServer, shared_resolver, silent_udp_port, zone
from slimta.edge.smtp import SmtpValidators
from slimta.util import dns as sdns
from slimta.util.dnsbl import check_dnsbl
from slimta.util.ptr import (
    MAX_PTR_NAMES,
    PtrLookup,
    PtrResult,
    PtrValidators,
    start_ptr_lookup,
    verify_ptr,
)

RECORDS = [
    # 127.0.0.2: PTR good.example.test, whose A is 127.0.0.2 (--host-record makes both)
    "--host-record=good.example.test,127.0.0.2",
    # 127.0.0.3: PTR liar.example.test, whose A is elsewhere
    "--ptr-record=3.0.0.127.in-addr.arpa,liar.example.test",
    "--address=/liar.example.test/127.0.0.99",
    # 127.0.0.4: no PTR at all
    # 127.0.0.5: two PTR names, the second confirms
    "--ptr-record=5.0.0.127.in-addr.arpa,liar.example.test",
    "--ptr-record=5.0.0.127.in-addr.arpa,second.example.test",
    "--address=/second.example.test/127.0.0.5",
    # 127.0.0.6: PTR to a name that does not exist
    "--ptr-record=6.0.0.127.in-addr.arpa,gone.example.test",
    # IPv6: 2001:db8::5 confirmed, 2001:db8::6 points at an IPv4-only name
    "--host-record=six.example.test,2001:db8::5",
    "--ptr-record=6.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa,"
    "good.example.test",
    # ::1, for the session over IPv6
    "--host-record=loop6.example.test,::1",
]


@pytest.fixture
def names(dnsmasq):
    server = dnsmasq(RECORDS)
    server.install()
    return server


# --- verify_ptr ---------------------------------------------------------------


async def test_fcrdns_pass(names):
    assert await verify_ptr("127.0.0.2") == PtrResult(
        "127.0.0.2", "pass", "good.example.test", ("good.example.test",))


async def test_fcrdns_fail_when_the_name_points_elsewhere(names):
    assert await verify_ptr("127.0.0.3") == PtrResult(
        "127.0.0.3", "fail", None, ("liar.example.test",))


async def test_fcrdns_fail_without_ptr(names):
    assert await verify_ptr("127.0.0.4") == PtrResult("127.0.0.4", "fail")


async def test_fcrdns_fail_when_the_name_does_not_exist(names):
    assert await verify_ptr("127.0.0.6") == PtrResult(
        "127.0.0.6", "fail", None, ("gone.example.test",))


async def test_fcrdns_any_confirming_name(names):
    result = await verify_ptr("127.0.0.5")
    assert result.status == "pass"
    assert result.host == "second.example.test"
    assert set(result.names) == {"liar.example.test", "second.example.test"}


async def test_fcrdns_ipv6(names):
    assert await verify_ptr("2001:db8::5") == PtrResult(
        "2001:db8::5", "pass", "six.example.test", ("six.example.test",))
    # good.example.test has an A record only: an AAAA lookup cannot confirm
    assert await verify_ptr("2001:db8::6") == PtrResult(
        "2001:db8::6", "fail", None, ("good.example.test",))


async def test_ipv4_mapped_address(names):
    assert (await verify_ptr("::ffff:127.0.0.2")).host == "good.example.test"


async def test_explicit_resolver(dnsmasq):
    server = dnsmasq(RECORDS)
    assert (await verify_ptr("127.0.0.2", server.resolver())).status == "pass"


async def test_not_an_ip_address():
    with pytest.raises(ValueError):
        await verify_ptr("mail.example.test")


async def test_temperror_when_the_ptr_lookup_times_out():
    with silent_udp_port() as port:
        resolver = sdns.Resolver([f"127.0.0.1:{port}"], timeout=0.2, lifetime=0.3)
        assert await verify_ptr("127.0.0.2", resolver) == PtrResult("127.0.0.2", "temperror")


async def test_temperror_when_the_forward_lookup_times_out():
    def handler(query):
        if query.question[0].rdtype == dns.rdatatype.PTR:
            return zone({("2.0.0.127.in-addr.arpa", "PTR"): ["good.example.test."]})(query)
        return None  # A lookups go unanswered

    with ScriptedDnsServer(handler) as server:
        resolver = sdns.Resolver([server.nameserver], timeout=0.2, lifetime=0.3)
        assert await verify_ptr("127.0.0.2", resolver) == PtrResult(
            "127.0.0.2", "temperror", None, ("good.example.test",))


async def test_at_most_ten_names_are_checked():
    ptrs = [f"h{n:02d}.example.test." for n in range(12)]
    records = {("2.0.0.127.in-addr.arpa", "PTR"): ptrs}
    for name in ptrs:
        records[(name.rstrip("."), "A")] = ["127.0.0.9"]
    with ScriptedDnsServer(zone(records)) as server:
        resolver = sdns.Resolver([server.nameserver], timeout=1, lifetime=2)
        result = await verify_ptr("127.0.0.2", resolver)
        forward = [q for q in server.queries if q.question[0].rdtype == dns.rdatatype.A]
    assert result.status == "fail"
    assert len(result.names) == 12
    # distinct names: a loaded machine may make the resolver retransmit a query
    assert len({q.question[0].name for q in forward}) == MAX_PTR_NAMES


# --- PtrLookup ------------------------------------------------------------------


async def test_lookup_in_the_background(names):
    lookup = start_ptr_lookup("127.0.0.2")
    assert isinstance(lookup, PtrLookup)
    assert lookup.result() is None and not lookup.done  # never waits
    result = await lookup.wait(5)
    assert result.host == "good.example.test"
    assert lookup.done and lookup.result() is result
    assert "done" in repr(lookup)


async def test_wait_gives_up_without_cancelling():
    release = threading.Event()

    def handler(query):
        release.wait(5)
        return zone({("2.0.0.127.in-addr.arpa", "PTR"): ["good.example.test."]})(query)

    with ScriptedDnsServer(handler) as server:
        resolver = sdns.Resolver([server.nameserver], timeout=3, lifetime=3)
        lookup = PtrLookup("127.0.0.2", resolver=resolver)
        assert await lookup.wait(0.1) is None
        assert not lookup.done
        release.set()
        result = await lookup.wait(5)
    assert result == PtrResult("127.0.0.2", "fail", None, ("good.example.test",))


async def test_lookup_timeout_is_temperror():
    with silent_udp_port() as port:
        resolver = sdns.Resolver([f"127.0.0.1:{port}"], timeout=1, lifetime=1)
        lookup = PtrLookup("127.0.0.2", resolver=resolver, timeout=0.2)
        assert await lookup.wait(5) == PtrResult("127.0.0.2", "temperror")
        await asyncio.gather(*resolver._inflight.values(), return_exceptions=True)


async def test_cancel():
    with silent_udp_port() as port:
        resolver = sdns.Resolver([f"127.0.0.1:{port}"], timeout=1, lifetime=1)
        lookup = PtrLookup("127.0.0.2", resolver=resolver)
        await asyncio.sleep(0)
        lookup.cancel()
        assert await lookup.wait(1) is None
        assert lookup.done and lookup.result() is None
        await asyncio.gather(*resolver._inflight.values(), return_exceptions=True)


# --- PtrValidators on real SmtpEdge sessions -------------------------------------


class Validators(PtrValidators, SmtpValidators):
    ptr_skip_loopback = False


def send(port, source, host="127.0.0.1", pause=0.3):
    """One message from ``source``; ``pause`` after EHLO lets a quick lookup finish."""
    with smtplib.SMTP(host, port, timeout=10, source_address=(source, 0)) as client:
        client.ehlo("client.test")
        time.sleep(pause)
        client.sendmail("a@example.test", ["b@example.test"], b"Subject: hi\r\n\r\nhello\r\n")


def test_confirmed_name_in_envelope(names, run_edge):
    edge = run_edge(validator_class=Validators)
    send(edge.port, "127.0.0.2")
    [envelope] = edge.queue.envelopes
    assert envelope.client["host"] == "good.example.test"
    assert envelope.client["ip"] == "127.0.0.2"


def test_unconfirmed_name_not_recorded(names, run_edge):
    edge = run_edge(validator_class=Validators)
    send(edge.port, "127.0.0.3")
    send(edge.port, "127.0.0.4")
    assert [e.client["host"] for e in edge.queue.envelopes] == [None, None]


def test_ipv6_session(names, run_edge):
    edge = run_edge(validator_class=Validators, listener=("::1", 0))
    with smtplib.SMTP("::1", edge.port, timeout=10) as client:
        client.ehlo("client.test")
        time.sleep(0.3)
        client.sendmail("a@example.test", ["b@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
    assert edge.queue.envelopes[0].client["host"] == "loop6.example.test"


def test_slow_lookup_does_not_block_end_of_data(run_edge):
    """The PTR answer is held back: the first message is queued at once without a
    host; once the lookup has finished, the next message in the session has it."""
    release = threading.Event()
    answer = zone({
        ("2.0.0.127.in-addr.arpa", "PTR"): ["good.example.test."],
        ("good.example.test", "A"): ["127.0.0.2"],
    })

    def handler(query):
        if query.question[0].rdtype == dns.rdatatype.PTR:
            release.wait(10)
        return answer(query)

    with ScriptedDnsServer(handler) as server, \
            shared_resolver(sdns.Resolver([server.nameserver], timeout=8, lifetime=8)):
        edge = run_edge(validator_class=Validators)
        with smtplib.SMTP("127.0.0.1", edge.port, timeout=10,
                          source_address=("127.0.0.2", 0)) as client:
            client.ehlo("client.test")
            started = time.monotonic()
            client.sendmail("a@example.test", ["b@example.test"], b"Subject: 1\r\n\r\none\r\n")
            assert time.monotonic() - started < 1
            release.set()
            time.sleep(0.3)
            client.sendmail("a@example.test", ["b@example.test"], b"Subject: 2\r\n\r\ntwo\r\n")
    assert [e.client["host"] for e in edge.queue.envelopes] == [None, "good.example.test"]


def test_unanswered_lookup_does_not_block_and_is_cancelled_at_close(run_edge):
    with silent_udp_port() as port, \
            shared_resolver(sdns.Resolver([f"127.0.0.1:{port}"], timeout=1, lifetime=1)):
        edge = run_edge(validator_class=Validators)
        started = time.monotonic()
        send(edge.port, "127.0.0.2", pause=0)
        assert time.monotonic() - started < 0.8
        time.sleep(1.3)  # the resolver's own request ends before the edge stops
    assert edge.queue.envelopes[0].client["host"] is None


class DefaultValidators(PtrValidators, SmtpValidators):
    pass


def test_loopback_client_triggers_no_query(run_edge):
    handler = zone({("2.0.0.127.in-addr.arpa", "PTR"): ["good.example.test."]})
    with ScriptedDnsServer(handler) as server, \
            shared_resolver(sdns.Resolver([server.nameserver], cache=False)):
        edge = run_edge(validator_class=DefaultValidators)
        send(edge.port, "127.0.0.2")
        assert server.queries == []
    assert edge.queue.envelopes[0].client["host"] is None


class Combined(PtrValidators, SmtpValidators):
    """User validators on top of PtrValidators, with a DNSBL check, calling super()."""

    ptr_skip_loopback = False
    seen: list = []

    @check_dnsbl("zen.test", "554", "5.7.1 Client blocked", skip_loopback=False)
    async def handle_banner(self, reply, address):
        await asyncio.sleep(0)
        return super().handle_banner(reply, address)

    def handle_rcpt(self, reply, recipient, params):
        if recipient.startswith("nobody@"):
            reply.code = "550"
            reply.message = "5.1.1 No such user"

    async def handle_have_data(self, reply, data):
        await asyncio.sleep(0)
        result = super().handle_have_data(reply, data)
        self.seen.append(self.session.client_host)
        return result

    def handle_close(self):
        self.seen.append(self.ptr_lookup.done if self.ptr_lookup else None)
        return super().handle_close()


def test_combined_with_user_validators_and_dnsbl(dnsmasq, run_edge):
    server = dnsmasq([*RECORDS, "--host-record=3.0.0.127.zen.test,127.0.0.2"])
    server.install()
    Combined.seen = []
    edge = run_edge(validator_class=Combined)
    with smtplib.SMTP("127.0.0.1", edge.port, timeout=10,
                      source_address=("127.0.0.2", 0)) as client:
        client.ehlo("client.test")
        time.sleep(0.3)
        client.mail("a@example.test")
        assert client.rcpt("nobody@example.test") == (550, b"5.1.1 No such user")
        assert client.rcpt("b@example.test")[0] == 250
        assert client.data(b"Subject: hi\r\n\r\nhello\r\n")[0] == 250
    # the DNSBL refuses 127.0.0.3 at the banner (and starts no PTR lookup)
    with pytest.raises(smtplib.SMTPConnectError) as exc:
        smtplib.SMTP("127.0.0.1", edge.port, timeout=10, source_address=("127.0.0.3", 0))
    assert (exc.value.smtp_code, exc.value.smtp_error) == (554, b"5.7.1 Client blocked")
    deadline = time.monotonic() + 5
    while len(Combined.seen) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert Combined.seen == ["good.example.test", True, None]
    assert edge.queue.envelopes[0].client["host"] == "good.example.test"
