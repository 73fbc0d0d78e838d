"""DictStorage: a queue storage in memory, for tests, proxies and edge-only processes.

Nothing survives the process. Messages are kept in their stored form (the
JSON metadata as text and the raw bytes, see :mod:`slimta.queue.record`), so
``get`` always returns a new :class:`~slimta.envelope.Envelope`: changing it
does not change the stored message, and an envelope that could not be stored
durably (metadata that is not JSON) fails here just as with SqliteStorage.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from slimta.envelope import Envelope
from slimta.queue.record import envelope_from_record, envelope_to_record
from slimta.queue.storage import (
    QueueEntry,
    QueueStorage,
    SharedQueueStorage,
    StoredMessage,
    history_with,
)

__all__ = ["DictStorage", "SharedDictStorage"]


@dataclass(slots=True)
class _Entry:
    meta: str  # JSON text
    data: bytes
    timestamp: float
    created: float
    sender: str | None
    recipients: list[str]
    attempts: int = 0
    delivered: set[int] = field(default_factory=set)
    last_reply: str | None = None
    held: bool = False
    history: list[tuple[float, str | None]] = field(default_factory=list)


class DictStorage(QueueStorage):
    """A :class:`~slimta.queue.storage.QueueStorage` in a dict; ids are uuid4 hex.

    ``clock`` gives the creation time recorded for each message (default
    :func:`time.time`). Operations on an id that is not stored raise
    :class:`KeyError`, except :meth:`remove`, which returns False.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._messages: dict[str, _Entry] = {}

    def _entry(self, id: str) -> _Entry:
        try:
            return self._messages[id]
        except KeyError:
            raise KeyError(id) from None

    async def write(self, envelope: Envelope, timestamp: float) -> str:
        meta, data = envelope_to_record(envelope)
        id = uuid.uuid4().hex
        self._messages[id] = _Entry(
            meta=json.dumps(meta, separators=(",", ":")),
            data=data,
            timestamp=float(timestamp),
            created=self._clock(),
            sender=meta["sender"],
            recipients=meta["recipients"],
        )
        return id

    async def get(self, id: str) -> StoredMessage:
        entry = self._entry(id)
        return StoredMessage(
            envelope=envelope_from_record(json.loads(entry.meta), entry.data),
            attempts=entry.attempts,
            delivered=set(entry.delivered),
            timestamp=entry.timestamp,
            last_reply=entry.last_reply,
            held=entry.held,
            history=list(entry.history),
        )

    async def set_timestamp(self, id: str, timestamp: float) -> None:
        self._entry(id).timestamp = float(timestamp)

    async def increment_attempts(self, id: str) -> int:
        entry = self._entry(id)
        entry.attempts += 1
        return entry.attempts

    async def set_recipients_delivered(self, id: str, indexes: list[int]) -> None:
        self._entry(id).delivered.update(int(i) for i in indexes)

    async def set_last_reply(self, id: str, reply: str | None) -> None:
        self._entry(id).last_reply = reply

    async def set_held(self, id: str, held: bool) -> None:
        self._entry(id).held = bool(held)

    async def append_history(self, id: str, attempted_at: float, reply: str | None) -> None:
        entry = self._entry(id)
        entry.history = history_with(entry.history, attempted_at, reply)

    async def record_attempt(self, id: str, timestamp: float, delivered: list[int],
                             last_reply: str | None, attempted_at: float | None = None) -> int:
        entry = self._entry(id)
        entry.delivered.update(int(i) for i in delivered)
        entry.attempts += 1
        entry.last_reply = last_reply
        if attempted_at is not None:
            entry.history = history_with(entry.history, attempted_at, last_reply)
        entry.timestamp = float(timestamp)
        return entry.attempts

    async def remove(self, id: str) -> bool:
        return self._messages.pop(id, None) is not None

    def _ordered(self) -> list[tuple[str, _Entry]]:
        # sorted() is stable: equal times stay in the order they were written.
        return sorted(self._messages.items(), key=lambda item: item[1].timestamp)

    async def load(self) -> list[tuple[float, str]]:
        return [(e.timestamp, id) for id, e in self._ordered() if not e.held]

    async def list(self) -> list[QueueEntry]:
        return [
            QueueEntry(
                id=id,
                sender=e.sender if e.sender is not None else "",
                recipients=[r for i, r in enumerate(e.recipients) if i not in e.delivered],
                attempts=e.attempts,
                next_attempt=e.timestamp,
                last_reply=e.last_reply,
                held=e.held,
                size=len(e.data),
                created=e.created,
            )
            for id, e in self._ordered()
        ]

    async def stats(self) -> dict:
        entries = self._messages.values()
        return {
            "messages": len(self._messages),
            "held": sum(1 for e in entries if e.held),
            "recipients": sum(
                sum(1 for i in range(len(e.recipients)) if i not in e.delivered) for e in entries
            ),
            "bytes": sum(len(e.data) for e in entries),
        }


