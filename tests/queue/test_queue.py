"""Queue scheduling, retries, bounces and management, on a clock the tests move."""

from __future__ import annotations

import asyncio
import email
import itertools

import pytest

from slimta.envelope import Envelope
from slimta.queue import Queue, QueueError, exponential_backoff
from slimta.queue.dict import DictStorage, SharedDictStorage
from slimta.queue.sqlite import SqliteStorage
from slimta.relay import PermanentRelayError, Relay, TransientRelayError
from slimta.smtp.reply import Reply
from slimta.util.clock import ManualClock

MSG = b"From: a@example.com\r\nSubject: test\r\n\r\nhello\r\n"


def make_envelope(sender="a@example.com", rcpts=("b@example.com",), **fields) -> Envelope:
    env = Envelope(sender, list(rcpts))
    env.parse(MSG)
    for k, v in fields.items():
        setattr(env, k, v)
    return env


class ScriptedRelay(Relay):
    """Answers each attempt with the next scripted outcome; records what it was given."""

    def __init__(self, *outcomes):
        super().__init__()
        self.outcomes = list(outcomes)
        self.calls: list[tuple[float, list[str], int]] = []
        self.clock = None

    def _attempt(self, envelope, attempts):
        self.calls.append((self.clock.time() if self.clock else 0, list(envelope.recipients),
                           attempts))
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if isinstance(outcome, BaseException):
            raise outcome
        if callable(outcome):
            return outcome(envelope)
        return outcome


class Bounces:
    """A bounce_queue that records what it is given."""

    def __init__(self):
        self.envelopes = []

    async def enqueue(self, envelope):
        self.envelopes.append(envelope)
        return [(envelope, f"b{len(self.envelopes)}")]


def no_jitter(clock):
    return exponential_backoff(initial=300, maximum=3600, lifetime=5 * 86400, jitter=0,
                               clock=clock)


@pytest.fixture(params=["dict", "sqlite", "shared"])
def storage_factory(request, tmp_path):
    if request.param == "dict":
        store = DictStorage()
        return lambda: store
    if request.param == "shared":
        shared = SharedDictStorage()
        return lambda: shared
    return lambda: SqliteStorage(str(tmp_path / "queue.db"))


@pytest.fixture
def clock():
    return ManualClock()


async def started(queue):
    queue.start()
    await queue.started()
    return queue


async def test_first_attempt_right_away_and_delivered_message_is_removed(clock, storage_factory):
    relay = ScriptedRelay(None)
    queue = await started(Queue(storage_factory(), relay, clock=clock, hostname="mx.test"))
    [(_, qid)] = await queue.enqueue(make_envelope())
    assert isinstance(qid, str)
    await queue.join()
    assert relay.calls == [(0, ["b@example.com"], 0)]
    assert await queue.list() == []
    await queue.stop()


async def test_whole_retry_schedule_then_give_up_and_bounce(clock, storage_factory):
    relay = ScriptedRelay()
    relay.clock = clock
    relay.outcomes = [TransientRelayError(reply=Reply("451", "4.4.1 Try later"))] * 1000
    bounces = Bounces()
    queue = await started(Queue(storage_factory(), relay, backoff=no_jitter(clock), clock=clock,
                                bounce_queue=bounces, hostname="mx.test"))
    start = clock.time()
    await queue.enqueue(make_envelope(timestamp=start))
    await queue.join()
    for _ in range(200):
        entries = await queue.list()
        if not entries:
            break
        await clock.advance(entries[0].next_attempt - clock.time())
        await queue.join()
    offsets = [round(t - start) for t, _, _ in relay.calls]
    # 5 min, doubling to 1 h between attempts
    assert offsets[:7] == [0, 300, 900, 2100, 4500, 8100, 11700]
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    assert all(g <= 3600 for g in gaps)
    assert offsets[-1] <= 5 * 86400 + 3600
    assert offsets[-1] >= 5 * 86400 - 3600
    assert [a for _, _, a in relay.calls] == list(range(len(relay.calls)))
    [dsn] = bounces.envelopes
    assert dsn.sender == "" and dsn.recipients == ["a@example.com"]
    report = email.message_from_bytes(b"".join(dsn.flatten()))
    assert report.get_content_type() == "multipart/report"
    assert b"4.4.1" in b"".join(dsn.flatten())
    assert await queue.list() == []
    await queue.stop()


