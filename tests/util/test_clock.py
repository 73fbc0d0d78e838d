"""SystemClock.wait: a cancelled waiter stays cancelled."""

from __future__ import annotations

import asyncio

import pytest

from slimta.util.clock import SystemClock


async def test_a_cancellation_as_the_event_is_set_is_not_lost():
    """The queue's scheduler loops on clock.wait: a lost cancellation made stop() hang."""
    clock = SystemClock()
    event = asyncio.Event()
    rounds = 0

    async def scheduler():
        nonlocal rounds
        while True:
            await clock.wait(event, 10)
            event.clear()
            rounds += 1

    task = asyncio.ensure_future(scheduler())
    await asyncio.sleep(0.01)
    event.set()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert rounds == 0


async def test_wait_returns_on_the_event_or_the_timeout():
    clock = SystemClock()
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    start = loop.time()
    await clock.wait(event, 0.05)
    assert 0.04 <= loop.time() - start < 1
    loop.call_later(0.01, event.set)
    start = loop.time()
    await clock.wait(event, 10)
    assert loop.time() - start < 1
