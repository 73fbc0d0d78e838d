"""StaticLmtpRelay against Dovecot's LMTP server delivering into real Maildirs.

The test starts its own Dovecot (``protocols = lmtp``) with an LMTP listener
on 127.0.0.1 and a free port, and one on a Unix socket; users alice and bob
live in a passwd-file. Dovecot advertises PIPELINING and CHUNKING, so the
relay pipelines MAIL, the RCPTs and BDAT LAST; a second run takes CHUNKING
away from the session to cover DATA with one reply per recipient.

Dovecot's services run as an unprivileged user (nobody when we are root), so
its files live in a fresh 0755 directory rather than in pytest's private
(0700) tmp_path, and the mailboxes belong to that user (Dovecot refuses uid 0
in the users file).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import time

import pytest

from daemons import daemon_dir, dovecot_setup, free_port, read_log, start_dovecot, wait_gone
from slimta.envelope import Envelope
from slimta.relay import PermanentRelayError, TransientRelayError
from slimta.relay.smtp import session as session_module
from slimta.relay.smtp.static import StaticLmtpRelay
from slimta.smtp.reply import Reply

LMTP_SERVICE = "/usr/lib/dovecot/lmtp"

DATA = (
    b"From: Carol <carol@example.org>\r\n"
    b"To: alice@example.test, bob@example.test\r\n"
    b"Subject: LMTP interop\r\n"
    b"Message-Id: <lmtp.1@example.org>\r\n"
    b"\r\n"
    b"first line\r\n"
    b".a line with a leading dot\r\n"
    b"..two dots\r\n"
    b"caf\xc3\xa9 8-bit text\r\n"
    b"last line\r\n"
)


class Dovecot:
    """A private Dovecot LMTP server; ``maildir(user)`` is that user's Maildir."""

    def __init__(self, binary: str, users: tuple[str, ...] = ("alice", "bob")):
        self.base = daemon_dir("slimta-lmtp-")
        self.master: int | None = None
        self.port = free_port()
        self.socket_path = os.path.join(self.base, "lmtp.sock")
        self.log = os.path.join(self.base, "dovecot.log")
        conf, self.mail = dovecot_setup(self.base, users, protocols="lmtp", settings=f"""\
            mail_save_crlf = yes
            service lmtp {{
              inet_listener lmtp {{
                address = 127.0.0.1
                port = {self.port}
              }}
              unix_listener {self.socket_path} {{
                mode = 0666
              }}
            }}
        """)
        try:
            start_dovecot(binary, conf)
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> None:
        """Wait for master.pid (written after the daemon forked) and both listeners."""
        pidfile = os.path.join(self.base, "run", "master.pid")
        deadline = time.monotonic() + 15
        while True:
            try:
                if self.master is None:
                    with open(pidfile) as f:
                        text = f.read().strip()
                    if not text.isdigit():
                        raise OSError("master.pid not written yet")
                    self.master = int(text)
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.socket_path)
                return
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"Dovecot LMTP did not start; log:\n{self.log_text()}") from exc
                time.sleep(0.05)

    def log_text(self) -> str:
        return read_log(self.log)

    def maildir(self, user: str) -> str:
        return os.path.join(self.mail, user)

    def messages(self, user: str) -> list[bytes]:
        """The files in the user's Maildir new/ (in name order)."""
        new = os.path.join(self.maildir(user), "new")
        if not os.path.isdir(new):
            return []
        out = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                out.append(f.read())
        return out

    def stop(self) -> None:
        if self.master is None:  # it may have started without our noticing
            pidfile = os.path.join(self.base, "run", "master.pid")
            with contextlib.suppress(OSError, ValueError), open(pidfile) as f:
                self.master = int(f.read().strip())
        if self.master is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.master, signal.SIGTERM)
            wait_gone(self.master, 10, 0.05)
            self.master = None
        print(self.log_text())
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture
def dovecot(tool):
    binary = tool("dovecot")
    if not os.access(LMTP_SERVICE, os.X_OK):
        pytest.fail(f"{LMTP_SERVICE} is not installed (Debian package dovecot-lmtpd, "
                    "see scripts/test)")
    server = Dovecot(binary)
    try:
        yield server
    finally:
        server.stop()


