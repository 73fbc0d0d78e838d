"""Delivery status notifications: bounces, delay warnings and success reports.

:func:`build_dsn` turns an :class:`~slimta.envelope.Envelope` and the
outcome for some of its recipients (:class:`RecipientStatus`) into a new
envelope: a DSN (RFC 3464) from the null sender ``<>`` to the original
sender, or ``None`` when no DSN is due.

The message is a ``multipart/report; report-type=delivery-status``
(RFC 6522) in three parts:

1. ``text/plain``: what happened, for people.
2. ``message/delivery-status``: the same for programs. One block of
   per-message fields (``Original-Envelope-Id`` when the sender gave an
   ENVID, ``Reporting-MTA``, ``Arrival-Date`` when known), then one block per
   recipient (``Original-Recipient`` when the sender gave an ORCPT,
   ``Final-Recipient``, ``Action``, ``Status``, ``Remote-MTA`` when known,
   ``Diagnostic-Code``, ``Last-Attempt-Date`` when known), in the order of
   the RFC 3464 grammar.
3. The original message: ``message/rfc822`` with all of it, or
   ``text/rfc822-headers`` with its header section only.

Decisions where the RFCs leave a choice:

* **Who gets a DSN** (RFC 3461 §4.1). Never the null sender: a bounce is
  never bounced. Per recipient: ``failed`` unless NOTIFY was given without
  FAILURE (NEVER included); ``delivered`` only with NOTIFY=SUCCESS;
  ``delayed`` only with NOTIFY=DELAY. Without NOTIFY, RFC 3461 lets the MTA
  choose between FAILURE and FAILURE,DELAY: we send no delay warnings then
  (as Postfix does unless configured to). Recipients that want no DSN are
  left out; with none left there is no DSN.
* **What is returned** (RFC 3461 §4.3). The whole message only in a
  ``failed`` DSN, and only when RET is not HDRS and the message is at most
  ``max_returned_size`` octets; otherwise the header section alone (RET=FULL
  asks for the message in *failed* DSNs only, so delay warnings and success
  reports carry the header section). A header section larger than
  ``max_returned_size`` is cut after the last whole field that fits.
* **Diagnostic-Code** is the reply the recipient got, as
  ``smtp; <code> <enhanced code> <text>``, for ``failed`` and ``delayed``;
  for ``delivered`` only when ``remote_mta`` is given (the reply then came
  from that MTA, not from us). A multi-line reply becomes one line; control
  characters (CR and LF included) become spaces, so reply text can never
  start a field or a MIME part of its own. Long values are folded at
  whitespace near 78 columns; only a word longer than 900 octets (never an
  address, which is shorter) is cut, so no line exceeds the 998-octet limit.
* **Status** is the reply's enhanced status code (RFC 3463) as it is, even
  when its class differs from the action (a message that expired after
  4.4.1 errors is ``Action: failed`` with ``Status: 4.4.1``, as with
  Postfix); without one it is ``X.0.0`` from the reply code's class, or
  from the action when the reply code is not 2xx/4xx/5xx.
* **Internationalized mail** (RFC 6533, RFC 6532). When the sender's
  address is not ASCII, or the original came with SMTPUTF8 and anything the
  DSN repeats (addresses, ORCPT, reply text, the original header section)
  is not ASCII, the DSN is an SMTPUTF8 message itself: the report is
  ``message/global-delivery-status`` with UTF-8 in it, and the original is
  ``message/global`` or ``message/global-headers``. Otherwise the DSN is
  plain RFC 3464, ASCII in the report: non-ASCII addresses are written with
  the ``utf-8`` address type in the 7-bit ``utf-8-addr-xtext`` form
  (``\\x{HEX}``) and other non-ASCII text as ``?``.
* **8-bit and binary originals** are returned unchanged with
  ``Content-Transfer-Encoding: 8bit`` or ``binary`` (a ``message/*`` part may
  not be encoded otherwise, RFC 2046 §5.2.1) and the DSN envelope's
  :attr:`~slimta.envelope.Envelope.body` says ``8BITMIME`` or
  ``BINARYMIME``; a relay to a 7-bit peer downgrades it with
  :meth:`~slimta.envelope.Envelope.encode_7bit`. Line endings of the
  returned copy are made CRLF, except in the body of a binary original.
"""

from __future__ import annotations

import re
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass
from email.generator import BytesGenerator
from email.headerregistry import Address
from email.message import EmailMessage, MIMEPart
from email.policy import SMTP, SMTPUTF8, EmailPolicy
from email.utils import formatdate, make_msgid
from io import BytesIO