async def test_each_deferral_adds_an_entry_to_the_history(clock, storage_factory):
    relay = ScriptedRelay(TransientRelayError(reply=Reply("451", "4.4.1 Try later")),
                          TransientRelayError(reply=Reply("452", "4.2.2 Mailbox full")))
    relay.clock = clock
    queue = await started(Queue(storage_factory(), relay, backoff=no_jitter(clock), clock=clock))
    start = clock.time()
    [(_, qid)] = await queue.enqueue(make_envelope(timestamp=start))
    await queue.join()
    stored = await queue.get(qid)
    assert stored.history == [(start, "451 4.4.1 Try later")]
    await clock.advance(300)
    await queue.join()
    stored = await queue.get(qid)
    assert stored.attempts == 2
    assert stored.history == [(start, "451 4.4.1 Try later"),
                              (start + 300, "452 4.2.2 Mailbox full")]
    assert stored.last_reply == "452 4.2.2 Mailbox full"
    await queue.stop()


async def test_permanent_failure_bounces_at_once(clock, storage_factory):
    relay = ScriptedRelay(PermanentRelayError(reply=Reply("550", "5.1.1 No such user")))
    bounces = Bounces()
    queue = await started(Queue(storage_factory(), relay, clock=clock, bounce_queue=bounces,
                                hostname="mx.test"))
    await queue.enqueue(make_envelope())
    await queue.join()
    [dsn] = bounces.envelopes
    assert dsn.sender == ""
    assert b"5.1.1" in b"".join(dsn.flatten())
    assert await queue.list() == []
    await queue.stop()


async def test_null_sender_is_never_bounced(clock, storage_factory):
    relay = ScriptedRelay(PermanentRelayError())
    bounces = Bounces()
    queue = await started(Queue(storage_factory(), relay, clock=clock, bounce_queue=bounces))
    await queue.enqueue(make_envelope(sender=""))
    await queue.join()
    assert bounces.envelopes == []
    assert await queue.list() == []
    await queue.stop()


async def test_bounce_goes_into_the_same_queue_by_default(clock, storage_factory):
    relay = ScriptedRelay(PermanentRelayError(), TransientRelayError())
    queue = await started(Queue(storage_factory(), relay, clock=clock, hostname="mx.test"))
    await queue.enqueue(make_envelope())
    await queue.join()
    # the bounce itself was queued and attempted (and deferred) by this queue
    assert relay.calls[1][1] == ["a@example.com"]
    [entry] = await queue.list()
    assert entry.sender == "" and entry.recipients == ["a@example.com"]
    await queue.stop()


async def test_per_recipient_results_across_a_restart(clock, storage_factory):
    def partial(envelope):
        return {"ok@example.com": Reply("250", "2.0.0 Ok"),
                "later@example.com": TransientRelayError(reply=Reply("451", "4.2.0 Busy")),
                "bad@example.com": PermanentRelayError(reply=Reply("550", "5.1.1 Unknown"))}

    relay = ScriptedRelay(partial)
    bounces = Bounces()
    store = storage_factory()
    queue = await started(Queue(store, relay, clock=clock, bounce_queue=bounces,
                                backoff=no_jitter(clock)))
    await queue.enqueue(make_envelope(rcpts=["ok@example.com", "later@example.com",
                                             "bad@example.com"]))
    await queue.join()
    [dsn] = bounces.envelopes
    text = b"".join(dsn.flatten())
    assert b"bad@example.com" in text and b"later@example.com" not in text
    [entry] = await queue.list()
    assert entry.recipients == ["later@example.com"]
    assert entry.attempts == 1
    assert "4.2.0" in entry.last_reply
    await queue.stop()

    # a new process: the schedule comes back from storage
    relay2 = ScriptedRelay(None)
    queue2 = await started(Queue(storage_factory(), relay2, clock=clock, bounce_queue=bounces))
    await queue2.join()
    assert relay2.calls == []  # not due yet
    await clock.advance(300)
    await queue2.join()
    assert relay2.calls == [(0, ["later@example.com"], 1)]
    assert await queue2.list() == []
    await queue2.stop()