def envelope(*rcpts: str, data: bytes = DATA) -> Envelope:
    env = Envelope("carol@example.org", list(rcpts))
    env.parse(data)
    return env


def stored_message(raw: bytes) -> tuple[list[bytes], bytes]:
    """Split what Dovecot stored into the header lines it put in front and the rest.

    Dovecot adds Return-Path, Delivered-To (only when the transaction has
    one accepted recipient) and its own Received header before the message;
    everything from our first header on must be the message as sent.
    """
    start = raw.index(b"From: Carol")
    return raw[:start].split(b"\r\n")[:-1], raw[start:]


def check_delivered(dovecot: Dovecot, user: str, data: bytes = DATA, *,
                    alone: bool = False, count: int = 1) -> None:
    """``user`` got ``count`` messages, each ``data`` byte for byte after Dovecot's headers.

    ``alone``: the transaction had only this recipient, so Dovecot added
    Delivered-To.
    """
    messages = dovecot.messages(user)
    assert len(messages) == count, messages
    for raw in messages:
        check_stored(raw, user, data, alone)


def check_stored(raw: bytes, user: str, data: bytes, alone: bool) -> None:
    added, rest = stored_message(raw)
    assert rest == data  # mail_save_crlf = yes: stored as sent, CRLF and all
    assert added[0] == b"Return-Path: <carol@example.org>"
    received = added[1:]
    if alone:
        assert received[0] == f"Delivered-To: {user}@example.test".encode()
        received = received[1:]
    # "from relay.test ([127.0.0.1])" over TCP, "from relay.test" over the socket
    assert received[0].startswith(b"Received: from relay.test"), added
    assert any(line.endswith(b" with LMTP") for line in received), added
    assert all(line.startswith(b"\t") for line in received[1:]), added


def check_results(results) -> None:
    assert set(results) == {"alice@example.test", "bob@example.test", "nobody@example.test"}
    for rcpt in ("alice@example.test", "bob@example.test"):
        assert isinstance(results[rcpt], Reply), results
        assert results[rcpt].code == "250", results
        assert results[rcpt].enhanced_status_code == "2.0.0", results
    err = results["nobody@example.test"]
    assert isinstance(err, PermanentRelayError), results
    assert (err.reply.code, err.reply.enhanced_status_code) == ("550", "5.1.1")
    assert "RCPT" in str(err)
    assert "doesn't exist" in err.reply.message


@pytest.mark.parametrize("listener", ["inet", "unix"])
async def test_per_recipient_results_and_real_mailboxes(dovecot, listener):
    if listener == "inet":
        relay = StaticLmtpRelay("127.0.0.1", dovecot.port, ehlo_as="relay.test")
    else:
        relay = StaticLmtpRelay(dovecot.socket_path, ehlo_as="relay.test")
    env = envelope("alice@example.test", "nobody@example.test", "bob@example.test")
    try:
        results = await relay.attempt(env, 0)
    finally:
        await relay.close()
    check_results(results)
    check_delivered(dovecot, "alice")
    check_delivered(dovecot, "bob")
    assert dovecot.messages("nobody") == []
    assert not os.path.exists(dovecot.maildir("nobody"))


@pytest.fixture
def without_chunking(monkeypatch):
    """Sessions forget CHUNKING after LHLO, so the content goes with DATA."""
    hello = session_module.ClientSession._hello

    async def _hello(self):
        await hello(self)
        self.conn.extensions.drop("CHUNKING")

    monkeypatch.setattr(session_module.ClientSession, "_hello", _hello)


