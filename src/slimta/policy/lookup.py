"""LookupPolicy: rewrite addresses and add headers from the records of a lookup.

For each address it looks at (the recipients by default, the sender with
``on_sender=True``), the policy asks its lookup (see :mod:`slimta.lookup`)
with ``address``, ``localpart`` and ``domain`` (plus ``sender`` or
``recipient`` as ``role``) and acts on the record's fields:

``alias``
    The address is replaced. The value is a template filled with the
    original ``{localpart}``, ``{domain}`` and ``{address}``
    (``'{localpart}@example.net'``); for a recipient it may also be a list,
    or a comma-separated string, of several addresses (the recipient is
    expanded to all of them; duplicates, domains compared in any case, are
    dropped).
``verp``
    For the sender only: Variable Envelope Return Paths. The message is split
    into one envelope per recipient, each with the sender
    ``localpart+rcptlocal=rcptdomain@verp-domain``; the value is the VERP
    domain (``true``, ``'1'`` or ``'yes'`` mean the sender's own domain). The
    ``verp`` constructor argument turns it on for every sender that has a record.
``add_headers``
    Header fields to put on top of the message: a mapping of names to
    values, or that mapping as a JSON string (as a Redis hash stores it).
    Line breaks in values are replaced by spaces.

A lookup that fails raises :class:`~slimta.queue.QueueError` with
``451 4.3.0`` so the client tries again later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from slimta.lookup import Lookup, LookupError, address_kwargs
from slimta.policy import QueuePolicy
from slimta.queue import QueueError
from slimta.smtp.reply import Reply

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["LookupPolicy"]

log = logging.getLogger(__name__)

_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+\Z")
_TRUE = frozenset({"1", "true", "yes", "on"})


def _fill(template: str, kwargs: dict[str, str]) -> str:
    try:
        return template.format_map(kwargs)
    except (KeyError, IndexError, AttributeError, ValueError) as exc:
        raise LookupError(f"alias template {template!r} cannot be filled: {exc!r}") from exc


def _aliases(value: Any, kwargs: dict[str, str]) -> list[str]:
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list | tuple):
        items = [str(v) for v in value]
    else:
        raise LookupError(f"alias must be a string or a list, not {type(value).__name__}")
    return [_fill(item.strip(), kwargs) for item in items if item.strip()]


class LookupPolicy(QueuePolicy):
    """A queue policy acting on lookup records: aliases, VERP, added headers.

    ``lookup`` is any :class:`~slimta.lookup.Lookup`. ``on_sender`` and
    ``on_recipients`` choose which addresses are looked up. ``verp`` (a
    domain, or ``True`` for the sender's own domain) makes VERP senders for
    every sender that has a record, without a ``verp`` field in it.
    ``alias_field``, ``verp_field`` and ``headers_field`` name the record's
    fields. See the module documentation for what each does.
    """

    def __init__(
        self,
        lookup: Lookup,
        on_sender: bool = False,
        on_recipients: bool = True,
        *,
        verp: str | bool | None = None,
        alias_field: str = "alias",
        verp_field: str = "verp",
        headers_field: str = "add_headers",
        verp_separator: str = "+",
    ) -> None:
        self.lookup = lookup
        self.on_sender = on_sender
        self.on_recipients = on_recipients
        self.verp = verp
        self.alias_field = alias_field
        self.verp_field = verp_field
        self.headers_field = headers_field
        self.verp_separator = verp_separator

    async def _lookup(self, address: str, role: str) -> dict[str, Any] | None:
        try:
            return await self.lookup.lookup(**address_kwargs(address), role=role)
        except LookupError as exc:
            log.error("lookup of %s %r failed: %s", role, address, exc)
            raise QueueError(Reply("451", "4.3.0 Lookup failed, try again later")) from exc

    def _add_headers(self, envelope: Envelope, record: Mapping[str, Any]) -> None:
        value = record.get(self.headers_field)
        if not value:
            return
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                log.warning("%s is not a JSON object: %r", self.headers_field, value)
                return
        if not isinstance(value, Mapping):
            log.warning("%s is not a mapping: %r", self.headers_field, value)
            return
        for name, text in reversed(list(value.items())):  # each goes on top: keep their order
            if not isinstance(name, str) or not _FIELD_NAME.match(name):
                log.warning("bad header field name from lookup: %r", name)
                continue
            envelope.prepend_header(name, re.sub(r"[\r\n]+", " ", str(text)))

    async def apply(self, envelope: Envelope) -> list[Envelope] | None:
        """Rewrite ``envelope`` in place; a list of envelopes when VERP splits it."""
        sender_record = None
        if self.on_sender and envelope.sender:
            sender_record = await self._lookup(envelope.sender, "sender")
        rcpt_records: list[dict[str, Any] | None] = []
        if self.on_recipients and envelope.recipients:
            rcpt_records = list(await asyncio.gather(
                *(self._lookup(rcpt, "recipient") for rcpt in envelope.recipients)
            ))
        original_sender = envelope.sender
        try:
            if rcpt_records:
                self._rewrite_recipients(envelope, rcpt_records)
            if sender_record is None:
                return None
            self._add_headers(envelope, sender_record)
            alias = sender_record.get(self.alias_field)
            if alias:
                aliases = _aliases(alias, address_kwargs(envelope.sender or ""))
                if len(aliases) != 1:
                    raise LookupError(f"sender alias must be one address, not {aliases!r}")
                envelope.sender = aliases[0]
            verp = sender_record.get(self.verp_field, self.verp)
            if isinstance(verp, str) and verp.lower() in _TRUE:
                verp = True
            if verp and envelope.sender:
                return self._verp(envelope, verp)
        except LookupError as exc:
            log.error("lookup record for message from %r unusable: %s", original_sender, exc)
            raise QueueError(Reply("451", "4.3.0 Lookup failed, try again later")) from exc
        return None

    def _rewrite_recipients(
        self, envelope: Envelope, records: list[dict[str, Any] | None]
    ) -> None:
        new_rcpts: list[str] = []
        params: dict[str, Any] = {}
        seen: set[str] = set()
        for rcpt, record in zip(list(envelope.recipients), records, strict=True):
            targets = [rcpt]
            if record is not None:
                self._add_headers(envelope, record)
                alias = record.get(self.alias_field)
                if alias:
                    targets = _aliases(alias, address_kwargs(rcpt))
            for target in targets:
                local, at, domain = target.rpartition("@")
                folded = f"{local}{at}{domain.lower()}"  # local parts are case-sensitive
                if folded in seen:
                    continue
                seen.add(folded)
                new_rcpts.append(target)
                if rcpt in envelope.rcpt_params:
                    params[target] = dict(envelope.rcpt_params[rcpt])
        envelope.recipients = new_rcpts
        envelope.rcpt_params = params

    def _verp(self, envelope: Envelope, verp: str | bool) -> list[Envelope]:
        sender = address_kwargs(envelope.sender or "")
        domain = sender["domain"] if verp is True else str(verp)
        result = []
        for rcpt in envelope.recipients:
            rk = address_kwargs(rcpt)
            copy = envelope.copy([rcpt])
            copy.sender = (
                f"{sender['localpart']}{self.verp_separator}"
                f"{rk['localpart']}={rk['domain']}@{domain}"
            )
            result.append(copy)
        return result