class SharedDictStorage(DictStorage, SharedQueueStorage):
    """A DictStorage that several queues of one process share, with delivery leases.

    For tests and examples of shared queues without a database:
    :meth:`peer` gives another user (another ``owner``) of the same messages.
    Leases, claims and wake-ups follow
    :class:`~slimta.queue.storage.SharedQueueStorage`.
    """

    def __init__(self, *, owner: str | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock=clock)
        self.owner = owner or uuid.uuid4().hex[:8]
        self._leases: dict[str, tuple[str, float]] = {}  # id -> (owner, expiry)
        self._watchers: list[Callable[[], None]] = []

    def peer(self, owner: str | None = None) -> SharedDictStorage:
        """Another user of the same messages, leases and wake-ups."""
        other = SharedDictStorage(owner=owner, clock=self._clock)
        other._messages, other._leases, other._watchers = (
            self._messages, self._leases, self._watchers)
        return other

    def watch(self, wake: Callable[[], None]) -> None:
        self._watchers.append(wake)

    def _notify(self) -> None:
        for wake in self._watchers:
            wake()

    def _leased(self, id: str, now: float) -> bool:
        lease = self._leases.get(id)
        return lease is not None and lease[1] > now  # over at its expiry

    async def write(self, envelope: Envelope, timestamp: float) -> str:
        id = await super().write(envelope, timestamp)
        self._notify()
        return id

    async def set_timestamp(self, id: str, timestamp: float) -> None:
        await super().set_timestamp(id, timestamp)
        self._notify()

    async def set_held(self, id: str, held: bool) -> None:
        await super().set_held(id, held)
        if not held:
            self._notify()

    async def record_attempt(self, id: str, timestamp: float, delivered: list[int],
                             last_reply: str | None, attempted_at: float | None = None) -> int:
        attempts = await super().record_attempt(id, timestamp, delivered, last_reply,
                                                attempted_at)
        self._leases.pop(id, None)
        return attempts

    async def remove(self, id: str) -> bool:
        self._leases.pop(id, None)
        return await super().remove(id)

    async def claim(self, now: float, limit: int, lease: float) -> list[str]:
        ids = [id for id, e in self._ordered()
               if not e.held and e.timestamp <= now and not self._leased(id, now)][:limit]
        for id in ids:
            self._leases[id] = (self.owner, now + lease)
        return ids

    async def renew(self, ids: list[str], now: float, lease: float) -> list[str]:
        # only live leases: one is over at its expiry, even if nobody took it since
        kept = [id for id in ids
                if self._leases.get(id, ("", 0.0))[0] == self.owner and self._leased(id, now)]
        for id in kept:
            self._leases[id] = (self.owner, now + lease)
        return kept

    async def release(self, id: str, timestamp: float | None = None) -> None:
        # nothing to do without a lease of this owner's (another's, none, no message)
        if self._leases.get(id, ("", 0.0))[0] != self.owner:
            return
        del self._leases[id]
        if timestamp is not None:
            self._entry(id).timestamp = float(timestamp)
        self._notify()

    async def next_due(self, now: float) -> float | None:
        times = [max(e.timestamp, self._leases[id][1]) if self._leased(id, now) else e.timestamp
                 for id, e in self._messages.items() if not e.held]
        return min(times, default=None)
