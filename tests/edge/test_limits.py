"""slimta.edge.limits on real SmtpEdge sessions (smtplib and raw sockets), in memory and Redis."""

from __future__ import annotations

import base64
import smtplib
import socket

import pytest

from slimta.edge.limits import EdgeLimits, Limit
from slimta.edge.smtp import SmtpValidators
from slimta.util.clock import ManualClock
from slimta.util.ratelimit import MemoryCounter, RedisCounter

REDIS_URL = "redis://127.0.0.1:6379/0"

CONN_REFUSED = b"4.7.0 Too many connections from your address, try again later"
MSG_REFUSED = b"4.7.1 Too many messages, try again later"
RCPT_REFUSED = b"4.5.3 Too many recipients, try again later"
AUTH_REFUSED = b"4.7.0 Too many authentication failures, try again later"
MSG = b"Subject: x\r\n\r\nx\r\n"


def validators_for(limits: EdgeLimits):
    class V(SmtpValidators):
        @limits.check_banner
        def handle_banner(self, reply, address):
            pass

        @limits.check_auth
        def handle_auth(self, reply, creds):
            if not (creds.authcid in ("alice", "bob") and creds.check_secret("secret")):
                reply.code = "535"
                reply.message = "5.7.8 Authentication credentials invalid"

        @limits.check_mail
        def handle_mail(self, reply, sender, params):
            pass

        @limits.check_rcpt
        def handle_rcpt(self, reply, recipient, params):
            if recipient.startswith("unknown@"):
                reply.code = "550"
                reply.message = "5.1.1 No such user"

    return V


def start(run_edge, limits):
    return run_edge(validator_class=validators_for(limits), auth=True, auth_require_tls=False)