@pytest.mark.parametrize("pipelined", [True, False])
async def test_data_with_one_reply_per_recipient(dovecot, without_chunking, pipelined):
    relay = StaticLmtpRelay("127.0.0.1", dovecot.port, ehlo_as="relay.test")
    relay.pool.options.pipelining = pipelined
    env = envelope("alice@example.test", "nobody@example.test", "bob@example.test")
    try:
        results = await relay.attempt(env, 0)
        [session] = relay.pool._idle
        assert "CHUNKING" not in session.conn.extensions
    finally:
        await relay.close()
    check_results(results)
    check_delivered(dovecot, "alice")
    check_delivered(dovecot, "bob")


async def test_connection_is_reused_for_the_next_envelopes(dovecot):
    relay = StaticLmtpRelay("127.0.0.1", dovecot.port, ehlo_as="relay.test")
    try:
        for _ in range(3):
            results = await relay.attempt(envelope("alice@example.test", "bob@example.test"), 0)
            assert all(r.code == "250" for r in results.values()), results
        [session] = relay.pool._idle
        assert session.deliveries == 3
    finally:
        await relay.close()
    assert len(dovecot.messages("alice")) == 3
    assert len(dovecot.messages("bob")) == 3


@pytest.mark.parametrize("chunking", [True, False])
async def test_every_recipient_rejected_then_the_connection_is_reused(dovecot, request,
                                                                      chunking):
    """Dovecot answers a BDAT LAST with no accepted recipient with one 503.

    (RFC 2033 has the server send no reply then; Dovecot sends "503 5.5.0 No
    valid recipients".) Either way the next transactions on the connection
    must read their own replies: nobody is refused, alice and bob get their
    own 250 from the end of the message, and the connection stays in use.
    A stray reply left behind shows as wrong results or a dropped
    connection, depending on timing, so this runs a few rounds.
    """
    if not chunking:
        request.getfixturevalue("without_chunking")
    relay = StaticLmtpRelay("127.0.0.1", dovecot.port, ehlo_as="relay.test",
                            command_timeout=10, data_timeout=10)
    rounds = 5
    start = time.monotonic()
    try:
        for _ in range(rounds):
            refused = await relay.attempt(envelope("nobody@example.test", "ghost@example.test"),
                                          0)
            mixed = await relay.attempt(envelope("nobody@example.test", "alice@example.test"), 0)
            alone = await relay.attempt(envelope("bob@example.test"), 0)
            for rcpt in ("nobody@example.test", "ghost@example.test"):
                err = refused[rcpt]
                assert isinstance(err, PermanentRelayError), refused
                assert (err.reply.code, err.reply.enhanced_status_code) == ("550", "5.1.1")
                assert "RCPT" in str(err)
            err = mixed["nobody@example.test"]
            assert isinstance(err, PermanentRelayError), mixed
            assert (err.reply.code, err.reply.enhanced_status_code) == ("550", "5.1.1"), mixed
            ok = mixed["alice@example.test"]
            assert isinstance(ok, Reply) and ok.code == "250", mixed
            assert ok.message.startswith("2.0.0 <alice@example.test> "), mixed  # not RCPT's
            assert alone["bob@example.test"].message.startswith("2.0.0 <bob@example.test> ")
        [session] = relay.pool._idle
        assert session.deliveries == 2 * rounds  # one connection all along
    finally:
        await relay.close()
    assert time.monotonic() - start < 10
    check_delivered(dovecot, "alice", alone=True, count=rounds)  # the only accepted recipient
    check_delivered(dovecot, "bob", alone=True, count=rounds)


async def test_a_stopped_server_is_a_transient_failure(dovecot):
    port, path = dovecot.port, dovecot.socket_path
    dovecot.stop()
    for relay in (StaticLmtpRelay("127.0.0.1", port, connect_timeout=5),
                  StaticLmtpRelay(path, connect_timeout=5)):
        with pytest.raises(TransientRelayError) as info:
            await relay.attempt(envelope("alice@example.test"), 0)
        assert info.value.reply.code == "451"
