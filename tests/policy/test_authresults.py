"""slimta.policy.authresults: DMARC against a real dnsmasq, the field, forged fields, end to end."""

from __future__ import annotations

import asyncio
import smtplib

import authres
import dns.rcode
import pytest

from dnsmasq import ScriptedDnsServer, zone
from slimta.edge.smtp import SmtpValidators
from slimta.envelope import Envelope
from slimta.policy import apply_queue_policies
from slimta.policy.authresults import (
    AddAuthenticationResults,
    DmarcRecord,
    evaluate_dmarc,
    find_dmarc_record,
    from_domain,
    organizational_domain,
    remove_forged,
)
from slimta.util.dns import Resolver
from slimta.util.spf import EnforceSpf

RECORDS = [
    "--txt-record=_dmarc.example.test,v=DMARC1; p=reject; sp=quarantine; rua=mailto:d@example.test",
    "--txt-record=_dmarc.strict.test,v=DMARC1; p=quarantine; adkim=s; aspf=s",
    "--txt-record=_dmarc.own.example.test,v=DMARC1; p=none",
    "--txt-record=_dmarc.two.test,v=DMARC1; p=reject",
    "--txt-record=_dmarc.two.test,v=DMARC1; p=none",
    "--txt-record=_dmarc.other.test,v=spf1 -all",
    "--txt-record=_dmarc.reports.test,v=DMARC1; p=bogus; rua=mailto:r@reports.test",
    "--txt-record=_dmarc.broken.test,v=DMARC1; p=bogus",
    "--txt-record=local.test,v=spf1 ip4:127.0.0.1 -all",
    "--txt-record=_dmarc.local.test,v=DMARC1; p=reject",
]


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def server(dnsmasq):
    return dnsmasq(RECORDS)


def message(from_=("alice@example.test",), extra=b"") -> Envelope:
    env = Envelope("alice@example.test", ["bob@example.org"])
    head = b"".join(b"From: " + f.encode() + b"\r\n" for f in from_)
    env.parse(extra + head + b"Subject: hi\r\n\r\nhello\r\n")
    return env


def spf(result, mailfrom):
    return {"result": result, "smtp.mailfrom": mailfrom, "reason": "r"}


def dkim(result, domain, selector="sel1", **extra):
    return {"result": result, "domain": domain, "selector": selector, "reason": None, **extra}


# --- organizational domains and records ---------------------------------------------


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("example.test", "example.test"),
        ("a.b.Example.TEST.", "example.test"),
        ("mail.example.co.uk", "example.co.uk"),
        ("example.co.uk", "example.co.uk"),
        ("co.uk", "co.uk"),
        ("test", "test"),
    ],
)
def test_organizational_domain(domain, org):
    assert organizational_domain(domain) == org


def test_record_parse():
    r = DmarcRecord.parse("v=DMARC1; p=Reject; adkim=s; pct=50", "example.test")
    assert r == DmarcRecord("reject", "reject", "s", "r", 50, "example.test")
    assert DmarcRecord.parse("v=DMARC1;p=none;sp=reject;aspf=x;pct=500").sp == "reject"
    assert DmarcRecord.parse("v=DMARC1;p=none;sp=reject;aspf=x;pct=500").aspf == "r"
    assert DmarcRecord.parse("v=DMARC1;p=none;pct=500").pct == 100
    assert DmarcRecord.parse("v = DMARC1 ; p = quarantine").p == "quarantine"


@pytest.mark.parametrize(
    "text",
    ["p=reject; v=DMARC1", "v=DMARC2; p=reject", "v=dmarc1; p=reject", "v=DMARC1; p=bogus",
     "v=DMARC1", "v=DMARC1; p=none; sp=bogus", "v=DMARC1; p=x; rua=https://x"],
)
def test_record_parse_refuses(text):
    assert DmarcRecord.parse(text) is None


def test_record_with_bad_policy_and_reports_counts_as_none():
    r = DmarcRecord.parse("v=DMARC1; p=bogus; rua=mailto:r@example.test")
    assert (r.p, r.sp) == ("none", "none")


