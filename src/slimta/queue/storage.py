"""What a queue needs from its storage: the :class:`QueueStorage` interface.

A storage keeps each queued message (its raw bytes and JSON metadata, never
pickle) under an id it chooses, with the time of its next attempt, how many
attempts were made, which recipients were delivered, the last reply, a
short history of attempts (:data:`HISTORY_LIMIT` entries at most) and whether
it is held. Every method is a coroutine; when ``write`` returns, the
message is durable (as far as the storage promises: SqliteStorage survives
power loss, DictStorage nothing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from slimta.envelope import Envelope

__all__ = ["HISTORY_LIMIT", "QueueEntry", "QueueStorage", "SharedQueueStorage",
           "StorageVersionError", "StoredMessage", "history_with"]

#: How many attempts a message's history keeps: the most recent ones.
HISTORY_LIMIT = 20


def history_with(history: list[tuple[float, str | None]], attempted_at: float,
                 reply: str | None) -> list[tuple[float, str | None]]:
    """``history`` with ``(attempted_at, reply)`` appended, trimmed to :data:`HISTORY_LIMIT`."""
    return [*history, (float(attempted_at), reply)][-HISTORY_LIMIT:]


class StorageVersionError(RuntimeError):
    """A queue's storage was written by a newer slimta (or is not a slimta queue).

    ``found`` is the version of the file, ``supported`` the newest this code knows.
    """

    def __init__(self, path: str, found: int, supported: int, message: str | None = None):
        self.path = path
        self.found = found
        self.supported = supported
        super().__init__(
            message
            or f"queue storage {path!r} has schema version {found}, newer than version "
            f"{supported}, the newest this slimta knows; upgrade slimta to open it"
        )


@dataclass
class StoredMessage:
    """A message as ``get`` returns it.

    ``envelope`` has all its original recipients; ``delivered`` holds the
    indexes (into ``envelope.recipients``) of those already delivered.
    ``history`` holds ``(when the attempt ended, its reply)`` of the last
    :data:`HISTORY_LIMIT` attempts recorded with a time, oldest first.
    """

    envelope: Envelope
    attempts: int = 0
    delivered: set[int] = field(default_factory=set)
    timestamp: float = 0.0
    last_reply: str | None = None
    held: bool = False
    history: list[tuple[float, str | None]] = field(default_factory=list)

    @property
    def pending(self) -> list[tuple[int, str]]:
        """(index, recipient) of the recipients not yet delivered."""
        return [(i, r) for i, r in enumerate(self.envelope.recipients) if i not in self.delivered]


@dataclass
class QueueEntry:
    """One line of ``list()``: what an operator sees of a queued message."""

    id: str
    sender: str
    recipients: list[str]  # those not yet delivered
    attempts: int
    next_attempt: float
    last_reply: str | None
    held: bool
    size: int
    created: float


class QueueStorage(ABC):
    """Where a :class:`~slimta.queue.Queue` keeps its messages."""

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Prepare for use (create tables, start threads). Called by Queue.start()."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources. Called by Queue.stop()."""

    @abstractmethod
    async def write(self, envelope: Envelope, timestamp: float) -> str:
        """Store a new message due at ``timestamp``; return its id once it is durable."""

    @abstractmethod
    async def get(self, id: str) -> StoredMessage:
        """The message ``id``; ``KeyError`` if there is none."""

    @abstractmethod
    async def set_timestamp(self, id: str, timestamp: float) -> None:
        """When the next attempt is due."""

    @abstractmethod
    async def increment_attempts(self, id: str) -> int:
        """Count one more attempt; return the new count."""

    @abstractmethod
    async def set_recipients_delivered(self, id: str, indexes: list[int]) -> None:
        """Record recipients (by index into the original list) as delivered, never to retry."""

    @abstractmethod
    async def set_last_reply(self, id: str, reply: str | None) -> None:
        """The last relay reply, for operators (``list()``)."""

    @abstractmethod
    async def set_held(self, id: str, held: bool) -> None:
        """Hold a message (never attempted until released) or release it."""

    async def record_attempt(self, id: str, timestamp: float, delivered: list[int],
                             last_reply: str | None, attempted_at: float | None = None) -> int:
        """After an attempt that leaves the message queued: all of the above at once.

        With ``attempted_at`` (when the attempt ended), ``(attempted_at,
        last_reply)`` is also appended to the message's history, which keeps
        the last :data:`HISTORY_LIMIT` entries (see :meth:`append_history`).
        Returns the new attempt count. Storages override it to write once.
        """
        if delivered:
            await self.set_recipients_delivered(id, delivered)
        attempts = await self.increment_attempts(id)
        await self.set_last_reply(id, last_reply)
        if attempted_at is not None:
            await self.append_history(id, attempted_at, last_reply)
        await self.set_timestamp(id, timestamp)
        return attempts

    async def append_history(self, id: str, attempted_at: float,  # noqa: B027 - optional
                             reply: str | None) -> None:
        """Append ``(attempted_at, reply)`` to the history of ``id``, trimmed to the limit.

        Used by the default :meth:`record_attempt`; this default keeps no
        history (every storage shipped with slimta overrides ``record_attempt``).
        """

    @abstractmethod
    async def remove(self, id: str) -> bool:
        """Delete the message; False if there was none."""

    @abstractmethod
    async def load(self) -> list[tuple[float, str]]:
        """(next attempt time, id) of every message that is not held: the schedule at start."""

    @abstractmethod
    async def list(self) -> list[QueueEntry]:
        """Every message, held ones included, ordered by next attempt."""

    async def stats(self) -> dict:
        """Counts for operators: ``{'messages': n, 'held': n, 'recipients': n, 'bytes': n}``."""
        entries = await self.list()
        return {
            "messages": len(entries),
            "held": sum(1 for e in entries if e.held),
            "recipients": sum(len(e.recipients) for e in entries),
            "bytes": sum(e.size for e in entries),
        }


