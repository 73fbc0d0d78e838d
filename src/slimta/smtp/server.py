"""The server side of SMTP as a sans-IO state machine.

:class:`ServerConnection` takes bytes (:meth:`~ServerConnection.receive_data`)
and hands out events (:meth:`~ServerConnection.next_event`), one at a time.
Each event carries the reply the server would give by default; the caller may
change it (that is where validators run) and then calls
:meth:`~ServerConnection.respond`. Replies that need no decision (syntax
errors, NOOP, limits) the connection produces itself. Everything to write to
the client is taken with :meth:`~ServerConnection.data_to_send`.

Events are produced lazily, so replies to pipelined commands come out in
order and each command is judged in the state its predecessors left.

No sockets, no clocks: timeouts and TLS are the caller's, signalled with
:meth:`~ServerConnection.timed_out` and :meth:`~ServerConnection.tls_started`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from slimta.smtp import reply as R
from slimta.smtp.address import AddressError, parse_path
from slimta.smtp.auth import PLAINTEXT_MECHANISMS, SERVER_MECHANISMS, AuthExchange
from slimta.smtp.data import ChunkReader, DataReader
from slimta.smtp.extensions import (
    Extensions,
    ParamError,
    parse_body,
    parse_envid,
    parse_notify,
    parse_orcpt,
    parse_params,
    parse_ret,
    parse_size,
    xtext_decode,
)
from slimta.smtp.reply import Reply

__all__ = [
    "Auth",
    "DataStart",
    "Ehlo",
    "Event",
    "HaveData",
    "Helo",
    "Mail",
    "Rcpt",
    "Rset",
    "ServerConnection",
    "StartTls",
    "Transaction",
]

DEFAULT_MAX_SIZE = 10 * 1024 * 1024
DEFAULT_MAX_RECIPIENTS = 1000
COMMAND_LINE_LIMIT = 512  # octets including CRLF (RFC 5321 §4.5.3.1.4)
AUTH_LINE_LIMIT = 12288  # RFC 4954 §4


# ---------------------------------------------------------------------------
# events
class Event:
    """Something the client asked for; answer it by calling ``respond()``.

    ``reply`` is the default answer; change it in place to answer otherwise.
    """

    __slots__ = ("reply",)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({fields}, reply={self.reply!r})"


class Ehlo(Event):
    """EHLO name."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name
        self.reply = Reply("250", f"Hello {name}")


