"""Relays deliver envelopes; here are the errors they raise.

The Relay base class and the delivery relays come with the relay issue.
"""

from __future__ import annotations

from slimta.smtp.reply import Reply

__all__ = ["PermanentRelayError", "RelayError", "TransientRelayError"]


class RelayError(Exception):
    """A delivery attempt failed; ``reply`` says how, in SMTP terms."""

    default_reply = Reply("451", "4.0.0 Delivery failed")

    def __init__(self, msg: str | None = None, reply: Reply | None = None):
        self.reply = reply if reply is not None else self.default_reply.copy()
        super().__init__(msg or str(self.reply))


class TransientRelayError(RelayError):
    """The attempt failed but may succeed later."""

    default_reply = Reply("451", "4.0.0 Temporary delivery failure")


class PermanentRelayError(RelayError):
    """The attempt failed and will not succeed if retried."""

    default_reply = Reply("550", "5.0.0 Permanent delivery failure")
