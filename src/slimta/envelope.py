"""The :class:`Envelope`: a message and the SMTP transaction data that came with it.

An envelope is what the edge builds, the queue stores and the relay delivers:
the reverse-path (:attr:`Envelope.sender`), the forward-paths
(:attr:`Envelope.recipients`), the message split into its header block
(:attr:`Envelope.headers`) and its body (:attr:`Envelope.message`), and the
facts about the transaction (client, receiver, time, ESMTP and DSN parameters).

Header handling is lazy, because the edge calls :meth:`Envelope.parse` for
every message it accepts:

* :meth:`~Envelope.parse` only finds the first empty line and keeps the raw
  header bytes; it builds nothing.
* :attr:`~Envelope.headers` builds an :class:`email.message.Message` (policy
  ``compat32``) from those bytes the first time it is read.
* :meth:`~Envelope.flatten` gives back the *original* header bytes, byte for
  byte, as long as the header fields were not changed, with any headers added
  by :meth:`~Envelope.prepend_header` in front of them. Only when a field was
  changed, added elsewhere or removed through :attr:`~Envelope.headers` is the
  header block written anew, and even then the fields that were not changed
  keep their original bytes.
"""

from __future__ import annotations

import base64
import binascii
import copy as _copy
import re
from collections.abc import Callable
from email.generator import BytesGenerator
from email.header import Header
from email.message import Message
from email.parser import BytesParser
from email.policy import Compat32, compat32
from io import BytesIO
from typing import Any, TypedDict

__all__ = ["Envelope", "RcptParams"]


class RcptParams(TypedDict, total=False):
    """The ESMTP parameters of one RCPT TO command that the envelope keeps.

    ``notify`` is the DSN ``NOTIFY=`` list (RFC 3461), upper case, e.g.
    ``['SUCCESS', 'FAILURE']`` or ``['NEVER']``; ``orcpt`` is the decoded
    ``ORCPT=`` value with its address type, e.g. ``'rfc822;a@example.com'``.
    """

    notify: list[str]
    orcpt: str


