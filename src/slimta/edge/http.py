"""HttpEdge: messages arrive as HTTP POST requests (the original slimta's HTTP edge protocol).

One request carries one message and its envelope::

    POST / HTTP/1.1
    Content-Type: message/rfc822
    X-Envelope-Sender: c2VuZGVyQGV4YW1wbGUuY29t          (base64 of the UTF-8 address)
    X-Envelope-Recipient: cmNwdEBleGFtcGxlLmNvbQ==       (one header per recipient, or
                                                          several split by ',' or ';')
    X-Ehlo: client.example.com                           (optional: the client's name)

    <the message, byte for byte>

The answer's ``X-Smtp-Reply: 250; message="2.6.0 Message queued as …"``
header is the SMTP reply the client would have got at the end of DATA; the
HTTP status follows it: 200 for 2xx, 503 for 4xx (try again later), 401 for
535, 500 for any other 5xx. Requests that are not mail get 404 (a path
outside ``uri_pattern``), 405 (not POST), 415 (not ``message/rfc822``),
413 (over ``max_size``) or 400 (a header that does not decode to an
address; the reason is in the body). :class:`slimta.relay.http.HttpRelay`
speaks the client side. See ``docs/http.md``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import inspect
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import hdrs, web

from slimta.edge import ListeningEdge
from slimta.edge.smtp import _queued_reply
from slimta.envelope import Envelope
from slimta.smtp import reply as R
from slimta.smtp.address import AddressError, parse_path
from slimta.smtp.reply import Reply
from slimta.smtp.server import DEFAULT_MAX_RECIPIENTS, DEFAULT_MAX_SIZE
from slimta.util.aio import maybe_await

__all__ = ["HttpEdge", "HttpValidators", "http_status", "reply_header"]

log = logging.getLogger(__name__)

SENDER_HEADER = "X-Envelope-Sender"
RECIPIENT_HEADER = "X-Envelope-Recipient"
EHLO_HEADER = "X-Ehlo"
REPLY_HEADER = "X-Smtp-Reply"
CONTENT_TYPE = "message/rfc822"

_SPLIT = re.compile(r"\s*[,;]\s*")
# an EHLO name is one word of printable ASCII (it ends up in Received headers)
_EHLO_RE = re.compile(r"[\x21-\x7e]{1,255}")

#: An ``auth`` for HttpEdge: a bearer token (str), ``{user: password}`` for basic
#: auth, a ``(user, password) -> bool`` callable (may be a coroutine), or a lookup.
AuthSpec = str | Mapping[str, str] | Callable[[str, str], bool | Awaitable[bool]] | Any

_auth_required = Reply("530", "5.7.0 Authentication required")
_too_many_recipients = Reply("552", "5.5.3 Too many recipients")
_no_recipients = Reply("554", "5.5.1 No valid recipients")
_auth_unavailable = Reply("454", "4.7.0 Temporary authentication failure")
_timed_out = Reply("451", "4.4.2 Timed out reading the message")


class HttpValidators:
    """Hooks that decide an HTTP request, one instance per request.

    Subclass and override what you need; each hook may be a plain method or
    a coroutine. Hooks get a 250 ``reply`` and refuse by changing it in place
    (``reply.code = '550'; reply.message = '5.7.1 No'``); the first refusal
    answers the request (its HTTP status follows :func:`http_status`) and the
    remaining hooks are not called. The order is :meth:`validate_ehlo`,
    :meth:`validate_sender`, :meth:`validate_recipient` for each recipient
    (one refused recipient refuses the whole request: HTTP has no partial
    acceptance), :meth:`validate_custom` for each name in
    :attr:`custom_headers`, then, once the body has arrived,
    :meth:`validate_data`.

    ``self.request`` is the aiohttp request and ``self.client`` the dict that
    becomes ``envelope.client`` (``ip``, ``host``, ``name``, ``protocol``,
    ``auth``): a hook may fill in ``client['host']``.
    """

    #: header names passed to :meth:`validate_custom`, whether or not the request has them
    custom_headers: tuple[str, ...] | list[str] = ()

    def __init__(self, request: web.BaseRequest, client: dict[str, Any]):
        self.request = request
        self.client = client

    def validate_ehlo(self, reply: Reply, ehlo: str) -> None:
        """The ``X-Ehlo`` header (``[ip]`` when the request has none)."""

    def validate_sender(self, reply: Reply, sender: str) -> None:
        """The decoded ``X-Envelope-Sender`` ('' for the null sender)."""

    def validate_recipient(self, reply: Reply, recipient: str) -> None:
        """One decoded recipient."""

    def validate_custom(self, reply: Reply, name: str, value: str | None) -> None:
        """A header listed in :attr:`custom_headers`: its value, or None when absent."""

    def validate_data(self, reply: Reply, data: bytes) -> None:
        """The whole message arrived; refusing here keeps it from the queue."""


_HOOKS = ("validate_ehlo", "validate_sender", "validate_recipient", "validate_custom",
          "validate_data")


def http_status(reply: Reply) -> int:
    """The HTTP status that answers ``reply``: 200 (2xx), 503 (4xx), 401 (535), else 500."""
    code = reply.code
    if code.startswith("2"):
        return 200
    if code.startswith("4"):
        return 503
    if code == "535":
        return 401
    return 500


def reply_header(reply: Reply) -> str:
    """``reply`` as the value of an ``X-Smtp-Reply`` header: ``550; message="5.7.1 No"``.

    A multi-line message becomes one line; ``"`` and ``\\`` are escaped.
    """
    text = " ".join(reply.message.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'{reply.code}; message="{text}"'


def _respond(reply: Reply, status: int | None = None, headers: dict | None = None,
             reason: str | None = None) -> web.Response:
    out = {REPLY_HEADER: reply_header(reply)}
    if headers:
        out.update(headers)
    body = reason if reason is not None else " ".join(reply.lines())
    return web.Response(status=status or http_status(reply), headers=out, text=body + "\n")


class _BadRequest(Exception):
    def __init__(self, reason: str, reply: Reply):
        super().__init__(reason)
        self.reason = reason
        self.reply = reply


def _decode_address(value: str, name: str, null_ok: bool) -> tuple[str, bool]:
    """A base64 header value as a mailbox; (address, has_non_ascii)."""
    reply = R.bad_sender if null_ok else R.bad_recipient
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise _BadRequest(f"{name}: invalid base64", reply) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _BadRequest(f"{name}: not UTF-8 after base64 decoding", reply) from None
    if text == "" and null_ok:
        return "", False
    try:
        address, rest, non_ascii = parse_path(f"<{text}>", allow_null=null_ok,
                                              allow_postmaster=not null_ok)
    except AddressError as exc:
        raise _BadRequest(f"{name}: bad address {text!r}: {exc}", reply) from None
    if rest:
        raise _BadRequest(f"{name}: bad address {text!r}", reply)
    return address, non_ascii


class _Basic:
    """Checks HTTP basic credentials against a dict, a callable or a lookup."""

    def __init__(self, spec: Any):
        self.spec = spec
        self._lookup = None
        if isinstance(spec, Mapping):
            pass
        elif hasattr(spec, "check"):
            self._lookup = spec  # a LookupCredentials of the caller's
        elif hasattr(spec, "lookup"):
            from slimta.lookup.credentials import LookupCredentials
            self._lookup = LookupCredentials(spec)

    async def check(self, user: str, password: str) -> bool:
        spec = self.spec
        if self._lookup is not None:
            from slimta.smtp.auth import Credentials
            return await self._lookup.check(Credentials("PLAIN", user, secret=password)) \
                is not None
        if isinstance(spec, Mapping):
            from slimta.lookup.credentials import verify_password_async
            stored = spec.get(user)
            if not isinstance(stored, str):
                return False
            return await verify_password_async(stored, password)
        return bool(await maybe_await(spec(user, password)))


class HttpEdge(ListeningEdge):
    """Receives mail as HTTP POST requests and hands each message to ``queue``.

    ``HttpEdge(('', 8025), queue).start()`` binds at once (``OSError`` for a
    bad address or a port in use) and serves on the running loop, or on the
    loop :func:`slimta.run_forever` starts. ``context`` (an
    ``ssl.SSLContext``) serves HTTPS; ``envelope.client['protocol']`` is then
    ``'HTTPS'``, else ``'HTTP'``.

    ``uri_pattern`` (a regular expression or its text) is matched at the
    start of the path, as :func:`re.match` does: other paths get 404.
    ``validator_class`` is an :class:`HttpValidators` subclass.

    ``auth``: None (anyone may post), a string (the bearer token every
    request must carry: ``Authorization: Bearer <token>``), or for basic
    auth a dict of user names to passwords (``{SCHEME}`` hashes as in
    :func:`slimta.lookup.credentials.verify_password`), a callable
    ``(user, password) -> bool`` (plain or coroutine), or a
    :class:`~slimta.lookup.Lookup` of user records with a ``password``
    field. Missing credentials get 401 with ``530 5.7.0``, wrong ones 401
    with ``535 5.7.8``; the basic user name lands in ``envelope.client['auth']``.

    Limits: ``max_size`` octets of message (default 10 MiB, 0: no limit; 413
    beyond, before the body is read when ``Content-Length`` says so),
    ``max_recipients`` (default 1000; more get ``552 5.5.3``),
    ``data_timeout`` seconds to read the body (default 600; then ``451
    4.4.2``). The reply to an accepted message is SmtpEdge's: ``250 2.6.0
    Message queued as <id>``, a :class:`~slimta.queue.QueueError`'s reply
    (default ``451 4.3.0``), or with a ProxyQueue the relay's own reply.
    """

    def __init__(
        self,
        listener,
        queue,
        validator_class: type[HttpValidators] | None = None,
        uri_pattern: str | re.Pattern | None = None,
        context: ssl.SSLContext | None = None,
        hostname: str | None = None,
        max_size: int | None = None,
        auth: AuthSpec | None = None,
        *,
        max_recipients: int | None = DEFAULT_MAX_RECIPIENTS,
        data_timeout: float | None = 600.0,
        shutdown_timeout: float = 30.0,
        backlog: int = 1024,
    ):
        super().__init__(queue, hostname)
        self.listener = listener
        self.validator_class = validator_class
        self.uri_pattern = re.compile(uri_pattern) if isinstance(uri_pattern, str) \
            else uri_pattern
        self.context = context
        self.max_size = DEFAULT_MAX_SIZE if max_size is None else max_size
        self.max_recipients = max_recipients
        self.data_timeout = data_timeout
        self.shutdown_timeout = shutdown_timeout
        self.backlog = backlog
        self._token: bytes | None = None
        self._basic: _Basic | None = None
        if isinstance(auth, str):
            self._token = auth.encode("utf-8")
        elif auth is not None:
            self._basic = _Basic(auth)
        self._hooks = frozenset(
            name for name in _HOOKS
            if validator_class is not None
            and getattr(validator_class, name) is not getattr(HttpValidators, name))
        self._sock = None
        self._runner: web.AppRunner | None = None

    # --- lifecycle ------------------------------------------------------
    async def _begin(self) -> None:
        # client_max_size 0 is "no limit" to aiohttp too
        app = web.Application(client_max_size=self.max_size or 0)
        app.router.add_route("*", "/{path:.*}", self._handle, expect_handler=self._expect)
        self._runner = runner = web.AppRunner(app, access_log=None,
                                              shutdown_timeout=self.shutdown_timeout)
        await runner.setup()
        site = web.SockSite(runner, self._sock, ssl_context=self.context, backlog=self.backlog)
        await site.start()

    async def _end(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting and finish the requests in progress (within ``timeout``), then stop."""
        if timeout is not None:
            self.shutdown_timeout = timeout
            if self._runner is not None:
                # aiohttp reads the runner's own copy when it shuts down; no public setter
                self._runner._shutdown_timeout = timeout
        await self.stop()

    # --- requests -------------------------------------------------------
    def _refusal(self, request: web.BaseRequest) -> web.Response | None:
        """The answer to a request that is not mail for this edge, or None."""
        if self.uri_pattern is not None and not self.uri_pattern.match(request.path):
            return web.Response(status=404, text="404 Not Found\n")
        if request.method != "POST":
            return web.Response(status=405, headers={hdrs.ALLOW: "POST"},
                                text="405 Method Not Allowed\n")
        return None

    def _too_big(self, request: web.BaseRequest) -> web.Response | None:
        length = request.content_length
        if self.max_size and length is not None and length > self.max_size:
            return _respond(R.message_too_big, 413)
        return None

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse before the client sends a body we would not read."""
        refused = self._refusal(request) or (await self._check_auth(request))[0] \
            or self._too_big(request)
        if refused is not None:
            return refused
        if request.headers.get(hdrs.EXPECT, "").lower() != "100-continue":
            return web.Response(status=417, text="417 Expectation Failed\n")
        if request.version == (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the 100 is not part of the response
        return None

    async def _check_auth(self, request: web.BaseRequest) -> tuple[web.Response | None,
                                                                    str | None]:
        """(None, basic user name or None) when the request may go on, else (the 401, None)."""
        if self._token is None and self._basic is None:
            return None, None
        scheme, _, value = request.headers.get(hdrs.AUTHORIZATION, "").strip().partition(" ")
        scheme, value = scheme.lower(), value.strip()
        if self._token is not None:
            challenge = {hdrs.WWW_AUTHENTICATE: 'Bearer realm="slimta"'}
            if scheme != "bearer" or not value:
                return _respond(_auth_required, 401, challenge), None
            if hmac.compare_digest(value.encode("utf-8", "replace"), self._token):
                return None, None
            log.info("HTTP bearer token from %s refused", request.remote)
            return _respond(R.auth_failed, 401, challenge), None
        challenge = {hdrs.WWW_AUTHENTICATE: 'Basic realm="slimta", charset="UTF-8"'}
        if scheme != "basic" or not value:
            return _respond(_auth_required, 401, challenge), None
        try:
            user, sep, password = base64.b64decode(value, validate=True).decode("utf-8") \
                .partition(":")
        except (binascii.Error, ValueError):
            sep = ""
        if not sep:
            return _respond(R.auth_failed, 401, challenge), None
        from slimta.lookup import LookupError as LookupFailed
        try:
            ok = await self._basic.check(user, password)
        except LookupFailed as exc:
            log.warning("HTTP auth for %r: lookup failed: %s", user, exc)
            return _respond(_auth_unavailable), None
        if not ok:
            log.info("HTTP auth for %r from %s refused", user, request.remote)
            return _respond(R.auth_failed, 401, challenge), None
        return None, user

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._handle_request(request)
        except _BadRequest as exc:
            log.info("bad request from %s: %s", request.remote, exc.reason)
            return _respond(exc.reply, 400, reason=f"400 Bad Request: {exc.reason}")
        except web.HTTPRequestEntityTooLarge:
            return _respond(R.message_too_big, 413)
        except TimeoutError:
            log.info("HTTP request from %s timed out reading the message", request.remote)
            return _respond(_timed_out)
        except Exception:
            log.exception("HTTP request from %s failed", request.remote)
            return _respond(R.queue_error)

    async def _handle_request(self, request: web.Request) -> web.StreamResponse:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        refused, user = await self._check_auth(request)
        if refused is not None:
            return refused
        if hdrs.CONTENT_TYPE in request.headers and request.content_type.lower() != CONTENT_TYPE:
            return web.Response(status=415, text="415 Unsupported Media Type: "
                                "send message/rfc822\n")
        refused = self._too_big(request)
        if refused is not None:
            return refused

        headers = request.headers
        sender, smtputf8 = _decode_address(headers.get(SENDER_HEADER, ""), SENDER_HEADER, True)
        recipients = []
        for value in headers.getall(RECIPIENT_HEADER, ()):
            for item in _SPLIT.split(value.strip()):
                if item:
                    rcpt, non_ascii = _decode_address(item, RECIPIENT_HEADER, False)
                    recipients.append(rcpt)
                    smtputf8 = smtputf8 or non_ascii
        if not recipients:
            raise _BadRequest(f"no {RECIPIENT_HEADER} header", _no_recipients)
        if self.max_recipients is not None and len(recipients) > self.max_recipients:
            return _respond(_too_many_recipients)
        ehlo = headers.get(EHLO_HEADER)
        if ehlo is None:
            ehlo = f"[{request.remote}]"
        elif not _EHLO_RE.fullmatch(ehlo.strip()):
            raise _BadRequest(f"{EHLO_HEADER}: not a host name", R.bad_arguments)
        ehlo = ehlo.strip()
        client = {
            "ip": request.remote,
            "host": None,
            "name": ehlo,
            "protocol": "HTTPS" if request.secure else "HTTP",
            "auth": user,
        }

        validators = None
        reply = Reply("250", "2.0.0 Ok")
        if self._hooks:
            validators = self.validator_class(request, client)
            refused = await self._validate(validators, reply, ehlo, sender, recipients)
            if refused is not None:
                return refused

        async with asyncio.timeout(self.data_timeout or None):
            data = await request.read()
        if "validate_data" in self._hooks:
            await maybe_await(validators.validate_data(reply, data))
            if not reply.is_success():
                return _respond(reply)

        envelope = Envelope(sender, recipients)
        envelope.parse(data)
        envelope.smtputf8 = smtputf8
        if not data.isascii():
            envelope.body = "8BITMIME"
        envelope.client = client
        results = await self.handoff(envelope)
        _queued_reply(reply, results)
        if reply.is_success():
            log.info("queued %s from %s over %s", reply.message.rsplit(" ", 1)[-1],
                     client["ip"], client["protocol"])
        else:
            log.info("message from %s not queued: %s", client["ip"], reply)
        return _respond(reply)

    async def _validate(self, validators: HttpValidators, reply: Reply, ehlo: str, sender: str,
                        recipients: list[str]) -> web.Response | None:
        calls: list[tuple[str, tuple]] = []
        if "validate_ehlo" in self._hooks:
            calls.append(("validate_ehlo", (ehlo,)))
        if "validate_sender" in self._hooks:
            calls.append(("validate_sender", (sender,)))
        if "validate_recipient" in self._hooks:
            calls.extend(("validate_recipient", (rcpt,)) for rcpt in recipients)
        if "validate_custom" in self._hooks:
            calls.extend(("validate_custom", (name, validators.request.headers.get(name)))
                         for name in validators.custom_headers)
        for name, args in calls:
            result = getattr(validators, name)(reply, *args)
            if inspect.isawaitable(result):
                await result
            if not reply.is_success():
                log.info("%s refused a request from %s: %s", name, validators.client["ip"],
                         reply)
                return _respond(reply)
        return None

