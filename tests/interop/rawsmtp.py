"""A deliberately dumb SMTP client for the interop tests.

It writes exactly the bytes it is given (so tests can pipeline, split and
misbehave on purpose) and parses replies strictly, so a malformed reply from
the server fails the test instead of being papered over.
"""

from __future__ import annotations

import contextlib
import re
import socket
import ssl
import time

_REPLY_LINE = re.compile(rb"^([2-5]\d\d)([ -])(.*)$", re.S)
_ESC = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?: |$)")


class Reply:
    """One parsed reply: ``code`` (int), ``lines`` (text after the code), ``esc``."""

    def __init__(self, code: int, lines: list[str]):
        self.code = code
        self.lines = lines
        m = _ESC.match(lines[0]) if lines else None
        self.esc = m.group(1) if m else None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __repr__(self) -> str:
        return f"<Reply {self.code} {self.lines!r}>"


class Closed(Exception):
    """The server closed the connection before a complete reply."""


class RawSmtp:
    """A socket to the server with a byte buffer and a strict reply parser."""

    def __init__(self, host: str, port: int, *, timeout: float = 10.0, source: str | None = None):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source is not None:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.timeout = timeout
        self.buf = b""
        self.eof = False
        self.banner: Reply | None = None

    # --- writing ------------------------------------------------------
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, line: str | bytes) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send(line + b"\r\n")
        return self.reply()

    # --- reading ------------------------------------------------------
    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise Closed(f"connection closed; unparsed bytes {self.buf!r}")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> Reply:
        """Read one complete (possibly multi-line) reply."""
        code = None
        lines = []
        while True:
            raw = self.line()
            m = _REPLY_LINE.match(raw)
            if m is None and raw[:3].isdigit() and len(raw) == 3:
                m = _REPLY_LINE.match(raw + b" ")
            assert m is not None, f"malformed reply line {raw!r}"
            this = int(m.group(1))
            assert code is None or code == this, f"code changed inside a reply: {raw!r}"
            code = this
            lines.append(m.group(3).decode("utf-8"))
            if m.group(2) == b" ":
                return Reply(code, lines)

    def replies(self, n: int) -> list[Reply]:
        return [self.reply() for _ in range(n)]

    def more_replies(self, wait: float = 0.2) -> list[Reply]:
        """Every complete reply that arrives within ``wait`` seconds, without asking."""
        self.buf = self.pending(wait)
        out = []
        while b"\r\n" in self.buf:
            out.append(self.reply())
        return out

    def read_banner(self) -> Reply:
        self.banner = self.reply()
        return self.banner

    def _fill_within(self, left: float) -> None:
        """Read what arrives within ``left`` seconds (works for TLS sockets too,
        where select() also wakes up for records that carry no application data)."""
        self.sock.settimeout(max(left, 0.001))
        try:
            self._fill()
        except TimeoutError:
            pass
        except ssl.SSLError as exc:  # e.g. a close_notify race: the peer is gone
            if "timed out" in str(exc):
                return
            self.eof = True
        finally:
            self.sock.settimeout(self.timeout)

    def pending(self, wait: float = 0.3) -> bytes:
        """Whatever the server sends within ``wait`` seconds (plus anything buffered)."""
        deadline = time.monotonic() + wait
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._fill_within(left)
        out, self.buf = self.buf, b""
        return out

    def wait_closed(self, timeout: float = 5.0) -> bytes:
        """Wait until the server closes the connection; return the bytes it sent meanwhile.

        Fails the test if the connection is still open after ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            assert left > 0, f"server did not close the connection; got {self.buf!r}"
            self._fill_within(left)
        out, self.buf = self.buf, b""
        return out

    # --- TLS ----------------------------------------------------------
    def starttls(self, context: ssl.SSLContext) -> None:
        """Wrap the socket after a 220 to STARTTLS; no cleartext may be left unread."""
        assert self.buf == b"", f"cleartext after the STARTTLS reply: {self.buf!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname="localhost")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def message(subject: str = "interop", body: bytes = b"Hello from the interop tests.\r\n",
            sender: str = "a@example.com", to: str = "b@example.com") -> bytes:
    """A small RFC 5322 message with CRLF line endings, including dot-stuffing bait."""
    return (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Message-Id: <{subject.replace(' ', '.')}@client.example.com>\r\n\r\n"
    ).encode() + body + b".leading dot\r\n..two dots\r\n.\tdot tab\r\nlast line\r\n"


def dot_stuff(data: bytes) -> bytes:
    """``data`` as sent after DATA: lines starting with a dot get another, then ``.CRLF``."""
    assert data.endswith(b"\r\n")
    return re.sub(rb"(?m)^\.", b"..", data) + b".\r\n"


def flat(envelope) -> bytes:
    """The envelope's message as bytes, headers then body."""
    header, body = envelope.flatten()
    return header + body