# A header field starts with a field name (printable US-ASCII except ':',
# RFC 5322 section 3.6.8) followed by a colon.
_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_NEWLINES = re.compile(r"\r\n|\r|\n")
_HIGH_BYTES_TO_QMARK = bytes(range(128)) + b"?" * 128
_MAX_LINE = 78
_ADDRESS_FIELDS = frozenset(
    {
        "from", "sender", "reply-to", "to", "cc", "bcc",
        "resent-from", "resent-sender", "resent-to", "resent-cc", "resent-bcc",
        "disposition-notification-to",
    }
)
_PARAM_FIELDS = frozenset({"content-type", "content-disposition"})
# RFC 2231 attribute-char: any CHAR except SPACE, CTLs, tspecials, '*', "'", '%'.
_ATTR_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$&+-.^_`|~"
)


def _to_bytes(text: str) -> bytes:
    """Header text to bytes: UTF-8, with escaped raw bytes restored."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


def _decode_field(lines: list[bytes]) -> list[str]:
    """Header lines as text: UTF-8 when the field is valid UTF-8 (RFC 6532).

    Otherwise the compat32 convention of the email package: ASCII, with every
    other byte as a surrogate escape (which it reports as ``unknown-8bit``).
    Either way :func:`_to_bytes` gives back the original bytes.
    """
    try:
        return [line.decode("utf-8") for line in lines]
    except UnicodeDecodeError:
        return [line.decode("ascii", "surrogateescape") for line in lines]


def _fold_line(line: str, first_min: int) -> list[str]:
    """Split one long header line at whitespace so lines stay near 78 characters.

    The break goes *before* a space or tab, so unfolding (removing the line
    breaks, RFC 5322 section 2.2.3) gives back exactly ``line``. A line with no
    whitespace to break at is left long.
    """
    out: list[str] = []
    low = first_min
    while len(line) > _MAX_LINE:
        cut = max(line.rfind(" ", low, _MAX_LINE + 1), line.rfind("\t", low, _MAX_LINE + 1))
        if cut <= 0:
            start = max(low, _MAX_LINE)
            spaces = [p for p in (line.find(" ", start), line.find("\t", start)) if p > 0]
            if not spaces:
                break
            cut = min(spaces)
        if not line[cut:].strip(" \t"):
            break
        out.append(line[:cut])
        line = line[cut:]
        # The next line starts with whitespace: never break inside it.
        low = len(line) - len(line.lstrip(" \t")) + 1
    out.append(line)
    return out


def _field_bytes(name: str, value: Any, nl: bytes) -> bytes:
    """Serialize one header field, ending with ``nl``.

    Values keep their own folding (line breaks become ``nl``, a continuation
    line that does not start with whitespace gets a space so a value can never
    inject a field); long single-line values are folded at whitespace. Text is
    written as UTF-8 (RFC 6532), with raw bytes that were not valid UTF-8
    written back unchanged. :class:`email.header.Header` objects are encoded by
    the email package (RFC 2047).
    """
    if isinstance(value, Header):
        value = value.encode(linesep="\n")
    elif not isinstance(value, str):
        value = str(value)
    if "\n" in value or "\r" in value:
        pieces = _NEWLINES.split(value)
        lines = [f"{name}: {pieces[0]}"]
        for piece in pieces[1:]:
            if not piece:
                continue
            lines.append(piece if piece[0] in " \t" else " " + piece)
    else:
        lines = _fold_line(f"{name}: {value}", len(name) + 2)
    return nl.join(_to_bytes(line) for line in lines) + nl


def _needs_encoding(data: bytes) -> bool:
    """True when ``data`` is not valid 7bit content (RFC 2045 section 2.7)."""
    if not data.isascii() or b"\0" in data:
        return True
    if len(data) <= 1000:
        return False
    return any(len(line) > 999 for line in data.split(b"\n"))


def _encoded_words(text: str) -> str:
    """``text`` as RFC 2047 encoded words (base64), each at most 75 characters."""
    data = _to_bytes(text)
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:
        charset = "unknown-8bit"
        chunks = [data[i:i + 39] for i in range(0, len(data), 39)]
    else:
        charset = "utf-8"
        chunks = []
        current = b""
        for char in decoded:
            encoded = char.encode("utf-8")
            if len(current) + len(encoded) > 45:
                chunks.append(current)
                current = b""
            current += encoded
        if current:
            chunks.append(current)
    return " ".join(f"=?{charset}?b?{base64.b64encode(c).decode('ascii')}?=" for c in chunks)


_PHRASE_TOKENS = re.compile(r'[ \t]+|"(?:[^"\\]|\\.)*"?|<[^>]*>?|[(),:;]|[^ \t"<(),:;]+')
_TEXT_TOKENS = re.compile(r"[ \t]+|[^ \t]+")


def _encode_words(value: str, phrases: bool) -> str:
    """Replace the non-ASCII words of a header value by RFC 2047 encoded words.

    Neighbouring non-ASCII words are encoded together so the space between
    them survives decoding. With ``phrases`` (address fields), a quoted string
    with non-ASCII text becomes encoded words without its quotes, as RFC 2047
    section 5 requires.
    """
    value = _NEWLINES.sub("", value)
    pattern = _PHRASE_TOKENS if phrases else _TEXT_TOKENS
    tokens: list[tuple[str, str]] = []  # (kind, text): kind in 'ws', 'plain', 'enc'
    for tok in pattern.findall(value):
        if tok[0] in " \t":
            tokens.append(("ws", tok))
        elif tok.isascii():
            tokens.append(("plain", tok))
        elif phrases and tok[0] == '"':
            inner = tok[1:-1] if len(tok) > 1 and tok.endswith('"') else tok[1:]
            tokens.append(("enc", re.sub(r"\\(.)", r"\1", inner)))
        else:
            tokens.append(("enc", tok))
    out: list[str] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        if kind != "enc":
            out.append(text)
            i += 1
            continue
        run = text
        i += 1
        while i + 1 < len(tokens) and tokens[i][0] == "ws" and tokens[i + 1][0] == "enc":
            run += tokens[i][1] + tokens[i + 1][1]
            i += 2
        out.append(_encoded_words(run))
    return "".join(out)


def _split_params(value: str) -> list[str]:
    """Split a MIME header value at the semicolons that are not inside quotes."""
    parts: list[str] = []
    start = 0
    quoted = escaped = False
    for i, char in enumerate(value):
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ";" and not quoted:
            parts.append(value[start:i])
            start = i + 1
    parts.append(value[start:])
    return parts


def _encode_params(value: str) -> str:
    """Make a Content-Type / Content-Disposition value 7-bit.

    Non-ASCII parameter values become RFC 2231 extended values (with
    continuations when long); anything else that is not ASCII gets RFC 2047
    encoded words.
    """
    parts = [p.strip() for p in _split_params(_NEWLINES.sub("", value))]
    out = [parts[0] if parts[0].isascii() else _encode_words(parts[0], False)]
    for part in parts[1:]:
        if not part:
            continue
        if part.isascii():
            out.append(part)
            continue
        key, sep, val = part.partition("=")
        key = key.strip().rstrip("*")
        val = val.strip()
        if not sep or not key or not key.isascii():
            out.append(_encode_words(part, False))
            continue
        if len(val) >= 2 and val[0] == '"' and val[-1] == '"':
            val = re.sub(r"\\(.)", r"\1", val[1:-1])
        data = _to_bytes(val)
        try:
            data.decode("utf-8")
            charset = "utf-8"
        except UnicodeDecodeError:
            charset = "unknown-8bit"
        escaped = [chr(b) if chr(b) in _ATTR_CHARS else f"%{b:02X}" for b in data]
        chunks: list[str] = [""]
        for piece in escaped:
            if len(chunks[-1]) + len(piece) > 60:
                chunks.append("")
            chunks[-1] += piece
        if len(chunks) == 1:
            out.append(f"{key}*={charset}''{chunks[0]}")
        else:
            out.append(f"{key}*0*={charset}''{chunks[0]}")
            out.extend(f"{key}*{n}*={chunk}" for n, chunk in enumerate(chunks[1:], 1))
    return "; ".join(out)


def _encode_header_value(name: str, value: str) -> str:
    """A 7-bit form of one header value (see :meth:`Envelope.encode_7bit`)."""
    lname = name.lower()
    if lname in _PARAM_FIELDS:
        return _encode_params(value)
    return _encode_words(value, lname in _ADDRESS_FIELDS)


def _default_encoder(part: Message) -> None:
    """Encode one MIME leaf: quoted-printable for text/*, base64 for the rest."""
    data = part.get_payload(decode=True) or b""
    if part.get_content_maintype() == "text":
        encoded = binascii.b2a_qp(data, quotetabs=False, istext=True, header=False)
        cte = "quoted-printable"
    else:
        encoded = base64.encodebytes(data)
        cte = "base64"
    part.set_payload(encoded.decode("ascii"))
    part["Content-Transfer-Encoding"] = cte


class _VerbatimPolicy(Compat32):
    """compat32, but header fields are written as they are (no re-folding)."""

    def fold(self, name: str, value: Any) -> str:
        return _field_bytes(name, value, b"\n").decode("utf-8", "surrogateescape").replace(
            "\n", self.linesep
        )

    def fold_binary(self, name: str, value: Any) -> bytes:
        return _field_bytes(name, value, self.linesep.encode("ascii"))


_VERBATIM = _VerbatimPolicy(linesep="\r\n")


def _set_header(msg: Message, name: str, value: str | None) -> None:
    """Set ``name`` to ``value`` where its first occurrence is, dropping the others.

    A header that is not there yet is appended; ``None`` removes it.
    """
    lname = name.lower()
    fields: list[tuple[str, Any]] = []
    placed = False
    for field in msg._headers:
        if field[0].lower() != lname:
            fields.append(field)
        elif not placed and value is not None:
            fields.append((field[0], value))
            placed = True
    if not placed and value is not None:
        fields.append((name, value))
    msg._headers[:] = fields


_ENVELOPE_STATE = frozenset(
    {
        "sender", "recipients", "message", "client", "receiver", "timestamp", "ret", "envid",
        "auth", "smtputf8", "body", "rcpt_params", "_raw", "_sep_len", "_body0", "_pre",
        "_msg", "_orig", "_raw_fields", "_tail",
    }
)


class Envelope:
    """A message with its sender, recipients and the data of the SMTP transaction.

    ``Envelope(sender, recipients, headers, message)``: ``headers`` is an
    :class:`email.message.Message` holding header fields only and ``message``
    the body bytes; usually both come from :meth:`parse` instead.

    Attributes (all plain, read and write):

    ``sender``
        The reverse-path without angle brackets; ``''`` for the null
        reverse-path ``<>`` (bounces).
    ``recipients``
        The forward-paths, in the order given.
    ``message``
        The body: every byte after the empty line that ends the header block,
        never rewritten (binary-clean for BINARYMIME).
    ``client``
        What the edge knows about the client: ``ip``, ``host`` (reverse DNS),
        ``name`` (as given in EHLO/HELO), ``protocol`` (``'SMTP'``,
        ``'ESMTP'``, ``'ESMTPS'``, ``'ESMTPA'``, ``'ESMTPSA'``) and ``auth``
        (the identity the client authenticated as). All ``None`` at first.
    ``receiver``
        The host name of the server that received the message.
    ``timestamp``
        When it was received (seconds since the epoch, :func:`time.time`).
    ``ret``
        The DSN ``RET=`` of MAIL FROM: ``'FULL'``, ``'HDRS'`` or ``None``.
    ``envid``
        The DSN ``ENVID=`` of MAIL FROM, xtext-decoded, or ``None``.
    ``auth``
        The ``AUTH=`` parameter of MAIL FROM (RFC 4954 section 5), xtext
        decoded: the submitter the client vouches for, ``'<>'`` when unknown,
        ``None`` when absent. Not the same as ``client['auth']``, which is who
        the client itself authenticated as.
    ``smtputf8``
        True when MAIL FROM carried ``SMTPUTF8`` (RFC 6531).
    ``body``
        The ``BODY=`` type: ``'7BIT'`` (default), ``'8BITMIME'`` or
        ``'BINARYMIME'``; :meth:`encode_7bit` sets it to ``'7BIT'``.
    ``rcpt_params``
        ``{recipient: RcptParams}``: the DSN parameters of each RCPT TO that
        had any (``notify`` list, ``orcpt`` string). Read them with
        :meth:`notify` and :meth:`orcpt`, record them with
        :meth:`add_recipient`.
    """

    def __init__(
        self,
        sender: str | None = None,
        recipients: list[str] | None = None,
        headers: Message | None = None,
        message: bytes | None = None,
    ) -> None:
        self.sender: str | None = sender
        self.recipients: list[str] = list(recipients) if recipients else []
        self.message: bytes = message if message is not None else b""
        self.client: dict[str, Any] = {
            "ip": None,
            "host": None,
            "name": None,
            "protocol": None,
            "auth": None,
        }
        self.receiver: str | None = None
        self.timestamp: float | None = None
        self.ret: str | None = None
        self.envid: str | None = None
        self.auth: str | None = None
        self.smtputf8: bool = False
        self.body: str = "7BIT"
        self.rcpt_params: dict[str, RcptParams] = {}
        # Header state, see parse(), the headers property and flatten().
        self._raw: bytes | None = None  # original header block, with its empty line
        self._sep_len = 0  # length of that empty line (0: the message had none)
        self._body0: bytes | None = None  # the body parse() produced
        self._pre: list[tuple[str, Any]] = []  # prepended fields, top first
        self._msg: Message | None = headers
        self._orig: list[tuple[str, Any]] | None = None  # fields as parsed
        self._raw_fields: dict[tuple[str, str], list[bytes]] = {}
        self._tail = b""  # header-block lines that are not fields

    # --- DSN and recipients -----------------------------------------------

    def add_recipient(
        self, rcpt: str, notify: list[str] | None = None, orcpt: str | None = None
    ) -> None:
        """Append ``rcpt`` to :attr:`recipients`, recording its DSN parameters if given."""
        self.recipients.append(rcpt)
        if notify is not None or orcpt is not None:
            params: RcptParams = {}
            if notify is not None:
                params["notify"] = list(notify)
            if orcpt is not None:
                params["orcpt"] = orcpt
            self.rcpt_params[rcpt] = params

    def notify(self, rcpt: str) -> list[str] | None:
        """The DSN ``NOTIFY=`` list given for ``rcpt``, or ``None`` if there was none.

        ``None`` means the default of RFC 3461: notify on failure (and maybe delay).
        """
        params = self.rcpt_params.get(rcpt)
        return params.get("notify") if params else None

    def orcpt(self, rcpt: str) -> str | None:
        """The DSN ``ORCPT=`` value given for ``rcpt`` (e.g. ``'rfc822;a@b'``), or ``None``."""
        params = self.rcpt_params.get(rcpt)
        return params.get("orcpt") if params else None

    # --- parsing ------------------------------------------------------------

    def parse(self, data: bytes) -> None:
        """Split a raw RFC 5322 message into the header block and :attr:`message`.

        The split is at the first empty line (``CRLF CRLF``; a bare ``LF`` also
        ends a line). The header bytes are only stored: the
        :class:`~email.message.Message` behind :attr:`headers` is built on
        first use. Headers added before by :meth:`prepend_header` are dropped.

        * A message that starts with an empty line has no headers; its body
          is everything after that line.
        * A message with no empty line is all header block when its first line
          is a header field (``name:``), otherwise all body.

        Whatever the input, an untouched envelope gives it back exactly:
        ``b''.join(env.flatten()) == data``.
        """
        if type(data) is not bytes:
            data = bytes(data)
        if data[:1] == b"\n":
            cut, sep = 1, 1
        elif data[:2] == b"\r\n":
            cut, sep = 2, 2
        else:
            crlf = data.find(b"\n\r\n")
            lf = data.find(b"\n\n", 0, crlf + 1 if crlf >= 0 else len(data))
            if lf >= 0:
                cut, sep = lf + 2, 1
            elif crlf >= 0:
                cut, sep = crlf + 3, 2
            elif _FIELD_START.match(data):
                cut, sep = len(data), 0
            else:
                cut, sep = 0, 0
        self._raw = data[:cut]
        body = data[cut:] if cut else data
        self.message = self._body0 = body
        self._sep_len = sep
        self._pre = []
        self._msg = None
        self._orig = None
        self._raw_fields = {}
        self._tail = b""

    @property
    def headers(self) -> Message:
        """The header fields, as an :class:`email.message.Message` (policy ``compat32``).

        Built from the parsed bytes the first time it is read. A field value is
        its bytes decoded as UTF-8 (RFC 6532) when they are valid UTF-8;
        otherwise, as the email package does, ASCII with the other bytes as
        surrogate escapes. Either way they are written back unchanged. As in
        the email package, a folded value keeps its line breaks.

        Reading does not count as a change. Any change made through this object
        is seen by :meth:`flatten`, which then writes the header block anew.
        Lines of the header block from the first one that is neither a field
        nor a continuation line are not fields: they are kept and written back
        after the fields. Assigning a new ``Message`` replaces all fields.
        """
        msg = self._msg
        if msg is None:
            msg = self._build_headers()
        return msg

    @headers.setter
    def headers(self, value: Message | None) -> None:
        self._msg = value
        self._raw = None
        self._sep_len = 0
        self._pre = []
        self._orig = None
        self._raw_fields = {}
        self._tail = b""

    def _build_headers(self) -> Message:
        msg = Message(policy=compat32)
        for name, value in self._pre:
            msg.set_raw(name, value)
        raw = self._raw
        if raw:
            block = raw[: len(raw) - self._sep_len]
            nl = self._newline()
            pieces = block.split(b"\n")
            last = pieces.pop()
            lines = [piece + b"\n" for piece in pieces]
            if last:
                lines.append(last)
            fields: list[list[bytes]] = []
            tail_at = len(lines)
            for i, line in enumerate(lines):
                if line[:1] in (b" ", b"\t") and fields:
                    fields[-1].append(line)
                elif _FIELD_START.match(line):
                    fields.append([line])
                else:
                    tail_at = i
                    break
            orig: list[tuple[str, Any]] = []
            raw_fields: dict[tuple[str, str], list[bytes]] = {}
            for field_lines in fields:
                text = _decode_field(field_lines)
                name, value = compat32.header_source_parse(text)
                msg.set_raw(name, value)
                orig.append((name, value))
                field_raw = b"".join(field_lines)
                if not field_raw.endswith(b"\n"):
                    field_raw += nl
                raw_fields.setdefault((name, value), []).append(field_raw)
            tail = b"".join(lines[tail_at:])
            if tail and not tail.endswith(b"\n"):
                tail += nl
            self._orig = orig
            self._raw_fields = raw_fields
            self._tail = tail
        elif raw is not None:
            self._orig = []
        self._msg = msg
        return msg

    # --- changing headers -------------------------------------------------------

    def prepend_header(self, name: str, value: str) -> None:
        """Add a header field above all others, as a ``Received:`` trace field is.

        Cheap when :attr:`headers` was never read: the original header bytes
        stay as they are and the new field is written in front of them. A long
        value is folded at whitespace; a value with line breaks keeps them.
        """
        self._pre.insert(0, (name, value))
        if self._msg is not None:
            self._msg._headers.insert(0, (name, value))

    # --- output -----------------------------------------------------------------

    def _newline(self) -> bytes:
        """The line ending for header lines we write: the header block's own, or CRLF."""
        raw = self._raw
        if raw:
            i = raw.find(b"\n")
            if i == 0 or (i > 0 and raw[i - 1] != 13):
                return b"\n"
        return b"\r\n"

    def flatten(self) -> tuple[bytes, bytes]:
        """The message as ``(header_bytes, body_bytes)``; their concatenation is the message.

        ``body_bytes`` is :attr:`message`, as it is. ``header_bytes`` is:

        * after :meth:`parse`, while no field was changed: the original header
          block exactly as received (the same bytes object), including the
          empty line that ended it. Fields added by :meth:`prepend_header` are
          written in front of it and nothing else is touched. So
          ``b''.join(env.flatten()) == data`` for an untouched envelope.
        * otherwise: the fields written anew, then the empty line. A field
          still as parsed keeps its original bytes; other fields are written
          as ``Name: value``, folded at whitespace near 78 columns, text as
          UTF-8 (non-ASCII values survive unchanged; :meth:`encode_7bit` makes
          them 7-bit).

        Lines we write end in CRLF, unless the parsed header block used bare
        LF line endings: then they end in LF, so a header block never mixes
        the two. The body is never rewritten.
        """
        body = self.message if self.message is not None else b""
        raw = self._raw
        msg = self._msg
        if raw is not None and (
            msg is None
            or (
                self._orig is not None
                and msg._headers[len(self._pre):] == self._orig
                and msg._headers[: len(self._pre)] == self._pre
            )
        ):
            head = raw
            if self._pre:
                nl = self._newline()
                head = b"".join(_field_bytes(n, v, nl) for n, v in self._pre) + raw
                if not raw and self._sep_len == 0:
                    head += nl
            elif self._sep_len == 0 and body and body is not self._body0:
                # The body was replaced on a message that had no empty line.
                nl = self._newline()
                head += nl if not head or head.endswith(b"\n") else nl + nl
            return head, body
        return self._serialize(body), body

    def _serialize(self, body: bytes) -> bytes:
        nl = self._newline()
        raw_fields = self._raw_fields
        used: dict[tuple[str, str], int] = {}
        out: list[bytes] = []
        fields = self._msg._headers if self._msg is not None else []
        for name, value in fields:
            field = None
            if raw_fields and type(value) is str:
                key = (name, value)
                known = raw_fields.get(key)
                if known:
                    n = used.get(key, 0)
                    field = known[min(n, len(known) - 1)]
                    used[key] = n + 1
            out.append(field if field is not None else _field_bytes(name, value, nl))
        if self._tail:
            out.append(self._tail)
        if out or body or self._sep_len:
            raw = self._raw
            out.append(raw[len(raw) - self._sep_len:] if raw and self._sep_len else nl)
        return b"".join(out)

    # --- copies -----------------------------------------------------------------

    def copy(self, new_rcpts: list[str] | None = None) -> Envelope:
        """An independent copy, optionally with other recipients.

        Headers, ``client``, ``recipients`` and ``rcpt_params`` are copied, not
        shared (byte strings are immutable and are shared). With
        ``new_rcpts``, the copy has those recipients and only their
        ``rcpt_params``.
        """
        new = self.__class__.__new__(self.__class__)
        state = new.__dict__
        state.update(self.__dict__)  # bytes, str and the immutable header state are shared
        for key in self.__dict__.keys() - _ENVELOPE_STATE:
            state[key] = _copy.deepcopy(self.__dict__[key])  # attributes users added
        new.recipients = list(self.recipients if new_rcpts is None else new_rcpts)
        new.client = dict(self.client)
        keep = set(new.recipients)
        new.rcpt_params = {
            rcpt: _copy.deepcopy(params)
            for rcpt, params in self.rcpt_params.items()
            if rcpt in keep
        }
        new._pre = list(self._pre)
        new._msg = _copy.deepcopy(self._msg) if self._msg is not None else None
        return new

    # --- 7-bit ------------------------------------------------------------------

    def encode_7bit(self, encoder: Callable[[Message], None] | None = None) -> bool:
        """Make the message 7-bit clean, for a next hop without 8BITMIME; True if it changed.

        Body: when it has 8-bit bytes, NUL bytes or lines over 998 octets, it
        is parsed as MIME and every leaf part that has them is re-encoded:
        text/* as quoted-printable, anything else as base64, with its
        ``Content-Transfer-Encoding`` set (and ``MIME-Version: 1.0`` added to
        the top when missing). ``encoder``, if given, replaces that choice: it
        is called with each such part after its ``Content-Transfer-Encoding``
        was removed, like the functions of :mod:`email.encoders`. Containers
        marked ``8bit``/``binary`` become ``7bit``. The re-encoded body has
        CRLF line endings; parts that needed nothing keep their bytes.

        Headers: a field with non-ASCII text gets RFC 2047 encoded words for
        its non-ASCII words (display names in address fields lose their
        quotes as RFC 2047 requires); non-ASCII MIME parameters
        (``filename``, ``name``) of Content-Type/Content-Disposition become
        RFC 2231 values. An address with a non-ASCII mailbox has no 7-bit
        form: it is encoded too, which keeps the result 7-bit but is not a
        usable address. Non-field lines in the header block have 8-bit bytes
        replaced by ``?``.

        A message that is already 7-bit is not touched (byte-exact).
        Afterwards :attr:`body` is ``'7BIT'``.
        """
        changed = False
        body = self.message if self.message is not None else b""
        if _needs_encoding(body):
            self.message = self._encode_body(body, encoder or _default_encoder)
            changed = True
        head, _ = self.flatten()
        if not head.isascii():
            msg = self.headers
            fields = msg._headers
            for i, (name, value) in enumerate(fields):
                if isinstance(value, str) and not value.isascii():
                    fields[i] = (name, _encode_header_value(name, value))
            if not self._tail.isascii():
                self._tail = self._tail.translate(_HIGH_BYTES_TO_QMARK)
                self._orig = None  # forces flatten() to write the header block anew
            changed = True
        self.body = "7BIT"
        return changed

    def _encode_body(self, body: bytes, encoder: Callable[[Message], None]) -> bytes:
        headers = self.headers
        mime_names = ("content-type", "content-transfer-encoding")
        mime = [(n, v) for n, v in headers._headers if n.lower() in mime_names]
        head = b"".join(_field_bytes(n, v, b"\r\n") for n, v in mime)
        tree = BytesParser(policy=_VERBATIM).parsebytes(head + b"\r\n" + body)
        encoded = False
        for part in tree.walk():
            if part is not tree:
                fields = part._headers
                for i, (name, value) in enumerate(fields):
                    if isinstance(value, str) and not value.isascii():
                        fields[i] = (name, _encode_header_value(name, value))
            if part.is_multipart():
                cte = part.get("Content-Transfer-Encoding")
                if isinstance(cte, str) and cte.strip().lower() in ("8bit", "binary"):
                    part.replace_header("Content-Transfer-Encoding", "7bit")
                continue
            # The payload as parsed (get_payload() would decode 8-bit text).
            payload = part._payload
            if not isinstance(payload, str):
                continue
            if _needs_encoding(payload.encode("ascii", "surrogateescape")):
                del part["Content-Transfer-Encoding"]
                encoder(part)
                encoded = True
        out = BytesIO()
        BytesGenerator(out, mangle_from_=False, policy=_VERBATIM).flatten(tree, unixfrom=False)
        generated = out.getvalue()
        head_len = sum(len(_VERBATIM.fold_binary(n, v)) for n, v in tree.raw_items()) + 2
        # Carry changes to the top-level MIME fields back to the envelope headers.
        for lname in mime_names:
            before = [_field_bytes("", v, b"") for n, v in mime if n.lower() == lname]
            after = [v for n, v in tree.raw_items() if n.lower() == lname]
            if before != [_field_bytes("", v, b"") for v in after]:
                name = "Content-Type" if lname == "content-type" else "Content-Transfer-Encoding"
                _set_header(headers, name, after[0] if after else None)
        if encoded and "MIME-Version" not in headers:
            headers["MIME-Version"] = "1.0"
        return generated[head_len:]

    def __repr__(self) -> str:
        return f"<Envelope sender={self.sender!r} recipients={self.recipients!r}>"