class SharedQueueStorage(QueueStorage):
    """A storage several queues (processes, hosts) use at once, with delivery leases.

    A queue on a shared storage keeps no schedule of its own: it asks the
    storage for due messages with :meth:`claim`, which gives each message to
    one queue only, for ``lease`` seconds. The queue renews the leases of the
    messages it is delivering (:meth:`renew`); ``record_attempt`` and
    ``remove`` end a lease (whoever holds it), :meth:`release` ends one
    without a result. ``load()`` and ``list()`` include leased messages. A
    message whose lease ran out (its host died) is due again, so another
    queue claims it: delivery is at least once.

    Times are the callers' (``Queue.clock``), in seconds since the epoch, so
    hosts sharing a storage need synchronised clocks (NTP) and tests can
    inject one. ``owner`` names this queue in the leases it holds.
    """

    shared = True
    owner: str

    @abstractmethod
    async def claim(self, now: float, limit: int, lease: float) -> list[str]:
        """Lease up to ``limit`` due messages until ``now + lease``; return their ids.

        Due: not held, next attempt at or before ``now``, and no lease or one
        that expired (a lease is over at its expiry: ``expiry <= now``).
        Oldest due first. Atomic across every user of the storage.
        """

    @abstractmethod
    async def renew(self, ids: list[str], now: float, lease: float) -> list[str]:
        """Extend this owner's leases on ``ids`` to ``now + lease``; the ids still held."""

    @abstractmethod
    async def release(self, id: str, timestamp: float | None = None) -> None:
        """End this owner's lease on ``id`` (next attempt at ``timestamp`` when given)."""

    @abstractmethod
    async def next_due(self, now: float) -> float | None:
        """When the next claim could succeed: the earliest next attempt or lease expiry.

        None when nothing is queued that is not held.
        """

    def watch(self, wake: Callable[[], None]) -> None:
        """Have ``wake()`` called (on the event loop) when any user makes a message due now.

        Called by the queue before :meth:`open`. Storages with a notification
        channel (PostgreSQL LISTEN/NOTIFY, Redis pub/sub) call it after a
        ``write``, a ``set_timestamp``, a ``set_held(id, False)`` or a
        ``release`` by any user, their own included; others never call it and
        the queue polls (``Queue.poll_interval``).
        """
