"""DKIM signing/verification and ARC sealing (slimta.policy.dkim) against real DNS and tools.

Keys are made by ``opendkim-genkey`` (and ``cryptography``); a dnsmasq
started by the test serves them as ``<selector>._domainkey.<domain>`` TXT
records, split into strings of at most 255 octets (dnsmasq's
``--txt-record=name,str1,str2`` gives one record of several strings).

The outside verifiers are dkimpy's ``dkimverify``/``arcverify`` and
OpenDKIM's ``opendkim-testmsg``. ``opendkim-testmsg`` has no option for a
name server or a key file when verifying: libopendkim asks the C library's
resolver (``res_query``), which reads ``/etc/resolv.conf`` and only knows
port 53. So :func:`system_dns` runs a tool in a private mount namespace
(``unshare -m``, needs root, as CI runs) where ``/etc/resolv.conf`` is
bind-mounted to a file naming a second dnsmasq on ``127.53.x.y:53`` that
forwards every query to the test's dnsmasq: the tool, unchanged, asks the
same DNS as our verifier, and the machine's own resolver configuration is
never touched. dkimpy's tools (dnspython) read the same file.
"""

from __future__ import annotations

import base64
import contextlib
import os
import random
import re
import shutil
import smtplib
import subprocess
import time
from collections.abc import Iterator

import dkim
import dns.exception
import dns.message
import dns.query
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from dnsmasq import dnsmasq_binary, silent_udp_port
from slimta.envelope import Envelope
from slimta.policy import QueuePolicy, RelayPolicy, apply_queue_policies
from slimta.policy.dkim import ArcSeal, DkimKey, DkimSign, DkimVerify, load_private_key
from slimta.util import dns as slimta_dns

MESSAGE = (
    b"From: Alice <alice@example.test>\r\n"
    b"To: Bob <bob@dest.test>\r\n"
    b"Subject: Quarterly figures\r\n"
    b"Date: Wed, 25 Nov 2026 17:00:00 +0000\r\n"
    b"Message-Id: <1234@example.test>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b"\r\n"
    b"the figures are attached.   Trailing spaces:   \r\n"
    b"-- \r\nAlice\r\n"
)


def tool(name: str) -> str:
    """The path of a required program; fails (never skips) when it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if path is None:
        pytest.fail(f"required program {name!r} is not installed (Debian: opendkim-tools; "
                    "PyPI: dkimpy)")
    return path


def envelope_of(data: bytes, sender: str = "alice@example.test") -> Envelope:
    env = Envelope(sender, ["bob@dest.test"])
    env.parse(data)
    return env


def message_of(env: Envelope) -> bytes:
    return b"".join(env.flatten())


def from_domain(data: bytes, domain: str) -> bytes:
    return data.replace(b"alice@example.test", f"alice@{domain}".encode())


# --- keys and DNS ---------------------------------------------------------------


class Key:
    """A private key (PEM) and the TXT record of its public half."""

    def __init__(self, selector: str, domain: str, pem: bytes, record: str):
        self.selector = selector
        self.domain = domain
        self.pem = pem
        self.record = record

    @property
    def name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def dnsmasq_option(self, record: str | None = None) -> str:
        return txt_option(self.name, self.record if record is None else record)


def txt_option(name: str, value: str) -> str:
    """``--txt-record=name,s1,s2``: dnsmasq splits at commas into strings of <= 255 octets."""
    assert "," not in value
    chunks = [value[i:i + 250] for i in range(0, len(value), 250)]
    return f"--txt-record={name}," + ",".join(chunks)


def opendkim_key(directory, selector: str, domain: str) -> Key:
    """A 2048-bit key made by ``opendkim-genkey``, record taken from its .txt file."""
    subprocess.run(
        [tool("opendkim-genkey"), "-b", "2048", "-d", domain, "-s", selector, "-D", str(directory)],
        check=True, capture_output=True,
    )
    pem = (directory / f"{selector}.private").read_bytes()
    zone = (directory / f"{selector}.txt").read_text()
    record = "".join(re.findall(r'"([^"]*)"', zone))
    assert record.startswith("v=DKIM1;") and len(record) > 255  # needs several strings
    return Key(selector, domain, pem, record)


def crypto_key(selector: str, domain: str, bits: int = 2048) -> Key:
    """A key made with ``cryptography`` (PKCS#1 PEM)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return Key(selector, domain, pem, "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode())


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Key]:
    directory = tmp_path_factory.mktemp("dkimkeys")
    return {
        "example": opendkim_key(directory, "sel1", "example.test"),
        "other": crypto_key("sel2", "other.test"),
        "forwarder": crypto_key("arc1", "forwarder.test"),
        "small": crypto_key("tiny", "small.test", bits=1024),
        "nokey": crypto_key("gone", "nokey.test"),  # not published
    }