from slimta.envelope import Envelope
from slimta.smtp.reply import Reply

__all__ = [
    "ACTIONS",
    "DEFAULT_MAX_RETURNED_SIZE",
    "RecipientStatus",
    "build_dsn",
    "dsn_requested",
]

#: The RFC 3464 ``Action`` values :func:`build_dsn` produces.
ACTIONS = ("failed", "delayed", "delivered")

#: The largest original (octets) returned whole in a ``failed`` DSN.
DEFAULT_MAX_RETURNED_SIZE = 256 * 1024

_SUBJECTS = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delivery Status Notification (Delay)",
    "delivered": "Delivery Status Notification (Success)",
}
_NOTIFY_KEYWORD = {"failed": "FAILURE", "delayed": "DELAY", "delivered": "SUCCESS"}
_DEFAULT_STATUS = {"failed": "5.0.0", "delayed": "4.0.0", "delivered": "2.0.0"}

# C0 and C1 controls, DEL and the Unicode line and paragraph separators.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_ESC = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_REPLY_CODE = re.compile(r"[2-5]\d\d")
# RFC 6533 QCHAR: printable ASCII except SP, '\', '+' and '='.
_QCHAR = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"\\", "+", "="}
_MAX_LINE = 78
_MAX_WORD_OCTETS = 900
_WRAP = 76
_CTE_RANK = {"7bit": 0, "quoted-printable": 0, "8bit": 1, "binary": 2}


@dataclass
class RecipientStatus:
    """The outcome for one recipient, as a DSN reports it.

    ``reply`` is the reply that decided it (from the remote MTA, or made up
    locally); ``remote_mta`` the host name of the MTA that gave it, when it
    came from one; ``last_attempt`` when delivery was last attempted
    (seconds since the epoch).
    """

    recipient: str
    reply: Reply
    remote_mta: str | None = None
    last_attempt: float | None = None


def dsn_requested(envelope: Envelope, recipient: str, action: str = "failed") -> bool:
    """True when ``recipient``'s NOTIFY parameter (RFC 3461 §4.1) asks for this DSN.

    ``failed``: NOTIFY absent or with FAILURE. ``delayed``: NOTIFY with
    DELAY. ``delivered``: NOTIFY with SUCCESS. NOTIFY=NEVER asks for none.
    Whether the envelope's sender can get a DSN at all is not checked here.
    """
    if action not in _NOTIFY_KEYWORD:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    notify = envelope.notify(recipient)
    if notify is None:
        return action == "failed"
    return _NOTIFY_KEYWORD[action] in (item.upper() for item in notify)


