"""Policies: changes made to envelopes before they are queued or relayed.

A *queue policy* runs once, when the queue takes a message and before it is
stored, so what it changes is stored with the message: adding headers,
rewriting recipients, splitting one envelope into several. A *relay policy*
runs before every delivery attempt and what it changes is not stored: things
that belong to delivery, such as a DKIM signature made with today's key.

Both kinds are classes with an ``apply(envelope)`` method, which may be a plain
method or a coroutine (``async def``)::

    class AddQueuedHeader(QueuePolicy):
        def apply(self, envelope):
            envelope.prepend_header('X-Queued-At', str(time.time()))

    queue.add_policy(AddQueuedHeader())

A queue policy changes the envelope in place and returns ``None``, or returns
a list of envelopes that replace it (each stored as a message of its own, and
each given to the policies that follow). A policy refuses a message by raising
:class:`~slimta.queue.QueueError` (the edge gives the client its reply); a relay
policy fails an attempt by raising a
:class:`~slimta.relay.TransientRelayError` or
:class:`~slimta.relay.PermanentRelayError`.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["QueuePolicy", "RelayPolicy", "apply_queue_policies"]


class QueuePolicy:
    """Base of the policies the queue applies before it stores a message.

    Subclasses override :meth:`apply`.
    """

    def apply(
        self, envelope: Envelope
    ) -> list[Envelope] | Awaitable[list[Envelope] | None] | None:
        """Change ``envelope`` in place, or return the envelopes that replace it.

        ``None`` (or an empty list) keeps ``envelope``, changed or not; a list
        of envelopes replaces it, for instance copies made with
        :meth:`~slimta.envelope.Envelope.copy` that share the recipients out.
        May be a coroutine. Raise :class:`~slimta.queue.QueueError` to refuse
        the message.
        """
        raise NotImplementedError


class RelayPolicy:
    """Base of the policies a relay applies before each delivery attempt.

    Subclasses override :meth:`apply`. Changes are made to the envelope that
    is about to be delivered; the queue does not store them.
    """

    def apply(self, envelope: Envelope) -> Awaitable[None] | None:
        """Change ``envelope`` before an attempt; the return value is ignored.

        May be a coroutine. Raise :class:`~slimta.relay.TransientRelayError`
        or :class:`~slimta.relay.PermanentRelayError` to fail the attempt for
        all recipients.
        """
        raise NotImplementedError


QueuePolicyLike = QueuePolicy | Callable[[Any], Any]


async def apply_queue_policies(
    policies: Iterable[QueuePolicyLike], envelope: Envelope
) -> list[Envelope]:
    """Apply ``policies`` in order to ``envelope``; return the envelopes to store.

    Each policy is applied to every envelope the policies before it produced:
    a returned list replaces the envelope it was given (in its place, so the
    order is kept), ``None`` or an empty list keeps it. An empty list does
    *not* drop the message: a policy that wants to refuse one raises
    :class:`~slimta.queue.QueueError`. ``apply`` may return an awaitable,
    which is awaited. Anything with an ``apply`` method is a policy; so is a
    plain function or coroutine function of one envelope.

    Exceptions from a policy propagate to the caller; a result that is neither
    ``None`` nor iterable is a :class:`TypeError`.
    """
    envelopes = [envelope]
    for policy in policies:
        apply = getattr(policy, "apply", policy)
        produced: list[Envelope] = []
        for env in envelopes:
            result = apply(env)
            if result is not None and inspect.isawaitable(result):
                result = await result
            if result is None:
                produced.append(env)
                continue
            try:
                replacements = list(result)
            except TypeError:
                raise TypeError(
                    f"{policy!r} returned {type(result).__name__}, "
                    "not None or a list of envelopes"
                ) from None
            if replacements:
                produced.extend(replacements)
            else:
                produced.append(env)
        envelopes = produced
    return envelopes
