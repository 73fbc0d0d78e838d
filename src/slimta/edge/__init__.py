"""Edges receive messages and hand them to a queue.

An edge owns its conversation with the client; once it has an
:class:`~slimta.envelope.Envelope` it calls :meth:`Edge.handoff`, and the
reply the client gets says whether the queue took responsibility.
"""

from __future__ import annotations

import socket
import time

from slimta.service import Service

__all__ = ["Edge"]


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
