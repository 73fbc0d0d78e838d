"""slimta.util.spf: pyspf checks against a real dnsmasq, and EnforceSpf in a real SmtpEdge."""

from __future__ import annotations

import asyncio
import smtplib
from types import SimpleNamespace

import dns.rcode
import pytest
import spf as pyspf

from dnsmasq import ScriptedDnsServer, silent_udp_port, zone
from slimta.edge.smtp import SmtpValidators
from slimta.util.dns import Resolver
from slimta.util.spf import DEFAULT_ENFORCEMENT, EnforceSpf, SpfResult, check_spf

RECORDS = [
    "--txt-record=example.test,v=spf1 ip4:192.0.2.0/24 include:inc.example.test -all",
    "--txt-record=inc.example.test,v=spf1 ip4:198.51.100.7 ip6:2001:db8::/32 -all",
    "--txt-record=soft.test,v=spf1 ip4:192.0.2.1 ~all",
    "--txt-record=neutral.test,v=spf1 ?all",
    "--txt-record=bad.test,v=spf1 ip4:192.0.2.1 foo:bar -all",
    "--txt-record=badinclude.test,v=spf1 include:nospf.test -all",
    "--txt-record=nospf.test,just some text",
    "--txt-record=two.test,v=spf1 -all",
    "--txt-record=two.test,v=spf1 +all",
    "--txt-record=helo.example.test,v=spf1 ip4:203.0.113.5 -all",
    "--txt-record=local.test,v=spf1 ip4:127.0.0.1 -all",
    "--txt-record=localfail.test,v=spf1 ip4:192.0.2.1 -all",
    "--txt-record=localsoft.test,v=spf1 ~all",
    "--txt-record=localerr.test,v=spf1 bogus -all",
]


@pytest.fixture
def server(dnsmasq):
    return dnsmasq(RECORDS)


def run(coro):
    return asyncio.run(coro)


# --- check_spf against dnsmasq ---------------------------------------------------


@pytest.mark.parametrize(
    ("ip", "sender", "result", "reason"),
    [
        ("192.0.2.9", "alice@example.test", "pass",
         "example.test designates 192.0.2.9 as permitted sender"),
        ("198.51.100.7", "alice@example.test", "pass",
         "example.test designates 198.51.100.7 as permitted sender"),
        ("2001:db8::25", "alice@example.test", "pass",
         "example.test designates 2001:db8::25 as permitted sender"),
        ("203.0.113.1", "alice@example.test", "fail",
         "example.test does not designate 203.0.113.1 as permitted sender"),
        ("203.0.113.1", "bob@soft.test", "softfail",
         "soft.test does not designate 203.0.113.1 as permitted sender (softfail)"),
        ("203.0.113.1", "bob@neutral.test", "neutral",
         "203.0.113.1 is neither permitted nor denied by neutral.test"),
        ("203.0.113.1", "bob@nospf.test", "none", "nospf.test does not publish an SPF record"),
        ("203.0.113.1", "bob@missing.test", "none",
         "missing.test does not publish an SPF record"),
        ("203.0.113.1", "bob@bad.test", "permerror",
         "permanent error in the SPF record of bad.test: Unknown mechanism found: foo:bar"),
        ("203.0.113.1", "bob@two.test", "permerror",
         "permanent error in the SPF record of two.test: Two or more type TXT spf records found."),
    ],
)
def test_results(server, ip, sender, result, reason):
    found = run(check_spf(ip, sender, "client.example.test", resolver=server.resolver()))
    assert (found.result, found.reason) == (result, reason)
    assert found.identity == "mailfrom"
    assert found.sender == sender
    assert found.domain == sender.rpartition("@")[2]
    assert found.ip == ip


def test_include_without_record_is_permerror(server):
    found = run(check_spf("203.0.113.1", "a@badinclude.test", "h.test",
                          resolver=server.resolver()))
    assert found.result == "permerror"
    assert found.reason.startswith("permanent error in the SPF record of badinclude.test:")


def test_ipv4_mapped_address_is_checked_as_ipv4(server):
    found = run(check_spf("::ffff:192.0.2.9", "a@example.test", "h", resolver=server.resolver()))
    assert (found.result, found.ip) == ("pass", "192.0.2.9")


def test_null_sender_uses_helo_identity(server):
    found = run(check_spf("203.0.113.5", "", "helo.example.test", resolver=server.resolver()))
    assert found.result == "pass"
    assert found.identity == "helo"
    assert found.sender == "postmaster@helo.example.test"
    assert found.as_auth_result() == {
        "result": "pass", "smtp.helo": "helo.example.test",
        "reason": "helo.example.test designates 203.0.113.5 as permitted sender",
    }
    failed = run(check_spf("203.0.113.6", "", "helo.example.test", resolver=server.resolver()))
    assert failed.result == "fail"


