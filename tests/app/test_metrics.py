"""slimta.app.metrics: counts through a real SmtpEdge, Queue and relay, as Prometheus text."""

from __future__ import annotations

import asyncio
import smtplib

import pytest
from prometheus_client.parser import text_string_to_metric_families

from slimta.app.metrics import Metrics
from slimta.edge.smtp import SmtpEdge
from slimta.envelope import Envelope
from slimta.queue import Queue, QueueError
from slimta.queue.dict import DictStorage
from slimta.queue.sqlite import SqliteStorage
from slimta.relay import PermanentRelayError, Relay, TransientRelayError
from slimta.smtp.reply import Reply

MESSAGE = b"From: a@example.com\r\nSubject: test\r\n\r\nhello\r\n"


def sample(text: bytes, name: str, **labels: str) -> float | None:
    """The value of one sample in rendered metrics, or None if it is absent."""
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return None


class ResultsRelay(Relay):
    """Answers each attempt with ``results`` (a callable of the envelope)."""

    def __init__(self, results):
        super().__init__()
        self.results = results
        self.attempted = []

    async def _attempt(self, envelope, attempts):
        self.attempted.append(list(envelope.recipients))
        return self.results(envelope)


def send(port: int, rcpts=("b@example.org",), count: int = 1) -> list:
    """Send ``count`` messages on one connection; the end-of-data replies."""
    replies = []
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo()
        for _ in range(count):
            client.mail("a@example.com")
            for rcpt in rcpts:
                client.rcpt(rcpt)
            replies.append(client.data(MESSAGE))
    return replies


