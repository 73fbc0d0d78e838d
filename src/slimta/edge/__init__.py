"""Edges receive messages and hand them to a queue.

An edge owns its conversation with the client; once it has an
:class:`~slimta.envelope.Envelope` it calls :meth:`Edge.handoff`, and the
reply the client gets says whether the queue took responsibility.
"""

from __future__ import annotations

import socket
import time

from slimta.service import Service
from slimta.util.listeners import bind_listener

__all__ = ["Edge", "ListeningEdge"]


class Edge(Service):
    """Base of all edges: holds the queue and stamps envelopes on handoff.

    ``queue`` is anything with ``async enqueue(envelope)`` returning
    ``[(envelope, id_or_QueueError), ...]``. ``hostname`` names this host in
    replies and in ``envelope.receiver`` (default: ``socket.getfqdn()``).
    """

    def __init__(self, queue, hostname: str | None = None):
        self.queue = queue
        self.hostname = hostname or socket.getfqdn()

    async def handoff(self, envelope) -> list:
        """Give ``envelope`` to the queue; returns the queue's results."""
        envelope.receiver = self.hostname
        envelope.timestamp = time.time()
        return await self.queue.enqueue(envelope)


class ListeningEdge(Edge):
    """An edge on a listening TCP socket: ``listener`` is ``(host, port)`` or a bound socket.

    Subclasses set ``listener`` and ``backlog``; the socket is bound by
    ``start()`` (or :meth:`handover_socket`) and served by their ``_begin``.
    """

    listener: object
    backlog: int
    _sock: socket.socket | None = None

    @property
    def address(self) -> tuple:
        """The bound (host, port), e.g. to learn the port after binding port 0."""
        return self._sock.getsockname()[:2]

    def _prepare(self) -> None:
        if self._sock is None:
            self._sock = bind_listener(self.listener, self.backlog)

    def handover_socket(self) -> socket.socket:
        """A duplicate of the bound listening socket, for an edge that takes over (reload).

        The duplicate keeps listening (connections wait in the backlog) after
        this edge closes its own descriptor when it stops.
        """
        self._prepare()
        return self._sock.dup()
