"""Queues: durable storage, scheduling, retries and bounces.

Only :class:`QueueError` lives here so far; the Queue itself comes with the queue issue.
"""

from __future__ import annotations

from slimta.smtp.reply import Reply

__all__ = ["QueueError"]


class QueueError(Exception):
    """A queue could not take responsibility for a message.

    ``reply`` is what the edge tells the client (default ``451 4.3.0``).
    """

    def __init__(self, reply: Reply | None = None, message: str | None = None):
        self.reply = reply if reply is not None else Reply("451", "4.3.0 Error queuing message")
        super().__init__(message or str(self.reply))
