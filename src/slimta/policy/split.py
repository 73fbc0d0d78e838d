"""Splitting an envelope with several recipients into several envelopes.

Useful before relays that deliver one recipient or one domain at a time,
such as an MX relay, and to give each recipient a schedule of its own.
Each new envelope is an independent :meth:`~slimta.envelope.Envelope.copy`
with its share of the recipients and their DSN parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from slimta.policy import QueuePolicy

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["RecipientDomainSplit", "RecipientSplit"]


class RecipientSplit(QueuePolicy):
    """One envelope per recipient, in the order of the recipients.

    An envelope with one recipient (or none) is kept as it is.
    """

    def apply(self, envelope: Envelope) -> list[Envelope] | None:
        """The copies of ``envelope``, one per recipient; ``None`` if there is one."""
        recipients = envelope.recipients
        if len(recipients) <= 1:
            return None
        return [envelope.copy([rcpt]) for rcpt in recipients]


def _domain_key(recipient: str) -> str | None:
    """The domain of ``recipient`` in lower case; ``None`` when it has none."""
    _, at, domain = recipient.rpartition("@")
    if not at or not domain:
        return None
    return domain.lower()


class RecipientDomainSplit(QueuePolicy):
    """One envelope per recipient domain (compared without regard to case).

    The envelopes come in the order in which their domains first appear among
    the recipients, and keep the recipients in their order. A recipient with
    no domain (such as the bare ``postmaster`` of RFC 5321 section 4.1.1.3)
    gets an envelope of its own, in its place. An envelope whose recipients
    all share one domain is kept as it is.
    """

    def apply(self, envelope: Envelope) -> list[Envelope] | None:
        """The copies of ``envelope``, one per domain; ``None`` if there is one."""
        groups: dict[object, list[str]] = {}
        for index, rcpt in enumerate(envelope.recipients):
            domain = _domain_key(rcpt)
            groups.setdefault(index if domain is None else domain, []).append(rcpt)
        if len(groups) <= 1:
            return None
        return [envelope.copy(rcpts) for rcpts in groups.values()]
