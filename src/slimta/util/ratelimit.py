"""Rate counters: how many times has ``key`` been hit in its current window?

A counter answers one question, atomically::

    count = await counter.hit("conn:192.0.2.7", window=60)

adds one (or ``amount``) to the key's count and returns the count in the
current window. The window is **fixed and starts at the key's first hit**:
``hit`` at time *t* on a key with no live window opens one that ends at
*t + window*; every hit until then adds to the same count; the first hit
after it opens a new window at one. (This is the classic ``INCR`` +
``EXPIRE`` scheme; it lets a burst of at most twice the limit through across
a window boundary, which abuse limits tolerate.) A window opened this way
also serves as a cool-down: ``hit(key, 900)`` once, then ``get(key) > 0``
for the next 900 seconds.

Two implementations:

- :class:`MemoryCounter`: a dict in this process; expired keys are swept out
  so memory stays bounded (``max_keys`` caps it hard). The clock is
  injectable (:class:`slimta.util.clock.ManualClock`) for tests.
- :class:`RedisCounter`: one Lua script per hit (``INCRBY`` and ``PEXPIRE``
  together, atomic on the server), so several hosts sharing one Redis see
  the same counts. Windows follow Redis's clock.
"""

from __future__ import annotations

import heapq
import itertools
import math
from typing import Any, Protocol, runtime_checkable

from slimta.util.clock import SystemClock
from slimta.util.redisclient import RedisClientOwner

__all__ = ["Counter", "MemoryCounter", "RedisCounter"]


@runtime_checkable
class Counter(Protocol):
    """What the edge limits need from a counter (see the module docstring)."""

    async def hit(self, key: str, window_seconds: float, amount: int = 1) -> int:
        """Add ``amount`` to ``key`` and return its count in the current window."""
        ...

    async def get(self, key: str) -> int:
        """The count of ``key`` in its current window, 0 when it has none."""
        ...


class MemoryCounter:
    """Counts in this process's memory (the default when no Redis is shared).

    ``clock`` has a ``time()`` method (default: the system clock). Expired
    keys are removed at least every ``sweep_interval`` seconds of the clock;
    when more than ``max_keys`` keys are live, those whose windows end first
    are forgotten (their counts start again), so memory stays bounded even
    under a flood of distinct keys.
    """

    def __init__(self, *, clock: Any = None, max_keys: int = 100_000,
                 sweep_interval: float = 60.0):
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.clock = clock if clock is not None else SystemClock()
        self.max_keys = max_keys
        self.sweep_interval = sweep_interval
        self._counts: dict[str, tuple[int, float]] = {}  # key -> (count, window end)
        self._ends: list[tuple[float, int, str]] = []  # heap of (window end, seq, key)
        self._seq = itertools.count()
        self._next_sweep = -math.inf

    def __len__(self) -> int:
        return len(self._counts)

    async def hit(self, key: str, window_seconds: float, amount: int = 1) -> int:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        now = self.clock.time()
        if now >= self._next_sweep:
            self._sweep(now)
        entry = self._counts.get(key)
        if entry is None or entry[1] <= now:
            end = now + window_seconds
            self._counts[key] = (amount, end)
            heapq.heappush(self._ends, (end, next(self._seq), key))
            if len(self._counts) > self.max_keys:
                self._evict(now)
            return amount
        count = entry[0] + amount
        self._counts[key] = (count, entry[1])
        return count

    async def get(self, key: str) -> int:
        entry = self._counts.get(key)
        if entry is None or entry[1] <= self.clock.time():
            return 0
        return entry[0]

    def _sweep(self, now: float) -> None:
        """Drop every key whose window has ended."""
        self._next_sweep = now + self.sweep_interval
        ends, counts = self._ends, self._counts
        while ends and ends[0][0] <= now:
            end, _, key = heapq.heappop(ends)
            entry = counts.get(key)
            if entry is not None and entry[1] == end:
                del counts[key]

    def _evict(self, now: float) -> None:
        """Over ``max_keys``: forget the windows that end first."""
        self._sweep(now)
        ends, counts = self._ends, self._counts
        while len(counts) > self.max_keys and ends:
            end, _, key = heapq.heappop(ends)
            entry = counts.get(key)
            if entry is not None and entry[1] == end:
                del counts[key]


# KEYS[1] = key, ARGV[1] = amount, ARGV[2] = window in milliseconds.
# A key without a TTL (new, or left behind by something else) gets one, so
# no count lives forever.
_HIT_SCRIPT = """
local n = redis.call('INCRBY', KEYS[1], ARGV[1])
if redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return n
"""


class RedisCounter(RedisClientOwner):
    """Counts in Redis, shared by every host that uses the same server and prefix.

    ``redis`` is a URL (``redis://127.0.0.1:6379/0``) or a
    ``redis.asyncio.Redis`` client. Every key is stored as ``prefix + key``.
    Each hit is one round trip running a Lua script, so counting is atomic
    across hosts and a key always expires. Redis errors propagate: the caller
    decides whether to fail open (the edge limits do, see
    :mod:`slimta.edge.limits`). Like any ``redis.asyncio`` client, use one
    counter from one event loop.
    """

    def __init__(self, redis: Any = "redis://127.0.0.1:6379/0", prefix: str = "slimta:rate:"):
        super().__init__(redis, prefix)
        self._script = self.client.register_script(_HIT_SCRIPT)

    async def hit(self, key: str, window_seconds: float, amount: int = 1) -> int:
        if window_seconds <= 0:
            raise ValueError("window_seconds must be positive")
        ms = max(1, math.ceil(window_seconds * 1000))
        return int(await self._script(keys=[self.prefix + key], args=[amount, ms]))

    async def get(self, key: str) -> int:
        value = await self.client.get(self.prefix + key)
        return int(value) if value is not None else 0
