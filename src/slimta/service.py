"""The lifecycle every long-running part shares, and ``run_forever``.

``start()`` works both inside a running event loop and in a plain script
before any loop exists; in the second case the service begins when
:func:`run_forever` runs the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

__all__ = ["Service", "run_forever"]

_waiting: list[Service] = []  # started before a loop ran
_running: list[Service] = []  # serving on a loop


class Service:
    """Base of edges, queues and relays with a lifecycle.

    Subclasses implement :meth:`_prepare` (synchronous, may raise, e.g. bind),
    :meth:`_begin` (on the running loop) and :meth:`_end` (graceful stop).
    """

    _begun = False
    _stopped = False

    def _prepare(self) -> None:
        """Synchronous part of start(): acquire what can fail early."""

    async def _begin(self) -> None:
        """Start working on the running loop."""

    async def _end(self) -> None:
        """Stop gracefully."""

    def start(self) -> None:
        """Start the service: at once if a loop runs, else when run_forever() runs one."""
        self._prepare()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            _waiting.append(self)
            return
        self._start_on(loop)

    def _start_on(self, loop: asyncio.AbstractEventLoop) -> None:
        self._begun = True
        self._closed = loop.create_future()
        self._begin_task = loop.create_task(self._begin())
        _running.append(self)

    async def started(self) -> None:
        """Wait until the service has begun (start() itself does not wait)."""
        if self._begun:
            await self._begin_task

    async def stop(self) -> None:
        """Stop gracefully and wait until done."""
        if not self._begun:
            with contextlib.suppress(ValueError):
                _waiting.remove(self)
            self._stopped = True
            return
        if not self._stopped:
            self._stopped = True
            try:
                await self._begin_task
            finally:
                try:
                    await self._end()
                finally:
                    with contextlib.suppress(ValueError):
                        _running.remove(self)
                    if not self._closed.done():
                        self._closed.set_result(None)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until the service has stopped."""
        if self._begun:
            await asyncio.shield(self._closed)

    async def __aenter__(self):
        self.start()
        await self.started()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_forever(main=None) -> None:
    """Run the started services until SIGINT or SIGTERM, then stop them gracefully.

    ``main``, if given, is a coroutine function run first on the loop (it may
    start more services). Uses uvloop when it is installed.
    """

    async def _run() -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        while _waiting:
            _waiting.pop(0)._start_on(loop)
        if main is not None:
            await main()
        for service in list(_running):
            await service.started()
        await stop.wait()
        await asyncio.gather(*(s.stop() for s in reversed(list(_running))),
                             return_exceptions=True)

    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(_run())
