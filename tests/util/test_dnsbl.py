"""slimta.util.dnsbl against a real dnsmasq serving DNSBL zones, and on real SmtpEdge sessions."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import smtplib
import time

import pytest

from dnsmasq import ScriptedDnsServer, shared_resolver, silent_udp_port, zone
from slimta.edge.smtp import SmtpValidators
from slimta.util import dns as sdns
from slimta.util.dnsbl import (
    MAX_REASON,
    DnsBlocklist,
    DnsBlocklistGroup,
    DnsblResult,
    check_dnsbl,
    client_ip,
    reverse_ip,
)

V6_LISTED = "2001:db8::1"
V6_NIBBLES = "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2"
LOOPBACK6_NIBBLES = ".".join(["1"] + ["0"] * 31)

RECORDS = [
    # zen.test lists 127.0.0.2 (with a reason), 2001:db8::1 and ::1
    "--host-record=2.0.0.127.zen.test,127.0.0.2",
    "--txt-record=2.0.0.127.zen.test,listed",
    f"--host-record={V6_NIBBLES}.zen.test,127.0.0.4",
    f"--txt-record={V6_NIBBLES}.zen.test,IPv6 spammer",
    f"--host-record={LOOPBACK6_NIBBLES}.zen.test,127.0.0.2",
    # return codes that do not count
    "--host-record=5.0.0.127.zen.test,127.255.255.254",
    "--host-record=6.0.0.127.zen.test,10.0.0.1",
    # bl.test lists 127.0.0.2 and 127.0.0.3; psbl.test lists 127.0.0.3
    "--host-record=2.0.0.127.bl.test,127.0.0.3",
    "--txt-record=2.0.0.127.bl.test,see http://bl.test/2",
    "--host-record=3.0.0.127.bl.test,127.0.0.3",
    "--host-record=3.0.0.127.psbl.test,127.0.0.2",
]


@pytest.fixture
def zones(dnsmasq):
    """dnsmasq serving the DNSBL zones, installed as the shared resolver."""
    server = dnsmasq(RECORDS)
    server.install()
    return server


async def drain(resolver):
    """Wait for the resolver's own requests still running (they outlive a caller's timeout)."""
    await asyncio.gather(*resolver._inflight.values(), return_exceptions=True)


# --- names --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("127.0.0.2", "2.0.0.127"),
        ("192.0.2.99", "99.2.0.192"),
        (V6_LISTED, V6_NIBBLES),
        ("::1", LOOPBACK6_NIBBLES),
        ("::ffff:192.0.2.99", "99.2.0.192"),  # IPv4-mapped: the IPv4 address
        ("fe80::1%eth0", "1" + ".0" * 28 + ".8.e.f"),  # zone id dropped
    ],
)
def test_reverse_ip(ip, expected):
    assert reverse_ip(ip) == expected


def test_reverse_ip_of_nonsense():
    with pytest.raises(ValueError):
        reverse_ip("mail.example.test")


def test_query_name():
    assert DnsBlocklist("Zen.Test.").query_name("127.0.0.2") == "2.0.0.127.zen.test"
    assert DnsBlocklist("zen.test").query_name(V6_LISTED) == f"{V6_NIBBLES}.zen.test"


def test_client_ip():
    class Session:
        address = ("::ffff:127.0.0.2", 2525)

    assert client_ip(Session()) == "127.0.0.2"
    Session.address = ("/run/smtp.sock", 0)
    assert client_ip(Session()) is None
    assert client_ip(None) is None


# --- one list -----------------------------------------------------------------


async def test_listed_and_not_listed(zones):
    zen = DnsBlocklist("zen.test")
    assert await zen.check("127.0.0.2") is True
    assert await zen.lookup("127.0.0.2") == "127.0.0.2"
    assert await zen.check("127.0.0.3") is False
    assert await zen.lookup("127.0.0.3") is None
    result = await zen.evaluate("127.0.0.2")
    assert result == DnsblResult("127.0.0.2", True, 1.0, {"zen.test": "127.0.0.2"})


async def test_ipv6_nibble_format(zones):
    zen = DnsBlocklist("zen.test")
    assert await zen.lookup(V6_LISTED) == "127.0.0.4"
    assert await zen.check("2001:db8::2") is False
    assert await zen.get_reason(V6_LISTED) == "IPv6 spammer"


async def test_ipv4_mapped_address_is_looked_up_as_ipv4(zones):
    assert await DnsBlocklist("zen.test").check("::ffff:127.0.0.2") is True


async def test_txt_reason(zones):
    zen = DnsBlocklist("zen.test")
    assert await zen.get_reason("127.0.0.2") == "listed"
    assert await zen.get_reason("127.0.0.3") is None


async def test_ignored_return_codes(zones, caplog):
    assert await DnsBlocklist("zen.test").check("127.0.0.5") is True
    assert await DnsBlocklist("zen.test", ignore=["127.255.255.0/24"]).check("127.0.0.5") is False
    assert await DnsBlocklist("zen.test", ignore="127.255.255.254").check("127.0.0.5") is False
    # an answer outside 127.0.0.0/8 never lists
    with caplog.at_level(logging.WARNING, logger="slimta.util.dnsbl"):
        assert await DnsBlocklist("zen.test").check("127.0.0.6") is False
    assert "DNSBL zen.test answered 10.0.0.1, outside 127.0.0.0/8: ignored" in caplog.text


async def test_explicit_resolver(dnsmasq):
    server = dnsmasq(RECORDS)
    zen = DnsBlocklist("zen.test", resolver=server.resolver())
    assert zen.resolver is not sdns.get_resolver()
    assert await zen.check("127.0.0.2") is True


async def test_timeout_fails_open(caplog):
    with silent_udp_port() as port:
        resolver = sdns.Resolver([f"127.0.0.1:{port}"], timeout=1.0, lifetime=1.0)
        zen = DnsBlocklist("zen.test", resolver=resolver)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="slimta.util.dnsbl"):
            result = await zen.evaluate("127.0.0.2", timeout=0.3)
        assert time.monotonic() - started < 0.8
        await drain(resolver)
    assert result == DnsblResult("127.0.0.2", False, failed=("zen.test",))
    assert "DNSBL zen.test: lookup of 127.0.0.2 timed out after 0.3s" in caplog.text


async def test_resolver_timeout_fails_open(caplog):
    with silent_udp_port() as port:
        resolver = sdns.Resolver([f"127.0.0.1:{port}"], timeout=0.2, lifetime=0.3)
        zen = DnsBlocklist("zen.test", resolver=resolver)
        with caplog.at_level(logging.WARNING, logger="slimta.util.dnsbl"):
            assert await zen.check("127.0.0.2") is False
            assert await zen.get_reason("127.0.0.2") is None
    assert "DNSBL zen.test: lookup of 127.0.0.2 failed: A lookup of 2.0.0.127.zen.test timed out" \
        in caplog.text
    assert "DNSBL zen.test: TXT lookup of 127.0.0.2 failed" in caplog.text


async def test_dead_name_server_fails_open(dnsmasq, caplog):
    server = dnsmasq(RECORDS)
    zen = DnsBlocklist("zen.test", resolver=server.resolver(timeout=0.3, lifetime=0.5))
    assert await zen.check("127.0.0.2") is True
    server.stop()
    with caplog.at_level(logging.WARNING, logger="slimta.util.dnsbl"):
        assert await zen.check("127.0.0.2") is False
    assert "DNSBL zen.test: lookup of 127.0.0.2 failed" in caplog.text


async def test_servfail_fails_open(caplog):
    import dns.rcode

    handler = zone({}, rcodes={"2.0.0.127.zen.test": dns.rcode.SERVFAIL})
    with ScriptedDnsServer(handler) as server:
        zen = DnsBlocklist("zen.test", resolver=sdns.Resolver([server.nameserver], lifetime=1.0))
        with caplog.at_level(logging.WARNING, logger="slimta.util.dnsbl"):
            assert await zen.check("127.0.0.2") is False
    assert "DNSBL zen.test: lookup of 127.0.0.2 failed" in caplog.text


async def test_reason_is_sanitised():
    evil = '"first line\\013\\010550 5.7.1 injected\\000"'
    long = '"' + "x" * 150 + '" "' + "x" * 150 + '"'  # two character-strings, joined
    handler = zone({
        ("2.0.0.127.evil.test", "TXT"): [evil],
        ("3.0.0.127.evil.test", "TXT"): [long],
        ("4.0.0.127.evil.test", "TXT"): ['"caf\\195\\169"'],
    })
    with ScriptedDnsServer(handler) as server:
        bl = DnsBlocklist("evil.test", resolver=sdns.Resolver([server.nameserver], lifetime=1.0))
        assert await bl.get_reason("127.0.0.2") == "first line 550 5.7.1 injected"
        reason = await bl.get_reason("127.0.0.3")
        assert len(reason) == MAX_REASON and reason.endswith("...")
        assert await bl.get_reason("127.0.0.4") == "caf?"


def test_blocklist_needs_a_zone():
    with pytest.raises(ValueError):
        DnsBlocklist(" . ")


# --- groups -------------------------------------------------------------------


async def test_group_threshold_and_score(zones):
    group = DnsBlocklistGroup(threshold=2.0)
    group.add("zen.test", weight=1.5)
    group.add("bl.test")
    group.add("psbl.test", weight=0.5)
    # 127.0.0.2: zen (1.5) + bl (1.0)
    assert await group.score("127.0.0.2") == 2.5
    assert await group.check("127.0.0.2") is True
    assert await group.matches("127.0.0.2") == {"zen.test": "127.0.0.2", "bl.test": "127.0.0.3"}
    # 127.0.0.3: bl (1.0) + psbl (0.5) = 1.5, under the threshold
    assert await group.score("127.0.0.3") == 1.5
    assert await group.check("127.0.0.3") is False
    # nowhere
    assert await group.evaluate("127.0.0.9") == DnsblResult("127.0.0.9", False, 0.0, {})
    assert "zen.test=1.5" in repr(group)


async def test_group_defaults_any_list_is_enough(zones):
    group = DnsBlocklistGroup(["zen.test", ("bl.test", 1.0), DnsBlocklist("psbl.test")])
    assert await group.check("127.0.0.3") is True
    assert await group.check("127.0.0.4") is False
    assert await DnsBlocklistGroup().check("127.0.0.2") is False


async def test_group_reasons(zones):
    group = DnsBlocklistGroup(["zen.test", "bl.test", "psbl.test"])
    assert await group.get_reasons("127.0.0.2") == {
        "zen.test": "listed", "bl.test": "see http://bl.test/2"}
    assert await group.get_reasons("127.0.0.2", ["bl.test"]) == {"bl.test": "see http://bl.test/2"}


async def test_group_counts_lists_that_answer_in_time(zones, caplog):
    with silent_udp_port() as port:
        resolver = sdns.Resolver([f"127.0.0.1:{port}"], timeout=1.0, lifetime=1.0)
        slow = DnsBlocklist("slow.test", resolver=resolver)
        group = DnsBlocklistGroup([("zen.test", 1.0), (slow, 5.0)], threshold=1.0)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="slimta.util.dnsbl"):
            result = await group.evaluate("127.0.0.2", timeout=0.3)
        assert time.monotonic() - started < 0.8
        await drain(resolver)
    assert result == DnsblResult("127.0.0.2", True, 1.0, {"zen.test": "127.0.0.2"}, ("slow.test",))
    assert "DNSBL slow.test: lookup of 127.0.0.2 timed out after 0.3s" in caplog.text


def test_group_ignore_belongs_to_the_blocklist():
    with pytest.raises(ValueError):
        DnsBlocklistGroup().add(DnsBlocklist("zen.test"), ignore=["127.0.0.1"])
    group = DnsBlocklistGroup()
    assert group.add_dnsbl("zen.test", 2, ignore="127.255.255.0/24").ignore == (
        ipaddress.ip_network("127.255.255.0/24"),)


# --- the decorator on real SmtpEdge sessions -----------------------------------


def smtp(port, source="127.0.0.1", host="127.0.0.1"):
    return smtplib.SMTP(host, port, timeout=10, source_address=(source, 0))


def rcpt_reply(port, source, recipient="rcpt@example.test"):
    with smtp(port, source) as client:
        client.ehlo("client.test")
        assert client.mail("sender@example.test")[0] == 250
        return client.rcpt(recipient)


class RcptValidators(SmtpValidators):
    @check_dnsbl("zen.test", skip_loopback=False)
    def handle_rcpt(self, reply, recipient, params):
        if recipient.startswith("nobody@"):
            reply.code = "550"
            reply.message = "5.1.1 No such user"


def test_rcpt_refused_when_listed(zones, run_edge, caplog):
    edge = run_edge(validator_class=RcptValidators)
    with caplog.at_level(logging.INFO, logger="slimta.util.dnsbl"):
        assert rcpt_reply(edge.port, "127.0.0.2") == (550, b"5.7.1 Access denied")
    assert "refused 127.0.0.2: listed by zen.test=127.0.0.2 (score 1)" in caplog.text


def test_rcpt_accepted_when_not_listed(zones, run_edge):
    edge = run_edge(validator_class=RcptValidators)
    assert rcpt_reply(edge.port, "127.0.0.3") == (250, b"2.1.5 <rcpt@example.test> Ok")
    # the decorated hook still runs for clients that are not listed
    assert rcpt_reply(edge.port, "127.0.0.3", "nobody@example.test") == (
        550, b"5.1.1 No such user")


def test_whole_message_from_unlisted_client(zones, run_edge):
    edge = run_edge(validator_class=RcptValidators)
    with smtp(edge.port, "127.0.0.3") as client:
        client.sendmail("a@example.test", ["b@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
    assert [e.recipients for e in edge.queue.envelopes] == [["b@example.test"]]


class BannerValidators(SmtpValidators):
    @check_dnsbl("zen.test", "554", "5.7.1 Service unavailable; client [{ip}] blocked "
                 "using {blocklist}: {reason}", skip_loopback=False)
    def handle_banner(self, reply, address):
        pass


def test_banner_refused_with_reason_template(zones, run_edge):
    edge = run_edge(validator_class=BannerValidators)
    with pytest.raises(smtplib.SMTPConnectError) as exc:
        smtp(edge.port, "127.0.0.2")
    assert exc.value.smtp_code == 554
    assert exc.value.smtp_error == (
        b"5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.test: listed")


def test_banner_refusal_keeps_refusing_commands(zones, run_edge):
    edge = run_edge(validator_class=BannerValidators)
    client = smtplib.SMTP(timeout=10, source_address=("127.0.0.2", 0))
    assert client.connect("127.0.0.1", edge.port) == (
        554, b"5.7.1 Service unavailable; client [127.0.0.2] blocked using zen.test: listed")
    assert client.mail("a@example.test")[0] == 503
    client.close()


def test_banner_accepted_when_not_listed(zones, run_edge):
    edge = run_edge(validator_class=BannerValidators)
    with smtp(edge.port, "127.0.0.3") as client:
        assert client.noop()[0] == 250


class NoReasonValidators(SmtpValidators):
    @check_dnsbl(DnsBlocklist("psbl.test"), match_message="5.7.1 Blocked: {reason}",
                 skip_loopback=False)
    def handle_rcpt(self, reply, recipient, params):
        pass


def test_reason_placeholder_without_txt_record(zones, run_edge):
    edge = run_edge(validator_class=NoReasonValidators)
    assert rcpt_reply(edge.port, "127.0.0.3") == (550, b"5.7.1 Blocked: listed by psbl.test")


GROUP = DnsBlocklistGroup([("zen.test", 1.0), ("bl.test", 1.0), ("psbl.test", 0.5)], 2.0)


class GroupValidators(SmtpValidators):
    @check_dnsbl(GROUP, "550", "5.7.1 Score too high: {reason}", skip_loopback=False)
    async def handle_rcpt(self, reply, recipient, params):
        pass


def test_group_decorator(zones, run_edge):
    edge = run_edge(validator_class=GroupValidators)
    assert rcpt_reply(edge.port, "127.0.0.2") == (
        550, b"5.7.1 Score too high: listed; see http://bl.test/2")
    assert rcpt_reply(edge.port, "127.0.0.3") == (250, b"2.1.5 <rcpt@example.test> Ok")  # 1.5 < 2


class V6Validators(SmtpValidators):
    @check_dnsbl("zen.test", skip_loopback=False)
    def handle_rcpt(self, reply, recipient, params):
        pass


def test_ipv6_client_refused(zones, run_edge):
    edge = run_edge(validator_class=V6Validators, listener=("::1", 0))
    with smtplib.SMTP("::1", edge.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@example.test")
        assert client.rcpt("b@example.test") == (550, b"5.7.1 Access denied")


class DefaultValidators(SmtpValidators):
    @check_dnsbl("zen.test")
    def handle_rcpt(self, reply, recipient, params):
        pass


def test_loopback_client_triggers_no_query(run_edge):
    handler = zone({("2.0.0.127.zen.test", "A"): ["127.0.0.2"]})
    with ScriptedDnsServer(handler) as server, \
            shared_resolver(sdns.Resolver([server.nameserver], cache=False)):
        edge = run_edge(validator_class=DefaultValidators)
        assert rcpt_reply(edge.port, "127.0.0.2") == (250, b"2.1.5 <rcpt@example.test> Ok")
        assert server.queries == []


def test_one_lookup_per_connection(run_edge):
    handler = zone({("2.0.0.127.zen.test", "A"): ["127.0.0.2"]})
    with ScriptedDnsServer(handler) as server, \
            shared_resolver(sdns.Resolver([server.nameserver], cache=False)):
        edge = run_edge(validator_class=RcptValidators)
        with smtp(edge.port, "127.0.0.2") as client:
            client.ehlo("client.test")
            client.mail("a@example.test")
            for n in range(3):
                assert client.rcpt(f"r{n}@example.test") == (550, b"5.7.1 Access denied")
        assert len(server.queries) == 1


class TimeoutValidators(SmtpValidators):
    @check_dnsbl("zen.test", timeout=0.3, skip_loopback=False)
    def handle_rcpt(self, reply, recipient, params):
        pass


def test_dns_timeout_fails_open_in_the_session(run_edge, caplog):
    with silent_udp_port() as port, \
            shared_resolver(sdns.Resolver([f"127.0.0.1:{port}"], timeout=1, lifetime=1)):
        edge = run_edge(validator_class=TimeoutValidators)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="slimta.util.dnsbl"):
            assert rcpt_reply(edge.port, "127.0.0.2") == (250, b"2.1.5 <rcpt@example.test> Ok")
        assert time.monotonic() - started < 0.9  # the decorator's 0.3 s, not the resolver's 1 s
        time.sleep(max(0.0, started + 1.3 - time.monotonic()))  # the resolver's request ends
    assert "DNSBL zen.test: lookup of 127.0.0.2 timed out after 0.3s" in caplog.text
