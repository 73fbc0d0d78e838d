"""The queue: it takes responsibility for messages, and delivers, retries or bounces them.

:class:`Queue` stores each envelope durably (in a :class:`QueueStorage`)
before :meth:`Queue.enqueue` returns, so the edge's 250 means the message is
safe. A scheduler then hands due messages to the relay, a bounded number at
a time, and acts on the results per recipient: delivered ones are recorded
and never tried again, transient failures are retried after
:func:`exponential_backoff`, permanent failures (and those that ran out of
retries) are bounced together in one delivery status notification.

With a :class:`~slimta.queue.storage.SharedQueueStorage` (PostgreSQL, Redis)
the queue keeps no schedule of its own: several queues, on several hosts,
claim due messages from the storage with a lease, renew the leases while
they deliver, and a message whose host died is claimed again when its lease
runs out.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
import socket
from collections.abc import Callable, Mapping

from slimta.queue.storage import QueueEntry, QueueStorage, SharedQueueStorage, StoredMessage
from slimta.relay import RelayError, TransientRelayError
from slimta.service import Service
from slimta.smtp.reply import Reply
from slimta.util.clock import SystemClock

# The submodule slimta.queue.dict (DictStorage) becomes the name "dict" in
# this module's namespace once imported: never use the builtin dict here.

__all__ = [
    "Queue",
    "QueueEntry",
    "QueueError",
    "QueueStorage",
    "SharedQueueStorage",
    "StoredMessage",
    "exponential_backoff",
]

log = logging.getLogger(__name__)

DEFAULT_RELAY_POOL = 10
#: seconds a claimed message stays leased to its queue without renewal
DEFAULT_LEASE = 300.0
#: with shared storage, how often to look for due messages when no notification came
DEFAULT_SHARED_POLL = 5.0


class QueueError(Exception):
    """A queue could not take responsibility for a message.

    ``reply`` is what the edge tells the client (default ``451 4.3.0``).
    """

    def __init__(self, reply: Reply | None = None, message: str | None = None):
        self.reply = reply if reply is not None else Reply("451", "4.3.0 Error queuing message")
        super().__init__(message or str(self.reply))


def exponential_backoff(initial: float = 300.0, maximum: float = 3600.0,
                        lifetime: float = 5 * 86400.0, jitter: float = 0.1,
                        clock=None, rng: random.Random | None = None) -> Callable:
    """Postfix-like retry delays: ``initial``, doubling up to ``maximum``, until ``lifetime``.

    Returns ``backoff(envelope, attempts) -> seconds | None``: the delay
    before the next attempt after ``attempts`` failed ones, or None once the
    message has been queued for ``lifetime`` seconds (counted from
    ``envelope.timestamp``, its arrival). Each delay is spread by up to
    ``jitter`` (a fraction) either way, so retries of many messages do not
    arrive together.
    """
    clock = clock or SystemClock()
    rng = rng or random.Random()

    def backoff(envelope, attempts: int) -> float | None:
        arrival = getattr(envelope, "timestamp", None)
        if arrival is not None and clock.time() - arrival >= lifetime:
            return None
        delay = min(maximum, initial * (2 ** max(0, attempts - 1)))
        if jitter:
            delay *= 1 + rng.uniform(-jitter, jitter)
        if arrival is not None:
            # never schedule past the end of the lifetime by more than one step
            delay = min(delay, max(1.0, arrival + lifetime - clock.time()))
        return delay

    return backoff


def _default_bounce_factory(hostname: str) -> Callable:
    def factory(envelope, statuses, action: str = "failed"):
        from slimta.bounce import build_dsn

        return build_dsn(envelope, statuses, action=action, reporting_mta=hostname,
                         arrival=envelope.timestamp)

    return factory


class Queue(Service):
    """A durable queue with retries and bounces.

    ``store`` is a :class:`QueueStorage`; ``relay`` delivers (without one
    the queue only stores, for an edge-only process). ``backoff(envelope,
    attempts)`` gives the delay before a retry or None to give up (default
    :func:`exponential_backoff`). ``bounce_factory(envelope, statuses,
    action)`` builds a DSN envelope (default :func:`slimta.bounce.build_dsn`);
    bounces are queued in ``bounce_queue`` (default: this queue).
    ``relay_pool`` bounds concurrent delivery attempts (default 10).
    ``clock`` (``time()``, ``async wait(event, timeout)``) is injectable so
    tests can run a retry schedule without waiting.

    With a :class:`SharedQueueStorage`, due messages are claimed from the
    storage for ``lease`` seconds (renewed every ``lease / 3`` while the
    attempt runs); ``poll_interval`` (default 5 s) bounds how long the queue
    waits for a notification before it looks again.
    """

    def __init__(self, store: QueueStorage, relay=None, backoff: Callable | None = None,
                 bounce_factory: Callable | None = None, bounce_queue=None,
                 relay_pool: int | None = None, clock=None, hostname: str | None = None,
                 poll_interval: float | None = None, lease: float = DEFAULT_LEASE):
        self.store = store
        self.relay = relay
        self.clock = clock or SystemClock()
        self.backoff = backoff or exponential_backoff(clock=self.clock)
        self.hostname = hostname or socket.getfqdn()
        self.bounce_factory = bounce_factory or _default_bounce_factory(self.hostname)
        self.bounce_queue = bounce_queue
        self.relay_pool = relay_pool or DEFAULT_RELAY_POOL
        #: with storage shared by another process (one edge-only, one delivering),
        #: look for messages it stored every so many seconds
        self.poll_interval = poll_interval
        self.shared = isinstance(store, SharedQueueStorage)
        self.lease = float(lease)
        self._renewer: asyncio.Task | None = None
        self.queue_policies: list = []
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}  # id -> its current entry in _heap
        self._seq = itertools.count()
        self._attempting: dict[str, asyncio.Task] = {}
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._slots: asyncio.Semaphore | None = None
        self._scheduler: asyncio.Task | None = None

    def add_policy(self, policy) -> None:
        """A :class:`~slimta.policy.QueuePolicy`, applied in order to each new envelope."""
        self.queue_policies.append(policy)

    # --- lifecycle ------------------------------------------------------
    async def _begin(self) -> None:
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._slots = asyncio.Semaphore(self.relay_pool)
        if self.shared:
            self.store.watch(self._wake.set)
        await self.store.open()
        if self.shared:
            if self.relay is not None:
                loop = asyncio.get_running_loop()
                self._scheduler = loop.create_task(self._run_shared())
                self._renewer = loop.create_task(self._renew_leases())
        elif self.relay is not None:
            for timestamp, qid in await self.store.load():
                self._schedule(qid, timestamp)
            self._scheduler = asyncio.get_running_loop().create_task(self._run())

    async def _end(self) -> None:
        for task in (self._scheduler, self._renewer):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        # attempts in progress finish: their results must be recorded
        if self._attempting:
            await asyncio.gather(*self._attempting.values(), return_exceptions=True)
        await self.store.close()

    # --- taking messages --------------------------------------------------
    async def enqueue(self, envelope) -> list:
        """Apply the queue policies, store each resulting envelope, schedule its first attempt.

        Returns ``[(envelope, id | QueueError), ...]``; an id means the
        message is stored durably.
        """
        from slimta.policy import apply_queue_policies

        if not self._begun:
            raise RuntimeError("the queue has not been started")
        await self.started()
        if envelope.timestamp is None:
            envelope.timestamp = self.clock.time()
        try:
            envelopes = await apply_queue_policies(self.queue_policies, envelope)
        except Exception:
            log.exception("queue policy failed for message from <%s>", envelope.sender)
            return [(envelope, QueueError())]
        if len(envelopes) == 1:
            # the usual case: no task for gather() to create and schedule
            return [await self._store(envelopes[0])]
        return list(await asyncio.gather(*(self._store(env) for env in envelopes)))

    async def _store(self, envelope) -> tuple:
        now = self.clock.time()
        try:
            qid = await self.store.write(envelope, now)
        except Exception:
            log.exception("could not store message from <%s>", envelope.sender)
            return envelope, QueueError()
        log.info("id=%s queued from=<%s> rcpts=%d", qid, envelope.sender,
                 len(envelope.recipients))
        if self.relay is not None:
            self._schedule(qid, now)
        return envelope, qid

    # --- scheduling ---------------------------------------------------------
    def _schedule(self, qid: str, timestamp: float) -> None:
        if self.shared:  # the storage keeps the schedule: just look again
            if self._wake is not None:
                self._wake.set()
            return
        self._due[qid] = timestamp
        heapq.heappush(self._heap, (timestamp, next(self._seq), qid))
        if self._wake is not None:
            self._wake.set()

    def _unschedule(self, qid: str) -> None:
        self._due.pop(qid, None)  # its heap entry is skipped when it comes up

    async def _run(self) -> None:
        heap, due = self._heap, self._due
        next_poll = self.clock.time() + self.poll_interval if self.poll_interval else None
        while True:
            now = self.clock.time()
            if next_poll is not None and now >= next_poll:
                await self._poll()
                now = self.clock.time()
                next_poll = now + self.poll_interval
            while heap and heap[0][0] <= now:
                timestamp, _, qid = heapq.heappop(heap)
                if due.get(qid) != timestamp:
                    continue  # rescheduled or removed since
                del due[qid]
                if qid in self._attempting:
                    continue
                await self._slots.acquire()
                self._start_attempt(qid)
            self._wake.clear()
            if not self._attempting:
                self._idle.set()
            delay = heap[0][0] - now if heap else None
            if next_poll is not None:
                delay = next_poll - now if delay is None else min(delay, next_poll - now)
            await self.clock.wait(self._wake, delay)
            self._idle.clear()

    async def _run_shared(self) -> None:
        """The scheduler with shared storage: claim what is due, sleep until more is."""
        wake, clock = self._wake, self.clock
        poll = self.poll_interval or DEFAULT_SHARED_POLL
        while True:
            wake.clear()  # before the claim: a notification during it is not lost
            now = clock.time()
            free = self.relay_pool - len(self._attempting)
            claimed: list[str] = []
            delay: float | None = poll
            try:
                if free > 0:
                    claimed = await self.store.claim(now, free, self.lease)
                    for qid in claimed:
                        self._start_attempt(qid)
                if len(claimed) < free:
                    due = await self.store.next_due(now)
                    if due is not None:  # the clock may have moved during the awaits
                        delay = min(poll, max(0.0, due - clock.time()))
                elif free > 0:
                    delay = 0.0  # maybe more is due
                else:
                    delay = None  # every slot busy: an attempt that ends wakes us
            except Exception:
                log.exception("could not claim messages from the queue storage")
            if not self._attempting and not claimed:
                self._idle.set()
            await clock.wait(wake, delay)
            self._idle.clear()

    async def _renew_leases(self) -> None:
        """Keep the leases of the messages being attempted until their attempts end."""
        interval = self.lease / 3
        never = asyncio.Event()  # only the interval ends each wait
        while True:
            await self.clock.wait(never, interval)
            ids = list(self._attempting)
            if not ids:
                continue
            try:
                kept = set(await self.store.renew(ids, self.clock.time(), self.lease))
            except Exception:
                log.exception("could not renew %d delivery leases", len(ids))
                continue
            for qid in ids:
                if qid not in kept and qid in self._attempting:
                    log.warning("id=%s lost its delivery lease; another queue may deliver it too",
                                qid)

    def _start_attempt(self, qid: str) -> None:
        task = asyncio.get_running_loop().create_task(self._attempt(qid))
        self._attempting[qid] = task
        task.add_done_callback(lambda _t, q=qid: self._attempt_done(q))

    async def _poll(self) -> None:
        """Schedule messages another process stored (shared storage)."""
        try:
            entries = await self.store.load()
        except Exception:
            log.exception("could not read the queue storage")
            return
        for timestamp, qid in entries:
            if qid not in self._due and qid not in self._attempting:
                self._schedule(qid, timestamp)

    def _attempt_done(self, qid: str) -> None:
        self._attempting.pop(qid, None)
        if self.shared:
            self._wake.set()  # a free slot: claim more
            return
        self._slots.release()
        if not self._attempting:
            self._wake.set()  # let the scheduler notice it is idle

    async def join(self) -> None:
        """Wait until nothing is due now and no attempt is in progress (for tests and tools)."""
        await self.started()
        if self._scheduler is None:
            return
        while True:
            self._idle.clear()
            self._wake.set()
            await self._idle.wait()
            if not self._attempting:
                return

    # --- one delivery attempt -------------------------------------------------
    async def _attempt(self, qid: str) -> None:
        try:
            stored = await self.store.get(qid)
        except KeyError:
            return
        if stored.held:
            if self.shared:
                await self._release_lease(qid, None)
            return
        try:
            await self._deliver(qid, stored)
        except KeyError:
            log.info("id=%s was deleted during its attempt", qid)
        except Exception:
            # never lose the message to a bug here: try again later
            log.exception("id=%s attempt failed unexpectedly; retrying later", qid)
            if self.shared:
                await self._release_lease(qid, self.clock.time() + 60)
            else:
                self._schedule(qid, self.clock.time() + 60)

    async def _release_lease(self, qid: str, timestamp: float | None) -> None:
        try:
            await self.store.release(qid, timestamp)
        except KeyError:
            pass
        except Exception:  # the lease runs out on its own
            log.exception("id=%s could not release its delivery lease", qid)

    async def _deliver(self, qid: str, stored: StoredMessage) -> None:
        pending = stored.pending
        if not pending:
            await self.store.remove(qid)
            return
        original = stored.envelope
        envelope = original.copy([rcpt for _, rcpt in pending])
        results = await self._relay_results(qid, envelope, stored.attempts, pending)
        delivered, transient, permanent = [], [], []
        for (index, rcpt), result in zip(pending, results, strict=True):
            if isinstance(result, TransientRelayError):
                transient.append((index, rcpt, result.reply))
            elif isinstance(result, RelayError):
                permanent.append((index, rcpt, result.reply))
            else:
                delivered.append((index, rcpt, result))
        attempts = stored.attempts + 1
        next_delay = None
        if transient:
            next_delay = self.backoff(original, attempts)
            if next_delay is None:
                log.info("id=%s giving up after %d attempts", qid, attempts)
                permanent.extend(transient)
                transient = []
        now = self.clock.time()
        if permanent:
            await self._send_dsn(qid, original, permanent, "failed", now)
        if delivered and original.rcpt_params:  # success DSNs only where NOTIFY asks
            await self._send_dsn(qid, original, delivered, "delivered", now)
        for _, rcpt, reply in delivered:
            log.info("id=%s to=<%s> delivered: %s", qid, rcpt, reply or "ok")
        for _, rcpt, reply in permanent:
            log.info("id=%s to=<%s> failed: %s", qid, rcpt, reply)
        if not transient:
            await self.store.remove(qid)
            return
        last = transient[0][2]
        for _, rcpt, reply in transient:
            log.info("id=%s to=<%s> deferred: %s", qid, rcpt, reply)
        finished = [i for i, _, _ in delivered] + [i for i, _, _ in permanent]
        when = now + next_delay
        await self.store.record_attempt(qid, when, finished, str(last) if last else None,
                                        attempted_at=now)
        self._schedule(qid, when)

    async def _relay_results(self, qid: str, envelope, attempts: int, pending) -> list:
        """The relay's outcome as one entry per pending recipient."""
        try:
            result = await self.relay.attempt(envelope, attempts)
        except RelayError as exc:
            return [exc] * len(pending)
        except Exception:
            log.exception("id=%s relay raised", qid)
            return [TransientRelayError(reply=Reply("450", "4.3.0 Internal error in relay"))] \
                * len(pending)
        if isinstance(result, Mapping):
            out = []
            for _, rcpt in pending:
                if rcpt in result:
                    out.append(result[rcpt])
                else:
                    out.append(TransientRelayError(
                        reply=Reply("450", "4.3.0 No result for this recipient")))
            return out
        return [result] * len(pending)

    async def _send_dsn(self, qid: str, original, outcomes, action: str, now: float) -> None:
        from slimta.bounce import RecipientStatus

        statuses = [RecipientStatus(rcpt, reply if isinstance(reply, Reply) else
                                    Reply("250", "2.0.0 Delivered"), last_attempt=now)
                    for _, rcpt, reply in outcomes]
        try:
            dsn = self.bounce_factory(original, statuses, action)
        except Exception:
            log.exception("id=%s could not build a %s DSN", qid, action)
            return
        if dsn is None:
            return
        target = self.bounce_queue if self.bounce_queue is not None else self
        results = await target.enqueue(dsn)
        for _, result in results:
            if isinstance(result, QueueError):
                log.error("id=%s the %s DSN could not be queued: %s", qid, action, result)
            else:
                log.info("id=%s %s DSN queued as %s", qid, action, result)

    # --- management ------------------------------------------------------------
    async def list(self) -> list[QueueEntry]:
        """Every queued message, held ones included, by next attempt."""
        await self.started()
        return await self.store.list()

    async def get(self, qid: str) -> StoredMessage:
        """One queued message; KeyError if there is none."""
        await self.started()
        return await self.store.get(qid)

    async def delete(self, qid: str) -> bool:
        """Remove a message without delivering or bouncing it."""
        await self.started()
        self._unschedule(qid)
        return await self.store.remove(qid)

    async def hold(self, qid: str) -> None:
        """Keep a message but attempt it no more until released."""
        await self.started()
        await self.store.set_held(qid, True)
        self._unschedule(qid)

    async def release(self, qid: str) -> None:
        """Release a held message; it is attempted at once."""
        await self.started()
        await self.store.set_held(qid, False)
        await self.retry(qid)

    async def retry(self, qid: str) -> None:
        """Attempt a message now."""
        await self.started()
        now = self.clock.time()
        await self.store.set_timestamp(qid, now)
        if self.relay is not None:
            self._schedule(qid, now)

    async def flush(self) -> None:
        """Attempt every message that is not held, now."""
        await self.started()
        if self.relay is None:
            return
        now = self.clock.time()
        for _, qid in await self.store.load():
            if self.shared:
                await self.store.set_timestamp(qid, now)
            self._schedule(qid, now)

    async def stats(self) -> dict:
        """The storage's counts plus what is being attempted now."""
        await self.started()
        stats = {**await self.store.stats()}
        stats["attempting"] = len(self._attempting)
        stats["scheduled"] = len(self._due)
        return stats
