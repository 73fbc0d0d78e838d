"""Prometheus metrics for the daemon: what edges received, what relays delivered, queue sizes.

A :class:`Metrics` owns its own :class:`~prometheus_client.CollectorRegistry`
(never the process-wide one, so several instances and tests do not clash).
It counts by wrapping methods of the objects it is given, on those objects
only, so the edge, queue and relay code stays unaware of it:

- :meth:`Metrics.instrument_edge`: connections (admitted, refused, open now)
  and messages received by the class of the end-of-data reply;
- :meth:`Metrics.instrument_relay`: delivery attempts by result per
  recipient, and the delivery latency (arrival to delivery);
- :meth:`Metrics.instrument_queue`: bounces, and the queue size by state,
  read with ``await queue.stats()`` at scrape time (:meth:`Metrics.update`).

Besides the Prometheus samples, :attr:`Metrics.recent` (a :class:`RecentCounts`)
keeps the deliveries, deferrals, failures and bounces of the last hour per
queue, for the web dashboard (:meth:`Metrics.last_hour`).

Samples (prefix ``slimta_``)::

    slimta_connections_total                       admitted SMTP connections
    slimta_connections_refused_total               refused over a connection limit
    slimta_connections_current                     open now
    slimta_messages_received_total{result}         accepted (2xx), tempfailed (4xx), rejected (5xx)
    slimta_delivery_attempts_total{result}         delivered, deferred, failed (per recipient)
    slimta_delivery_latency_seconds                histogram: arrival to delivery, per recipient
    slimta_bounces_total                           failure DSNs built
    slimta_queue_messages{queue,state}             queued (all, held included), held, attempting
    slimta_queue_recipients{queue}                 recipients not yet delivered
    slimta_queue_bytes{queue}                      size of the queued messages
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from slimta.relay import RelayError, TransientRelayError
from slimta.smtp.reply import Reply

try:
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
except ImportError:  # older prometheus-client
    from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "Metrics", "RecentCounts"]

log = logging.getLogger(__name__)

#: Delivery latency buckets in seconds: from local delivery (ms) to the end of a
#: five-day retry lifetime.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                   3600.0, 4 * 3600.0, 86400.0, 5 * 86400.0)

_RECEIVED_RESULTS = {"2": "accepted", "4": "tempfailed", "5": "rejected"}
_QUEUE_STATES = ("queued", "held", "attempting")
_MARK = "_slimta_metrics"  # set on each object instrumented, so it is wrapped once
#: the queue (its name with instrument_queue) whose delivery attempt is running in this task
_ATTEMPT_QUEUE: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "slimta_metrics_queue", default=None)
#: the events RecentCounts keeps, as Metrics.last_hour names them
RECENT_EVENTS = ("delivered", "deferred", "failed", "bounced")


class RecentCounts:
    """Event counts over the last ``buckets`` x ``width`` seconds (default: an hour).

    A ring of one-minute buckets: :meth:`add` is a dict update, and a bucket
    older than the window is emptied when its slot comes round again, so
    memory stays bounded by the number of distinct keys. ``clock()`` gives
    the time in seconds (default :func:`time.time`).
    """

    def __init__(self, clock: Callable[[], float] = time.time, buckets: int = 60,
                 width: float = 60.0):
        self.clock = clock
        self.width = width
        self._slots: list[int] = [-1] * buckets  # the minute number each bucket holds
        self._counts: list[dict[Any, int]] = [{} for _ in range(buckets)]

    def add(self, key: Any, n: int = 1) -> None:
        """Count ``n`` events of ``key`` now."""
        slot = int(self.clock() // self.width)
        i = slot % len(self._slots)
        if self._slots[i] != slot:
            self._slots[i] = slot
            self._counts[i] = {}
        counts = self._counts[i]
        counts[key] = counts.get(key, 0) + n

    def totals(self) -> dict[Any, int]:
        """``{key: count}`` over the window that ends now."""
        now = int(self.clock() // self.width)
        out: dict[Any, int] = {}
        for slot, counts in zip(self._slots, self._counts, strict=True):
            if 0 <= now - slot < len(self._slots):
                for key, n in counts.items():
                    out[key] = out.get(key, 0) + n
        return out


def _reply_class(results) -> str:
    """The end-of-data result for the queue's ``results``, as SmtpEdge answers them."""
    ids = 0
    for _envelope, result in results:
        if isinstance(result, Reply):
            return _RECEIVED_RESULTS.get(str(result.code)[:1], "rejected")
        if isinstance(result, BaseException):
            reply = getattr(result, "reply", None)
            code = str(reply.code) if isinstance(reply, Reply) else "451"
            return _RECEIVED_RESULTS.get(code[:1], "rejected")
        ids += 1
    return "accepted" if ids else "tempfailed"