async def test_unexpected_relay_exception_is_transient_and_scheduler_survives(clock,
                                                                             storage_factory):
    relay = ScriptedRelay(ZeroDivisionError("bug"), None)
    queue = await started(Queue(storage_factory(), relay, clock=clock, backoff=no_jitter(clock)))
    await queue.enqueue(make_envelope())
    await queue.join()
    [entry] = await queue.list()
    assert entry.last_reply.startswith("450 4.3.0")
    await clock.advance(300)
    await queue.join()
    assert await queue.list() == []
    # still scheduling new mail
    relay.outcomes = [None]
    await queue.enqueue(make_envelope())
    await queue.join()
    assert len(relay.calls) == 3
    await queue.stop()


async def test_hold_release_retry_delete_flush(clock, storage_factory):
    relay = ScriptedRelay(*[TransientRelayError()] * 3, None, None)
    queue = await started(Queue(storage_factory(), relay, clock=clock, backoff=no_jitter(clock)))
    [(_, qid)] = await queue.enqueue(make_envelope())
    await queue.join()
    await queue.hold(qid)
    [entry] = await queue.list()
    assert entry.held
    await clock.advance(10_000)
    await queue.join()
    assert len(relay.calls) == 1  # held: not attempted
    assert (await queue.stats())["held"] == 1
    await queue.release(qid)
    await queue.join()
    assert len(relay.calls) == 2
    await queue.retry(qid)
    await queue.join()
    assert len(relay.calls) == 3
    await queue.flush()
    await queue.join()
    assert len(relay.calls) == 4 and await queue.list() == []
    [(_, qid2)] = await queue.enqueue(make_envelope())
    await queue.join()
    assert await queue.delete(qid2) in (True, False)
    with pytest.raises(KeyError):
        await queue.get(qid2)
    await queue.stop()


async def test_delete_stops_retries(clock, storage_factory):
    relay = ScriptedRelay(TransientRelayError(), None)
    queue = await started(Queue(storage_factory(), relay, clock=clock, backoff=no_jitter(clock)))
    [(_, qid)] = await queue.enqueue(make_envelope())
    await queue.join()
    assert await queue.delete(qid) is True
    await clock.advance(10_000)
    await queue.join()
    assert len(relay.calls) == 1
    await queue.stop()


async def test_notify_never_suppresses_and_success_reports(clock, storage_factory):
    bounces = Bounces()
    relay = ScriptedRelay(PermanentRelayError(), None)
    queue = await started(Queue(storage_factory(), relay, clock=clock, bounce_queue=bounces,
                                hostname="mx.test"))
    await queue.enqueue(make_envelope(rcpt_params={"b@example.com": {"notify": ["NEVER"]}}))
    await queue.join()
    assert bounces.envelopes == []
    await queue.enqueue(make_envelope(rcpt_params={"b@example.com": {"notify": ["SUCCESS"]}},
                                      envid="ENV-1"))
    await queue.join()
    [dsn] = bounces.envelopes
    text = b"".join(dsn.flatten())
    assert b"delivered" in text.lower() and b"ENV-1" in text
    await queue.stop()


