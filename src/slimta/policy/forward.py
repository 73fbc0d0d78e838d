"""Recipient rewriting with regular expressions: aliases, catch-alls, domain moves.

::

    forward = Forward()
    forward.add_mapping(r'^postmaster@', 'admin@')
    forward.add_mapping(r'@old\\.example\\.com$', '@example.com')
    queue.add_policy(forward)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from slimta.policy import QueuePolicy

if TYPE_CHECKING:
    from slimta.envelope import Envelope, RcptParams

__all__ = ["Forward"]

Pattern = str | re.Pattern[str]
Replacement = str | Callable[[re.Match[str]], str]
Rules = Mapping[Pattern, Replacement] | Iterable[tuple[Pattern, Replacement]]


class Forward(QueuePolicy):
    """Rewrites recipients with regular expression rules, the first match wins.

    Each recipient is tried against the rules in the order they were added;
    the first rule whose pattern is found in it (:meth:`re.Pattern.search`)
    rewrites it, replacing the first match (:func:`re.sub` with ``count=1``),
    and no other rule is tried. A rule whose result would be empty does not
    apply. Patterns are case-sensitive unless compiled otherwise (``(?i)`` or
    :data:`re.IGNORECASE`); anchor them (``^``, ``$``) to match whole addresses.

    The DSN parameters of a recipient (:attr:`Envelope.rcpt_params
    <slimta.envelope.Envelope.rcpt_params>`: ``NOTIFY``, ``ORCPT``) move with
    it to its new address, so the sender still gets the notifications asked
    for, about the address the sender used when ``ORCPT`` was given.

    ``mapping`` gives the first rules: a mapping of pattern to replacement, or
    an iterable of ``(pattern, replacement)`` pairs.
    """

    def __init__(self, mapping: Rules | None = None) -> None:
        self.rules: list[tuple[re.Pattern[str], Replacement]] = []
        if mapping is not None:
            items = mapping.items() if isinstance(mapping, Mapping) else mapping
            for pattern, repl in items:
                self.add_mapping(pattern, repl)

    def add_mapping(self, pattern: Pattern, repl: Replacement) -> None:
        """Add a rule after the others: rewrite what ``pattern`` matches to ``repl``.

        ``repl`` is a replacement string (with ``\\1`` or ``\\g<name>`` group
        references) or a function of the match, as for :func:`re.sub`.
        """
        self.rules.append((re.compile(pattern), repl))

    def rewrite(self, recipient: str) -> str:
        """``recipient`` as the first matching rule rewrites it, or unchanged."""
        for pattern, repl in self.rules:
            if pattern.search(recipient) is None:
                continue
            new = pattern.sub(repl, recipient, count=1)
            if new:
                return new
        return recipient

    def apply(self, envelope: Envelope) -> None:
        """Rewrite the recipients of ``envelope`` in place, with their DSN parameters."""
        recipients = envelope.recipients
        old = list(recipients)
        new = [self.rewrite(rcpt) for rcpt in old]
        if new == old:
            return
        recipients[:] = new
        params = envelope.rcpt_params
        if params:
            old_set = set(old)
            moved: dict[str, RcptParams] = {
                rcpt: value for rcpt, value in params.items() if rcpt not in old_set
            }
            for before, after in zip(old, new, strict=True):
                if before in params:
                    # Two recipients rewritten to one address: the first keeps its own.
                    moved.setdefault(after, params[before])
            envelope.rcpt_params = moved
