"""Clocks for the queue's scheduler: the system's, and one that tests move by hand."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time

__all__ = ["ManualClock", "SystemClock"]


class SystemClock:
    """Wall-clock time (stored in queues, so it must survive restarts)."""

    def time(self) -> float:
        return time.time()

    async def wait(self, event: asyncio.Event, timeout: float | None) -> None:
        """Return when ``event`` is set or ``timeout`` seconds have passed."""
        if (timeout is not None and timeout <= 0) or event.is_set():
            return
        # not asyncio.wait_for: on Python 3.11 it can swallow a cancellation that
        # arrives as the event is set, and a cancelled scheduler would run on
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait((waiter,), timeout=timeout)
        finally:
            waiter.cancel()


class ManualClock:
    """A clock that only moves when told: ``await clock.advance(300)``.

    Lets a test run a retry schedule of days in milliseconds.
    """

    def __init__(self, start: float = 1_000_000_000.0):
        self._now = start
        self._sleepers: list[tuple[float, int, asyncio.Future]] = []
        self._seq = itertools.count()

    def time(self) -> float:
        return self._now

    async def wait(self, event: asyncio.Event, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        deadline = math.inf if timeout is None else self._now + timeout
        heapq.heappush(self._sleepers, (deadline, next(self._seq), fut))
        waiter = loop.create_task(event.wait())
        try:
            await asyncio.wait({fut, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not fut.done():
                fut.cancel()

    async def advance(self, seconds: float) -> None:
        """Move time forward and wake whoever was waiting until then."""
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)
        await asyncio.sleep(0)