def test_find_record(server):
    resolver = server.resolver()
    found = run(find_dmarc_record("example.test", resolver))
    assert (found.p, found.sp, found.domain) == ("reject", "quarantine", "example.test")
    # a subdomain without a record of its own: the organizational domain's
    assert run(find_dmarc_record("news.example.test", resolver)).domain == "example.test"
    assert run(find_dmarc_record("own.example.test", resolver)).domain == "own.example.test"
    assert run(find_dmarc_record("missing.test", resolver)) is None
    assert run(find_dmarc_record("two.test", resolver)) is None  # two records: no DMARC
    assert run(find_dmarc_record("other.test", resolver)) is None
    assert run(find_dmarc_record("broken.test", resolver)) is None
    assert run(find_dmarc_record("reports.test", resolver)).p == "none"


# --- From domains ---------------------------------------------------------------------


def test_from_domain():
    assert from_domain(message(["Alice <Alice@Example.TEST>"])) == "example.test"
    assert from_domain(message(["a@example.test, b@example.test"])) == "example.test"
    assert from_domain(message([])) is None
    with pytest.raises(ValueError, match="From domains differ"):
        from_domain(message(["a@example.test, b@other.test"]))
    with pytest.raises(ValueError, match="From domains differ"):
        from_domain(message(["a@example.test", "b@other.test"]))
    with pytest.raises(ValueError, match="without a domain"):
        from_domain(message(["undisclosed"]))


# --- DMARC evaluation -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("from_", "results", "verdict", "policy", "spf_ok", "dkim_ok"),
    [
        # relaxed alignment: organizational domains match
        ("a@example.test", {"spf": spf("pass", "bounce@mail.example.test")}, "pass", "reject",
         True, False),
        ("a@example.test", {"dkim": [dkim("pass", "signer.example.test")]}, "pass", "reject",
         False, True),
        ("a@example.test", {"spf": spf("pass", "b@example.test"),
                            "dkim": [dkim("pass", "example.test")]}, "pass", "reject", True, True),
        # a pass for another domain is not aligned; a fail for ours does not count
        ("a@example.test", {"spf": spf("pass", "b@elsewhere.test"),
                            "dkim": [dkim("pass", "elsewhere.test"),
                                     dkim("fail", "example.test")]}, "fail", "reject",
         False, False),
        ("a@example.test", {"spf": spf("softfail", "b@example.test")}, "fail", "reject",
         False, False),
        ("a@example.test", {}, "fail", "reject", False, False),
        # the second of two signatures passes
        ("a@example.test", {"dkim": [dkim("fail", "example.test"), dkim("pass", "example.test")]},
         "pass", "reject", False, True),
        # strict alignment: only the From domain itself
        ("a@strict.test", {"spf": spf("pass", "b@mail.strict.test"),
                           "dkim": [dkim("pass", "mail.strict.test")]}, "fail", "quarantine",
         False, False),
        ("a@strict.test", {"dkim": [dkim("pass", "STRICT.test")]}, "pass", "quarantine",
         False, True),
        ("a@strict.test", {"spf": spf("pass", "b@strict.test")}, "pass", "quarantine",
         True, False),
        # a subdomain under the organizational domain's record: sp= applies
        ("a@news.example.test", {}, "fail", "quarantine", False, False),
        ("a@news.example.test", {"dkim": [dkim("pass", "example.test")]}, "pass", "quarantine",
         False, True),
        ("a@own.example.test", {}, "fail", "none", False, False),
        # the HELO identity of a bounce counts for SPF
        ("a@example.test", {"spf": {"result": "pass", "smtp.helo": "mx.example.test"}}, "pass",
         "reject", True, False),
        # header_d as the colleague's DKIM entry may name it
        ("a@example.test", {"dkim": [{"result": "pass", "header_d": "example.test"}]}, "pass",
         "reject", False, True),
    ],
)
def test_evaluate(server, from_, results, verdict, policy, spf_ok, dkim_ok):
    env = message([from_])
    env.auth_results = results
    found = run(evaluate_dmarc(env, server.resolver()))
    assert (found.result, found.policy) == (verdict, policy)
    assert (found.spf_aligned, found.dkim_aligned) == (spf_ok, dkim_ok)
    assert found.from_domain == from_.rpartition("@")[2].lower()


def test_evaluate_without_record_or_from(server):
    resolver = server.resolver()
    env = message(["a@missing.test"])
    env.auth_results = {"spf": spf("pass", "a@missing.test")}
    found = run(evaluate_dmarc(env, resolver))
    assert (found.result, found.policy, found.reason) == ("none", None, "no DMARC record")
    assert run(evaluate_dmarc(message([]), resolver)).as_auth_result() == {
        "result": "none", "header.from": None, "policy": None, "reason": "no From field"}
    both = run(evaluate_dmarc(message(["a@example.test", "b@other.test"]), resolver))
    assert (both.result, both.reason) == ("permerror", "From domains differ")