async def test_relay_pool_bounds_concurrent_attempts(clock, storage_factory):
    running = 0
    peak = 0
    gate = asyncio.Event()

    class SlowRelay(Relay):
        async def _attempt(self, envelope, attempts):
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await gate.wait()
            running -= 1

    queue = await started(Queue(storage_factory(), SlowRelay(), clock=clock, relay_pool=3))
    for _ in range(10):
        await queue.enqueue(make_envelope())
    for _ in range(20):
        await asyncio.sleep(0.01)
    assert peak == 3
    gate.set()
    await queue.join()
    assert await queue.list() == []
    await queue.stop()


async def test_without_a_relay_the_queue_only_stores(clock, storage_factory):
    queue = await started(Queue(storage_factory(), None, clock=clock))
    [(_, qid)] = await queue.enqueue(make_envelope())
    await queue.join()
    stored = await queue.get(qid)
    assert b"".join(stored.envelope.flatten()) == MSG
    await queue.stop()


async def test_queue_policies_each_envelope_stored_separately(clock, storage_factory):
    class Split:
        def apply(self, envelope):
            return [envelope.copy([r]) for r in envelope.recipients]

    queue = await started(Queue(storage_factory(), None, clock=clock))
    queue.add_policy(Split())
    results = await queue.enqueue(make_envelope(rcpts=["x@example.com", "y@example.com"]))
    assert len(results) == 2 and len({qid for _, qid in results}) == 2
    assert sorted(e.recipients[0] for e in await queue.list()) == ["x@example.com",
                                                                   "y@example.com"]
    await queue.stop()


async def test_storage_failure_is_a_queue_error(clock):
    class BrokenStorage(DictStorage):
        async def write(self, envelope, timestamp):
            raise OSError("disk full")

    queue = await started(Queue(BrokenStorage(), None, clock=clock))
    [(_, result)] = await queue.enqueue(make_envelope())
    assert isinstance(result, QueueError)
    assert result.reply.code == "451"
    await queue.stop()


def test_default_backoff_is_postfix_like():
    clock = ManualClock()
    backoff = exponential_backoff(clock=clock)
    env = make_envelope(timestamp=clock.time())
    delays = [backoff(env, n) for n in range(1, 8)]
    assert 270 <= delays[0] <= 330
    assert 540 <= delays[1] <= 660
    assert all(d <= 3600 * 1.1 for d in delays)
    env.timestamp = clock.time() - 5 * 86400
    assert backoff(env, 50) is None


async def test_message_deleted_during_its_attempt_is_not_rescheduled(clock, storage_factory):
    gate = asyncio.Event()
    calls = []

    class WaitingRelay(Relay):
        async def _attempt(self, envelope, attempts):
            calls.append(attempts)
            await gate.wait()
            raise TransientRelayError()

    queue = await started(Queue(storage_factory(), WaitingRelay(), clock=clock,
                                backoff=no_jitter(clock)))
    [(_, qid)] = await queue.enqueue(make_envelope())
    for _ in range(10):
        await asyncio.sleep(0)
    assert await queue.delete(qid) is True
    gate.set()
    await queue.join()
    await clock.advance(100_000)
    await queue.join()
    assert calls == [0]
    assert await queue.list() == []
    await queue.stop()


async def test_poll_picks_up_messages_stored_by_another_process(clock, tmp_path):
    db = str(tmp_path / "shared.db")
    relay = ScriptedRelay(None, None)
    delivering = await started(Queue(SqliteStorage(db), relay, clock=clock, poll_interval=1.0))
    # another queue object (another process in real life) stores without a relay
    storing = await started(Queue(SqliteStorage(db), None, clock=clock))
    await storing.enqueue(make_envelope(rcpts=["x@example.com"]))
    await delivering.join()
    assert relay.calls == []
    await clock.advance(1.0)
    await delivering.join()
    assert [rcpts for _, rcpts, _ in relay.calls] == [["x@example.com"]]
    await storing.stop()
    await delivering.stop()
