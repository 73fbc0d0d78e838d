"""BlackholeRelay: accepts every message and throws it away."""

from __future__ import annotations

from slimta.envelope import Envelope
from slimta.relay import Relay

__all__ = ["BlackholeRelay"]


class BlackholeRelay(Relay):
    """Reports every recipient delivered and keeps nothing.

    For benchmarks, tests and sinks. :attr:`count` is the number of messages
    (attempts) it has taken and :attr:`recipient_count` the number of
    recipients among them. Relay policies still run before each attempt.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.recipient_count = 0

    def _attempt(self, envelope: Envelope, attempts: int) -> None:
        self.count += 1
        self.recipient_count += len(envelope.recipients)
        return None