class Helo(Event):
    """HELO name."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name
        self.reply = Reply("250", f"Hello {name}")


class Mail(Event):
    """MAIL FROM:<sender> with its ESMTP parameters (upper-case keys, raw values)."""

    __slots__ = ("params", "sender")

    def __init__(self, sender: str, params: dict[str, str | None]):
        self.sender = sender
        self.params = params
        self.reply = Reply("250", f"2.1.0 <{sender}> Ok")


class Rcpt(Event):
    """RCPT TO:<recipient> with its ESMTP parameters."""

    __slots__ = ("params", "recipient")

    def __init__(self, recipient: str, params: dict[str, str | None]):
        self.recipient = recipient
        self.params = params
        self.reply = Reply("250", f"2.1.5 <{recipient}> Ok")


class DataStart(Event):
    """DATA, or the first BDAT of a transaction (``bdat`` true).

    For DATA a 354 reply lets the content in. For BDAT a 2xx reply accepts
    the chunks; the reply itself is sent only after the chunk has been read.
    """

    __slots__ = ("bdat",)

    def __init__(self, bdat: bool):
        self.bdat = bdat
        if bdat:
            self.reply = Reply("250", "2.0.0 Ok")
        else:
            self.reply = Reply("354", "Start mail input; end with <CRLF>.<CRLF>")


class HaveData(Event):
    """A whole message arrived: ``data`` (unstuffed) for ``transaction``."""

    __slots__ = ("data", "transaction")

    def __init__(self, transaction: Transaction, data: bytes):
        self.transaction = transaction
        self.data = data
        self.reply = Reply("250", "2.6.0 Message accepted for delivery")


class Rset(Event):
    """RSET."""

    __slots__ = ()

    def __init__(self):
        self.reply = Reply("250", "2.0.0 Ok")


class StartTls(Event):
    """STARTTLS; a 220 reply means the caller starts the TLS handshake."""

    __slots__ = ()

    def __init__(self):
        self.reply = Reply("220", "2.0.0 Ready to start TLS")


class Auth(Event):
    """A finished SASL exchange; ``credentials`` to check (see slimta.smtp.auth)."""

    __slots__ = ("credentials",)

    def __init__(self, credentials):
        self.credentials = credentials
        self.reply = R.auth_succeeded.copy()


# ---------------------------------------------------------------------------
class Transaction:
    """The mail transaction being built: MAIL, RCPTs and their parameters."""

    __slots__ = (
        "auth", "body", "envid", "rcpt_params", "recipients", "ret", "sender", "size",
        "smtputf8",
    )

    def __init__(self, sender: str):
        self.sender = sender
        self.recipients: list[str] = []
        self.rcpt_params: dict[str, dict] = {}
        self.body = "7BIT"
        self.smtputf8 = False
        self.ret: str | None = None
        self.envid: str | None = None
        self.auth: str | None = None
        self.size: int | None = None


_COMMAND, _DATA, _BDAT, _AUTH, _TLS, _REJECTED = range(6)


class ServerConnection:
    """One SMTP server session, sans-IO (see the module docstring).

    ``tls`` says whether STARTTLS can be offered; ``secure`` whether the
    session is already encrypted (SMTPS). ``auth_mechanisms`` empty means no
    AUTH. With ``auth_require_tls`` the plain-text mechanisms (PLAIN, LOGIN)
    are offered and accepted only once the session is encrypted.
    """

    def __init__(
        self,
        hostname: str = "localhost",
        *,
        max_size: int | None = DEFAULT_MAX_SIZE,
        max_recipients: int | None = DEFAULT_MAX_RECIPIENTS,
        max_bad_commands: int | None = 20,
        max_auth_failures: int | None = 3,
        tls: bool = False,
        secure: bool = False,
        auth_mechanisms: tuple[str, ...] | list[str] = (),
        auth_require_tls: bool = True,
        nonce: Callable[[], str] | None = None,
    ):
        self.hostname = hostname
        self.max_size = max_size
        self.max_recipients = max_recipients
        self.max_bad_commands = max_bad_commands
        self.max_auth_failures = max_auth_failures
        self.tls_available = tls
        self.secure = secure
        mechs = [m.upper() for m in auth_mechanisms]
        for m in mechs:
            if m not in SERVER_MECHANISMS:
                raise ValueError(f"unsupported AUTH mechanism {m!r}")
        self.auth_mechanisms = tuple(mechs)
        self.auth_require_tls = auth_require_tls
        self._nonce = nonce or (lambda: secrets.token_hex(12))

        #: the EHLO/HELO name, once greeted
        self.ehlo_as: str | None = None
        #: True after EHLO (ESMTP), False after HELO
        self.extended = False
        #: the authenticated identity (authcid), once AUTH succeeded
        self.auth: str | None = None
        #: the transaction in progress (after a successful MAIL)
        self.transaction: Transaction | None = None
        #: set once the session must end; write data_to_send() then close
        self.closing = False
        self.bad_commands = 0
        self.auth_failures = 0

        self._buf = b""
        self._pos = 0
        self._mode = _COMMAND
        self._out: list[bytes] = []
        self._pending: Event | None = None
        self._discarding = False  # inside an over-long line
        self._data: DataReader | None = None
        self._chunk: ChunkReader | None = None
        self._chunk_last = False
        self._chunk_error: Reply | None = None
        self._chunks: list[bytes] = []
        self._bdat_size = 0
        self._auth_exchange: AuthExchange | None = None
        self._mail_values_pending: dict = {}
        self._rcpt_values: dict = {}
        self._ehlo_cache: dict[bool, list[str]] = {}

    # ------------------------------------------------------------------
    # the caller's side
    def banner(self, reply: Reply) -> None:
        """Send the greeting. 421 ends the session; 554 refuses all but QUIT (RFC 5321 §3.1)."""
        self._send(reply)
        if reply.code == "421":
            self.closing = True
        elif reply.is_error():
            self._mode = _REJECTED

    def receive_data(self, data: bytes) -> None:
        """Add bytes read from the client."""
        if self._mode == _TLS or self.closing:
            return  # cleartext after STARTTLS is never executed
        if self._pos >= len(self._buf):
            self._buf = data
        else:
            self._buf = self._buf[self._pos:] + data
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Octets received but not yet processed."""
        return len(self._buf) - self._pos

    @property
    def receiving_message(self) -> bool:
        """True while message content (DATA or BDAT chunks) is being accepted."""
        return self._mode == _DATA or bool(self._chunks) or (
            self._mode == _BDAT and not self._chunk.discard)

    @property
    def waiting_for_tls(self) -> bool:
        return self._mode == _TLS

    def data_to_send(self) -> bytes:
        """Everything to write to the client so far."""
        out = self._out
        if not out:
            return b""
        self._out = []
        return out[0] if len(out) == 1 else b"".join(out)

    def timed_out(self) -> None:
        """The caller's timer expired: say 421 4.4.2 and end the session."""
        if not self.closing:
            self._send(R.timed_out)
            self.closing = True

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS finished; the session starts over (RFC 3207 §4.2)."""
        self._mode = _COMMAND
        self.secure = True
        self._buf = b""
        self._pos = 0

    def next_event(self) -> Event | None:
        """The next event, or None when more input is needed (or the session is ending)."""
        if self._pending is not None:
            raise RuntimeError(f"respond() to {self._pending!r} first")
        while not self.closing:
            mode = self._mode
            if mode == _DATA:
                ev = self._read_data()
            elif mode == _BDAT:
                ev = self._read_chunk()
            elif mode == _TLS:
                return None
            else:
                line = self._read_line()
                if line is None:
                    return None
                ev = self._auth_advance(line) if mode == _AUTH else self._command(line)
            if ev is None:
                continue
            if ev is True:  # input exhausted in a content mode
                return None
            self._pending = ev
            return ev
        return None

    def respond(self) -> None:
        """Answer the pending event with its (possibly changed) reply."""
        ev = self._pending
        if ev is None:
            raise RuntimeError("no event to respond to")
        self._pending = None
        reply = ev.reply
        ok = reply.code[:1] == "2"
        kind = type(ev)
        if kind is Mail:
            if ok:
                self._begin_transaction(ev)
            self._send(reply)
        elif kind is Rcpt:
            if ok and self.transaction is not None:
                t = self.transaction
                t.recipients.append(ev.recipient)
                if ev.params:
                    t.rcpt_params[ev.recipient] = self._rcpt_values
            self._send(reply)
        elif kind is HaveData:
            self.transaction = None
            self._send(reply)
        elif kind is DataStart:
            if ev.bdat:
                if not ok:
                    self._chunk.discard = True
                    self._chunk_error = reply
                    self.transaction = None
            else:
                if reply.code == "354":
                    self._mode = _DATA
                    self._data = DataReader(self.max_size)
                self._send(reply)
        elif kind is Ehlo or kind is Helo:
            if ok:
                self.ehlo_as = ev.name
                self.extended = kind is Ehlo
                self.transaction = None
                self._reset_content()
                if kind is Ehlo and reply.code == "250":
                    self._send_ehlo(reply)
                    reply = None
            if reply is not None:
                self._send(reply)
        elif kind is Rset:
            if ok:
                self.transaction = None
            self._send(reply)
        elif kind is StartTls:
            self._send(reply)
            if reply.code == "220":
                self._mode = _TLS
                self._buf = b""
                self._pos = 0
                self.ehlo_as = None
                self.extended = False
                self.transaction = None
                self.auth = None
        elif kind is Auth:
            self._send(reply)
            if reply.code == "235":
                self.auth = ev.credentials.authcid
            else:
                if reply.closes_connection():  # the validator's 421 is the last word
                    self.closing = True
                self._auth_failed()
        else:  # pragma: no cover - all kinds handled above
            self._send(reply)
        if reply is not None and (reply.code == "421" or reply.code == "221"):
            self.closing = True

    # ------------------------------------------------------------------
    # output helpers
    def _send(self, reply: Reply) -> None:
        self._out.append(bytes(reply))

    def _error(self, reply: Reply) -> None:
        """A protocol error by the client: reply, count it, end the session past the limit."""
        self._out.append(bytes(reply))
        self.bad_commands += 1
        if self.max_bad_commands is not None and self.bad_commands >= self.max_bad_commands:
            self._send(R.too_many_errors)
            self.closing = True

    def _auth_failed(self) -> None:
        self.auth_failures += 1
        if (self.max_auth_failures is not None and self.auth_failures >= self.max_auth_failures
                and not self.closing):  # one 421, even when the bad-command limit hit too
            self._send(R.too_many_errors)
            self.closing = True

    def _extensions(self) -> Extensions:
        ext = Extensions()
        ext.add("8BITMIME")
        ext.add("PIPELINING")
        ext.add("ENHANCEDSTATUSCODES")
        ext.add("SMTPUTF8")
        ext.add("SIZE", str(self.max_size) if self.max_size else None)
        ext.add("CHUNKING")
        ext.add("BINARYMIME")
        ext.add("DSN")
        if self.tls_available and not self.secure:
            ext.add("STARTTLS")
        mechs = self._offered_mechanisms()
        if mechs:
            ext.add("AUTH", " ".join(mechs))
        return ext

    def _offered_mechanisms(self) -> tuple[str, ...]:
        if self.secure or not self.auth_require_tls:
            return self.auth_mechanisms
        return tuple(m for m in self.auth_mechanisms if m not in PLAINTEXT_MECHANISMS)

    def _send_ehlo(self, reply: Reply) -> None:
        lines = self._ehlo_cache.get(self.secure)
        if lines is None:
            lines = self._ehlo_cache[self.secure] = self._extensions().lines()
        first = reply.message.replace("\r\n", "\n").split("\n")
        allx = first + lines
        code = reply.code
        out = [f"{code}-{x}\r\n" for x in allx[:-1]]
        out.append(f"{code} {allx[-1]}\r\n")
        self._out.append("".join(out).encode("utf-8", "replace"))

    # ------------------------------------------------------------------
    # input
    def _read_line(self) -> str | None:
        """The next command line as text, or None when it has not fully arrived."""
        while True:
            buf, pos = self._buf, self._pos
            i = buf.find(b"\n", pos)
            if i == -1:
                if len(buf) - pos > self._line_limit():
                    self._discarding = True
                    self._buf, self._pos = b"", 0
                return None
            n = i + 1 - pos
            if self._discarding or (n > COMMAND_LINE_LIMIT and n > self._line_limit()):
                self._pos = i + 1
                self._discarding = False
                self._error(R.line_too_long)
                if self.closing:
                    return None
                continue
            self._pos = i + 1
            end = i - 1 if i > pos and buf[i - 1] == 13 else i
            raw = buf[pos:end]
            # NUL, and a bare CR (RFC 5321 §2.3.8), which replies would echo
            if b"\0" in raw or b"\r" in raw:
                self._error(R.syntax_error)
                if self.closing:
                    return None
                continue
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                self._error(R.syntax_error)
                if self.closing:
                    return None

    def _line_limit(self) -> int:
        """AUTH lines may be longer than other commands (RFC 4954 §4)."""
        if self._mode == _AUTH or self._buf[self._pos:self._pos + 5].upper() == b"AUTH ":
            return AUTH_LINE_LIMIT
        return COMMAND_LINE_LIMIT

    def _command(self, line: str) -> Event | None:
        sp = line.find(" ")
        if sp == -1:
            verb, arg = line, ""
        else:
            verb, arg = line[:sp], line[sp + 1:]
        # only ASCII command words: str.upper() maps a dotless i (U+0131) to I
        verb = verb.upper() if verb.isascii() else ""
        if self._mode == _REJECTED and verb != "QUIT":
            self._send(R.bad_sequence)
            return None
        handler = _COMMANDS.get(verb)
        if handler is None:
            self._error(R.syntax_error)
            return None
        return handler(self, arg)

    # ------------------------------------------------------------------
    # commands
    def _cmd_ehlo(self, arg: str) -> Event | None:
        name = arg.strip()
        if not name:
            self._error(Reply("501", "5.5.4 Syntax: EHLO hostname"))
            return None
        return Ehlo(name)

    def _cmd_helo(self, arg: str) -> Event | None:
        name = arg.strip()
        if not name:
            self._error(Reply("501", "5.5.4 Syntax: HELO hostname"))
            return None
        return Helo(name)

    def _cmd_mail(self, arg: str) -> Event | None:
        if self.ehlo_as is None:
            self._error(Reply("503", "5.5.1 Send EHLO or HELO first"))
            return None
        if self.transaction is not None:
            self._error(Reply("503", "5.5.1 Nested MAIL command"))
            return None
        if arg[:5].upper() != "FROM:":
            self._error(Reply("501", "5.5.4 Syntax: MAIL FROM:<address>"))
            return None
        try:
            sender, rest, non_ascii = parse_path(arg[5:], allow_null=True)
        except AddressError:
            self._error(R.bad_sender)
            return None
        try:
            params = parse_params(rest) if rest else {}
            values = self._mail_values(params)
        except ParamError as exc:
            self._error(R.unknown_parameter if exc.kind == "unknown" else R.bad_arguments)
            return None
        except _Refuse as exc:
            self._send(exc.reply)
            return None
        if non_ascii and not values.get("smtputf8"):
            self._send(R.utf8_not_declared)
            return None
        self._mail_values_pending = values
        return Mail(sender, params)

    def _mail_values(self, params: dict[str, str | None]) -> dict:
        values: dict = {}
        for key, value in params.items():
            if key == "SIZE":
                size = parse_size(value)
                if self.max_size and size > self.max_size:
                    raise _Refuse(R.message_too_big)
                values["size"] = size
            elif key == "BODY":
                values["body"] = parse_body(value)
            elif key == "SMTPUTF8":
                if value is not None:
                    raise ParamError("syntax", "SMTPUTF8 takes no value")
                values["smtputf8"] = True
            elif key == "AUTH":
                if value is None:
                    raise ParamError("syntax", "AUTH needs a value")
                values["auth"] = None if value == "<>" else xtext_decode(value)
            elif key == "RET":
                values["ret"] = parse_ret(value)
            elif key == "ENVID":
                values["envid"] = parse_envid(value)
            else:
                raise ParamError("unknown", f"unknown parameter {key}")
        return values

    def _begin_transaction(self, ev: Mail) -> None:
        t = Transaction(ev.sender)
        values = self._mail_values_pending
        if values:
            t.size = values.get("size")
            t.body = values.get("body", "7BIT")
            t.smtputf8 = values.get("smtputf8", False)
            t.auth = values.get("auth")
            t.ret = values.get("ret")
            t.envid = values.get("envid")
        self.transaction = t

    def _cmd_rcpt(self, arg: str) -> Event | None:
        t = self.transaction
        if t is None:
            self._error(Reply("503", "5.5.1 Need MAIL before RCPT"))
            return None
        if arg[:3].upper() != "TO:":
            self._error(Reply("501", "5.5.4 Syntax: RCPT TO:<address>"))
            return None
        try:
            rcpt, rest, non_ascii = parse_path(arg[3:], allow_postmaster=True)
        except AddressError:
            self._error(R.bad_recipient)
            return None
        values: dict = {}
        params: dict[str, str | None] = {}
        if rest:
            try:
                params = parse_params(rest)
                for key, value in params.items():
                    if key == "NOTIFY":
                        values["notify"] = parse_notify(value)
                    elif key == "ORCPT":
                        values["orcpt"] = parse_orcpt(value)
                    else:
                        raise ParamError("unknown", f"unknown parameter {key}")
            except ParamError as exc:
                self._error(R.unknown_parameter if exc.kind == "unknown" else R.bad_arguments)
                return None
        if non_ascii and not t.smtputf8:
            self._send(R.utf8_not_declared)
            return None
        if self.max_recipients is not None and len(t.recipients) >= self.max_recipients:
            self._send(R.too_many_recipients)
            return None
        self._rcpt_values = values
        return Rcpt(rcpt, params)

    def _cmd_data(self, arg: str) -> Event | None:
        if arg.strip():
            self._error(Reply("501", "5.5.4 Syntax: DATA"))
            return None
        t = self.transaction
        if t is None:
            self._error(Reply("503", "5.5.1 Need MAIL command"))
            return None
        if not t.recipients:
            self._error(Reply("554", "5.5.1 No valid recipients"))
            return None
        if t.body == "BINARYMIME" or self._chunks:
            self._error(Reply("503", "5.5.1 Use BDAT for this message"))
            return None
        return DataStart(bdat=False)

    def _cmd_bdat(self, arg: str) -> Event | None:
        parts = arg.split()
        if not parts or len(parts) > 2 or not (parts[0].isascii() and parts[0].isdigit()) or (
                len(parts) == 2 and parts[1].upper() != "LAST"):
            # the chunk's length is unknown, so the input cannot be followed any further
            self._send(Reply("501", "5.5.4 Syntax: BDAT size [LAST]; closing connection"))
            self.closing = True
            return None
        size = int(parts[0])
        self._chunk_last = len(parts) == 2
        t = self.transaction
        if t is None or not t.recipients:
            self._chunk = ChunkReader(size, discard=True)
            self._chunk_error = Reply("503", "5.5.1 Need MAIL and RCPT before BDAT")
            self._mode = _BDAT
            return None
        self._mode = _BDAT
        over = self.max_size and self._bdat_size + size > self.max_size
        self._chunk = ChunkReader(size, discard=bool(over))
        self._chunk_error = R.message_too_big if over else None
        if self._chunks or over:
            return None
        self._chunks = []
        return DataStart(bdat=True)

    def _cmd_rset(self, arg: str) -> Event | None:
        if arg.strip():
            self._error(Reply("501", "5.5.4 Syntax: RSET"))
            return None
        self._reset_content()
        return Rset()

    def _cmd_noop(self, arg: str) -> None:
        self._send(Reply("250", "2.0.0 Ok"))

    def _cmd_quit(self, arg: str) -> None:
        self._send(Reply("221", "2.0.0 Bye"))
        self.closing = True

    def _cmd_vrfy(self, arg: str) -> None:
        if not arg.strip():
            self._error(Reply("501", "5.5.4 Syntax: VRFY address"))
            return
        self._send(Reply(
            "252", "2.5.0 Cannot VRFY user, but will accept message and attempt delivery"))

    def _cmd_expn(self, arg: str) -> None:
        self._send(R.not_implemented)

    def _cmd_help(self, arg: str) -> None:
        self._send(Reply("214", "2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT "
                                "VRFY HELP STARTTLS AUTH"))

    def _cmd_starttls(self, arg: str) -> Event | None:
        if arg.strip():
            self._error(Reply("501", "5.5.4 Syntax: STARTTLS"))
            return None
        if self.secure:
            self._error(Reply("503", "5.5.1 TLS already active"))
            return None
        if not self.tls_available:
            self._error(R.not_implemented)
            return None
        self._reset_content()
        return StartTls()

    def _cmd_auth(self, arg: str) -> Event | None:
        if not self.auth_mechanisms:
            self._error(R.not_implemented)
            return None
        if self.ehlo_as is None:
            self._error(Reply("503", "5.5.1 Send EHLO first"))
            return None
        if self.auth is not None:
            self._error(Reply("503", "5.5.1 Already authenticated"))
            return None
        if self.transaction is not None:
            self._error(Reply("503", "5.5.1 AUTH not allowed during a mail transaction"))
            return None
        parts = arg.split()
        if not parts or len(parts) > 2:
            self._error(Reply("501", "5.5.4 Syntax: AUTH mechanism [initial-response]"))
            return None
        mech = parts[0].upper()
        if mech not in self.auth_mechanisms:
            self._error(Reply("504", "5.5.4 Unrecognized authentication type"))
            return None
        if mech in PLAINTEXT_MECHANISMS and self.auth_require_tls and not self.secure:
            self._send(R.tls_required_for_auth)
            self._auth_failed()
            return None
        initial = parts[1] if len(parts) == 2 else None
        self._auth_exchange = AuthExchange(mech, initial, self.hostname, self._nonce())
        return self._auth_advance(None)

    def _auth_advance(self, line: str | None) -> Event | None:
        result = self._auth_exchange.step(line)
        kind = result.kind
        if kind == "challenge":
            self._mode = _AUTH
            # RFC 4954 §4: continue-req = "334" SP [base64] CRLF, even when empty
            self._out.append(b"334 " + result.encoded.encode("ascii") + b"\r\n")
            return None
        self._mode = _COMMAND
        self._auth_exchange = None
        if kind == "done":
            return Auth(result.credentials)
        if kind == "cancelled":
            self._send(Reply("501", "5.7.0 Authentication cancelled"))
            return None
        self._error(Reply("501", "5.5.2 Malformed authentication response"))
        self._auth_failed()
        return None

    # ------------------------------------------------------------------
    # message content
    def _read_data(self) -> Event | bool | None:
        reader = self._data
        self._pos = reader.feed(self._buf, self._pos)
        if not reader.done:
            return True
        self._data = None
        self._mode = _COMMAND
        t = self.transaction
        if reader.bogus_end:
            self.transaction = None
            self._send(Reply("550", "5.6.11 Bare CR or LF around end-of-data; closing connection"))
            self.closing = True
            return None
        if reader.too_big:
            self.transaction = None
            self._send(R.message_too_big)
            return None
        if reader.bare_newline:
            self.transaction = None
            self._send(R.bare_newline)
            return None
        return HaveData(t, reader.content())

    def _read_chunk(self) -> Event | bool | None:
        chunk = self._chunk
        self._pos = chunk.feed(self._buf, self._pos)
        if not chunk.done:
            return True
        self._mode = _COMMAND
        self._chunk = None
        error = self._chunk_error
        if error is not None:
            self._chunk_error = None
            self._reset_content()
            self.transaction = None
            self._send(error)
            return None
        data = chunk.content()
        self._chunks.append(data)
        self._bdat_size += len(data)
        if not self._chunk_last:
            self._send(Reply("250", f"2.0.0 {len(data)} octets received"))
            return None
        content = b"".join(self._chunks)
        self._reset_content()
        return HaveData(self.transaction, content)

    def _reset_content(self) -> None:
        self._chunks = []
        self._bdat_size = 0


# the handlers are looked up on the class, so a connection holds no cycle of bound methods
_COMMANDS = {
    "EHLO": ServerConnection._cmd_ehlo,
    "HELO": ServerConnection._cmd_helo,
    "MAIL": ServerConnection._cmd_mail,
    "RCPT": ServerConnection._cmd_rcpt,
    "DATA": ServerConnection._cmd_data,
    "BDAT": ServerConnection._cmd_bdat,
    "RSET": ServerConnection._cmd_rset,
    "NOOP": ServerConnection._cmd_noop,
    "QUIT": ServerConnection._cmd_quit,
    "VRFY": ServerConnection._cmd_vrfy,
    "EXPN": ServerConnection._cmd_expn,
    "HELP": ServerConnection._cmd_help,
    "STARTTLS": ServerConnection._cmd_starttls,
    "AUTH": ServerConnection._cmd_auth,
}


class _Refuse(Exception):
    def __init__(self, reply: Reply):
        self.reply = reply

