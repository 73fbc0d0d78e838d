"""Relays deliver envelopes: the base class and the errors they raise.

``await relay.attempt(envelope, attempts)`` returns ``None`` or a ``Reply``
when every recipient was delivered, raises :class:`TransientRelayError` or
:class:`PermanentRelayError` when all failed alike, or returns
``{recipient: None | Reply | RelayError}`` for results per recipient.
"""

from __future__ import annotations

from slimta.service import Service
from slimta.smtp.reply import Reply
from slimta.util.aio import maybe_await

__all__ = ["PermanentRelayError", "Relay", "RelayError", "TransientRelayError"]


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


class Relay(Service):
    """Base of every relay: runs the relay policies, then :meth:`_attempt`.

    Subclasses implement ``_attempt(envelope, attempts)`` (plain or async)
    with the result contract in this module's docstring.
    """

    def __init__(self):
        self.relay_policies: list = []

    def add_policy(self, policy) -> None:
        """A :class:`~slimta.policy.RelayPolicy` applied before each attempt."""
        self.relay_policies.append(policy)

    async def attempt(self, envelope, attempts: int):
        """Deliver ``envelope`` (its ``attempts``-th try, counting from 0)."""
        for policy in self.relay_policies:
            await maybe_await(policy.apply(envelope))
        return await maybe_await(self._attempt(envelope, attempts))

    def _attempt(self, envelope, attempts: int):
        raise NotImplementedError
