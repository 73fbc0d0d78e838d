"""Queue policies for the standard header fields: ``Date``, ``Message-Id``, ``Received``.

* :class:`AddDateHeader` and :class:`AddMessageIdHeader` add the field when
  the message has none, at the end of the header block, as a submission
  server does for clients that leave them out (RFC 6409 section 8).
* :class:`AddReceivedHeader` puts a ``Received:`` trace field on top of the
  header block (RFC 5321 section 4.4), as every hop must.

All three are cheap on the usual path: they never make the envelope parse its
header block into an :class:`email.message.Message`, except to add a field
that is missing. The check for a field looks at the raw header bytes that
:meth:`~slimta.envelope.Envelope.flatten` hands back unchanged; the trace field
goes in front of them with :meth:`~slimta.envelope.Envelope.prepend_header`.

Dates are written in the RFC 5322 form with a numeric zone, in English
whatever the locale: ``Tue, 05 Mar 2024 14:07:09 +0000``.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import socket
import time
from functools import lru_cache
from typing import TYPE_CHECKING

from slimta import __version__
from slimta.policy import QueuePolicy

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["AddDateHeader", "AddMessageIdHeader", "AddReceivedHeader", "format_date", "has_field"]

_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_date(timestamp: float | None = None, localtime: bool = False) -> str:
    """An RFC 5322 date-time for ``timestamp`` (default: now), with a numeric zone.

    In UTC (``+0000``) by default; with ``localtime``, in the local zone with
    its offset (``-0500``). Day and month names are English, whatever the
    locale (unlike :func:`time.strftime`).
    """
    if timestamp is None:
        timestamp = time.time()
    if localtime:
        t = time.localtime(timestamp)
        offset = (t.tm_gmtoff or 0) // 60
    else:
        t = time.gmtime(timestamp)
        offset = 0
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset), 60)
    return (
        f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year} "
        f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {sign}{hours:02d}{minutes:02d}"
    )


# The header block as Envelope reads it: field lines (a name of printable
# US-ASCII but ':', then ':'), each followed by its continuation lines (starting
# with a space or tab). The first other line ends the fields.
_FIELDS_BEFORE = rb"\A(?:[\x21-\x39\x3b-\x7e]+:[^\n]*\n(?:[ \t][^\n]*\n)*)*?"


@lru_cache(maxsize=32)
def _field_pattern(name: str) -> re.Pattern[bytes]:
    return re.compile(_FIELDS_BEFORE + b"(?i:" + re.escape(name.encode("ascii")) + b"):")


def has_field(envelope: Envelope, name: str) -> bool:
    """True when the header block of ``envelope`` has a field ``name`` (any case).

    The same answer as ``name in envelope.headers``, but from the bytes
    :meth:`~slimta.envelope.Envelope.flatten` returns, which for an envelope
    whose fields were not changed are the received header block itself: so
    the header block is not parsed into a :class:`~email.message.Message`.
    """
    head, _ = envelope.flatten()
    return _field_pattern(name).match(head) is not None


class AddDateHeader(QueuePolicy):
    """Adds a ``Date:`` field when the message has none.

    The date is when the message was received (:attr:`Envelope.timestamp
    <slimta.envelope.Envelope.timestamp>`), or now if that is not set, in the
    RFC 5322 form with a numeric zone: UTC (``+0000``) unless ``localtime``.
    The field goes at the end of the header block, so that trace fields
    (``Received:``) stay together on top.
    """

    def __init__(self, localtime: bool = False) -> None:
        self.localtime = localtime

    def apply(self, envelope: Envelope) -> None:
        """Add ``Date:`` to ``envelope`` unless it has one."""
        if not has_field(envelope, "Date"):
            envelope.headers["Date"] = format_date(envelope.timestamp, self.localtime)


class AddMessageIdHeader(QueuePolicy):
    """Adds a ``Message-Id:`` field when the message has none.

    The id is ``<time.random@hostname>``: the time in microseconds and 64
    random bits (so ids made by several processes at once do not collide),
    then ``hostname`` (default: :func:`socket.getfqdn`). The field goes at the
    end of the header block.
    """

    def __init__(self, hostname: str | None = None) -> None:
        self.hostname = hostname or socket.getfqdn()

    def new_id(self) -> str:
        """A new unique msg-id, angle brackets included (RFC 5322 section 3.6.4)."""
        return f"<{time.time_ns() // 1000}.{secrets.token_hex(8)}@{self.hostname}>"

    def apply(self, envelope: Envelope) -> None:
        """Add ``Message-Id:`` to ``envelope`` unless it has one."""
        if not has_field(envelope, "Message-Id"):
            envelope.headers["Message-Id"] = self.new_id()


# Characters a client-given name must not bring into a Received field: spaces
# and controls (which would split it), and the ones that open or close
# comments, quote, or start the date (';').
_UNSAFE = re.compile(r'[\x00-\x20\x7f();\\"]')


def _clean(text: object) -> str | None:
    if not text:
        return None
    return _UNSAFE.sub("?", str(text))


@lru_cache(maxsize=4096)
def _address_literal(ip: str) -> str | None:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 section 4.1.3); None if not an IP.

    An IPv4 address seen through a dual-stack socket (``::ffff:192.0.2.1``)
    is written as IPv4; a zone (``%eth0``) is left out.
    """
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return f"[{addr.ipv4_mapped}]"
        return f"[IPv6:{addr.compressed}]"
    return f"[{addr}]"


