"""A pool of reusable connections to one SMTP/LMTP destination."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from slimta.relay import RelayError, TransientRelayError
from slimta.relay.smtp.session import ClientSession, SessionOptions

__all__ = ["ConnectionPool"]

log = logging.getLogger(__name__)


class ConnectionPool:
    """Connections to ``host:port`` (or a Unix socket ``path``), reused between deliveries.

    At most ``size`` connections exist at once (None: no bound). An idle
    connection is kept up to ``idle_timeout`` seconds and checked before it
    is reused; a reused connection that turns out dead before the server
    accepted MAIL is replaced by a new one, once.
    """

    def __init__(self, options: SessionOptions, host: str | None = None, port: int | None = None,
                 path: str | None = None, size: int | None = None, idle_timeout: float = 10.0,
                 server_name: str | None = None):
        self.options = options
        self.server_name = server_name
        self.host = host
        self.port = port
        self.path = path
        self.idle_timeout = idle_timeout
        self._slots = asyncio.Semaphore(size) if size else None
        self._idle: list[ClientSession] = []
        self._reaper: asyncio.TimerHandle | None = None

    async def deliver(self, envelope) -> dict:
        """Deliver on a pooled connection; ``{recipient: result}`` or raises RelayError."""
        if self._slots is not None:
            await self._slots.acquire()
        try:
            session = self._take()
            reused = session is not None
            if session is None:
                session = await self._connect()
            try:
                results = await session.deliver(envelope)
            except RelayError as exc:
                session.abort()
                if (not reused or session.mail_answered
                        or not isinstance(exc, TransientRelayError)):
                    raise
                # a stale connection from the pool (lost, or a 421, before any
                # reply to MAIL: nothing was accepted): once more on a fresh one
                session = await self._connect()
                results = await session.deliver(envelope)
            self._give_back(session)
            return results
        finally:
            if self._slots is not None:
                self._slots.release()

    async def _connect(self) -> ClientSession:
        return await ClientSession.connect(self.options, self.host, self.port, self.path,
                                           self.server_name)

    def _take(self) -> ClientSession | None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        while self._idle:
            session = self._idle.pop()
            if session.usable and now - session.last_used < self.idle_timeout:
                return session
            self._retire(session)
        return None

    def _give_back(self, session: ClientSession) -> None:
        if not session.usable:
            session.abort()
            return
        loop = asyncio.get_running_loop()
        session.last_used = loop.time()
        self._idle.append(session)
        if self._reaper is None:
            self._reaper = loop.call_later(self.idle_timeout, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        keep = []
        for session in self._idle:
            if now - session.last_used >= self.idle_timeout or not session.usable:
                self._retire(session)
            else:
                keep.append(session)
        self._idle = keep
        if keep:
            self._reaper = loop.call_later(self.idle_timeout, self._reap)

    def _retire(self, session: ClientSession) -> None:
        if session.usable:
            task = asyncio.get_running_loop().create_task(session.quit())
            task.add_done_callback(lambda t: t.exception() if not t.cancelled() else None)
        else:
            session.abort()

    async def close(self) -> None:
        """QUIT every idle connection."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle, self._idle = self._idle, []
        with contextlib.suppress(Exception):
            await asyncio.gather(*(s.quit() for s in idle), return_exceptions=True)
