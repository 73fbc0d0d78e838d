"""ProxyQueue behind a real SmtpEdge: the client gets the relay's own reply."""

from __future__ import annotations

import smtplib

import pytest

from slimta.queue.proxy import ProxyQueue
from slimta.relay import PermanentRelayError, Relay, TransientRelayError
from slimta.smtp.reply import Reply


class FixedRelay(Relay):
    def __init__(self, outcome):
        super().__init__()
        self.outcome = outcome
        self.envelopes = []

    def _attempt(self, envelope, attempts):
        self.envelopes.append(envelope)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def send(port):
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        client.rcpt("c@example.com")
        return client.data(b"Subject: proxied\r\n\r\nbody\r\n")


def test_relay_reply_reaches_the_client(run_edge):
    relay = FixedRelay(Reply("250", "2.0.0 Ok: queued as NEXTHOP42"))
    edge = run_edge(queue=ProxyQueue(relay))
    assert send(edge.port) == (250, b"2.0.0 Ok: queued as NEXTHOP42")
    [env] = relay.envelopes
    assert env.recipients == ["b@example.com", "c@example.com"]
    assert env.client["ip"] == "127.0.0.1"


@pytest.mark.parametrize(("error", "code", "text"), [
    (PermanentRelayError(reply=Reply("554", "5.7.1 Spam")), 554, b"5.7.1 Spam"),
    (TransientRelayError(reply=Reply("421", "4.3.2 Busy")), 421, b"4.3.2 Busy"),
    (ZeroDivisionError("bug"), 451, b"4.3.0 Internal error in relay"),
])
def test_relay_failures_reach_the_client(run_edge, error, code, text):
    edge = run_edge(queue=ProxyQueue(FixedRelay(error)))
    with smtplib.SMTP("127.0.0.1", edge.port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("a@example.com")
        client.rcpt("b@example.com")
        # smtplib's data() returns an error reply instead of raising
        assert client.data(b"Subject: x\r\n\r\nbody\r\n") == (code, text)


def test_partial_delivery_is_reported_as_the_failure(run_edge):
    relay = FixedRelay({"b@example.com": None,
                        "c@example.com": TransientRelayError(reply=Reply("450", "4.2.1 Later"))})
    edge = run_edge(queue=ProxyQueue(relay))
    assert send(edge.port) == (450, b"4.2.1 Later")


async def test_queue_policies_apply_before_relaying():
    class Tag:
        def apply(self, envelope):
            envelope.prepend_header("X-Tag", "proxied")

    from slimta.envelope import Envelope

    relay = FixedRelay(None)
    proxy = ProxyQueue(relay)
    proxy.add_policy(Tag())
    env = Envelope("a@example.com", ["b@example.com"])
    env.parse(b"Subject: x\r\n\r\nbody\r\n")
    [(_, reply)] = await proxy.enqueue(env)
    assert isinstance(reply, Reply) and reply.code == "250"
    assert relay.envelopes[0].flatten()[0].startswith(b"X-Tag: proxied\r\n")
