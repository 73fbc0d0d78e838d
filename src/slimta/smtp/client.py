"""The client side of SMTP and LMTP as a sans-IO state machine.

:class:`ClientConnection` turns commands into bytes (``conn.ehlo(name)``,
``conn.mail(sender)``, ...) and the bytes read from the server into replies
(:meth:`~ClientConnection.receive_data`, then
:meth:`~ClientConnection.next_reply`). The caller writes the bytes and reads
the socket; nothing here does I/O, keeps time or draws random numbers.

Each command method returns the bytes to write and records which reply the
command awaits, so replies come out of :meth:`~ClientConnection.next_reply`
tagged with the command they answer, in order. Pipelining (RFC 2920) is
therefore just writing the bytes of several commands at once::

    conn = ClientConnection()
    conn.expect_banner()
    ...                                  # banner, EHLO as below
    write(conn.mail(sender) + conn.rcpt(a) + conn.rcpt(b) + conn.data())
    # replies: ('MAIL', r), ('RCPT', r), ('RCPT', r), ('DATA', Reply('354', ...))
    write(conn.message(content))         # then ('DATA_END', r)

The tags are ``'BANNER'``, ``'EHLO'``, ``'LHLO'``, ``'HELO'``, ``'STARTTLS'``,
``'AUTH'``, ``'MAIL'``, ``'RCPT'``, ``'DATA'``, ``'DATA_END'`` (the reply to
the message content), ``'BDAT'``, ``'RSET'``, ``'NOOP'`` and ``'QUIT'``. A
reply that arrives when none is awaited is tagged ``'UNSOLICITED'`` (an
early ``421`` from a server that gives up). A ``421`` that arrives while a
reply is awaited takes that command's tag: RFC 5321 §3.8 lets a server
answer any command with it.

How replies are read (RFC 5321 §4.2):

- Lines end with CRLF; a bare LF from a broken server is accepted too.
- A line is a three-digit code (first digit 2 to 5) followed by ``-`` (more
  lines follow), a space and text, or nothing (``250`` alone is a complete
  reply without text). Anything else is not SMTP and raises
  :class:`ClientError`.
- When the lines of one reply carry different codes, the last line's code
  counts: RFC 5321 §4.2.1 asks for the same code on every line, so such a
  server is broken, and the line that ends the reply is its final word.
- The text of the lines is joined with ``'\\n'``. An enhanced status code
  (RFC 2034, RFC 3463) on the first line whose class matches the reply code
  becomes :attr:`Reply.enhanced_status_code` and is removed from every line
  that repeats it. Text is decoded as UTF-8; undecodable octets become
  U+FFFD.
- A reply line longer than :data:`MAX_REPLY_LINE_LENGTH` octets or a reply
  of more than :data:`MAX_REPLY_LINES` lines raises :class:`ClientError`, so
  a hostile server cannot make the client buffer without bound.

After a :class:`ClientError` the session cannot go on (the caller treats it
as a transient failure and closes the connection); every later
:meth:`~ClientConnection.next_reply` raises it again.

What the session learnt is on the connection: ``extensions`` (from the 250
to EHLO/LHLO), ``pipelining``, ``size_limit``, ``secure``,
``authenticated``, ``closing`` (a 221 or 421 came) and ``pending`` (the tags
still awaited); ``best_auth_mechanism()`` and ``ehlo_failed_use_helo()``
help with the decisions that are the caller's.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Iterable

from slimta.smtp.address import format_path, split_address
from slimta.smtp.auth import ClientAuth
from slimta.smtp.data import LINE_LENGTH_LIMIT, dot_stuff, fold_long_lines, to_crlf
from slimta.smtp.extensions import MAX_ENVID_LENGTH, Extensions, xtext_encode
from slimta.smtp.reply import Reply

__all__ = [
    "LINE_LENGTH_LIMIT",
    "MAX_REPLY_LINES",
    "MAX_REPLY_LINE_LENGTH",
    "REPLY_TAGS",
    "ClientConnection",
    "ClientError",
]

#: The longest reply line accepted, in octets without the line ending.
MAX_REPLY_LINE_LENGTH = 65536
#: The most lines one reply may have.
MAX_REPLY_LINES = 1000

#: Every tag :meth:`ClientConnection.next_reply` can give.
REPLY_TAGS = frozenset({
    "BANNER", "EHLO", "LHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "DATA_END",
    "BDAT", "RSET", "NOOP", "QUIT", "UNSOLICITED",
})

# Expected-reply markers for LMTP, whose count is only known when the first
# reply comes: one reply per recipient accepted since MAIL, in RCPT order.
# The end of DATA gets at least one (RFC 2033 §4.2: a server that took DATA
# with none accepted is broken, but it will say something); BDAT LAST gets
# none when no recipient was accepted (RFC 2033 §4.3).
_DATA_END_PER_RCPT = "DATA_END*"
_BDAT_PER_RCPT = "BDAT*"

_NOTIFY_VALUES = ("SUCCESS", "FAILURE", "DELAY")
_BODY_VALUES = ("7BIT", "8BITMIME", "BINARYMIME")
# characters that must not reach a command line (they would end it or worse)
_UNSAFE = re.compile("[\r\n\x00]")
# a domain also may not hold what would end the path (a local part is quoted)
_UNSAFE_DOMAIN = re.compile("[\r\n\x00<> \t]")
_UNSAFE_NAME = re.compile("[\r\n\x00 \t]")
# RFC 3463 §2: class "." subject "." detail, then a space or the end
_ESC_RE = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}(?= |\Z)")
# compact the receive buffer once this much of it has been consumed
_COMPACT_AT = 16384


class ClientError(Exception):
    """The server sent something that is not an SMTP reply, or too much of one.

    ``str(error)`` says what. The session is unusable: close the
    connection and treat the attempt as a transient failure.
    """


def _check(value: str, what: str, unsafe: re.Pattern[str] = _UNSAFE) -> str:
    if unsafe.search(value) is not None:
        raise ValueError(f"{what} holds a character that cannot be sent: {value!r}")
    return value


def _path(address: str, what: str) -> str:
    """The path for MAIL or RCPT, or ValueError when ``address`` would break the line."""
    _check(address, what)
    _check(split_address(address)[1], f"{what} domain", _UNSAFE_DOMAIN)
    return format_path(address)


def _esc_prefix(text: str, code: str) -> str | None:
    """The enhanced status code at the start of ``text`` if its class is ``code``'s."""
    m = _ESC_RE.match(text)
    return m.group() if m is not None and text[0] == code[0] else None


