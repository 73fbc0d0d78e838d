"""HttpRelay: delivery by HTTP POST, the client side of :class:`slimta.edge.http.HttpEdge`.

Each attempt is one ``POST`` of the message (``Content-Type:
message/rfc822``) with the envelope in headers: ``X-Envelope-Sender`` and
one ``X-Envelope-Recipient`` per recipient (base64 of the UTF-8 address)
and ``X-Ehlo``. The answer's ``X-Smtp-Reply: <code>; message="<text>"``
header says what happened in SMTP terms; see ``docs/http.md``.
"""

from __future__ import annotations

import base64
import logging
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict

from slimta.relay import PermanentRelayError, Relay, TransientRelayError
from slimta.smtp.reply import Reply

__all__ = ["HttpRelay", "parse_reply_header"]

log = logging.getLogger(__name__)

_CODE_RE = re.compile(r"\s*([245]\d\d)\s*(?:;|$)")
_PARAM_RE = re.compile(r';\s*([\w-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s;]*))')
_UNESCAPE_RE = re.compile(r"\\(.)")


def parse_reply_header(value: str | None) -> Reply | None:
    """The Reply in an ``X-Smtp-Reply`` header value, or None when there is none to read.

    ``'550; message="5.7.1 No"'`` gives ``Reply('550', '5.7.1 No')``; the
    message may be quoted (with ``\\"`` and ``\\\\`` escapes) or a bare token.
    """
    if not value:
        return None
    m = _CODE_RE.match(value)
    if m is None:
        return None
    message = ""
    for param in _PARAM_RE.finditer(value, m.end() - 1):
        if param.group(1).lower() == "message":
            quoted = param.group(2)
            message = _UNESCAPE_RE.sub(r"\1", quoted) if quoted is not None else param.group(3)
            break
    return Reply(m.group(1), message)


def _b64(address: str) -> str:
    return base64.b64encode(address.encode("utf-8")).decode("ascii")


class HttpRelay(Relay):
    """Delivers every envelope by an HTTP(S) ``POST`` to ``url``, reusing connections.

    ``url`` is ``http://host[:port]/path`` or ``https://…`` (with
    ``context``, an ``ssl.SSLContext``, to verify the server or present a
    client certificate; else the default verification). ``pool_size``
    bounds the open connections (None: no bound); an idle connection is
    kept ``idle_timeout`` seconds for the next message (default 10, 0: a new
    connection each time). ``timeout`` bounds a whole attempt: connect,
    upload and answer (default 60 s). ``ehlo_as`` (a string, or a callable
    returning one) is sent as ``X-Ehlo`` (default: this host's FQDN).
    ``headers`` are added to every request (``{'Authorization': 'Bearer …'}``).

    The result covers the whole envelope: the protocol has no per-recipient
    replies. A 2xx answer delivers it (the attempt returns the
    ``X-Smtp-Reply``, if any). Otherwise a reply header decides: 4xx raises
    :class:`~slimta.relay.TransientRelayError`, 5xx
    :class:`~slimta.relay.PermanentRelayError`, with that reply. Without one,
    an HTTP 4xx is permanent (``550 5.0.0``) and anything else, like a
    connection that fails or a timeout, is transient (``451 4.x.x``).
    """

    def __init__(self, url: str, pool_size: int | None = None,
                 context: ssl.SSLContext | None = None,
                 ehlo_as: str | Callable[[], str] | None = None,
                 timeout: float | None = None, idle_timeout: float | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__()
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"HttpRelay needs an http:// or https:// URL, not {url!r}")
        self.url = parts.geturl()
        self.host = parts.hostname
        self.pool_size = pool_size
        self.context = context
        self.ehlo_as = ehlo_as or socket.getfqdn()
        self.timeout = 60.0 if timeout is None else float(timeout)
        self.idle_timeout = 10.0 if idle_timeout is None else float(idle_timeout)
        self.headers = dict(headers or {})
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None or session.closed:
            reuse = self.idle_timeout > 0
            connector = aiohttp.TCPConnector(
                limit=self.pool_size or 0, force_close=not reuse,
                keepalive_timeout=self.idle_timeout if reuse else None,
                ssl=self.context if self.context is not None else True)
            session = self._session = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout or None),
                auto_decompress=False)
        return session

    async def _begin(self) -> None:
        self._client()

    async def close(self) -> None:
        """Close the idle connections (also done by ``stop()``)."""
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def _end(self) -> None:
        await self.close()

    def _request_headers(self, envelope) -> list[tuple[str, str]]:
        ehlo = self.ehlo_as() if callable(self.ehlo_as) else self.ehlo_as
        headers = [(name, value) for name, value in self.headers.items()]
        headers += [("Content-Type", "message/rfc822"), ("X-Ehlo", ehlo),
                    ("X-Envelope-Sender", _b64(envelope.sender or ""))]
        headers += [("X-Envelope-Recipient", _b64(rcpt)) for rcpt in envelope.recipients]
        return headers

    async def _attempt(self, envelope, attempts: int):
        header_block, body = envelope.flatten()
        data = header_block + body
        headers = CIMultiDict(self._request_headers(envelope))
        try:
            async with self._client().post(self.url, data=data, headers=headers,
                                           allow_redirects=False) as resp:
                await resp.read()
                status, reason = resp.status, resp.reason or ""
                reply = parse_reply_header(resp.headers.get("X-Smtp-Reply"))
        except TimeoutError:
            raise TransientRelayError(reply=Reply(
                "451", f"4.4.2 No answer from {self.host} within {self.timeout:g}s")) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise TransientRelayError(reply=Reply(
                "451", f"4.4.1 Connection to {self.host} failed: {exc or type(exc).__name__}"
            )) from None
        if 200 <= status < 300:
            return reply
        if reply is not None and reply.is_transient():
            raise TransientRelayError(reply=reply)
        if reply is not None and reply.is_permanent():
            raise PermanentRelayError(reply=reply)
        if 400 <= status < 500:
            raise PermanentRelayError(reply=Reply("550", f"5.0.0 HTTP {status} {reason}".strip()))
        raise TransientRelayError(reply=Reply("451", f"4.0.0 HTTP {status} {reason}".strip()))