async def wait_for(predicate, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_edge_and_queue_counts(tmp_path):
    metrics = Metrics()

    def always_defer(envelope):
        raise TransientRelayError(reply=Reply("451", "4.4.1 Try later"))

    relay = ResultsRelay(always_defer)
    queue = Queue(SqliteStorage(tmp_path / "q.db"), relay=relay, backoff=lambda e, n: 3600.0)
    edge = SmtpEdge(("127.0.0.1", 0), queue)
    metrics.instrument_edge(edge)
    metrics.instrument_relay(relay)
    metrics.instrument_queue(queue, "inbound")
    async with queue, edge:
        replies = await asyncio.to_thread(send, edge.address[1], count=2)
        assert [code for code, _ in replies] == [250, 250]
        await queue.join()
        await wait_for(lambda: sample(metrics.render(), "slimta_connections_current") == 0)
        text = await metrics.scrape()
    assert b'slimta_messages_received_total{result="accepted"} 2.0' in text
    assert sample(text, "slimta_messages_received_total", result="rejected") == 0.0
    assert sample(text, "slimta_connections_total") == 1.0
    assert sample(text, "slimta_connections_current") == 0.0
    assert sample(text, "slimta_delivery_attempts_total", result="deferred") == 2.0
    assert sample(text, "slimta_delivery_attempts_total", result="delivered") == 0.0
    assert sample(text, "slimta_queue_messages", queue="inbound", state="queued") == 2.0
    assert sample(text, "slimta_queue_messages", queue="inbound", state="held") == 0.0
    assert sample(text, "slimta_queue_messages", queue="inbound", state="attempting") == 0.0
    assert sample(text, "slimta_queue_recipients", queue="inbound") == 2.0
    assert sample(text, "slimta_queue_bytes", queue="inbound") > 0


async def test_open_connections_are_counted():
    metrics = Metrics()
    queue = Queue(DictStorage())
    edge = SmtpEdge(("127.0.0.1", 0), queue)
    metrics.instrument_edge(edge)
    async with queue, edge:
        reader, writer = await asyncio.open_connection(*edge.address)
        assert (await reader.readline()).startswith(b"220")
        assert sample(metrics.render(), "slimta_connections_current") == 1.0
        writer.write(b"QUIT\r\n")
        await reader.read()
        writer.close()
        await wait_for(lambda: sample(metrics.render(), "slimta_connections_current") == 0)
    assert sample(metrics.render(), "slimta_connections_total") == 1.0


async def test_instrumenting_a_running_edge():
    metrics = Metrics()
    queue = Queue(DictStorage())
    edge = SmtpEdge(("127.0.0.1", 0), queue)
    async with queue, edge:
        reader, writer = await asyncio.open_connection(*edge.address)
        assert (await reader.readline()).startswith(b"220")
        metrics.instrument_edge(edge)
        assert sample(metrics.render(), "slimta_connections_current") == 1.0
        writer.close()
        await wait_for(lambda: sample(metrics.render(), "slimta_connections_current") == 0)


async def test_refused_connections():
    metrics = Metrics()
    queue = Queue(DictStorage())
    edge = SmtpEdge(("127.0.0.1", 0), queue, max_connections=0)
    metrics.instrument_edge(edge)
    async with queue, edge:
        reader, writer = await asyncio.open_connection(*edge.address)
        assert (await reader.readline()).startswith(b"421")
        writer.close()
    text = metrics.render()
    assert sample(text, "slimta_connections_refused_total") == 1.0
    assert sample(text, "slimta_connections_total") == 0.0
    assert sample(text, "slimta_connections_current") == 0.0


@pytest.mark.parametrize(("error", "result", "code"), [
    (QueueError(), "tempfailed", 451),
    (QueueError(Reply("554", "5.7.1 No thanks")), "rejected", 554),
])
async def test_queue_errors_by_reply_class(recording_queue, error, result, code):
    metrics = Metrics()
    recording_queue.fail_with = error
    edge = SmtpEdge(("127.0.0.1", 0), recording_queue)
    metrics.instrument_edge(edge)
    async with edge:
        replies = await asyncio.to_thread(send, edge.address[1])
    assert replies[0][0] == code
    text = metrics.render()
    assert sample(text, "slimta_messages_received_total", result=result) == 1.0
    assert sample(text, "slimta_messages_received_total", result="accepted") == 0.0


async def test_queue_raising_counts_tempfailed(recording_queue):
    metrics = Metrics()
    recording_queue.raise_exc = RuntimeError("storage on fire")
    edge = SmtpEdge(("127.0.0.1", 0), recording_queue)
    metrics.instrument_edge(edge)
    async with edge:
        replies = await asyncio.to_thread(send, edge.address[1])
    assert replies[0][0] == 451
    assert sample(metrics.render(), "slimta_messages_received_total", result="tempfailed") == 1.0


async def test_relay_results_per_recipient_latency_and_bounces():
    now = [1000.0]
    metrics = Metrics(clock=lambda: now[0])

    def results(envelope):
        out = {}
        for rcpt in envelope.recipients:
            if rcpt.startswith("ok"):
                out[rcpt] = None
            elif rcpt.startswith("later"):
                out[rcpt] = TransientRelayError(reply=Reply("451", "4.4.1 later"))
            elif rcpt.startswith("never"):
                out[rcpt] = PermanentRelayError(reply=Reply("550", "5.1.1 no such user"))
            # "missing" gets no result: deferred
        return out

    relay = ResultsRelay(results)
    bounces = Queue(DictStorage())  # no relay: bounces stay here
    queue = Queue(DictStorage(), relay=relay, bounce_queue=bounces,
                  backoff=lambda e, n: 3600.0)
    metrics.instrument_relay(relay)
    metrics.instrument_queue(queue, "outbound")
    metrics.instrument_queue(bounces, "bounces")
    env = Envelope("a@example.com", ["ok1@x.org", "ok2@x.org", "later@x.org", "never@x.org",
                                     "missing@x.org"])
    env.parse(MESSAGE)
    env.timestamp = 998.0
    async with bounces, queue:
        [(_, qid)] = await queue.enqueue(env)
        assert isinstance(qid, str)
        await queue.join()
        text = await metrics.scrape()
    assert sample(text, "slimta_delivery_attempts_total", result="delivered") == 2.0
    assert sample(text, "slimta_delivery_attempts_total", result="deferred") == 2.0
    assert sample(text, "slimta_delivery_attempts_total", result="failed") == 1.0
    assert sample(text, "slimta_bounces_total") == 1.0
    assert sample(text, "slimta_delivery_latency_seconds_count") == 2.0
    assert sample(text, "slimta_delivery_latency_seconds_sum") == 4.0
    assert sample(text, "slimta_delivery_latency_seconds_bucket", le="1.0") == 0.0
    assert sample(text, "slimta_delivery_latency_seconds_bucket", le="2.5") == 2.0
    assert sample(text, "slimta_queue_messages", queue="outbound", state="queued") == 1.0
    assert sample(text, "slimta_queue_messages", queue="bounces", state="queued") == 1.0


async def test_relay_raising_counts_every_recipient():
    metrics = Metrics()

    def fail(envelope):
        raise PermanentRelayError(reply=Reply("550", "5.0.0 no"))

    relay = ResultsRelay(fail)
    metrics.instrument_relay(relay)
    env = Envelope("", ["a@x.org", "b@x.org"])
    with pytest.raises(PermanentRelayError):
        await relay.attempt(env, 0)
    relay.results = lambda e: Reply("250", "2.0.0 ok")
    assert (await relay.attempt(env, 0)).code == "250"
    text = metrics.render()
    assert sample(text, "slimta_delivery_attempts_total", result="failed") == 2.0
    assert sample(text, "slimta_delivery_attempts_total", result="delivered") == 2.0
    # no timestamp on the envelope: no latency observed
    assert sample(text, "slimta_delivery_latency_seconds_count") == 0.0


async def test_instrumenting_twice_counts_once():
    metrics = Metrics()
    relay = ResultsRelay(lambda e: None)
    metrics.instrument_relay(relay)
    metrics.instrument_relay(relay)
    await relay.attempt(Envelope("", ["a@x.org"]), 0)
    assert sample(metrics.render(), "slimta_delivery_attempts_total", result="delivered") == 1.0


def test_instances_have_their_own_registry():
    first, second = Metrics(), Metrics()
    first.bounces.inc()
    assert sample(first.render(), "slimta_bounces_total") == 1.0
    assert sample(second.render(), "slimta_bounces_total") == 0.0
    assert b"process_" in first.render()
    assert b"process_" not in Metrics(process=False).render()


async def test_queue_gauges_replaced_forgotten_and_failing(caplog):
    metrics = Metrics(process=False)

    class Stats:
        def __init__(self, stats):
            self.value = stats

        async def stats(self):
            if isinstance(self.value, Exception):
                raise self.value
            return self.value

    good = Stats({"messages": 3, "held": 1, "attempting": 2})
    metrics.instrument_queue(good, "a")
    text = await metrics.scrape()
    assert sample(text, "slimta_queue_messages", queue="a", state="queued") == 3.0
    assert sample(text, "slimta_queue_messages", queue="a", state="held") == 1.0
    assert sample(text, "slimta_queue_messages", queue="a", state="attempting") == 2.0
    metrics.instrument_queue(Stats({"messages": 7, "held": 0, "attempting": 0}), "a")
    text = await metrics.scrape()
    assert sample(text, "slimta_queue_messages", queue="a", state="queued") == 7.0
    metrics.instrument_queue(Stats(RuntimeError("down")), "b")
    text = await metrics.scrape()
    assert sample(text, "slimta_queue_messages", queue="b", state="queued") is None
    assert sample(text, "slimta_queue_messages", queue="a", state="queued") == 7.0
    assert "stats of queue 'b' failed" in caplog.text
    metrics.forget_queue("a")
    assert sample(await metrics.scrape(), "slimta_queue_messages", queue="a",
                  state="queued") is None