def build_dsn(
    envelope: Envelope,
    statuses: Iterable[RecipientStatus],
    *,
    action: str = "failed",
    reporting_mta: str,
    arrival: float | None = None,
    max_returned_size: int = DEFAULT_MAX_RETURNED_SIZE,
    now: float | None = None,
) -> Envelope | None:
    """Build the DSN reporting ``action`` for ``statuses`` of ``envelope``, or None.

    ``action`` is ``'failed'``, ``'delayed'`` or ``'delivered'`` and applies
    to every status given. ``reporting_mta`` is this host's name (in
    ``Reporting-MTA``, ``From: MAILER-DAEMON@...`` and the ``Message-Id``).
    ``arrival`` is when the original was received (default
    ``envelope.timestamp``; no ``Arrival-Date`` when neither is known).
    ``max_returned_size`` caps the original returned whole; ``now`` is the
    DSN's ``Date`` (default: the current time).

    Returns None when the original has the null sender or no recipient's
    NOTIFY asks for this DSN (see :func:`dsn_requested`). Otherwise a new
    envelope from ``''`` to the original sender, its message parsed (so
    :meth:`~slimta.envelope.Envelope.flatten` works), ``smtputf8`` and
    ``body`` set to what it needs, ``timestamp`` and ``receiver`` unset.
    """
    if action not in _NOTIFY_KEYWORD:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, not {action!r}")
    if not envelope.sender:
        return None
    wanted = [s for s in statuses if dsn_requested(envelope, s.recipient, action)]
    if not wanted:
        return None
    now = time.time() if now is None else now
    if arrival is None:
        arrival = envelope.timestamp

    head, body = envelope.flatten()
    full = (
        action == "failed"
        and (envelope.ret or "").upper() != "HDRS"
        and len(head) + len(body) <= max_returned_size
    )
    header_section = _header_section(head)
    if full:
        if _transfer_encoding(body) != "binary":
            body = _crlf(body)
        # The empty line ends the header section; with no header section it
        # keeps the body from being read as one.
        original = header_section + b"\r\n" + body
    else:
        original = _truncate_fields(header_section, max_returned_size)

    sender = _strip_controls(envelope.sender)
    repeated = [
        text
        for status in wanted
        for text in (status.recipient, envelope.orcpt(status.recipient) or "",
                     status.reply.message, status.remote_mta or "")
    ]
    utf8 = not sender.isascii() or (
        envelope.smtputf8
        and not (header_section.isascii() and all(text.isascii() for text in repeated))
    )
    host = _hostname(reporting_mta)
    policy = (SMTPUTF8 if utf8 else SMTP).clone(max_line_length=_MAX_LINE)

    report = _report(envelope, wanted, action, host, arrival, utf8)
    parts = [
        _text_part(policy, _human_text(wanted, action, host, full), utf8),
        _raw_part(
            policy,
            "message/global-delivery-status" if utf8 else "message/delivery-status",
            "Delivery report",
            report,
        ),
    ]
    if full:
        ctype = "message/global" if utf8 else "message/rfc822"
        description = "Undelivered Message"
    else:
        ctype = "message/global-headers" if utf8 else "text/rfc822-headers"
        description = "Undelivered Message Headers" if action == "failed" else "Message Headers"
    parts.append(_raw_part(policy, ctype, description, original))

    msg = EmailMessage(policy=policy)
    msg["From"] = Address("Mail Delivery System", "MAILER-DAEMON", host)
    msg["To"] = _to_header(sender)
    msg["Subject"] = _SUBJECTS[action]
    msg["Date"] = formatdate(now, localtime=True)
    msg["Message-Id"] = make_msgid(domain=host)
    msg["Auto-Submitted"] = "auto-replied"
    msg["MIME-Version"] = "1.0"
    msg["Content-Type"] = "multipart/report; report-type=delivery-status"
    # A multipart is labelled with the widest encoding of its parts (RFC 2045 §6.4).
    cte = ("7bit", "8bit", "binary")[
        max(_CTE_RANK[str(p.get("Content-Transfer-Encoding", "7bit")).lower()] for p in parts)
    ]
    if cte != "7bit":
        msg["Content-Transfer-Encoding"] = cte
    msg.preamble = "This is a MIME-formatted message (a delivery status notification)."
    for part in parts:
        msg.attach(part)

    out = BytesIO()
    _DsnGenerator(out, mangle_from_=False, policy=policy).flatten(msg)
    dsn = Envelope("", [envelope.sender])
    dsn.parse(out.getvalue())
    dsn.smtputf8 = utf8
    dsn.body = {"8bit": "8BITMIME", "binary": "BINARYMIME"}.get(cte, "7BIT")
    return dsn


# --- the parts ------------------------------------------------------------------


class _DsnGenerator(BytesGenerator):
    """A BytesGenerator that writes a ``message/*`` part given as text byte for byte.

    The email package represents ``message/delivery-status`` as a list of
    header blocks and refolds them, and writes other ``message/*`` text
    payloads as ASCII only; our payloads are already exactly what must be
    sent (8-bit text as surrogate escapes).
    """

    def _write_raw(self, msg: EmailMessage) -> bool:
        payload = msg._payload
        if not isinstance(payload, str):
            return False
        self._fp.write(payload.encode("ascii", "surrogateescape"))
        return True

    def _handle_message_delivery_status(self, msg: EmailMessage) -> None:
        if not self._write_raw(msg):
            super()._handle_message_delivery_status(msg)

    def _handle_message(self, msg: EmailMessage) -> None:
        if not self._write_raw(msg):
            super()._handle_message(msg)


def _text_part(policy: EmailPolicy, text: str, utf8: bool) -> MIMEPart:
    """The human-readable part: US-ASCII, or UTF-8 (8bit in an SMTPUTF8 DSN, else QP)."""
    part = MIMEPart(policy=policy)
    if text.isascii():
        part.set_content(text, charset="us-ascii", cte="7bit")
    else:
        part.set_content(text, charset="utf-8", cte="8bit" if utf8 else "quoted-printable")
    part["Content-Description"] = "Notification"
    return part


def _raw_part(policy: EmailPolicy, ctype: str, description: str, data: bytes) -> MIMEPart:
    """A part whose body is ``data``, byte for byte."""
    part = MIMEPart(policy=policy)
    part["Content-Type"] = ctype
    part["Content-Description"] = description
    cte = _transfer_encoding(data)
    if cte != "7bit":
        part["Content-Transfer-Encoding"] = cte
    part.set_payload(data.decode("ascii", "surrogateescape"))
    return part