def test_evaluate_temperror():
    handler = zone({}, rcodes={"_dmarc.example.test": dns.rcode.SERVFAIL})
    with ScriptedDnsServer(handler) as scripted:
        resolver = Resolver([scripted.nameserver], timeout=0.5, lifetime=1.0)
        found = run(evaluate_dmarc(message(), resolver))
    assert found.result == "temperror"
    assert found.reason.startswith("DMARC record lookup failed: ")


def test_evaluate_temperror_at_organizational_domain():
    handler = zone({}, rcodes={"_dmarc.example.test": dns.rcode.SERVFAIL})
    with ScriptedDnsServer(handler) as scripted:
        resolver = Resolver([scripted.nameserver], timeout=0.5, lifetime=1.0)
        found = run(evaluate_dmarc(message(["a@sub.example.test"]), resolver))
    assert found.result == "temperror"


# --- the field ------------------------------------------------------------------------


def field_value(env: Envelope) -> str:
    head, _ = env.flatten()
    first = head.split(b"\r\n")[0]
    assert first.startswith(b"Authentication-Results: ")
    lines = [first]
    for line in head.split(b"\r\n")[1:]:
        if not line.startswith(b"\t"):
            break
        lines.append(line)
    return b"\r\n".join(lines).decode()


def test_field_with_all_results(server):
    env = message()
    env.auth_results = {
        "spf": spf("pass", "alice@example.test"),
        "dkim": [dkim("pass", "example.test", header_b="aBcD/+eF"),
                 dkim("fail", "other.test", "s2", reason='body hash "mismatch"')],
        "arc": {"result": "pass", "reason": None, "instance": 1},
    }
    run(AddAuthenticationResults("mx.example.org", resolver=server.resolver()).apply(env))
    assert field_value(env) == (
        "Authentication-Results: mx.example.org;\r\n"
        "\tspf=pass smtp.mailfrom=alice@example.test;\r\n"
        '\tdkim=pass header.d=example.test header.s=sel1 header.b="aBcD/+eF";\r\n'
        '\tdkim=fail reason="body hash \\"mismatch\\"" header.d=other.test header.s=s2;\r\n'
        "\tarc=pass;\r\n"
        "\tdmarc=pass (p=reject) header.from=example.test"
    )
    assert env.auth_results["dmarc"] == {
        "result": "pass", "header.from": "example.test", "policy": "reject", "reason": None}
    # a standard parser reads it back
    parsed = authres.AuthenticationResultsHeader.parse(field_value(env).replace("\r\n", ""))
    assert parsed.authserv_id == "mx.example.org"
    assert [(r.method, r.result) for r in parsed.results] == [
        ("spf", "pass"), ("dkim", "pass"), ("dkim", "fail"), ("arc", "pass"), ("dmarc", "pass")]
    assert parsed.results[1].properties[2].value == "aBcD/+eF"
    # the rest of the message is untouched
    assert b"".join(env.flatten()).endswith(
        b"From: alice@example.test\r\nSubject: hi\r\n\r\nhello\r\n")


def test_field_failures_carry_reasons(server):
    env = message()
    env.auth_results = {
        "spf": {"result": "fail", "smtp.mailfrom": "x@example.test",
                "reason": "example.test does not designate 192.0.2.1 as permitted sender"},
        "dkim": [{"result": "none", "domain": None, "selector": None, "reason": "no signature"}],
    }
    run(AddAuthenticationResults("mx.example.org", resolver=server.resolver()).apply(env))
    assert field_value(env) == (
        "Authentication-Results: mx.example.org;\r\n"
        '\tspf=fail reason="example.test does not designate 192.0.2.1 as permitted sender"'
        " smtp.mailfrom=x@example.test;\r\n"
        "\tdkim=none;\r\n"
        '\tdmarc=fail (p=reject) reason="no aligned SPF or DKIM pass" header.from=example.test'
    )


def test_field_helo_identity_and_odd_addresses():
    policy = AddAuthenticationResults("mx.example.org", dmarc=False)
    value = policy.build_value({"spf": {"result": "pass", "smtp.helo": "mx.example.test"}})
    assert value == "mx.example.org;\n\tspf=pass smtp.helo=mx.example.test"
    value = policy.build_value({"spf": spf("pass", 'we"ird(x)@example.test')})
    assert value == 'mx.example.org;\n\tspf=pass smtp.mailfrom="we\\"ird(x)@example.test"'


