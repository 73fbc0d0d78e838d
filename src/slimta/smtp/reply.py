"""SMTP replies with enhanced status codes (RFC 5321 §4.2, RFC 2034, RFC 3463).

A :class:`Reply` is a three-digit code and a message. The message may start
with an enhanced status code (``2.1.0``); that code is kept apart in
:attr:`Reply.enhanced_status_code` and repeated on every line of a multi-line
reply, as RFC 2034 asks.
"""

from __future__ import annotations

import re

__all__ = ["Reply"]

_ESC_RE = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|$)")


class Reply:
    """One SMTP reply: ``Reply('550', '5.7.1 Recipient not allowed')``.

    Validators change replies in place (``reply.code = '550'``,
    ``reply.message = '5.7.1 No'``). The enhanced status code may be part of
    ``message`` or given separately; ``str(reply)`` and ``bytes(reply)`` give
    the wire form, one line per line of the message.
    """

    __slots__ = ("_code", "_esc", "_message")

    def __init__(self, code: str | int = "250", message: str = "", enhanced_status_code=None):
        self._code = str(code)
        self._esc = None
        self._message = ""
        self.message = message
        if enhanced_status_code is not None:
            self._esc = enhanced_status_code

    # --- attributes ---------------------------------------------------
    @property
    def code(self) -> str:
        """The three-digit reply code, as a string."""
        return self._code

    @code.setter
    def code(self, value: str | int) -> None:
        self._code = str(value)

    @property
    def message(self) -> str:
        """The reply text, with the enhanced status code in front if there is one."""
        if self._esc:
            return f"{self._esc} {self._message}" if self._message else self._esc
        return self._message

    @message.setter
    def message(self, value: str | None) -> None:
        value = value or ""
        m = _ESC_RE.match(value)
        if m:
            self._esc = f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
            self._message = value[m.end():]
        else:
            self._esc = None
            self._message = value

    @property
    def text(self) -> str:
        """The reply text without the enhanced status code."""
        return self._message

    @text.setter
    def text(self, value: str) -> None:
        self._message = value or ""

    @property
    def enhanced_status_code(self) -> str | None:
        """The RFC 3463 code (``'5.7.1'``) or None."""
        return self._esc

    @enhanced_status_code.setter
    def enhanced_status_code(self, value: str | None) -> None:
        self._esc = value or None

    # --- predicates ---------------------------------------------------
    def is_error(self) -> bool:
        """True for 4xx and 5xx replies."""
        return self._code[:1] in ("4", "5")

    def is_success(self) -> bool:
        """True for 2xx replies."""
        return self._code[:1] == "2"

    def is_transient(self) -> bool:
        return self._code[:1] == "4"

    def is_permanent(self) -> bool:
        return self._code[:1] == "5"

    def closes_connection(self) -> bool:
        """A 221 or 421 reply ends the session."""
        return self._code in ("221", "421")

    # --- copies and comparison ----------------------------------------
    def copy(self, reply: Reply | None = None) -> Reply:
        """With no argument, a new equal Reply; with one, take over its code and message."""
        if reply is None:
            new = Reply.__new__(Reply)
            new._code, new._esc, new._message = self._code, self._esc, self._message
            return new
        self._code, self._esc, self._message = reply._code, reply._esc, reply._message
        return self

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Reply):
            return (self._code, self.message) == (other._code, other.message)
        if isinstance(other, tuple) and len(other) == 2:
            return (self._code, self.message) == (str(other[0]), other[1])
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self._code, self.message))

    def __repr__(self) -> str:
        return f"Reply({self._code!r}, {self.message!r})"

    # --- wire form ----------------------------------------------------
    def lines(self) -> list[str]:
        """The reply's lines, without CRLF."""
        code, esc = self._code, self._esc
        text = self._message
        if "\n" not in text:
            if esc:
                return [f"{code} {esc} {text}" if text else f"{code} {esc}"]
            return [f"{code} {text}" if text else code]
        parts = text.replace("\r\n", "\n").split("\n")
        prefix = f"{esc} " if esc else ""
        out = [f"{code}-{prefix}{p}" for p in parts[:-1]]
        out.append(f"{code} {prefix}{parts[-1]}")
        return out

    def __str__(self) -> str:
        return "\r\n".join(self.lines())

    def __bytes__(self) -> bytes:
        return ("\r\n".join(self.lines()) + "\r\n").encode("utf-8", "replace")


def _canned(code: str, message: str) -> Reply:
    return Reply(code, message)


# Canned replies. Copy them before changing: ``r = bad_sequence.copy()``.
syntax_error = _canned("500", "5.5.2 Syntax error, command unrecognized")
line_too_long = _canned("500", "5.5.2 Line too long")
not_implemented = _canned("502", "5.5.1 Command not implemented")
bad_sequence = _canned("503", "5.5.1 Bad sequence of commands")
bad_arguments = _canned("501", "5.5.4 Syntax error in parameters or arguments")
unknown_parameter = _canned("555", "5.5.4 MAIL or RCPT parameter not recognized or not implemented")
bad_sender = _canned("501", "5.1.7 Bad sender address syntax")
bad_recipient = _canned("501", "5.1.3 Bad recipient address syntax")
too_many_recipients = _canned("452", "4.5.3 Too many recipients")
message_too_big = _canned("552", "5.3.4 Message size exceeds fixed maximum message size")
bare_newline = _canned("550", "5.6.11 Bare CR or LF in message data; use CRLF line endings")
utf8_not_declared = _canned("553", "5.6.7 Non-ASCII address requires the SMTPUTF8 parameter")
timed_out = _canned("421", "4.4.2 Connection timed out")
too_many_errors = _canned("421", "4.7.0 Too many errors, closing connection")
too_many_connections = _canned("421", "4.7.0 Too many connections, try again later")
tls_required_for_auth = _canned(
    "538", "5.7.11 Encryption required for requested authentication mechanism"
)
auth_failed = _canned("535", "5.7.8 Authentication credentials invalid")
auth_succeeded = _canned("235", "2.7.0 Authentication successful")
unavailable = _canned("421", "4.3.0 Service not available, closing connection")
queue_error = _canned("451", "4.3.0 Error queuing message")
shutting_down = _canned("421", "4.3.2 Service shutting down, closing connection")
