"""ProxyQueue: no storage; the edge's client waits while the relay delivers."""

from __future__ import annotations

import logging

from slimta.relay import RelayError, TransientRelayError
from slimta.service import Service
from slimta.smtp.reply import Reply

__all__ = ["ProxyQueue"]

log = logging.getLogger(__name__)

_DELIVERED = Reply("250", "2.6.0 Message delivered")


class ProxyQueue(Service):
    """Hands each envelope straight to ``relay`` and answers with the relay's result.

    With an SmtpEdge in front this is an SMTP proxy: the client gets the
    relay's own reply after end-of-data. Nothing is stored, so nothing is
    retried: a failure goes back to the client, whose own queue retries.
    When some recipients were delivered and others failed, the client is
    told of the failure (it will send again, and the delivered recipients
    may get the message twice: a duplicate rather than a loss).
    """

    def __init__(self, relay):
        self.relay = relay
        self.queue_policies: list = []

    def add_policy(self, policy) -> None:
        """A :class:`~slimta.policy.QueuePolicy`, applied before relaying."""
        self.queue_policies.append(policy)

    async def enqueue(self, envelope) -> list:
        """Relay now; returns ``[(envelope, Reply | RelayError)]`` per resulting envelope."""
        from slimta.policy import apply_queue_policies

        envelopes = await apply_queue_policies(self.queue_policies, envelope)
        return [(env, await self._relay(env)) for env in envelopes]

    async def _relay(self, envelope):
        try:
            result = await self.relay.attempt(envelope, 0)
        except RelayError as exc:
            return exc
        except Exception:
            log.exception("relay raised for message from <%s>", envelope.sender)
            return TransientRelayError(reply=Reply("451", "4.3.0 Internal error in relay"))
        if isinstance(result, dict):
            failures = [r for r in result.values() if isinstance(r, RelayError)]
            if failures:
                transient = [f for f in failures if isinstance(f, TransientRelayError)]
                return (transient or failures)[0]
            replies = [r for r in result.values() if isinstance(r, Reply)]
            return replies[0] if replies else _DELIVERED.copy()
        return result if isinstance(result, Reply) else _DELIVERED.copy()