@pytest.fixture
def dns_server(dnsmasq, keys):
    """dnsmasq with the published keys, installed as the shared resolver."""
    records = [k.dnsmasq_option() for name, k in keys.items() if name != "nokey"]
    records.append(txt_option("revoked._domainkey.example.test", "v=DKIM1; k=rsa; p="))
    server = dnsmasq(records)
    server.install()
    return server


def _answers(host: str, port: int) -> bool:
    try:
        dns.query.udp(dns.message.make_query("ready.test", "A"), host, port=port, timeout=0.1)
    except (dns.exception.Timeout, OSError):
        return False
    return True


@contextlib.contextmanager
def system_dns(server, tmp_path) -> Iterator:
    """``run(argv, data)`` runs a program whose system resolver is ``server``.

    See the module docstring: a forwarding dnsmasq on 127.53.x.y port 53 and
    ``/etc/resolv.conf`` replaced inside a private mount namespace.
    """
    if os.geteuid() != 0:
        pytest.fail("these interop tests need root (port 53 and unshare -m), as CI runs")
    unshare = tool("unshare")
    process = None
    for _ in range(5):
        address = f"127.53.{random.randint(0, 255)}.{random.randint(2, 254)}"
        process = subprocess.Popen(
            [dnsmasq_binary(), "--no-daemon", f"--listen-address={address}", "--bind-interfaces",
             "--port=53", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--pid-file=",
             "--cache-size=0", f"--server=127.0.0.1#{server.port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while process.poll() is None and time.monotonic() < deadline:
            if _answers(address, 53):
                break
            time.sleep(0.02)
        if process.poll() is None:
            break
    assert process is not None and process.poll() is None, "forwarding dnsmasq did not start"
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {address}\noptions timeout:2 attempts:1\n")

    def run(argv: list[str], data: bytes) -> subprocess.CompletedProcess:
        script = 'mount --bind "$1" /etc/resolv.conf && shift && exec "$@"'
        return subprocess.run(
            [unshare, "-m", "sh", "-c", script, "sh", str(resolv), *argv],
            input=data, capture_output=True, timeout=60,
        )

    try:
        yield run
    finally:
        process.terminate()
        process.wait(5)


@pytest.fixture
def outside(dns_server, tmp_path):
    with system_dns(dns_server, tmp_path) as run:
        yield run


def signer(keys) -> DkimSign:
    k = keys["example"]
    return DkimSign(k.selector, k.domain, k.pem)


def sig_tags(data: bytes, name: bytes = b"DKIM-Signature") -> dict[bytes, bytes]:
    headers, _ = dkim.rfc822_parse(data)
    values = [v for n, v in headers if n.lower() == name.lower()]
    assert values, f"no {name!r} field"
    return dkim.util.parse_tag_value(values[0])


# --- signing ---------------------------------------------------------------------


async def test_signature_verifies_with_dkimverify(keys, outside):
    env = envelope_of(MESSAGE)
    await signer(keys).apply(env)
    data = message_of(env)
    assert data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;")
    assert data.endswith(MESSAGE)  # nothing else touched
    tags = sig_tags(data)
    assert tags[b"d"] == b"example.test" and tags[b"s"] == b"sel1"
    assert b"from" in tags[b"h"].lower()

    done = outside([tool("dkimverify")], data)
    assert (done.returncode, done.stdout.strip()) == (0, b"signature ok"), done.stderr

    tampered = data.replace(b"figures are attached", b"figures are appended")
    done = outside([tool("dkimverify")], tampered)
    assert done.returncode == 1 and b"body hash mismatch" in done.stderr


async def test_signature_verifies_with_opendkim_testmsg(keys, outside):
    env = envelope_of(MESSAGE)
    await signer(keys).apply(env)
    data = message_of(env)
    done = outside([tool("opendkim-testmsg")], data)
    assert done.returncode == 0, done.stderr
    assert done.stderr == b"" and done.stdout == b""

    tampered = data.replace(b"Hello Bob", b"Hello Eve")
    done = outside([tool("opendkim-testmsg")], tampered)
    assert done.returncode != 0
    assert b"Bad signature" in done.stderr or b"body hash" in done.stderr.lower()

    # LF line endings, as a message file on disk has them, verify too
    done = outside([tool("opendkim-testmsg")], data.replace(b"\r\n", b"\n"))
    assert done.returncode == 0, done.stderr


async def test_signature_covers_fields_added_before_and_verifies_in_ours(keys, dns_server):
    env = envelope_of(MESSAGE)
    env.prepend_header("Received", "from a.test by b.test; Wed, 25 Nov 2026 17:00:00 +0000")
    env.headers["X-Added"] = "by a policy"  # header block rewritten before signing
    await DkimSign(keys["example"].selector, "example.test", keys["example"].pem,
                   headers=["From", "To", "Subject", "X-Added"]).apply(env)
    data = message_of(env)
    tags = sig_tags(data)
    assert re.sub(rb"\s", b"", tags[b"h"]) == b"from:to:subject:x-added"
    [result] = await DkimVerify().verify(data)
    assert result == {
        "result": "pass", "domain": "example.test", "selector": "sel1", "reason": None,
        "identity": "@example.test", "header_b": re.sub(rb"\s", b"", tags[b"b"])[:8].decode(),
    }
    # a signed field changed afterwards
    changed = data.replace(b"X-Added: by a policy", b"X-Added: by someone else")
    [result] = await DkimVerify().verify(changed)
    assert (result["result"], result["reason"]) == ("fail", "signature did not verify")


async def test_tampered_body_fails_in_ours(keys, dns_server):
    env = envelope_of(MESSAGE)
    await signer(keys).apply(env)
    data = message_of(env)
    tampered = data.replace(b"Alice\r\n", b"Mallory\r\n")
    [result] = await DkimVerify().verify(tampered)
    assert result["result"] == "fail"
    assert result["reason"] == "body hash did not verify"
    assert (result["domain"], result["selector"]) == ("example.test", "sel1")
    # relaxed body canonicalization: whitespace changes do not break it
    respaced = data.replace(b"Trailing spaces:   \r\n", b"Trailing  spaces:\r\n")
    [result] = await DkimVerify().verify(respaced)
    assert result["result"] == "pass"


async def test_several_domains_and_keys(keys, outside):
    ex, other = keys["example"], keys["other"]
    policy = DkimSign.for_domains({
        "example.test": (ex.selector, ex.pem),
        "Other.Test": (other.selector, other.pem),
        "*.example.test": DkimKey(ex.selector, "example.test", ex.pem),
    })
    for domain, d, s in [("example.test", b"example.test", b"sel1"),
                         ("other.test", b"other.test", b"sel2"),
                         ("news.example.test", b"example.test", b"sel1")]:
        env = envelope_of(from_domain(MESSAGE, domain))
        await policy.apply(env)
        data = message_of(env)
        tags = sig_tags(data)
        assert (tags[b"d"], tags[b"s"]) == (d, s), domain
        done = outside([tool("dkimverify")], data)
        assert done.returncode == 0, (domain, done.stdout, done.stderr)
        [result] = await DkimVerify().verify(data)
        assert result["result"] == "pass" and result["domain"] == d.decode()

    # no key: left unsigned, byte for byte
    for domain in ("third.test", "example.test.evil.test", "xexample.test"):
        env = envelope_of(from_domain(MESSAGE, domain))
        await policy.apply(env)
        assert message_of(env) == from_domain(MESSAGE, domain)
    # no From field at all
    env = envelope_of(MESSAGE.replace(b"From: Alice <alice@example.test>\r\n", b""))
    await policy.apply(env)
    assert not message_of(env).startswith(b"DKIM-Signature")


async def test_keyed_by_envelope_sender_and_catch_all(keys, dns_server):
    ex, other = keys["example"], keys["other"]
    by_envelope = DkimSign(other.selector, other.domain, other.pem, by="envelope")
    env = envelope_of(MESSAGE, sender="bounces@other.test")
    await by_envelope.apply(env)
    assert sig_tags(message_of(env))[b"d"] == b"other.test"
    env = envelope_of(MESSAGE, sender="")  # null sender: no domain
    await by_envelope.apply(env)
    assert message_of(env) == MESSAGE

    catch_all = DkimSign.for_domains({"*": DkimKey(ex.selector, ex.domain, ex.pem)})
    env = envelope_of(from_domain(MESSAGE, "customer.test"))
    await catch_all.apply(env)
    data = message_of(env)
    assert sig_tags(data)[b"d"] == b"example.test"
    [result] = await DkimVerify().verify(data)
    assert result["result"] == "pass"


async def test_queue_and_relay_policy(keys, dns_server):
    policy = signer(keys)
    assert isinstance(policy, QueuePolicy) and isinstance(policy, RelayPolicy)
    assert isinstance(ArcSeal(keys["forwarder"].selector, "forwarder.test",
                              keys["forwarder"].pem, "mx.forwarder.test"), RelayPolicy)
    [env] = await apply_queue_policies([DkimVerify(), policy], envelope_of(MESSAGE))
    assert env.auth_results["dkim"][0]["result"] == "none"
    [result] = await DkimVerify().verify(message_of(env))
    assert result["result"] == "pass"


async def test_seven_bit_signing_survives_a_downgrade(keys, dns_server):
    data = MESSAGE.replace(b"Hello Bob", "Grüße Bob".encode())
    env = envelope_of(data)
    env.body = "8BITMIME"
    await DkimSign(keys["example"].selector, "example.test", keys["example"].pem,
                   seven_bit=True).apply(env)
    signed = message_of(env)
    assert signed.isascii()
    copy = env.copy()
    assert copy.encode_7bit() is False  # what a relay does for a 7-bit hop: nothing left
    [result] = await DkimVerify().verify(message_of(copy))
    assert result["result"] == "pass"


async def test_large_message_is_signed_and_verified_in_a_thread(keys, dns_server):
    data = MESSAGE + b"x" * 70 + b"\r\n" + (b"line of text\r\n" * 20000)
    env = envelope_of(data)
    await signer(keys).apply(env)
    [result] = await DkimVerify().verify(message_of(env))
    assert result["result"] == "pass"


def test_bad_keys_and_arguments(keys, tmp_path):
    with pytest.raises(ValueError, match="not a PEM RSA private key"):
        DkimSign("s", "example.test", b"not a key")
    with pytest.raises(ValueError, match="From field must be signed"):
        DkimSign("s", "example.test", keys["example"].pem, headers=["Subject"])
    with pytest.raises(ValueError, match="wildcard needs a DkimKey"):
        DkimSign.for_domains({"*.example.test": ("s", keys["example"].pem)})
    with pytest.raises(ValueError, match="unsupported DKIM algorithm"):
        load_private_key(keys["example"].pem, "rsa-sha1")
    with pytest.raises(ValueError, match="by must be"):
        DkimSign("s", "example.test", keys["example"].pem, by="header")
    path = tmp_path / "key.pem"
    path.write_bytes(keys["example"].pem)
    assert DkimSign("s", "example.test", path).keys["example.test"].private_key == \
        keys["example"].pem.replace(b"\r\n", b"\n")


# --- verification -----------------------------------------------------------------


async def test_message_signed_by_opendkim_verifies_in_ours(keys, dns_server, tmp_path):
    k = keys["example"]
    key_file = tmp_path / "sel1.private"
    key_file.write_bytes(k.pem)
    done = subprocess.run(
        [tool("opendkim-testmsg"), "-C", "-d", k.domain, "-s", k.selector, "-k", str(key_file)],
        input=MESSAGE, capture_output=True, timeout=30,
    )
    assert done.returncode == 0, done.stderr
    signed = done.stdout
    tags = sig_tags(signed)
    assert tags[b"a"] == b"rsa-sha1"  # opendkim-testmsg has no option for another algorithm
    assert tags[b"c"] == b"relaxed/simple"

    [result] = await DkimVerify(allow_sha1=True).verify(signed)
    assert (result["result"], result["domain"], result["selector"]) == \
        ("pass", "example.test", "sel1")
    # RFC 8301: rsa-sha1 must not be considered valid, unless allowed
    [result] = await DkimVerify().verify(signed)
    assert result["result"] == "permerror"
    assert result["reason"] == "rsa-sha1 is not accepted (RFC 8301)"
    # simple body canonicalization: any change fails
    [result] = await DkimVerify(allow_sha1=True).verify(signed.replace(b"Bob,", b"Bob ,"))
    assert (result["result"], result["reason"]) == ("fail", "body hash did not verify")


async def test_results_stored_on_the_envelope(keys, dns_server):
    env = envelope_of(MESSAGE)
    await signer(keys).apply(env)
    other = keys["other"]
    await DkimSign(other.selector, other.domain, other.pem, by="envelope").apply(
        _with_sender(env, "x@other.test"))
    received = envelope_of(message_of(env))
    received.auth_results = {"spf": {"result": "pass"}}  # a colleague's entry stays
    await DkimVerify().apply(received)
    results = received.auth_results
    assert results["spf"] == {"result": "pass"}
    assert [(r["result"], r["domain"], r["selector"]) for r in results["dkim"]] == [
        ("pass", "other.test", "sel2"), ("pass", "example.test", "sel1")]
    assert results["arc"] == {"result": "none", "reason": "Message is not ARC signed",
                              "instance": 0}


def _with_sender(env: Envelope, sender: str) -> Envelope:
    env.sender = sender
    return env


async def test_unsigned_message(dns_server):
    env = envelope_of(MESSAGE)
    await DkimVerify().apply(env)
    assert env.auth_results["dkim"] == [{
        "result": "none", "domain": None, "selector": None, "reason": "message not signed",
        "identity": None, "header_b": None}]


async def test_key_problems(keys, dns_server):
    async def check(key: Key, selector: str | None = None, **kwargs) -> dict:
        policy = DkimSign(selector or key.selector, key.domain, key.pem)
        env = envelope_of(from_domain(MESSAGE, key.domain))
        await policy.apply(env)
        [result] = await DkimVerify(**kwargs).verify(message_of(env))
        return result

    result = await check(keys["nokey"])
    assert (result["result"], result["reason"]) == ("permerror", "no key for signature")
    assert (result["domain"], result["selector"]) == ("nokey.test", "gone")

    result = await check(keys["example"], selector="revoked")
    assert result["result"] == "permerror"
    assert result["reason"].startswith("bad key record:")

    result = await check(keys["small"], minkey=2048)
    assert (result["result"], result["reason"]) == ("permerror", "public key too small: 1024")
    assert (await check(keys["small"]))["result"] == "pass"

    # a key that does not match the signature: another domain's key published
    wrong = Key("sel1", "example.test", keys["other"].pem, keys["example"].record)
    result = await check(wrong)
    assert (result["result"], result["reason"]) == ("fail", "signature did not verify")


async def test_dns_failure_is_temperror(keys, dnsmasq):
    env = envelope_of(MESSAGE)
    await signer(keys).apply(env)
    with silent_udp_port() as port:
        resolver = slimta_dns.Resolver([f"127.0.0.1:{port}"], timeout=0.2, lifetime=0.5)
        [result] = await DkimVerify(resolver).verify(message_of(env))
    assert result["result"] == "temperror"
    assert result["reason"].startswith("key lookup failed: TXT lookup of sel1._domainkey."
                                       "example.test timed out")


async def test_malformed_and_too_many_signatures(keys, dns_server):
    env = envelope_of(MESSAGE)
    await signer(keys).apply(env)
    data = message_of(env)
    broken = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.test; s=sel1; h=from; b=abcd\r\n"
    [first, second] = await DkimVerify().verify(broken + data)
    assert first["result"] == "neutral"
    assert first["reason"] == "bad signature: missing bh="
    assert (first["domain"], first["selector"]) == ("example.test", "sel1")
    assert second["result"] == "pass"

    results = await DkimVerify(max_signatures=1).verify(data + b"")
    assert [r["result"] for r in results] == ["pass"]
    twice = data.split(b"\r\nFrom:")[0] + b"\r\n" + data
    results = await DkimVerify(max_signatures=1).verify(twice)
    assert [(r["result"], r["reason"]) for r in results] == [
        ("pass", None), ("neutral", "too many signatures, not checked")]
    assert results[1]["domain"] == "example.test"


# --- ARC --------------------------------------------------------------------------


def with_ar(data: bytes, authserv_id: str, results: str) -> bytes:
    return f"Authentication-Results: {authserv_id}; {results}\r\n".encode() + data


async def test_arc_seal_verifies_with_arcverify(keys, outside):
    # The original author signs; the forwarder verifies, records results, seals.
    env = envelope_of(MESSAGE)
    await signer(keys).apply(env)
    received = envelope_of(with_ar(message_of(env), "mx.forwarder.test",
                                   "dkim=pass header.d=example.test; spf=pass"))
    await DkimVerify().apply(received)
    assert received.auth_results["arc"]["result"] == "none"
    fwd = keys["forwarder"]
    seal = ArcSeal(fwd.selector, fwd.domain, fwd.pem, "mx.forwarder.test")
    await seal.apply(received)
    sealed = message_of(received)
    assert sealed.startswith(b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=forwarder.test; s=arc1;")
    aar = sig_tags(sealed, b"ARC-Seal")
    assert aar[b"i"] == b"1"
    assert b"ARC-Authentication-Results: i=1; mx.forwarder.test;" in sealed

    done = outside([tool("arcverify")], sealed)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == b"arc verification: cv=b'pass' success", done.stderr
    # the author's DKIM signature still verifies after sealing
    done = outside([tool("dkimverify")], sealed)
    assert done.stdout.strip() == b"signature ok"
    arc = await DkimVerify().verify_arc(sealed)
    assert arc == {"result": "pass", "reason": None, "instance": 1}

    # a second forwarder adds instance 2 after recording arc=pass
    hop2 = envelope_of(with_ar(sealed, "mx2.forwarder.test", "arc=pass; dkim=pass"))
    await ArcSeal(fwd.selector, fwd.domain, fwd.pem, "mx2.forwarder.test").apply(hop2)
    twice = message_of(hop2)
    assert twice.startswith(b"ARC-Seal: i=2; cv=pass;")
    done = outside([tool("arcverify")], twice)
    assert done.stdout.strip() == b"arc verification: cv=b'pass' success", done.stderr
    assert (await DkimVerify().verify_arc(twice))["result"] == "pass"
    assert (await DkimVerify().verify_arc(twice))["instance"] == 2

    # changed in transit after sealing: the chain fails
    tampered = twice.replace(b"Hello Bob", b"Hello Eve")
    arc = await DkimVerify().verify_arc(tampered)
    assert arc["result"] == "fail"
    assert arc["reason"] == "Most recent ARC-Message-Signature did not validate"
    done = outside([tool("arcverify")], tampered)
    assert b"cv=b'fail'" in done.stdout


async def test_arc_seal_needs_our_authentication_results(keys, dns_server, caplog):
    fwd = keys["forwarder"]
    seal = ArcSeal(fwd.selector, fwd.domain, fwd.pem, "mx.forwarder.test")
    for data in (MESSAGE, with_ar(MESSAGE, "someone.else.test", "dkim=pass")):
        env = envelope_of(data)
        await seal.apply(env)
        assert message_of(env) == data
    assert "ARC: not sealing: no Authentication-Results from mx.forwarder.test" in caplog.text


# --- through the edge ---------------------------------------------------------------


class PolicyQueue:
    """Applies queue policies as a Queue does, then keeps the envelopes."""

    def __init__(self, policies):
        self.policies = policies
        self.envelopes: list[Envelope] = []

    async def enqueue(self, envelope):
        envelopes = await apply_queue_policies(self.policies, envelope)
        self.envelopes.extend(envelopes)
        return [(env, f"q{len(self.envelopes)}") for env in envelopes]


def test_verified_at_end_of_data_through_smtp_edge(keys, dns_server, outside, run_edge,
                                                   tmp_path):
    """smtplib -> SmtpEdge -> queue policies: verify the incoming signature, then re-sign."""
    k = keys["example"]
    key_file = tmp_path / "sel1.private"
    key_file.write_bytes(k.pem)
    signed = subprocess.run(
        [tool("opendkim-testmsg"), "-C", "-d", k.domain, "-s", k.selector, "-k", str(key_file)],
        input=MESSAGE, capture_output=True, timeout=30, check=True,
    ).stdout
    other = keys["other"]
    queue = PolicyQueue([
        DkimVerify(allow_sha1=True),
        DkimSign(other.selector, other.domain, other.pem, by="envelope"),
    ])
    edge = run_edge(queue=queue)
    with smtplib.SMTP("127.0.0.1", edge.port, timeout=10) as client:
        client.sendmail("list@other.test", ["bob@dest.test"], signed)
    [env] = queue.envelopes
    assert [(r["result"], r["domain"]) for r in env.auth_results["dkim"]] == [
        ("pass", "example.test")]
    data = message_of(env)
    assert sig_tags(data)[b"d"] == b"other.test"
    # both signatures verify outside: ours (index 0) and opendkim's (index 1)
    for index in ("0", "1"):
        done = outside([tool("dkimverify"), "--index", index], data)
        assert done.stdout.strip() == b"signature ok", (index, done.stderr)