def test_null_sender_without_helo_is_none_without_query():
    # no resolver could answer: nothing may be asked
    found = run(check_spf("203.0.113.5", "", None, resolver=Resolver(["127.0.0.1:9"])))
    assert (found.result, found.reason) == ("none", "no identity to check")


def test_as_auth_result_mailfrom(server):
    found = run(check_spf("192.0.2.9", "alice@example.test", "h", resolver=server.resolver()))
    assert found.as_auth_result() == {
        "result": "pass", "smtp.mailfrom": "alice@example.test",
        "reason": "example.test designates 192.0.2.9 as permitted sender",
    }


def test_servfail_is_temperror():
    handler = zone({}, rcodes={"example.test": dns.rcode.SERVFAIL})
    with ScriptedDnsServer(handler) as scripted:
        resolver = Resolver([scripted.nameserver], timeout=1.0, lifetime=2.0)
        found = run(check_spf("192.0.2.9", "a@example.test", "h", resolver=resolver))
    assert found.result == "temperror"
    assert found.reason == (
        "temporary error checking SPF of example.test: DNS lookup of TXT of example.test failed")


def test_silent_name_server_is_temperror():
    with silent_udp_port() as port:
        resolver = Resolver([f"127.0.0.1:{port}"], timeout=0.2, lifetime=0.5)
        found = run(check_spf("192.0.2.9", "a@example.test", "h", resolver=resolver))
    assert (found.result, found.reason) == (
        "temperror", "temporary error checking SPF of example.test: "
        "DNS timeout looking up TXT of example.test")


def test_uses_the_shared_resolver(server):
    server.install()
    found = run(check_spf("192.0.2.9", "alice@example.test", "h"))
    assert found.result == "pass"


def test_concurrent_checks_keep_their_own_resolver(dnsmasq):
    allow = dnsmasq(["--txt-record=same.test,v=spf1 ip4:192.0.2.9 -all"])
    deny = dnsmasq(["--txt-record=same.test,v=spf1 -all"])

    async def both():
        return await asyncio.gather(*(
            check_spf("192.0.2.9", "a@same.test", "h", resolver=r)
            for r in [allow.resolver(), deny.resolver()] * 5
        ))

    assert [r.result for r in run(both())] == ["pass", "fail"] * 5


def test_pyspf_lookup_outside_our_checks_is_pyspf_own():
    from slimta.util import spf as slimta_spf

    assert pyspf.DNSLookup is slimta_spf._lookup
    assert slimta_spf._SYNC_RESOLVER.get() is None  # so pyspf's own DNSLookup would run


# --- enforcement rules -------------------------------------------------------------


def test_set_enforcement_defaults():
    enforce = EnforceSpf()
    for result in DEFAULT_ENFORCEMENT:
        enforce.set_enforcement(result)
    assert enforce.enforcement["fail"] == ("550", "5.7.23 SPF validation failed: {reason}")
    assert enforce.enforcement["softfail"] == ("550", "5.7.23 SPF validation failed: {reason}")
    assert enforce.enforcement["permerror"] == ("550", "5.7.24 SPF validation error: {reason}")
    assert enforce.enforcement["temperror"] == ("451", "4.7.24 SPF validation error: {reason}")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("failed",), "unknown SPF result"),
        (("fail", "250"), "4xx or 5xx"),
        (("fail", "550", "5.7.23 {nope}"), "bad match_message"),
        (("fail", "550", "5.7.23 {reason"), "bad match_message"),
    ],
)
def test_set_enforcement_rejects(args, message):
    with pytest.raises(ValueError, match=message):
        EnforceSpf().set_enforcement(*args)


def test_reply_template_fields_are_sanitised():
    enforce = EnforceSpf()
    enforce.set_enforcement(
        "fail", "554",
        "5.7.23 {result} {sender} {domain} {ip} {helo}: {explanation} / {reason}",
    )
    result = SpfResult("fail", "192.0.2.1", "a@ex.test", "ex.test", "h\r\nX", "mailfrom",
                       "r\x00eason", "go away\r\n250 ok ünïcode " + "x" * 300)
    code, message = enforce.reply_for(result)
    assert code == "554"
    assert message.startswith(
        "5.7.23 fail a@ex.test ex.test 192.0.2.1 h X: go away 250 ok ?n?code xxx")
    assert message.endswith("... / r eason")
    assert "\r" not in message and "\n" not in message
    assert enforce.reply_for(SpfResult("pass", "192.0.2.1", "", "", None, "helo", "")) is None


