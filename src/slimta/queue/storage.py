"""What a queue needs from its storage: the :class:`QueueStorage` interface.

A storage keeps each queued message (its raw bytes and JSON metadata, never
pickle) under an id it chooses, with the time of its next attempt, how many
attempts were made, which recipients were delivered, the last reply and
whether it is held. Every method is a coroutine; when ``write`` returns, the
message is durable (as far as the storage promises: SqliteStorage survives
power loss, DictStorage nothing).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from slimta.envelope import Envelope

__all__ = ["QueueEntry", "QueueStorage", "StoredMessage"]


@dataclass
class StoredMessage:
    """A message as ``get`` returns it.

    ``envelope`` has all its original recipients; ``delivered`` holds the
    indexes (into ``envelope.recipients``) of those already delivered.
    """

    envelope: Envelope
    attempts: int = 0
    delivered: set[int] = field(default_factory=set)
    timestamp: float = 0.0
    last_reply: str | None = None
    held: bool = False

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
                             last_reply: str | None) -> int:
        """After an attempt that leaves the message queued: all of the above at once.

        Returns the new attempt count. Storages override it to write once.
        """
        if delivered:
            await self.set_recipients_delivered(id, delivered)
        attempts = await self.increment_attempts(id)
        await self.set_last_reply(id, last_reply)
        await self.set_timestamp(id, timestamp)
        return attempts

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