def _make_reply(code: str, lines: list[str]) -> Reply:
    """A Reply from the texts of its lines (see the module docstring)."""
    reply = Reply(code)
    esc = _esc_prefix(lines[0], code)
    if esc is None:
        reply.text = "\n".join(lines)
        return reply
    n = len(esc)
    texts = []
    for line in lines:
        if line.startswith(esc) and (len(line) == n or line[n] == " "):
            line = line[n:].lstrip(" ")
        texts.append(line)
    reply.enhanced_status_code = esc
    reply.text = "\n".join(texts)
    return reply


class ClientConnection:
    """One SMTP (or, with ``lmtp``, LMTP) client session, sans-IO.

    See the module docstring for the reply rules. Options, all keywords
    but ``lmtp``:

    ``secure``
        The session is encrypted already (SMTPS); :meth:`tls_started` sets
        it too. It is the default of :meth:`best_auth_mechanism`.
    ``line_length_limit``
        Lines of the message content longer than this are folded by
        :meth:`message`, as Postfix's ``smtp_line_length_limit`` does
        (default :data:`LINE_LENGTH_LIMIT`, 998; 0 turns folding off).
    ``max_reply_line_length``, ``max_reply_lines``
        The bounds on a reply (defaults :data:`MAX_REPLY_LINE_LENGTH`,
        :data:`MAX_REPLY_LINES`).

    Command methods refuse (ValueError) arguments that would break the
    command line: CR, LF or NUL anywhere, white space in names, and white
    space or angle brackets in the domain of a path (a local part that needs
    it is quoted, as :func:`slimta.smtp.address.format_path` does).
    Misuse of the sequence (a command after STARTTLS before
    :meth:`tls_started`, content without a 354) is a RuntimeError.
    """

    def __init__(
        self,
        lmtp: bool = False,
        *,
        secure: bool = False,
        line_length_limit: int = LINE_LENGTH_LIMIT,
        max_reply_line_length: int = MAX_REPLY_LINE_LENGTH,
        max_reply_lines: int = MAX_REPLY_LINES,
    ) -> None:
        if line_length_limit == 1 or line_length_limit < 0:
            raise ValueError("line_length_limit must be 0 or at least 2")
        self.lmtp = lmtp
        #: the session is encrypted (SMTPS, or after :meth:`tls_started`)
        self.secure = secure
        self.line_length_limit = line_length_limit
        self.max_reply_line_length = max_reply_line_length
        self.max_reply_lines = max_reply_lines
        #: True after a 235 reply to AUTH
        self.authenticated = False
        #: True after a 221 or 421 reply: the server is closing the connection
        self.closing = False

        self._extensions = Extensions()
        self._buf = bytearray()
        self._pos = 0
        self._lines: list[str] = []  # the text of the lines of the reply being read
        self._code = ""  # the code of the last line read
        self._expected: deque[str] = deque()
        self._error: ClientError | None = None
        self._tls_pending = False  # a 220 to STARTTLS came; waiting for tls_started()
        self._auth: ClientAuth | None = None
        self._accepted = 0  # RCPTs answered 2xx since the last MAIL reply
        self._data_ready = False  # the last DATA got 354 and no content was sent yet

    # ------------------------------------------------------------------
    # what the server said
    @property
    def extensions(self) -> Extensions:
        """The server's EHLO/LHLO keywords; empty before its 250 reply, after HELO and STARTTLS."""
        return self._extensions

    @property
    def pipelining(self) -> bool:
        """The server offered PIPELINING (RFC 2920)."""
        return "PIPELINING" in self._extensions

    @property
    def size_limit(self) -> int | None:
        """The server's SIZE (RFC 1870) in octets; None when not offered or unlimited (0)."""
        value = self._extensions.getparam("SIZE")
        if value and value.isascii() and value.isdigit() and int(value) > 0:
            return int(value)
        return None

    @property
    def pending(self) -> tuple[str, ...]:
        """The tags of the replies still awaited, oldest first.

        An LMTP end of message counts once here until its first reply is
        due, when the number of accepted recipients is known.
        """
        return tuple(t.rstrip("*") for t in self._expected)

    @staticmethod
    def ehlo_failed_use_helo(reply: Reply) -> bool:
        """True when an EHLO reply means "say HELO instead": 500 or 502 (RFC 5321 §3.2)."""
        return reply.code in ("500", "502")

    def best_auth_mechanism(
        self,
        secure: bool | None = None,
        offered: Iterable[str] | None = None,
        *,
        token: bool = False,
    ) -> str | None:
        """The mechanism to AUTH with, among those the server offers; None if none fits.

        With a password the order is CRAM-MD5, PLAIN, LOGIN; PLAIN and LOGIN
        send the password itself, so they are chosen only when ``secure``
        (default: :attr:`secure`). With ``token`` (the secret is an OAuth 2.0
        bearer token) only XOAUTH2 fits, and also only when secure, since
        the token is as good as a password. ``offered`` defaults to the
        server's AUTH keyword (also the old ``AUTH=`` form).
        """
        if secure is None:
            secure = self.secure
        if offered is None:
            offered = (self._extensions.getparam("AUTH") or "").split()
        names = {m.upper() for m in offered}
        if token:
            order: tuple[str, ...] = ("XOAUTH2",) if secure else ()
        else:
            order = ("CRAM-MD5", "PLAIN", "LOGIN") if secure else ("CRAM-MD5",)
        for mech in order:
            if mech in names:
                return mech
        return None

    # ------------------------------------------------------------------
    # input
    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the server (empty bytes are ignored).

        Between a 220 reply to STARTTLS and :meth:`tls_started`, and after a
        :class:`ClientError`, data is dropped: nothing the server sends in
        clear after agreeing to TLS is ever read.
        """
        if data and not self._tls_pending and self._error is None:
            self._buf += data

    def next_reply(self) -> tuple[str, Reply] | None:
        """The next complete reply as ``(tag, reply)``, or None until more data comes.

        Raises :class:`ClientError` when the server's data is not SMTP.
        After a 220 reply to STARTTLS it gives None until :meth:`tls_started`.
        """
        if self._error is not None:
            raise self._error
        if self._tls_pending:
            return None
        try:
            lines = self._read_reply()
        except ClientError as exc:
            self._error = exc
            self._buf = bytearray()
            self._pos = 0
            raise
        if lines is None:
            return None
        reply = _make_reply(self._code, lines)
        tag = self._pop_tag()
        self._after(tag, reply, lines)
        return tag, reply

    def _read_reply(self) -> list[str] | None:
        """The texts of the lines of the next complete reply (its code in ``_code``)."""
        buf = self._buf
        limit = self.max_reply_line_length
        while True:
            pos = self._pos
            i = buf.find(b"\n", pos)
            if i == -1:
                # one more octet: the CR of a line of exactly `limit` octets
                if len(buf) - pos > limit + 1:
                    raise ClientError(f"reply line longer than {limit} octets")
                if pos:
                    del buf[:pos]
                    self._pos = 0
                return None
            end = i - 1 if i > pos and buf[i - 1] == 13 else i
            self._pos = i + 1
            if end - pos > limit:
                raise ClientError(f"reply line longer than {limit} octets")
            sep = buf[pos + 3:pos + 4]
            code = buf[pos:pos + 3]
            if not (len(code) == 3 and 50 <= code[0] <= 53 and 48 <= code[1] <= 57
                    and 48 <= code[2] <= 57 and (end - pos == 3 or sep in (b" ", b"-"))):
                raise ClientError(f"not an SMTP reply: {bytes(buf[pos:min(end, pos + 40)])!r}")
            lines = self._lines
            lines.append(buf[pos + 4:end].decode("utf-8", "replace"))
            if len(lines) > self.max_reply_lines:
                raise ClientError(f"reply of more than {self.max_reply_lines} lines")
            if sep == b"-" and end - pos > 3:
                continue
            self._lines = []
            self._code = code.decode("ascii")
            if self._pos >= _COMPACT_AT:
                del buf[:self._pos]
                self._pos = 0
            return lines

    def _pop_tag(self) -> str:
        expected = self._expected
        while expected:
            tag = expected.popleft()
            if tag == _DATA_END_PER_RCPT:
                tag, n = "DATA_END", max(self._accepted, 1)
            elif tag == _BDAT_PER_RCPT:
                tag, n = "BDAT", self._accepted
            else:
                return tag
            if n:
                expected.extendleft([tag] * (n - 1))
                return tag
        return "UNSOLICITED"

    def _after(self, tag: str, reply: Reply, lines: list[str]) -> None:
        """Update the session from a reply."""
        code = reply.code
        if code == "421" or code == "221":
            self.closing = True
        if tag == "EHLO" or tag == "LHLO":
            if code == "250":
                self._extensions = Extensions.parse_ehlo("\n".join(lines))[1]
        elif tag == "MAIL" or tag == "RSET":
            self._accepted = 0
        elif tag == "RCPT":
            if code[:1] == "2":
                self._accepted += 1
        elif tag == "DATA":
            self._data_ready = code == "354"
        elif tag == "AUTH":
            if code != "334":
                self._auth = None
                self.authenticated = code == "235"
        elif tag == "STARTTLS" and code == "220":
            # RFC 3207 §4.2: nothing that follows in clear is trusted
            self._tls_pending = True
            self._buf = bytearray()
            self._pos = 0

    # ------------------------------------------------------------------
    # commands
    def _command(self, tag: str, line: str) -> bytes:
        if self._tls_pending or "STARTTLS" in self._expected:
            raise RuntimeError("no command may follow STARTTLS before tls_started()")
        self._expected.append(tag)
        return line.encode("utf-8") + b"\r\n"

    def expect_banner(self) -> None:
        """Await the server's greeting as the first reply (tag ``'BANNER'``)."""
        self._expected.append("BANNER")

    def ehlo(self, name: str) -> bytes:
        """EHLO; the extensions are learnt from its 250 reply."""
        self._extensions = Extensions()
        return self._command("EHLO", f"EHLO {_check(name, 'EHLO name', _UNSAFE_NAME)}")

    def lhlo(self, name: str) -> bytes:
        """LHLO, LMTP's EHLO (RFC 2033 §4.1)."""
        self._extensions = Extensions()
        return self._command("LHLO", f"LHLO {_check(name, 'LHLO name', _UNSAFE_NAME)}")

    def helo(self, name: str) -> bytes:
        """HELO: no extensions (after a 500/502 to EHLO, see :meth:`ehlo_failed_use_helo`)."""
        self._extensions = Extensions()
        return self._command("HELO", f"HELO {_check(name, 'HELO name', _UNSAFE_NAME)}")

    def starttls(self) -> bytes:
        """STARTTLS (RFC 3207); no other command may follow it until :meth:`tls_started`."""
        return self._command("STARTTLS", "STARTTLS")

    def tls_started(self) -> None:
        """The TLS handshake finished: the session starts over (RFC 3207 §4.2).

        Anything buffered is discarded (a reply injected in clear before the
        handshake is never read), the extensions are forgotten (send EHLO
        again), AUTH is forgotten, and :attr:`secure` becomes True. For
        SMTPS, pass ``secure=True`` to the constructor instead.
        """
        self._tls_pending = False
        self._buf = bytearray()
        self._pos = 0
        self._lines = []
        self._extensions = Extensions()
        self._auth = None
        self.authenticated = False
        self.secure = True

    def auth(
        self, mechanism: str, authcid: str, secret: str | bytes, authzid: str | None = None
    ) -> bytes:
        """Start AUTH (RFC 4954) with PLAIN, LOGIN, CRAM-MD5 or XOAUTH2.

        ``secret`` is the password, or the bearer token for XOAUTH2;
        ``authzid`` is for PLAIN only. PLAIN and XOAUTH2 send an initial
        response. Each ``334`` reply (tagged ``'AUTH'``) is answered with
        :meth:`auth_continue`; the final 235 or error is tagged ``'AUTH'``
        too. ValueError for an unsupported mechanism or bad credentials.
        """
        if self._auth is not None:
            raise RuntimeError("an AUTH exchange is in progress")
        exchange = ClientAuth(mechanism, authcid, secret, authzid)
        data = self._command("AUTH", exchange.command())
        self._auth = exchange
        return data

    def auth_continue(self, reply: Reply) -> bytes:
        """The answer to a ``334`` reply during AUTH: the mechanism's next response.

        An empty line for XOAUTH2's error challenge; ``*`` (cancel, RFC 4954
        §4) when the challenge is not base64 or the mechanism has nothing
        more to send; the server then sends the final reply.
        """
        if reply.code != "334":
            raise ValueError(f"not a 334 reply: {reply!r}")
        if self._auth is None:
            raise RuntimeError("no AUTH exchange in progress")
        line = self._auth.respond(reply.message)
        return self._command("AUTH", line)

    def mail(
        self,
        sender: str,
        *,
        size: int | None = None,
        body: str | None = None,
        smtputf8: bool = False,
        ret: str | None = None,
        envid: str | None = None,
        auth: str | None = None,
    ) -> bytes:
        """MAIL FROM, with only the parameters the server offered.

        ``SIZE=`` needs SIZE (RFC 1870); ``BODY=8BITMIME`` (or ``7BIT``)
        needs 8BITMIME (RFC 6152) and ``BODY=BINARYMIME`` needs BINARYMIME
        (RFC 3030); ``SMTPUTF8`` needs SMTPUTF8 (RFC 6531); ``RET=`` and
        ``ENVID=`` need DSN (RFC 3461); ``AUTH=`` needs AUTH (RFC 4954 §5;
        ``''`` or ``'<>'`` give ``AUTH=<>``). A parameter the server did not
        offer is left out: deciding whether the message can go without it
        (7-bit downgrade, 553 for SMTPUTF8) is the caller's. ENVID and AUTH
        are xtext-encoded; an ENVID that is not 1 to 100 printable ASCII
        characters (RFC 3461 §4.4) is a ValueError. ``sender`` ``''`` is the
        null path ``<>``.
        """
        ext = self._extensions
        params: list[str] = []
        if size is not None and "SIZE" in ext:
            if size < 0:
                raise ValueError("negative SIZE")
            params.append(f"SIZE={int(size)}")
        if body is not None:
            body = body.upper()
            if body not in _BODY_VALUES:
                raise ValueError(f"bad BODY value: {body!r}")
            if ("BINARYMIME" in ext) if body == "BINARYMIME" else ("8BITMIME" in ext):
                params.append(f"BODY={body}")
        if smtputf8 and "SMTPUTF8" in ext:
            params.append("SMTPUTF8")
        if "DSN" in ext:
            if ret is not None:
                ret = ret.upper()
                if ret not in ("FULL", "HDRS"):
                    raise ValueError(f"bad RET value: {ret!r}")
                params.append(f"RET={ret}")
            if envid is not None:
                if not (envid.isascii() and envid.isprintable()
                        and 0 < len(envid) <= MAX_ENVID_LENGTH):
                    raise ValueError(f"bad ENVID: {envid!r}")
                params.append(f"ENVID={xtext_encode(envid)}")
        if auth is not None and "AUTH" in ext:
            params.append("AUTH=<>" if auth in ("", "<>") else f"AUTH={xtext_encode(auth)}")
        path = _path(sender, "sender")
        line = f"MAIL FROM:{path}"
        if params:
            line += " " + " ".join(params)
        return self._command("MAIL", line)

    def rcpt(
        self,
        recipient: str,
        *,
        notify: str | Iterable[str] | None = None,
        orcpt: str | None = None,
    ) -> bytes:
        """RCPT TO, with ``NOTIFY=`` and ``ORCPT=`` only when the server offers DSN.

        ``notify`` is ``'NEVER'`` or some of SUCCESS, FAILURE, DELAY, as a
        list or a comma-separated string. ``orcpt`` is ``'type;address'``
        decoded (as :func:`slimta.smtp.extensions.parse_orcpt` gives it; a
        bare address means ``rfc822``); the address is xtext-encoded, or for
        a non-ASCII address sent as type ``utf-8`` in the ASCII-only form of
        RFC 6533 §3 (``\\x{HEX}`` escapes).
        """
        params: list[str] = []
        if "DSN" in self._extensions:
            if notify is not None:
                params.append(f"NOTIFY={_notify_value(notify)}")
            if orcpt is not None:
                params.append(f"ORCPT={_orcpt_value(orcpt)}")
        path = _path(recipient, "recipient")
        line = f"RCPT TO:{path}"
        if params:
            line += " " + " ".join(params)
        return self._command("RCPT", line)

    def data(self) -> bytes:
        """DATA; after its 354 reply, send :meth:`message`."""
        self._data_ready = False
        return self._command("DATA", "DATA")

    def message(self, content: bytes, replies: int | None = None) -> bytes:
        """The message content after a 354 reply to DATA, dot-stuffed and ended.

        Line endings become CRLF (a bare LF or CR ends a line too, as
        :func:`slimta.smtp.data.to_crlf` does: a receiver never sees a bare
        one, which protects it from "SMTP smuggling"); lines longer than
        :attr:`line_length_limit` are folded as Postfix does
        (:func:`slimta.smtp.data.fold_long_lines`); lines starting with a
        dot get another (RFC 5321 §4.5.2); ``.<CRLF>`` ends it.

        The reply is tagged ``'DATA_END'``. With LMTP there is one per
        recipient accepted since MAIL, in RCPT order (RFC 2033 §4.2), counted
        from the RCPT replies; ``replies`` overrides the count.
        """
        if not self._data_ready:
            raise RuntimeError("message() only after a 354 reply to DATA")
        self._data_ready = False
        content = to_crlf(content)
        if self.line_length_limit:
            content = fold_long_lines(content, self.line_length_limit)
        self._expect_end(replies)
        return dot_stuff(content)

    def bdat(self, chunk: bytes, last: bool = False) -> bytes:
        """``BDAT <size> [LAST]`` and the chunk as it is (RFC 3030): binary-clean.

        No dot-stuffing, no line-ending changes and no folding. Replies are
        tagged ``'BDAT'``. For LMTP, ``BDAT ... LAST`` gets one reply per
        recipient accepted since MAIL, in RCPT order, and none when no
        recipient was accepted (RFC 2033 §4.3); they are counted when they
        are due, so BDAT may be pipelined behind the RCPTs.
        """
        line = f"BDAT {len(chunk)} LAST" if last else f"BDAT {len(chunk)}"
        head = self._command("BDAT", line)
        if last and self.lmtp:
            self._expected[-1] = _BDAT_PER_RCPT
        return head + chunk if chunk else head

    def _expect_end(self, replies: int | None) -> None:
        if replies is not None:
            self._expected.extend(["DATA_END"] * replies)
        elif self.lmtp:
            self._expected.append(_DATA_END_PER_RCPT)
        else:
            self._expected.append("DATA_END")

    def rset(self) -> bytes:
        """RSET."""
        self._data_ready = False
        return self._command("RSET", "RSET")

    def noop(self) -> bytes:
        """NOOP."""
        return self._command("NOOP", "NOOP")

    def quit(self) -> bytes:
        """QUIT; the server answers 221 and closes."""
        return self._command("QUIT", "QUIT")

    def __repr__(self) -> str:
        kind = "LMTP" if self.lmtp else "SMTP"
        return f"ClientConnection({kind}, pending={self.pending!r})"


def _notify_value(notify: str | Iterable[str]) -> str:
    items = notify.split(",") if isinstance(notify, str) else list(notify)
    values = [item.strip().upper() for item in items]
    if values == ["NEVER"]:
        return "NEVER"
    if not values or any(v not in _NOTIFY_VALUES for v in values):
        raise ValueError(f"bad NOTIFY value: {notify!r}")
    return ",".join(dict.fromkeys(values))


def _orcpt_value(orcpt: str) -> str:
    addr_type, sep, address = orcpt.partition(";")
    if not sep:
        addr_type, address = "rfc822", orcpt
    if not address or not addr_type or any(c in addr_type for c in "; =+\r\n\x00"):
        raise ValueError(f"bad ORCPT value: {orcpt!r}")
    if address.isascii() and addr_type.lower() != "utf-8":
        return f"{addr_type};{xtext_encode(address)}"
    # RFC 6533 §3 utf-8-addr-xtext: printable ASCII but "+", "=" and "\" as
    # it is, everything else as \x{HEX}
    out = []
    for c in address:
        o = ord(c)
        if 0x21 <= o <= 0x7E and c not in "+=\\":
            out.append(c)
        else:
            out.append(f"\\x{{{o:02X}}}")
    return "utf-8;" + "".join(out)