def _human_text(statuses: list[RecipientStatus], action: str, host: str, full: bool) -> str:
    """The text/plain part: what happened, recipient by recipient, with the replies.

    It has a charset, so addresses and reply text are shown as they are
    (UTF-8 when not ASCII); control characters become spaces.
    """
    if action == "failed":
        intro = (
            "Your message could not be delivered to the recipients below. The mail "
            "system has given up on them; the reasons are shown with each recipient."
        )
        returned = "a copy of your message" if full else "the header section of your message"
    elif action == "delayed":
        intro = (
            "Your message has not yet been delivered to the recipients below. This is "
            "only a warning: the mail system will keep trying, and you do not need to "
            "send the message again."
        )
        returned = "the header section of your message"
    else:
        intro = "Your message was delivered to the recipients below."
        returned = "the header section of your message"
    lines = [f"This is the mail system at {host}.", ""]
    lines += textwrap.wrap(intro, _WRAP)
    lines.append("")
    for status in statuses:
        lines.append(f"<{_strip_controls(status.recipient)}>:")
        remote = _text(status.remote_mta, True) if status.remote_mta else ""
        if remote:
            lines.append(f"    {remote} said:")
        for reply_line in status.reply.lines():
            lines += textwrap.wrap(_text(reply_line, True), _WRAP, initial_indent="    ",
                                   subsequent_indent="    ", break_on_hyphens=False)
        lines.append("")
    lines += textwrap.wrap(
        f"A delivery report for programs and {returned} are attached. This message "
        "was generated automatically; please do not reply to it.",
        _WRAP,
    )
    return "\r\n".join(lines) + "\r\n"


def _report(envelope: Envelope, statuses: list[RecipientStatus], action: str, host: str,
            arrival: float | None, utf8: bool) -> bytes:
    """The body of the delivery-status part: the field groups of RFC 3464 §2.1."""
    per_message = []
    if envelope.envid:
        per_message.append(_field("Original-Envelope-Id", _text(envelope.envid, utf8)))
    per_message.append(_field("Reporting-MTA", f"dns; {host}"))
    if arrival is not None:
        per_message.append(_field("Arrival-Date", formatdate(arrival, localtime=True)))
    blocks = ["".join(per_message)]
    for status in statuses:
        fields = []
        orcpt = envelope.orcpt(status.recipient)
        if orcpt:
            fields.append(_field("Original-Recipient", _orcpt(orcpt, utf8)))
        fields.append(_field("Final-Recipient", _typed_address(status.recipient, utf8)))
        fields.append(_field("Action", action))
        fields.append(_field("Status", _status(status.reply, action)))
        remote = _hostname(status.remote_mta, utf8) if status.remote_mta else ""
        if remote:
            fields.append(_field("Remote-MTA", f"dns; {remote}"))
        if action != "delivered" or remote:
            fields.append(_field("Diagnostic-Code", _diagnostic(status.reply, utf8)))
        if status.last_attempt is not None:
            fields.append(_field("Last-Attempt-Date",
                                 formatdate(status.last_attempt, localtime=True)))
        blocks.append("".join(fields))
    return "\r\n".join(blocks).encode("utf-8")


def _status(reply: Reply, action: str) -> str:
    """The ``Status`` value: the reply's enhanced code, else ``X.0.0`` (see the module doc)."""
    esc = reply.enhanced_status_code
    if esc and _ESC.fullmatch(esc):
        return esc
    code = str(reply.code)
    if _REPLY_CODE.fullmatch(code) and code[0] in "245":
        return f"{code[0]}.0.0"
    return _DEFAULT_STATUS[action]


def _diagnostic(reply: Reply, utf8: bool) -> str:
    """The ``Diagnostic-Code`` value: ``smtp; <code> <enhanced code> <text>``, one line."""
    pieces = []
    code = str(reply.code)
    if _REPLY_CODE.fullmatch(code):
        pieces.append(code)
    esc = reply.enhanced_status_code
    if esc and _ESC.fullmatch(esc):
        pieces.append(esc)
    text = _text(reply.text, utf8)
    if text:
        pieces.append(text)
    return "smtp; " + " ".join(pieces)


# --- field values ---------------------------------------------------------------


def _strip_controls(text: str) -> str:
    """``text`` without control characters (for addresses, where spaces would matter)."""
    return _CONTROLS.sub("", text)


def _text(text: str, utf8: bool) -> str:
    """One line of free text: controls become spaces, whitespace runs one space.

    Without ``utf8``, non-ASCII characters become ``?``.
    """
    text = " ".join(_CONTROLS.sub(" ", text).split())
    if not utf8:
        text = text.encode("ascii", "replace").decode("ascii")
    return text