def test_check_only_decorates_mail_and_rcpt():
    with pytest.raises(TypeError, match="handle_mail or handle_rcpt"):
        @EnforceSpf().check
        def handle_data(self, reply):
            pass


# --- the decorator, with sessions made by hand -------------------------------------


class Recorder:
    """A stand-in for SmtpValidators: a session and the calls it got."""

    def __init__(self, ip="192.0.2.9", helo="client.example.test", auth=None, envelope=None):
        self.session = SimpleNamespace(address=(ip, 4321), ehlo_as=helo, auth=auth,
                                       envelope=envelope, edge=SimpleNamespace(hostname="mx.test"))
        self.calls = []

    def handle_mail(self, reply, sender, params):
        self.calls.append(("mail", sender))

    def handle_rcpt(self, reply, recipient, params):
        self.calls.append(("rcpt", recipient))


class Reply:
    def __init__(self):
        self.code, self.message = "250", "2.1.0 Sender ok"


def test_decorated_hooks_share_one_query(server, monkeypatch):
    enforce = EnforceSpf(resolver=server.resolver())
    asked = []
    real = check_spf

    async def counting(*args, **kwargs):
        asked.append(args)
        return await real(*args, **kwargs)

    monkeypatch.setattr("slimta.util.spf.check_spf", counting)
    mail = enforce.check(Recorder.handle_mail)
    rcpt = enforce.check(Recorder.handle_rcpt)
    envelope = SimpleNamespace(sender="alice@example.test")
    v = Recorder(envelope=None)

    async def session():
        await mail(v, Reply(), "alice@example.test", {})
        v.session.envelope = envelope  # the edge makes it after MAIL
        await rcpt(v, Reply(), "bob@example.org", {})
        await rcpt(v, Reply(), "carol@example.org", {})

    run(session())
    assert len(asked) == 1
    assert asked[0][:3] == ("192.0.2.9", "alice@example.test", "client.example.test")
    assert v.calls == [("mail", "alice@example.test"), ("rcpt", "bob@example.org"),
                       ("rcpt", "carol@example.org")]
    assert envelope.auth_results == {"spf": {
        "result": "pass", "smtp.mailfrom": "alice@example.test",
        "reason": "example.test designates 192.0.2.9 as permitted sender"}}


def test_recording_keeps_other_results(server):
    enforce = EnforceSpf(resolver=server.resolver())
    envelope = SimpleNamespace(sender="alice@example.test",
                               auth_results={"dkim": [{"result": "none"}]})
    v = Recorder(envelope=envelope)
    run(enforce.check(Recorder.handle_rcpt)(v, Reply(), "bob@example.org", {}))
    assert envelope.auth_results["dkim"] == [{"result": "none"}]
    assert envelope.auth_results["spf"]["result"] == "pass"


def test_a_new_sender_is_checked_again(server):
    enforce = EnforceSpf(resolver=server.resolver())
    enforce.set_enforcement("fail")
    mail = enforce.check(Recorder.handle_mail)
    v = Recorder(ip="203.0.113.1")
    first, second = Reply(), Reply()
    run(mail(v, first, "a@neutral.test", {}))
    run(mail(v, second, "a@example.test", {}))
    assert (first.code, second.code) == ("250", "550")
    assert second.message == ("5.7.23 SPF validation failed: example.test does not designate "
                              "203.0.113.1 as permitted sender")
    assert v.calls == [("mail", "a@neutral.test")]


def test_authenticated_clients_are_not_checked():
    enforce = EnforceSpf(resolver=Resolver(["127.0.0.1:9"]))  # any query would fail
    enforce.set_enforcement("temperror")
    v = Recorder(auth="alice")
    reply = Reply()
    run(enforce.check(Recorder.handle_mail)(v, reply, "a@example.test", {}))
    assert reply.code == "250"
    assert v.calls == [("mail", "a@example.test")]


def test_loopback_clients_are_not_checked():
    enforce = EnforceSpf(resolver=Resolver(["127.0.0.1:9"]))
    enforce.set_enforcement("temperror")
    for ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        v = Recorder(ip=ip)
        reply = Reply()
        run(enforce.check(Recorder.handle_mail)(v, reply, "a@example.test", {}))
        assert reply.code == "250"


# --- a real SmtpEdge ----------------------------------------------------------------


def make_validators(enforce: EnforceSpf, at: str):
    if at == "mail":
        class Validators(SmtpValidators):
            @enforce.check
            def handle_mail(self, reply, sender, params):
                pass
    else:
        class Validators(SmtpValidators):
            @enforce.check
            def handle_rcpt(self, reply, recipient, params):
                pass
    return Validators


