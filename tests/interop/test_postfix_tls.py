"""StaticSmtpRelay over STARTTLS to a real Postfix smtpd with a test certificate.

Each test starts a private Postfix instance: its own config_directory and
queue_directory in a fresh temporary directory, smtpd only on 127.0.0.1 and
a free port, logging to a file through postlogd. Every accepted message is
parked in the hold queue (``check_client_access static:HOLD``), so nothing is
ever delivered anywhere; the tests read the hold queue (``postqueue -j``),
the queued message (``postcat``) and the log to see what Postfix got and
whether the session was encrypted. The system Postfix is never touched: every
command gets ``-c <our config_directory>``.

The master daemon must start as root (CI runs as root).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import textwrap
import time

import pytest

from daemons import daemon_dir, free_port, read_log, wait_gone
from slimta.envelope import Envelope
from slimta.relay import PermanentRelayError, TransientRelayError
from slimta.relay.smtp.static import StaticSmtpRelay
from slimta.smtp.reply import Reply

DATA = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: STARTTLS to Postfix\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
    b"Message-Id: <postfix-tls.1@example.com>\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line with a leading dot\r\n"
    b".\r\n"
    b"last line\r\n"
)


def _postconf_default(postconf: str, name: str) -> str:
    return subprocess.run([postconf, "-dh", name], check=True, capture_output=True,
                          text=True).stdout.strip()


class Postfix:
    """A private Postfix with smtpd on 127.0.0.1:``port``; mail goes to the hold queue.

    ``tls``: smtpd offers STARTTLS with a self-signed certificate for
    localhost / 127.0.0.1 (``cert``); without it smtpd has no TLS at all.
    ``main`` adds lines to main.cf.
    """

    def __init__(self, tool, *, tls: bool = True, main: str = ""):
        self.postfix = tool("postfix")
        self.postconf = tool("postconf")
        self.postqueue = tool("postqueue")
        self.postcat = tool("postcat")
        openssl = tool("openssl")
        self.base = daemon_dir("slimta-postfix-")
        self.etc = os.path.join(self.base, "etc")
        self.queue = os.path.join(self.base, "queue")
        data = os.path.join(self.base, "data")
        for d in (self.etc, self.queue, data):
            os.mkdir(d)
        shutil.chown(data, "postfix", "postfix")
        self.log = os.path.join(self.base, "maillog")
        self.port = free_port()
        self.started = False
        self.cert = os.path.join(self.base, "cert.pem")
        subprocess.run(
            [openssl, "req", "-x509", "-nodes", "-subj", "/CN=localhost", "-newkey", "rsa:2048",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
             "-keyout", self.cert, "-out", self.cert, "-days", "2"],
            check=True, capture_output=True)
        os.chmod(self.cert, 0o600)
        if tls:
            tls_conf = textwrap.dedent(f"""\
                smtpd_tls_cert_file = {self.cert}
                smtpd_tls_key_file = {self.cert}
                smtpd_tls_security_level = may
                smtpd_tls_loglevel = 1
                smtpd_tls_received_header = yes
                smtpd_tls_session_cache_database =
            """)
        else:
            tls_conf = "smtpd_tls_security_level = none\n"
        dirs = {name: _postconf_default(self.postconf, name) for name in (
            "command_directory", "daemon_directory", "meta_directory", "shlib_directory")}
        with open(os.path.join(self.etc, "main.cf"), "w") as f:
            f.write(textwrap.dedent(f"""\
                # a private instance for tests/interop/test_postfix_tls.py
                compatibility_level = 3.6
                config_directory = {self.etc}
                queue_directory = {self.queue}
                data_directory = {data}
                command_directory = {dirs['command_directory']}
                daemon_directory = {dirs['daemon_directory']}
                meta_directory = {dirs['meta_directory']}
                shlib_directory = {dirs['shlib_directory']}
                mail_owner = postfix
                setgid_group = postdrop
                maillog_file_prefixes = {self.base}
                maillog_file = {self.log}
                myhostname = postfix.test
                mydomain = postfix.test
                myorigin = postfix.test
                mydestination =
                relay_domains =
                inet_interfaces = loopback-only
                inet_protocols = ipv4
                mynetworks = 127.0.0.0/8
                alias_maps =
                alias_database =
                local_recipient_maps =
                biff = no
                smtpd_peername_lookup = no
                smtp_dns_support_level = disabled
                default_transport = discard:test
                relay_transport = discard:test
                local_transport = discard:test
                virtual_transport = discard:test
                smtpd_relay_restrictions = permit_mynetworks, reject
                smtpd_recipient_restrictions = check_client_access static:HOLD,
                    permit_mynetworks, reject
                in_flow_delay = 0
            """) + tls_conf + main)
        with open(os.path.join(self.etc, "master.cf"), "w") as f:
            f.write(textwrap.dedent(f"""\
                127.0.0.1:{self.port} inet n -       n       -       -       smtpd
                pickup    unix  n       -       n       60      1       pickup
                cleanup   unix  n       -       n       -       0       cleanup
                qmgr      unix  n       -       n       300     1       qmgr
                tlsmgr    unix  -       -       n       1000?   1       tlsmgr
                rewrite   unix  -       -       n       -       -       trivial-rewrite
                bounce    unix  -       -       n       -       0       bounce
                defer     unix  -       -       n       -       0       bounce
                trace     unix  -       -       n       -       0       bounce
                verify    unix  -       -       n       -       1       verify
                flush     unix  n       -       n       1000?   0       flush
                proxymap  unix  -       -       n       -       -       proxymap
                showq     unix  n       -       n       -       -       showq
                error     unix  -       -       n       -       -       error
                retry     unix  -       -       n       -       -       error
                discard   unix  -       -       n       -       -       discard
                anvil     unix  -       -       n       -       1       anvil
                scache    unix  -       -       n       -       1       scache
                postlog   unix-dgram n  -       n       -       1       postlogd
            """))
        try:
            self._run(self.postfix, "-c", self.etc, "start")
            self.started = True
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _run(self, *args: str) -> str:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}\nlog:\n{self.log_text()}")
        return proc.stdout

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    s.settimeout(5)
                    if s.recv(100).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Postfix smtpd did not answer; log:\n{self.log_text()}")
            time.sleep(0.1)

    def log_text(self) -> str:
        return read_log(self.log)

    async def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        """The first match of ``pattern`` in the log (postlogd writes it a moment later).

        It waits on the event loop, which must run for an aborted transport
        to close its socket.
        """
        deadline = time.monotonic() + timeout
        while True:
            m = re.search(pattern, self.log_text(), re.MULTILINE)
            if m:
                return m
            if time.monotonic() > deadline:
                pytest.fail(f"no {pattern!r} in the Postfix log:\n{self.log_text()}")
            await asyncio.sleep(0.05)

    def queued(self) -> list[dict]:
        """``postqueue -j``: one JSON object per queued message."""
        out = self._run(self.postqueue, "-c", self.etc, "-j")
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def message(self, queue_id: str) -> bytes:
        """Header and body of a queued message as Postfix stored it (LF line ends)."""
        proc = subprocess.run([self.postcat, "-c", self.etc, "-h", "-b", "-q", queue_id],
                              capture_output=True, timeout=30, check=True)
        return proc.stdout

    def stop(self) -> None:
        if self.started:
            self.started = False
            master = None
            try:
                with open(os.path.join(self.queue, "pid", "master.pid")) as f:
                    master = int(f.read().strip())
            except (OSError, ValueError):
                pass
            subprocess.run([self.postfix, "-c", self.etc, "stop"], capture_output=True,
                           timeout=60, stdin=subprocess.DEVNULL)
            if master is not None:
                wait_gone(master, 15, 0.05)
        print(self.log_text())
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def postfix(tool):
    """``postfix(tls=True, main="")`` starts a private Postfix; stopped at teardown."""
    if os.geteuid() != 0:
        pytest.fail("the Postfix interop tests must run as root (Postfix's master needs it)")
    started = []

    def start(**kwargs) -> Postfix:
        server = Postfix(tool, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def envelope(rcpts=("bob@example.net", "carol@example.net"), data: bytes = DATA) -> Envelope:
    env = Envelope("alice@example.com", list(rcpts))
    env.parse(data)
    return env


def unverified_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def queue_id_of(results, rcpts) -> str:
    """Every recipient got the same ``250 2.0.0 Ok: queued as ID``: that ID.

    (After BDAT Postfix says ``Ok: <octets> bytes queued as ID``; the count
    must be the whole message.)
    """
    assert set(results) == set(rcpts), results
    ids = set()
    for rcpt in rcpts:
        reply = results[rcpt]
        assert isinstance(reply, Reply) and reply.code == "250", results
        m = re.fullmatch(r"2\.0\.0 Ok: (?:(\d+) bytes )?queued as (\w+)", reply.message)
        assert m, reply
        if m.group(1) is not None:
            assert int(m.group(1)) == len(DATA), reply
        ids.add(m.group(2))
    [qid] = ids
    return qid


def check_held(server: Postfix, qid: str, rcpts, data: bytes = DATA) -> bytes:
    """The message ``qid`` waits in the hold queue, from alice to ``rcpts``, as sent.

    Returns Postfix's own Received header (unfolded).
    """
    [entry] = [e for e in server.queued() if e["queue_id"] == qid]
    assert entry["queue_name"] == "hold", entry
    assert entry["sender"] == "alice@example.com"
    assert [r["address"] for r in entry["recipients"]] == list(rcpts)
    stored = server.message(qid)
    start = stored.index(b"From: Alice")
    assert stored[start:] == data.replace(b"\r\n", b"\n")
    received = stored[:start]
    # smtpd_peername_lookup = no: the client is "unknown"
    assert received.startswith(b"Received: from relay.test (unknown [127.0.0.1])"), received
    assert received.count(b"\nReceived:") == 0, received  # only smtpd's own header
    return received.replace(b"\n\t", b" ").replace(b"\n ", b" ")


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
async def test_starttls_delivery_to_postfix(postfix, chunking):
    # without CHUNKING the content goes with DATA, dot-stuffed
    server = postfix(main="" if chunking else "smtpd_discard_ehlo_keywords = chunking\n")
    relay = StaticSmtpRelay("127.0.0.1", server.port, context=unverified_context(),
                            tls_required=True, ehlo_as="relay.test")
    rcpts = ["bob@example.net", "carol@example.net"]
    try:
        results = await relay.attempt(envelope(rcpts), 0)
        [session] = relay.pool._idle
        assert session.secure
        assert ("CHUNKING" in session.conn.extensions) is chunking
    finally:
        await relay.close()
    qid = queue_id_of(results, rcpts)
    received = check_held(server, qid, rcpts)
    # smtpd_tls_received_header: the cipher is in Postfix's Received header
    assert re.search(rb"\(using TLSv1\.[23] with cipher \S+", received), received
    assert b"with ESMTPS id " + qid.encode() in received, received
    await server.wait_log(r"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]: "
                          r"TLSv1\.[23] with cipher")
    await server.wait_log(r"NOQUEUE: hold: RCPT from unknown\[127\.0\.0\.1\]: .*Client host "
                          r"triggers HOLD action; from=<alice@example\.com> to=<bob@example\.net> "
                          r"proto=ESMTP helo=<relay\.test>")
    await server.wait_log(rf"{qid}: client=unknown\[127\.0\.0\.1\]")
    content = "bdat=1" if chunking else "data=1"
    await server.wait_log(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=2 starttls=1 mail=1 "
                          rf"rcpt=2 {content} quit=1 commands=8")


async def test_opportunistic_tls_is_the_default(postfix):
    server = postfix()
    relay = StaticSmtpRelay("127.0.0.1", server.port, ehlo_as="relay.test")
    try:
        results = await relay.attempt(envelope(["bob@example.net"]), 0)
    finally:
        await relay.close()
    qid = queue_id_of(results, ["bob@example.net"])
    received = check_held(server, qid, ["bob@example.net"])
    assert b"with ESMTPS id" in received
    await server.wait_log(r"Anonymous TLS connection established from unknown\[127\.0\.0\.1\]")


async def test_the_connection_is_reused_inside_tls(postfix):
    server = postfix()
    relay = StaticSmtpRelay("127.0.0.1", server.port, context=unverified_context(),
                            tls_required=True, ehlo_as="relay.test")
    qids = []
    try:
        for _ in range(3):
            qids.append(queue_id_of(await relay.attempt(envelope(["bob@example.net"]), 0),
                                    ["bob@example.net"]))
        [session] = relay.pool._idle
        assert session.deliveries == 3 and session.secure
    finally:
        await relay.close()
    assert len(set(qids)) == 3
    assert {e["queue_id"] for e in server.queued()} == set(qids)
    await server.wait_log(r"disconnect from unknown\[127\.0\.0\.1\]")
    assert server.log_text().count("TLS connection established") == 1


async def test_a_verified_certificate(postfix):
    server = postfix()
    ctx = ssl.create_default_context(cafile=server.cert)  # verifies the chain and 127.0.0.1
    relay = StaticSmtpRelay("127.0.0.1", server.port, context=ctx, tls_required=True,
                            ehlo_as="relay.test")
    try:
        results = await relay.attempt(envelope(["bob@example.net"]), 0)
    finally:
        await relay.close()
    check_held(server, queue_id_of(results, ["bob@example.net"]), ["bob@example.net"])


async def test_an_untrusted_certificate_is_a_transient_failure(postfix):
    server = postfix()
    ctx = ssl.create_default_context()  # the system CAs: our self-signed cert fails
    relay = StaticSmtpRelay("127.0.0.1", server.port, context=ctx, tls_required=True,
                            ehlo_as="relay.test")
    with pytest.raises(TransientRelayError) as info:
        await relay.attempt(envelope(["bob@example.net"]), 0)
    await relay.close()
    assert (info.value.reply.code, info.value.reply.enhanced_status_code) == ("451", "4.7.5")
    assert "certificate verify failed" in str(info.value)
    await server.wait_log(r"lost connection after STARTTLS|SSL_accept error")
    assert server.queued() == []


async def test_tls_required_but_not_offered_is_transient(postfix):
    server = postfix(tls=False)
    relay = StaticSmtpRelay("127.0.0.1", server.port, context=unverified_context(),
                            tls_required=True, ehlo_as="relay.test")
    with pytest.raises(TransientRelayError) as info:
        await relay.attempt(envelope(), 0)
    await relay.close()
    assert (info.value.reply.code, info.value.reply.enhanced_status_code) == ("451", "4.7.0")
    # the relay hung up right after EHLO, before any MAIL
    await server.wait_log(r"lost connection after EHLO from unknown\[127\.0\.0\.1\]")
    await server.wait_log(r"disconnect from unknown\[127\.0\.0\.1\] ehlo=1 commands=1$")
    assert server.queued() == []
    assert "TLS connection established" not in server.log_text()


async def test_without_tls_required_it_delivers_in_clear(postfix):
    server = postfix(tls=False)
    relay = StaticSmtpRelay("127.0.0.1", server.port, ehlo_as="relay.test")
    try:
        results = await relay.attempt(envelope(["bob@example.net"]), 0)
        [session] = relay.pool._idle
        assert not session.secure
    finally:
        await relay.close()
    received = check_held(server, queue_id_of(results, ["bob@example.net"]),
                          ["bob@example.net"])
    assert b"with ESMTP id" in received and b"using TLS" not in received


async def test_a_refused_recipient_inside_tls(postfix):
    server = postfix(main="smtpd_recipient_restrictions = check_recipient_access "
                          "inline:{ nobody@example.net=REJECT }, "
                          "check_client_access static:HOLD, permit_mynetworks, reject\n")
    relay = StaticSmtpRelay("127.0.0.1", server.port, context=unverified_context(),
                            tls_required=True, ehlo_as="relay.test")
    try:
        results = await relay.attempt(envelope(["nobody@example.net", "bob@example.net"]), 0)
    finally:
        await relay.close()
    err = results["nobody@example.net"]
    assert isinstance(err, PermanentRelayError), results
    assert (err.reply.code, err.reply.enhanced_status_code) == ("554", "5.7.1"), err.reply
    assert "RCPT" in str(err)
    qid = queue_id_of({"bob@example.net": results["bob@example.net"]}, ["bob@example.net"])
    check_held(server, qid, ["bob@example.net"])