class AddReceivedHeader(QueuePolicy):
    """Puts a ``Received:`` trace field on top of the header block (RFC 5321 section 4.4).

    ::

        Received: from mail.example.com (mx.example.com [192.0.2.1])
                by mx.example.org (slimta 0.1.0) with ESMTPS
                for <bob@example.org>; Tue, 05 Mar 2024 14:07:09 +0000

    The clauses are on lines of their own, as Postfix writes them (``from``;
    ``by``, ``with`` and ``id``; ``for`` and the date), each continuation line
    starting with a tab. They are:

    * ``from`` the name the client gave in EHLO/HELO (from
      :attr:`Envelope.client <slimta.envelope.Envelope.client>`), then in a
      comment its host name from reverse DNS, if known, and its IP address as
      an address literal. Without an EHLO name the host name or the address literal
      stands in; with none of the three the ``from`` clause is left out.
      Spaces, controls and ``( ) ; \\ "`` in the names become ``?``.
    * ``by`` :attr:`~slimta.envelope.Envelope.receiver`, or ``hostname``
      (default: :func:`socket.getfqdn`) when the envelope has none, with the
      software and version in a comment.
    * ``with`` the protocol (RFC 3848: ``ESMTPS`` when TLS was used, ``ESMTPA``
      when the client authenticated, ``ESMTPSA`` for both); left out when
      unknown. Who the client authenticated as is not written.
    * ``id`` what :meth:`received_id` returns; nothing by default, because a
      queue names a message only once it is stored, after its policies.
    * ``for`` the recipient, only when there is exactly one: listing several
      would tell each recipient who else got the message (Bcc included).
    * the date: :attr:`~slimta.envelope.Envelope.timestamp` (or now) in the
      RFC 5322 form in UTC (or the local zone with ``localtime``), or
      formatted by :func:`time.strftime` with ``date_format`` if given.

    The field is added with :meth:`~slimta.envelope.Envelope.prepend_header`,
    which does not parse the header block.
    """

    def __init__(
        self,
        date_format: str | None = None,
        hostname: str | None = None,
        localtime: bool = False,
    ) -> None:
        self.date_format = date_format
        self.hostname = hostname
        self.localtime = localtime

    def received_id(self, envelope: Envelope) -> str | None:
        """The ``id`` clause for ``envelope``, or ``None`` for none. Override to add one."""
        return None

    def build_date(self, timestamp: float | None) -> str:
        """The date-time at the end of the field."""
        if self.date_format is None:
            return format_date(timestamp, self.localtime)
        if timestamp is None:
            timestamp = time.time()
        t = time.localtime(timestamp) if self.localtime else time.gmtime(timestamp)
        return time.strftime(self.date_format, t)

    def build_value(self, envelope: Envelope) -> str:
        """The value of the ``Received:`` field for ``envelope``."""
        client = envelope.client or {}
        lines: list[str] = []
        ip = client.get("ip")
        literal = _address_literal(str(ip)) if ip else None
        host = _clean(client.get("host"))
        origin = _clean(client.get("name")) or host or literal
        if origin:
            if literal:
                tcp_info = f"{host} {literal}" if host else literal
                lines.append(f"from {origin} ({tcp_info})")
            else:
                lines.append(f"from {origin}")
        by = _clean(envelope.receiver or self.hostname)
        if not by:
            by = self.hostname = socket.getfqdn()
        line = f"by {by} (slimta {__version__})"
        protocol = _clean(client.get("protocol"))
        if protocol:
            line += f" with {protocol}"
        queue_id = _clean(self.received_id(envelope))
        if queue_id:
            line += f" id {queue_id}"
        lines.append(line)
        recipients = envelope.recipients
        if len(recipients) == 1:
            lines.append(f"for <{recipients[0]}>")
        lines[-1] += "; " + self.build_date(envelope.timestamp)
        return "\n\t".join(lines)

    def apply(self, envelope: Envelope) -> None:
        """Put the ``Received:`` field on top of ``envelope``'s headers."""
        envelope.prepend_header("Received", self.build_value(envelope))