class Metrics:
    """The daemon's counters, gauges and histograms, in a registry of their own.

    ``namespace`` prefixes every name (default ``slimta``). ``clock()`` gives
    the wall-clock time compared with ``envelope.timestamp`` for the
    delivery latency (default :func:`time.time`). ``process=True`` adds the
    standard ``process_*`` samples (CPU, memory, open files) of this process.
    """

    def __init__(self, namespace: str = "slimta", clock: Callable[[], float] = time.time,
                 process: bool = True):
        self.registry = CollectorRegistry()
        self.clock = clock
        self._queues: dict[str, Any] = {}
        #: the last hour's events, keyed (queue name or None, event): see last_hour()
        self.recent = RecentCounts(clock)
        reg, ns = self.registry, namespace
        self.connections = Counter("connections", "SMTP connections admitted",
                                   namespace=ns, registry=reg)
        self.connections_refused = Counter(
            "connections_refused", "SMTP connections refused over a connection limit",
            namespace=ns, registry=reg)
        self.connections_current = Gauge("connections_current", "SMTP connections open now",
                                         namespace=ns, registry=reg)
        self.messages_received = Counter(
            "messages_received",
            "Messages received, by end-of-data reply: accepted (2xx), tempfailed (4xx), "
            "rejected (5xx)", ["result"], namespace=ns, registry=reg)
        self.delivery_attempts = Counter(
            "delivery_attempts", "Delivery attempts per recipient: delivered, deferred, failed",
            ["result"], namespace=ns, registry=reg)
        self.delivery_latency = Histogram(
            "delivery_latency_seconds", "Time from a message's arrival to its delivery, "
            "per recipient", buckets=LATENCY_BUCKETS, namespace=ns, registry=reg)
        self.bounces = Counter("bounces", "Delivery status notifications of failure built",
                               namespace=ns, registry=reg)
        self.queue_messages = Gauge(
            "queue_messages", "Queued messages by state: queued (all, held included), held, "
            "attempting", ["queue", "state"], namespace=ns, registry=reg)
        self.queue_recipients = Gauge("queue_recipients", "Queued recipients not yet delivered",
                                      ["queue"], namespace=ns, registry=reg)
        self.queue_bytes = Gauge("queue_bytes", "Size of the queued messages in octets",
                                 ["queue"], namespace=ns, registry=reg)
        for result in _RECEIVED_RESULTS.values():
            self.messages_received.labels(result)
        for result in ("delivered", "deferred", "failed"):
            self.delivery_attempts.labels(result)
        if process:
            ProcessCollector(registry=reg)

    # --- instrumentation ------------------------------------------------------
    def _mark(self, obj: Any, what: str) -> bool:
        """True the first time ``obj`` is instrumented for ``what`` by this Metrics."""
        marks = obj.__dict__.setdefault(_MARK, {})
        if marks.get(what) is self:
            return False
        marks[what] = self
        return True

    def instrument_edge(self, edge: Any) -> None:
        """Count the connections and received messages of ``edge``.

        Wraps ``edge.handoff`` (every edge has it) on this instance: the
        queue's answer gives the end-of-data reply class. A message refused
        before the handoff (by a validator or a limit) is not counted.
        Connections are counted on edges with SmtpEdge's admission
        (``_admit``/``_release``); other edges only count messages.
        """
        if not self._mark(edge, "edge"):
            return
        handoff = edge.handoff
        received = self.messages_received

        @functools.wraps(handoff)
        async def counted_handoff(envelope):
            try:
                results = await handoff(envelope)
            except Exception:  # SmtpEdge answers 451 4.3.0
                received.labels("tempfailed").inc()
                raise
            received.labels(_reply_class(results)).inc()
            return results

        edge.handoff = counted_handoff
        admit, release = getattr(edge, "_admit", None), getattr(edge, "_release", None)
        if admit is None or release is None:
            return
        current = self.connections_current
        current.inc(len(getattr(edge, "_sessions", ())))  # open before instrumenting

        @functools.wraps(admit)
        def counted_admit(session) -> bool:
            admitted = admit(session)
            if admitted:
                self.connections.inc()
                current.inc()
            else:
                self.connections_refused.inc()
            return admitted

        @functools.wraps(release)
        def counted_release(session) -> None:
            current.dec()
            return release(session)

        edge._admit = counted_admit
        edge._release = counted_release

    def instrument_relay(self, relay: Any) -> None:
        """Count the results of ``relay.attempt`` per recipient and time deliveries.

        Results are read as the queue reads them: ``None`` or a ``Reply``
        delivered, :class:`TransientRelayError` (or any other exception, or
        a recipient missing from a per-recipient answer) deferred, another
        :class:`RelayError` failed. A deferral the queue turns into a bounce
        (out of retries) counts as deferred here and as a bounce.
        """
        if not self._mark(relay, "relay"):
            return
        attempt = relay.attempt

        @functools.wraps(attempt)
        async def counted_attempt(envelope, attempts: int):
            try:
                result = await attempt(envelope, attempts)
            except Exception as exc:
                self._count_attempt(envelope, {r: exc for r in envelope.recipients})
                raise
            if isinstance(result, Mapping):
                self._count_attempt(envelope, result)
            else:
                self._count_attempt(envelope, {r: result for r in envelope.recipients})
            return result

        relay.attempt = counted_attempt

    def _count_attempt(self, envelope: Any, results: Mapping) -> None:
        arrival = getattr(envelope, "timestamp", None)
        now = self.clock()
        counts = {"delivered": 0, "deferred": 0, "failed": 0}
        for rcpt in envelope.recipients:
            if rcpt not in results:
                counts["deferred"] += 1
                continue
            result = results[rcpt]
            if isinstance(result, TransientRelayError):
                counts["deferred"] += 1
            elif isinstance(result, RelayError):
                counts["failed"] += 1
            elif isinstance(result, BaseException):
                counts["deferred"] += 1
            else:
                counts["delivered"] += 1
                if arrival is not None:
                    self.delivery_latency.observe(max(0.0, now - arrival))
        queue = _ATTEMPT_QUEUE.get()
        for result, n in counts.items():
            if n:
                self.delivery_attempts.labels(result).inc(n)
                self.recent.add((queue, result), n)

    def instrument_queue(self, queue: Any, name: str = "default") -> None:
        """Report ``queue``'s size under ``name`` and count the bounces it builds.

        The size is read from ``await queue.stats()`` by :meth:`update`.
        Registering another queue under the same name replaces the first (a
        reload). Bounces are counted by wrapping ``queue.bounce_factory``:
        each failure DSN it returns counts once. The delivery attempts of a
        :class:`~slimta.queue.Queue` (its ``_attempt``, wrapped on this
        instance) are attributed to ``name`` in :meth:`last_hour`.
        """
        self._queues[name] = queue
        if not self._mark(queue, "queue"):
            return
        attempt = getattr(queue, "_attempt", None)
        if callable(attempt):

            @functools.wraps(attempt)
            async def named_attempt(*args, **kwargs):
                token = _ATTEMPT_QUEUE.set(name)
                try:
                    return await attempt(*args, **kwargs)
                finally:
                    _ATTEMPT_QUEUE.reset(token)

            queue._attempt = named_attempt
        factory = getattr(queue, "bounce_factory", None)
        if factory is None:
            return
        bounces, recent = self.bounces, self.recent

        @functools.wraps(factory)
        def counted_factory(envelope, statuses, action: str = "failed"):
            dsn = factory(envelope, statuses, action)
            if dsn is not None and action == "failed":
                bounces.inc()
                recent.add((name, "bounced"))
            return dsn

        queue.bounce_factory = counted_factory

    def forget_queue(self, name: str) -> None:
        """Stop reporting the queue registered as ``name`` (and drop its samples)."""
        self._queues.pop(name, None)
        self._drop_queue_samples(name)

    def _drop_queue_samples(self, name: str) -> None:
        for state in _QUEUE_STATES:
            with contextlib.suppress(KeyError):
                self.queue_messages.remove(name, state)
        for gauge in (self.queue_recipients, self.queue_bytes):
            with contextlib.suppress(KeyError):
                gauge.remove(name)

    def last_hour(self, queue: str | None = None) -> dict[str, int]:
        """Recipients ``delivered``, ``deferred`` and ``failed`` and DSNs ``bounced`` in the
        last hour: those of the queue registered as ``queue``, or of every queue (and of
        relays used without a registered queue) when ``queue`` is None."""
        out = dict.fromkeys(RECENT_EVENTS, 0)
        for (name, event), n in self.recent.totals().items():
            if queue is None or name == queue:
                out[event] = out.get(event, 0) + n
        return out

    # --- scraping ------------------------------------------------------------------
    async def update(self) -> None:
        """Fill the queue gauges from ``await queue.stats()`` of every registered queue.

        A queue whose stats fail is logged and its samples left out, so one
        broken storage does not hide the other metrics.
        """
        for name, queue in list(self._queues.items()):
            try:
                stats = await queue.stats()
            except Exception:
                log.exception("metrics: stats of queue %r failed", name)
                self._drop_queue_samples(name)
                continue
            gauge = self.queue_messages
            gauge.labels(name, "queued").set(stats.get("messages", 0))
            gauge.labels(name, "held").set(stats.get("held", 0))
            gauge.labels(name, "attempting").set(stats.get("attempting", 0))
            if "recipients" in stats:
                self.queue_recipients.labels(name).set(stats["recipients"])
            if "bytes" in stats:
                self.queue_bytes.labels(name).set(stats["bytes"])

    def render(self) -> bytes:
        """Every sample now, in the Prometheus text format (queue gauges as last updated)."""
        return generate_latest(self.registry)

    async def scrape(self) -> bytes:
        """:meth:`update`, then :meth:`render`: what ``GET /metrics`` answers."""
        await self.update()
        return self.render()