def _xtext_address(address: str) -> str:
    """RFC 6533 ``utf-8-addr-xtext``: QCHARs as they are, anything else as ``\\x{HEX}``."""
    return "".join(c if c in _QCHAR else f"\\x{{{ord(c):X}}}" for c in address)


def _typed_address(address: str, utf8: bool) -> str:
    """``rfc822; addr``, or ``utf-8; addr`` for a non-ASCII address (RFC 6533 §3)."""
    address = _strip_controls(address)
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {address if utf8 else _xtext_address(address)}"


def _orcpt(value: str, utf8: bool) -> str:
    """The ORCPT the sender gave, with its address type, for ``Original-Recipient``."""
    value = _strip_controls(value)
    addr_type, sep, address = value.partition(";")
    if not sep:
        addr_type, address = "rfc822", value
    addr_type = addr_type.strip()
    address = address.strip()
    if address.isascii():
        return f"{addr_type};{address}"
    if addr_type.lower() in ("rfc822", "utf-8"):
        addr_type = "utf-8"
    return f"{addr_type};{address if utf8 else _xtext_address(address)}"


def _hostname(name: str, utf8: bool = False) -> str:
    """A host name for ``dns;`` fields and addresses: no spaces or controls, ASCII if it can."""
    name = "".join(_CONTROLS.sub("", name).split())
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            if not utf8:
                name = name.encode("ascii", "replace").decode("ascii")
    return name or "localhost"


def _to_header(sender: str) -> Address | str:
    """The ``To`` value for the original sender's address."""
    try:
        return Address(addr_spec=sender)
    except (ValueError, IndexError, TypeError):
        # Not a plain addr-spec (e.g. a quoted local part the parser dislikes):
        # give it as an angle-addr, which the header parser takes as it is.
        return f"<{sender}>"


def _field(name: str, value: str) -> str:
    """``Name: value`` and CRLF, folded before spaces to stay near 78 columns.

    Unfolding gives ``value`` back, except that a word longer than
    ``_MAX_WORD_OCTETS`` (in UTF-8) is cut into pieces, so no line can reach
    998 octets (RFC 5322 §2.1.1).
    """
    pieces: list[str] = []
    for word in value.split(" "):
        if len(word.encode("utf-8", "surrogateescape")) <= _MAX_WORD_OCTETS:
            pieces.append(" " + word)
            continue
        chunk, size = "", 0
        for char in word:
            octets = len(char.encode("utf-8", "surrogateescape"))
            if size + octets > _MAX_WORD_OCTETS:
                pieces.append(" " + chunk)
                chunk, size = "", 0
            chunk += char
            size += octets
        pieces.append(" " + chunk)
    lines = [name + ":"]
    for piece in pieces:
        current = lines[-1]
        if (
            piece.strip()
            and len(current) + len(piece) > _MAX_LINE
            and current.strip() != name + ":"
        ):
            lines.append(piece)
        else:
            lines[-1] = current + piece
    return "\r\n".join(lines) + "\r\n"


# --- the original message ---------------------------------------------------------


_LONG_LINE = re.compile(rb"[^\r\n]{999}")


def _transfer_encoding(data: bytes) -> str:
    """``7bit``, ``8bit`` or ``binary``: what ``data`` needs (RFC 2045 §2.7-2.9).

    Binary means NUL bytes or a line over 998 octets.
    """
    if b"\0" in data or _LONG_LINE.search(data):
        return "binary"
    return "7bit" if data.isascii() else "8bit"


def _crlf(data: bytes) -> bytes:
    """Line endings made CRLF (a bare LF becomes CRLF)."""
    return re.sub(rb"\r?\n", b"\r\n", data)


def _header_section(head: bytes) -> bytes:
    """The header fields of a flattened header block, without the empty line, CRLF ended."""
    if head.endswith(b"\r\n\r\n"):
        head = head[:-2]
    elif head.endswith(b"\n\n"):
        head = head[:-1]
    elif head in (b"\r\n", b"\n"):
        head = b""
    head = _crlf(head)
    if head and not head.endswith(b"\n"):
        head += b"\r\n"
    return head


def _truncate_fields(section: bytes, limit: int) -> bytes:
    """``section`` cut after the last whole header field within ``limit`` octets."""
    if len(section) <= limit:
        return section
    keep = 0
    pos = 0
    while pos < len(section):
        end = section.find(b"\n", pos)
        end = len(section) if end < 0 else end + 1
        if end > limit:
            break
        if end >= len(section) or section[end:end + 1] not in (b" ", b"\t"):
            keep = end  # the next line starts a new field: this one is whole
        pos = end
    return section[:keep]