def test_field_none():
    env = message()
    run(AddAuthenticationResults("mx.example.org", dmarc=False).apply(env))
    assert field_value(env) == "Authentication-Results: mx.example.org; none"
    assert env.auth_results == {}


def test_dmarc_none_without_record(server):
    env = message(["a@missing.test"])
    run(AddAuthenticationResults("mx.example.org", resolver=server.resolver()).apply(env))
    assert field_value(env) == (
        "Authentication-Results: mx.example.org;\r\n\tdmarc=none header.from=missing.test")


def test_authserv_id_must_be_a_token():
    for bad in ("", "mx example", "mx;x", "a(b)"):
        with pytest.raises(ValueError, match="authserv_id"):
            AddAuthenticationResults(bad)
    with pytest.raises(ValueError, match="forged"):
        AddAuthenticationResults("mx.example.org", forged="drop")


# --- forged fields ------------------------------------------------------------------------

FORGED = (
    b"Received: from somewhere\r\n"
    b"Authentication-Results: MX.Example.ORG; dkim=pass header.d=bank.test\r\n"
    b"Authentication-Results: other.example; spf=fail\r\n"
    b"authentication-results: (forged (nested) comment)\r\n"
    b"\tmx.example.org 1; dmarc=pass header.from=bank.test\r\n"
    b'Authentication-Results: "mx.example.org"; spf=pass\r\n'
    b"Authentication-Results: mx.example.org.evil; spf=pass\r\n"
    b"X-Other: 1\r\n"
)


def test_forged_fields_removed(server):
    env = message(extra=FORGED)
    run(AddAuthenticationResults("mx.example.org", resolver=server.resolver()).apply(env))
    head, body = env.flatten()
    assert head.startswith(b"Authentication-Results: mx.example.org;\r\n\tdmarc=fail")
    rest = head[head.index(b"Received:"):]
    assert rest == (
        b"Received: from somewhere\r\n"
        b"Authentication-Results: other.example; spf=fail\r\n"
        b"Authentication-Results: mx.example.org.evil; spf=pass\r\n"
        b"X-Other: 1\r\n"
        b"From: alice@example.test\r\n"
        b"Subject: hi\r\n\r\n"
    )
    assert body == b"hello\r\n"


def test_forged_fields_renamed():
    env = message(extra=FORGED)
    assert remove_forged(env, "mx.example.org", "X-Original-Authentication-Results") == 3
    head, _ = env.flatten()
    assert head == (
        b"Received: from somewhere\r\n"
        # a renamed field is written anew, folded near 78 columns
        b"X-Original-Authentication-Results: MX.Example.ORG; dkim=pass\r\n"
        b" header.d=bank.test\r\n"
        b"Authentication-Results: other.example; spf=fail\r\n"
        b"X-Original-Authentication-Results: (forged (nested) comment)\r\n"
        b"\tmx.example.org 1; dmarc=pass header.from=bank.test\r\n"
        b'X-Original-Authentication-Results: "mx.example.org"; spf=pass\r\n'
        b"Authentication-Results: mx.example.org.evil; spf=pass\r\n"
        b"X-Other: 1\r\n"
        b"From: alice@example.test\r\n"
        b"Subject: hi\r\n\r\n"
    )


def test_forged_rename_and_keep_modes():
    env = message(extra=FORGED)
    run(AddAuthenticationResults("mx.example.org", dmarc=False, forged="rename").apply(env))
    assert env.headers.get_all("X-Original-Authentication-Results") is not None
    assert len(env.headers.get_all("X-Original-Authentication-Results")) == 3
    env = message(extra=FORGED)
    run(AddAuthenticationResults("mx.example.org", dmarc=False, forged="keep").apply(env))
    assert len(env.headers.get_all("Authentication-Results")) == 6


def test_no_forged_fields_leaves_the_header_block_as_it_was():
    raw = b"Received: x\r\nAuthentication-Results: other.example; none\r\nFrom: a@b.test\r\n\r\nb"
    env = Envelope()
    env.parse(raw)
    assert remove_forged(env, "mx.example.org") == 0
    assert b"".join(env.flatten()) == raw
    plain = Envelope()
    plain.parse(b"From: a@b.test\r\n\r\nbody")
    assert remove_forged(plain, "mx.example.org") == 0
    assert plain._msg is None  # not even parsed