def strict_enforcement(**kwargs) -> EnforceSpf:
    enforce = EnforceSpf(skip_loopback=False, **kwargs)
    enforce.set_enforcement("fail")
    enforce.set_enforcement("permerror")
    enforce.set_enforcement("temperror")
    enforce.set_enforcement("softfail", "450", "4.7.23 Not now: {result} for {domain} from {ip}")
    return enforce


@pytest.mark.parametrize("at", ["mail", "rcpt"])
@pytest.mark.parametrize(
    ("sender", "code", "text"),
    [
        ("a@localfail.test", 550,
         "5.7.23 SPF validation failed: localfail.test does not designate 127.0.0.1 "
         "as permitted sender"),
        ("a@localsoft.test", 450, "4.7.23 Not now: softfail for localsoft.test from 127.0.0.1"),
        ("a@localerr.test", 550,
         "5.7.24 SPF validation error: permanent error in the SPF record of localerr.test: "
         "Unknown mechanism found: bogus"),
    ],
)
def test_edge_refuses(server, run_edge, at, sender, code, text):
    server.install()
    edge = run_edge(validator_class=make_validators(strict_enforcement(), at))
    with smtplib.SMTP("127.0.0.1", edge.port, local_hostname="client.example.test") as client:
        client.ehlo()
        mail = client.mail(sender)
        if at == "mail":
            assert mail == (code, text.encode())
        else:
            assert mail[0] == 250
            assert client.rcpt("bob@example.org") == (code, text.encode())
    assert edge.queue.envelopes == []


def test_edge_temperror(run_edge):
    handler = zone({}, rcodes={"example.test": dns.rcode.SERVFAIL})
    with ScriptedDnsServer(handler) as scripted:
        enforce = strict_enforcement(resolver=Resolver([scripted.nameserver], timeout=0.5,
                                                       lifetime=1.0))
        edge = run_edge(validator_class=make_validators(enforce, "mail"))
        with smtplib.SMTP("127.0.0.1", edge.port, local_hostname="c.test") as client:
            client.ehlo()
            code, text = client.mail("a@example.test")
    assert code == 451
    assert text == (b"4.7.24 SPF validation error: temporary error checking SPF of "
                    b"example.test: DNS lookup of TXT of example.test failed")


@pytest.mark.parametrize("at", ["mail", "rcpt"])
def test_edge_accepts_and_records(server, run_edge, at):
    server.install()
    edge = run_edge(validator_class=make_validators(strict_enforcement(), at))
    with smtplib.SMTP("127.0.0.1", edge.port, local_hostname="client.example.test") as client:
        client.sendmail("alice@local.test", ["bob@example.org"], b"Subject: hi\r\n\r\nhello\r\n")
    (envelope,) = edge.queue.envelopes
    assert envelope.auth_results == {"spf": {
        "result": "pass", "smtp.mailfrom": "alice@local.test",
        "reason": "local.test designates 127.0.0.1 as permitted sender"}}


def test_edge_skips_loopback_by_default(server, run_edge):
    server.install()
    enforce = EnforceSpf()
    enforce.set_enforcement("fail")
    edge = run_edge(validator_class=make_validators(enforce, "rcpt"))
    with smtplib.SMTP("127.0.0.1", edge.port, local_hostname="client.example.test") as client:
        client.sendmail("a@localfail.test", ["bob@example.org"], b"Subject: hi\r\n\r\nhello\r\n")
    (envelope,) = edge.queue.envelopes
    assert not getattr(envelope, "auth_results", None)  # nothing recorded


@pytest.mark.parametrize(
    ("sender", "helo", "domain", "reason"),
    [
        ("nodomain", "h.test", "nodomain", "nodomain is not a domain SPF can check"),
        ("a@[192.0.2.1]", "h.test", "[192.0.2.1]", "[192.0.2.1] is not a domain SPF can check"),
        ("a@localhost", "h.test", "localhost", "localhost is not a domain SPF can check"),
        ("a@b..test", "h.test", "b..test", "b..test is not a domain SPF can check"),
        ("", "[192.0.2.1]", "[192.0.2.1]", "[192.0.2.1] is not a domain SPF can check"),
    ],
)
def test_uncheckable_domains_are_none_without_query(sender, helo, domain, reason):
    found = run(check_spf("192.0.2.9", sender, helo, resolver=Resolver(["127.0.0.1:9"])))
    assert (found.result, found.domain, found.reason) == ("none", domain, reason)


def test_a_pyspf_crash_is_temperror(server, monkeypatch):
    def broken(self, spf=None):
        raise RuntimeError("boom")

    monkeypatch.setattr(pyspf.query, "check", broken)
    found = run(check_spf("192.0.2.9", "a@example.test", "h", resolver=server.resolver()))
    assert (found.result, found.reason) == (
        "temperror", "temporary error checking SPF of example.test: SPF check failed: boom")
