"""End to end: smtplib → SmtpEdge → Queue(SqliteStorage) → MxSmtpRelay → smtp-sink.

One message to recipients in three domains, each domain's MX host a real
Postfix smtp-sink on its own loopback address (all on one port), DNS from a
real dnsmasq. Per-recipient results must land in the SQLite queue: a 4xx for
one recipient keeps only that recipient queued, and the retry delivers only
it; a 5xx bounces back to the sender's own MX host.
"""

from __future__ import annotations

import email
import re
import smtplib

import pytest

from daemons import shared_port
from slimta.queue import Queue
from slimta.queue.sqlite import SqliteStorage
from slimta.relay.smtp.mx import MxSmtpRelay
from slimta.util.clock import ManualClock

MX_A, MX_B, MX_C, MX_SENDER = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"

RECORDS = [
    "--mx-host=a.test,mx.a.test,10",
    "--mx-host=b.test,mx.b.test,10",
    "--mx-host=c.test,mx.c.test,10",
    "--mx-host=sender.test,mx.sender.test,10",
    f"--host-record=mx.a.test,{MX_A}",
    f"--host-record=mx.b.test,{MX_B}",
    f"--host-record=mx.c.test,{MX_C}",
    f"--host-record=mx.sender.test,{MX_SENDER}",
]

SENDER = "alice@sender.test"
RCPTS = ["a1@a.test", "b1@b.test", "c1@c.test", "a2@a.test"]
MSG = (
    "From: alice@sender.test\r\n"
    "To: a1@a.test, b1@b.test, c1@c.test, a2@a.test\r\n"
    "Subject: end to end\r\n"
    "Message-Id: <e2e@sender.test>\r\n"
    "\r\n"
    "Three domains, one envelope.\r\n"
)

QUEUED_AS = re.compile(r"queued as (\S+)")


class Mta:
    """The pipeline under test; its edge, queue and relay live on the EdgeThread's loop."""

    def __init__(self, thread, queue: Queue, relay: MxSmtpRelay):
        self.thread, self.queue, self.relay = thread, queue, relay

    def call(self, coro):
        return self.thread.call(coro, timeout=30)

    def send(self, sender: str, rcpts: list[str], data: str) -> str:
        """Submit with smtplib; the queue id from the 250 reply."""
        with smtplib.SMTP("127.0.0.1", self.thread.port, timeout=10) as client:
            client.ehlo("client.test")
            assert client.mail(sender)[0] == 250
            for rcpt in rcpts:
                assert client.rcpt(rcpt)[0] == 250
            code, text = client.data(data.encode())
        assert code == 250, text
        return QUEUED_AS.search(text.decode()).group(1)

    def settle(self) -> None:
        """Wait until nothing is due and no attempt is running."""
        self.call(self.queue.join())


@pytest.fixture
def port():
    return shared_port((MX_A, MX_B, MX_C, MX_SENDER))


@pytest.fixture
def mta(run_edge, dnsmasq, tmp_path, port):
    """SmtpEdge → Queue(SqliteStorage) → MxSmtpRelay, the queue on a clock that never moves.

    A deferred recipient therefore waits until the test asks for a retry.
    """
    resolver = dnsmasq(RECORDS).resolver(timeout=0.3, lifetime=0.8)
    relay = MxSmtpRelay(resolver=resolver, port=port, ehlo_as="mta.test", connect_timeout=2,
                        command_timeout=5, data_timeout=5)
    clock = ManualClock()
    queue = Queue(SqliteStorage(tmp_path / "queue.db"), relay, clock=clock,
                  backoff=lambda envelope, attempts: 300.0, hostname="mta.test")
    thread = run_edge(queue=queue, hostname="mta.test")

    async def start_queue():
        # the queue must run on the edge's loop, in its thread
        queue.start()
        await queue.started()

    mta = Mta(thread, queue, relay)
    mta.call(start_queue())
    yield mta
    mta.call(thread.edge.stop())
    mta.call(queue.stop())
    mta.call(relay.close())


def recipients(sink) -> list[list[str]]:
    return sorted(msg["recipients"] for msg in sink.messages())