# --- end to end: SmtpEdge + EnforceSpf -> queue policies ----------------------------------


class PolicyQueue:
    """A queue that applies queue policies and keeps what they produce."""

    def __init__(self, policies):
        self.policies = policies
        self.envelopes = []

    async def enqueue(self, envelope):
        produced = await apply_queue_policies(self.policies, envelope)
        self.envelopes.extend(produced)
        return [(env, f"q{len(self.envelopes)}") for env in produced]


def test_end_to_end(server, run_edge):
    resolver = server.install()
    enforce = EnforceSpf(skip_loopback=False)
    enforce.set_enforcement("fail")

    class Validators(SmtpValidators):
        @enforce.check
        def handle_rcpt(self, reply, recipient, params):
            pass

    queue = PolicyQueue([AddAuthenticationResults("mx.example.org", resolver=resolver)])
    edge = run_edge(queue=queue, validator_class=Validators)
    msg = (b"Authentication-Results: mx.example.org; spf=pass smtp.mailfrom=x@bank.test\r\n"
           b"From: Alice <alice@local.test>\r\nSubject: hi\r\n\r\nhello\r\n")
    with smtplib.SMTP("127.0.0.1", edge.port, local_hostname="client.example.test") as client:
        client.sendmail("alice@local.test", ["bob@example.org"], msg)
    (envelope,) = queue.envelopes
    head, body = envelope.flatten()
    assert head == (
        b"Authentication-Results: mx.example.org;\r\n"
        b"\tspf=pass smtp.mailfrom=alice@local.test;\r\n"
        b"\tdmarc=pass (p=reject) header.from=local.test\r\n"
        b"From: Alice <alice@local.test>\r\nSubject: hi\r\n\r\n"
    )
    assert body == b"hello\r\n"


# --- with the DKIM policies: DkimSign -> DkimVerify -> this -> ArcSeal -------------------


def rsa_key(selector: str, domain: str) -> tuple[bytes, str]:
    """A private key (PEM) and the dnsmasq option publishing its DKIM record."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    der = private.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    record = "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode()
    chunks = [record[i:i + 200] for i in range(0, len(record), 200)]
    return pem, f"--txt-record={selector}._domainkey.{domain}," + ",".join(chunks)


def test_with_dkim_verify_and_arc_seal(dnsmasq):
    from slimta.policy.dkim import ArcSeal, DkimSign, DkimVerify

    author_pem, author_record = rsa_key("sel1", "mail.example.test")
    fwd_pem, fwd_record = rsa_key("arc1", "forwarder.test")
    server = dnsmasq([author_record, fwd_record, *RECORDS])
    server.install()

    async def flow():
        sent = message(["Alice <alice@example.test>"],
                       extra=b"Date: Tue, 05 Mar 2024 14:07:09 +0000\r\nTo: bob@example.org\r\n")
        await DkimSign("sel1", "mail.example.test", author_pem, by="envelope").apply(
            _sender(sent, "alice@mail.example.test"))
        received = Envelope("bounce@elsewhere.test", ["bob@example.org"])
        received.parse(b"".join(sent.flatten()))
        received.auth_results = {"spf": spf("pass", "bounce@elsewhere.test")}
        await DkimVerify().apply(received)
        await AddAuthenticationResults("mx.forwarder.test").apply(received)
        await ArcSeal("arc1", "forwarder.test", fwd_pem, "mx.forwarder.test").apply(received)
        sealed = b"".join(received.flatten())
        return received, sealed, await DkimVerify().verify_arc(sealed)

    received, sealed, arc = run(flow())
    assert received.auth_results["dmarc"]["result"] == "pass"  # DKIM d= aligned (relaxed)
    head = sealed.split(b"\r\n\r\n")[0]
    assert b"ARC-Authentication-Results: i=1; mx.forwarder.test;" in head
    field = head[head.index(b"Authentication-Results: mx.forwarder.test;"):]
    assert field.startswith(
        b"Authentication-Results: mx.forwarder.test;\r\n"
        b"\tspf=pass smtp.mailfrom=bounce@elsewhere.test;\r\n"
        b"\tdkim=pass header.d=mail.example.test header.s=sel1 header.b=")
    assert b"\tdmarc=pass (p=reject) header.from=example.test\r\n" in field
    assert arc == {"result": "pass", "reason": None, "instance": 1}


def _sender(env: Envelope, sender: str) -> Envelope:
    env.sender = sender
    return env