def raw_banner(port: int) -> tuple[bytes, bool]:
    """The banner line, and whether the server closed the connection after it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        f = s.makefile("rb")
        line = f.readline()
        closed = f.read() == b"" if line.startswith(b"421") else False
        return line, closed


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_connections_per_ip(run_edge):
    edge = start(run_edge, EdgeLimits(connections=Limit(2, 60), exempt_loopback=False))
    for _ in range(2):
        with smtplib.SMTP("127.0.0.1", edge.port) as c:
            assert c.noop()[0] == 250
    with pytest.raises(smtplib.SMTPConnectError) as exc:
        smtplib.SMTP("127.0.0.1", edge.port)
    assert exc.value.smtp_code == 421
    assert exc.value.smtp_error == CONN_REFUSED
    line, closed = raw_banner(edge.port)
    assert line == b"421 " + CONN_REFUSED + b"\r\n"
    assert closed


def test_loopback_exempt_by_default(run_edge):
    edge = start(run_edge, EdgeLimits(connections=(1, 60), messages=(1, 60), recipients=(1, 60)))
    for _ in range(3):
        with smtplib.SMTP("127.0.0.1", edge.port) as c:
            c.sendmail("a@example.test", ["x@example.test", "y@example.test"], MSG)
    assert len(edge.queue.envelopes) == 3


def test_exempt_networks(run_edge):
    edge = start(run_edge, EdgeLimits(connections=(1, 60), exempt_loopback=False,
                                      exempt_networks=["127.0.0.0/8"]))
    for _ in range(3):
        with smtplib.SMTP("127.0.0.1", edge.port) as c:
            assert c.noop()[0] == 250


def test_messages_per_ip_then_per_user(run_edge):
    edge = start(run_edge, EdgeLimits(messages=Limit(2, 3600), exempt_loopback=False))
    with smtplib.SMTP("127.0.0.1", edge.port) as c:
        c.ehlo()
        for _ in range(2):
            assert c.mail("a@example.test")[0] == 250
            c.rset()
        assert c.mail("a@example.test") == (451, MSG_REFUSED)
        assert c.mail("a@example.test") == (451, MSG_REFUSED)  # refused attempts count too
    # an authenticated user has its own count, not the IP's
    with smtplib.SMTP("127.0.0.1", edge.port) as c:
        c.ehlo()
        assert c.docmd("AUTH", "PLAIN " + plain("alice", "secret"))[0] == 235
        for _ in range(2):
            c.sendmail("alice@example.test", ["x@example.test"], b"Subject: x\r\n\r\nx\r\n")
        with pytest.raises(smtplib.SMTPSenderRefused) as exc:
            c.sendmail("alice@example.test", ["x@example.test"], b"Subject: x\r\n\r\nx\r\n")
        assert (exc.value.smtp_code, exc.value.smtp_error) == (451, MSG_REFUSED)
    with smtplib.SMTP("127.0.0.1", edge.port) as c:
        c.ehlo()
        assert c.docmd("AUTH", "PLAIN " + plain("bob", "secret"))[0] == 235
        assert c.mail("bob@example.test")[0] == 250
    assert len(edge.queue.envelopes) == 2


def test_recipients_per_ip(run_edge):
    edge = start(run_edge, EdgeLimits(recipients=Limit(2, 3600), exempt_loopback=False))
    with smtplib.SMTP("127.0.0.1", edge.port) as c:
        c.ehlo()
        assert c.mail("a@example.test")[0] == 250
        assert c.rcpt("x@example.test")[0] == 250
        assert c.rcpt("y@example.test")[0] == 250
        assert c.rcpt("z@example.test") == (452, RCPT_REFUSED)
        c.rset()
        # the count is per IP and hour, not per message
        assert c.mail("a@example.test")[0] == 250
        assert c.rcpt("x@example.test") == (452, RCPT_REFUSED)


def test_recipients_refusal_skips_the_hook(run_edge):
    edge = start(run_edge, EdgeLimits(recipients=Limit(1, 3600), exempt_loopback=False))
    with smtplib.SMTP("127.0.0.1", edge.port) as c:
        c.ehlo()
        c.mail("a@example.test")
        assert c.rcpt("unknown@example.test")[0] == 550
        assert c.rcpt("unknown@example.test") == (452, RCPT_REFUSED)


def test_auth_failures_cool_down(run_edge):
    clock = ManualClock()
    limits = EdgeLimits(auth_failures=Limit(2, 60), auth_cooldown=900,
                        counter=MemoryCounter(clock=clock), exempt_loopback=False)
    edge = start(run_edge, limits)
    with smtplib.SMTP("127.0.0.1", edge.port) as c:
        c.ehlo()
        assert c.docmd("AUTH", "PLAIN " + plain("alice", "wrong")) == (
            535, b"5.7.8 Authentication credentials invalid")
        # the second failure still gets its 535, and starts the cool-down
        assert c.docmd("AUTH", "PLAIN " + plain("alice", "wrong"))[0] == 535
        # further attempts, even with good credentials, get 421 and the connection closes
        assert c.docmd("AUTH", "PLAIN " + plain("alice", "secret")) == (421, AUTH_REFUSED)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            c.noop()
    # new connections are refused at the banner
    line, closed = raw_banner(edge.port)
    assert line == b"421 " + AUTH_REFUSED + b"\r\n"
    assert closed
    edge.call(clock.advance(899))
    with pytest.raises(smtplib.SMTPConnectError) as exc:
        smtplib.SMTP("127.0.0.1", edge.port)
    assert (exc.value.smtp_code, exc.value.smtp_error) == (421, AUTH_REFUSED)
    edge.call(clock.advance(1))
    with smtplib.SMTP("127.0.0.1", edge.port) as c:
        c.ehlo()
        assert c.docmd("AUTH", "PLAIN " + plain("alice", "secret"))[0] == 235


def test_auth_failures_outside_window_do_not_add_up(run_edge):
    clock = ManualClock()
    limits = EdgeLimits(auth_failures=Limit(2, 60), counter=MemoryCounter(clock=clock),
                        exempt_loopback=False)
    edge = start(run_edge, limits)
    for _ in range(3):
        with smtplib.SMTP("127.0.0.1", edge.port) as c:
            c.ehlo()
            assert c.docmd("AUTH", "PLAIN " + plain("alice", "wrong"))[0] == 535
        edge.call(clock.advance(61))
    with smtplib.SMTP("127.0.0.1", edge.port) as c:
        c.ehlo()
        assert c.docmd("AUTH", "PLAIN " + plain("alice", "secret"))[0] == 235


class BrokenCounter:
    async def hit(self, key, window_seconds, amount=1):
        raise ConnectionError("counter down")

    async def get(self, key):
        raise ConnectionError("counter down")


def test_failing_counter_fails_open(run_edge, caplog):
    limits = EdgeLimits(connections=(1, 60), messages=(1, 60), recipients=(1, 60),
                        auth_failures=(1, 60), counter=BrokenCounter(), exempt_loopback=False)
    edge = start(run_edge, limits)
    for _ in range(2):
        with smtplib.SMTP("127.0.0.1", edge.port) as c:
            c.ehlo()
            assert c.docmd("AUTH", "PLAIN " + plain("alice", "wrong"))[0] == 535
            c.sendmail("a@example.test", ["x@example.test", "y@example.test"], MSG)
    assert len(edge.queue.envelopes) == 2
    assert "letting the client through" in caplog.text


class FakeSession:
    def __init__(self, ip):
        self.address = (ip, 25)
        self.auth = None


def test_client_key_aggregates_like_postfix():
    limits = EdgeLimits(exempt_loopback=False)
    key = limits.client_key
    assert key(FakeSession("192.0.2.7")) == "192.0.2.7"
    assert key(FakeSession("::ffff:192.0.2.7")) == "192.0.2.7"
    # IPv6: the first 84 bits count (smtpd_client_ipv6_prefix_length)
    assert key(FakeSession("2001:db8:1:2:3:4:5:6")) == "2001:db8:1:2:3::/84"
    assert key(FakeSession("2001:db8:1:2:3:fff:0:1")) == "2001:db8:1:2:3::/84"
    assert key(FakeSession("2001:db8:1:2:4::1")) != "2001:db8:1:2:3::/84"
    assert EdgeLimits(ipv4_prefix=24).client_key(FakeSession("192.0.2.7")) == "192.0.2.0/24"
    assert EdgeLimits(ipv6_prefix=128, exempt_loopback=False).client_key(
        FakeSession("2001:db8::1")) == "2001:db8::1"
    assert EdgeLimits().client_key(FakeSession("127.0.0.1")) is None
    assert EdgeLimits().client_key(FakeSession("::1")) is None
    assert key(FakeSession("/run/smtp.sock")) is None


def test_limit_validation():
    with pytest.raises(ValueError):
        Limit(0, 60)
    with pytest.raises(ValueError):
        Limit(1, 0)
    with pytest.raises(ValueError):
        EdgeLimits(auth_cooldown=0)
    with pytest.raises(ValueError):
        EdgeLimits(ipv6_prefix=129)


def test_two_edges_share_redis_counts(run_edge, redis_prefix):
    """Two hosts (edges on their own loops, each with its own Redis client) share the limits."""
    counters = [RedisCounter(REDIS_URL, prefix=redis_prefix) for _ in range(2)]
    edges = [start(run_edge, EdgeLimits(connections=Limit(3, 60), recipients=Limit(2, 3600),
                                        counter=counter, exempt_loopback=False))
             for counter in counters]
    try:
        a, b = edges
        with smtplib.SMTP("127.0.0.1", a.port) as c:
            c.ehlo()
            c.mail("s@example.test")
            assert c.rcpt("x@example.test")[0] == 250
        with smtplib.SMTP("127.0.0.1", b.port) as c:
            c.ehlo()
            c.mail("s@example.test")
            assert c.rcpt("x@example.test")[0] == 250
            assert c.rcpt("y@example.test") == (452, RCPT_REFUSED)
        with smtplib.SMTP("127.0.0.1", a.port) as c:  # third connection overall
            assert c.noop()[0] == 250
        for edge in (b, a):
            with pytest.raises(smtplib.SMTPConnectError) as exc:
                smtplib.SMTP("127.0.0.1", edge.port)
            assert (exc.value.smtp_code, exc.value.smtp_error) == (421, CONN_REFUSED)
    finally:
        for edge, counter in zip(edges, counters, strict=True):
            edge.call(counter.aclose())