def assert_is_the_message(msg):
    parsed = email.message_from_bytes(msg["data"])
    assert parsed["Subject"] == "end to end"
    assert parsed["Message-Id"] == "<e2e@sender.test>"
    assert parsed.get_payload().strip() == "Three domains, one envelope."
    assert msg["sender"] == SENDER


def test_three_domains_each_get_only_their_recipients(mta, smtp_sink, port):
    a, b, c = (smtp_sink(host=host, port=port) for host in (MX_A, MX_B, MX_C))
    mta.send(SENDER, RCPTS, MSG)
    mta.settle()
    assert recipients(a) == [["a1@a.test", "a2@a.test"]]
    assert recipients(b) == [["b1@b.test"]]
    assert recipients(c) == [["c1@c.test"]]
    for sink in (a, b, c):
        assert_is_the_message(sink.messages()[0])
    assert mta.call(mta.queue.list()) == []


def test_a_4xx_for_one_recipient_retries_only_that_one(mta, smtp_sink, port):
    a, c = smtp_sink(host=MX_A, port=port), smtp_sink(host=MX_C, port=port)
    b = smtp_sink("-r", "rcpt", host=MX_B, port=port)  # soft-rejects every RCPT
    qid = mta.send(SENDER, RCPTS, MSG)
    mta.settle()

    # delivered where it could be, in one attempt
    assert recipients(a) == [["a1@a.test", "a2@a.test"]]
    assert recipients(c) == [["c1@c.test"]]
    assert b.messages() == []
    # and SQLite says so: only b1 is still pending, after one attempt, with the 4xx
    [entry] = mta.call(mta.queue.list())
    assert entry.id == qid
    assert entry.sender == SENDER
    assert entry.recipients == ["b1@b.test"]
    assert entry.attempts == 1
    assert entry.last_reply is not None and entry.last_reply.startswith("4"), entry.last_reply
    stored = mta.call(mta.queue.get(qid))
    assert stored.envelope.recipients == RCPTS
    assert {RCPTS[i] for i in stored.delivered} == {"a1@a.test", "c1@c.test", "a2@a.test"}
    assert stored.pending == [(1, "b1@b.test")]

    # b's MX host comes back without the fault, on the same address and port
    b.stop()
    b = smtp_sink(host=MX_B, port=port)
    mta.call(mta.queue.retry(qid))
    mta.settle()

    assert recipients(b) == [["b1@b.test"]]
    assert_is_the_message(b.messages()[0])
    # nothing new for the others: only b1 was retried
    assert recipients(a) == [["a1@a.test", "a2@a.test"]]
    assert recipients(c) == [["c1@c.test"]]
    assert mta.call(mta.queue.list()) == []


def test_a_5xx_for_one_recipient_bounces_to_the_sender_over_mx(mta, smtp_sink, port):
    a, b = smtp_sink(host=MX_A, port=port), smtp_sink(host=MX_B, port=port)
    c = smtp_sink("-f", "rcpt", host=MX_C, port=port)  # hard-rejects every RCPT
    sender_mx = smtp_sink(host=MX_SENDER, port=port)
    mta.send(SENDER, RCPTS, MSG)
    mta.settle()

    assert recipients(a) == [["a1@a.test", "a2@a.test"]]
    assert recipients(b) == [["b1@b.test"]]
    assert c.messages() == []
    # the DSN went out through the same MX relay to the sender's domain
    [dsn] = sender_mx.messages()
    assert dsn["sender"] == ""
    assert dsn["recipients"] == [SENDER]
    report = email.message_from_bytes(dsn["data"])
    assert report.get_content_type() == "multipart/report"
    text = dsn["data"].decode(errors="replace")
    # only c1 is reported, with what c's MX host answered to RCPT
    assert re.findall(r"Final-Recipient: rfc822; ?(\S+)", text) == ["c1@c.test"]
    assert "Action: failed" in text
    assert re.search(r"Diagnostic-Code: smtp; 5\d\d ", text)
    assert mta.call(mta.queue.list()) == []
