"""SmtpEdge: an SMTP server on asyncio that hands each message to a queue.

The protocol lives in :mod:`slimta.smtp.server`; this module is the glue: an
:class:`asyncio.Protocol` per connection feeds bytes to a
:class:`~slimta.smtp.server.ServerConnection`, runs the user's validators on
each event, hands finished messages to the queue, and writes the replies,
once per batch of input (so pipelined commands cost one write).
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import logging
import ssl
import weakref

from slimta.edge import ListeningEdge
from slimta.envelope import Envelope
from slimta.smtp import reply as R
from slimta.smtp.auth import SERVER_MECHANISMS
from slimta.smtp.reply import Reply
from slimta.smtp.server import (
    DEFAULT_MAX_RECIPIENTS,
    DEFAULT_MAX_SIZE,
    Auth,
    DataStart,
    Ehlo,
    HaveData,
    Helo,
    Mail,
    Rcpt,
    Rset,
    ServerConnection,
    StartTls,
)
from slimta.util.proxyproto import ProxyProtocolError, parse_proxy_header

__all__ = ["SmtpEdge", "SmtpSession", "SmtpValidators"]

log = logging.getLogger(__name__)

HOOKS = (
    "handle_banner", "handle_ehlo", "handle_helo", "handle_auth", "handle_mail", "handle_rcpt",
    "handle_data", "handle_have_data", "handle_queued", "handle_rset", "handle_tls",
    "handle_close",
)
_PAUSE_ABOVE = 1024 * 1024  # octets buffered while a handler runs before reading pauses


class SmtpValidators:
    """Hooks that decide an SMTP session, one instance per connection.

    Subclass and override what you need; each hook may be a plain method or
    a coroutine. Hooks get the default ``reply`` and change it in place to
    answer otherwise (``reply.code = '550'; reply.message = '5.7.1 No'``). A
    221 or 421 reply closes the connection. ``self.session`` is the
    :class:`SmtpSession` (``address``, ``extended_smtp``, ``security``,
    ``ehlo_as``, ``auth``, ``envelope``, ``protocol``).

    Without an overridden :meth:`handle_auth`, every AUTH attempt fails with
    535 5.7.8; with one, the reply starts as 235 and the hook rejects by
    changing it.
    """

    def __init__(self, session: SmtpSession):
        self.session = session

    def handle_banner(self, reply: Reply, address: tuple) -> None:
        """The greeting; ``address`` is the client's (ip, port)."""

    def handle_ehlo(self, reply: Reply, ehlo_as: str) -> None:
        """EHLO; the extensions are appended to a 250 reply afterwards."""

    def handle_helo(self, reply: Reply, helo_as: str) -> None:
        """HELO."""

    def handle_auth(self, reply: Reply, creds) -> None:
        """A finished AUTH exchange: ``creds.authcid``, ``creds.authzid``,
        ``creds.check_secret(secret)``."""

    def handle_mail(self, reply: Reply, sender: str, params: dict) -> None:
        """MAIL FROM; ``sender`` is '' for the null sender."""

    def handle_rcpt(self, reply: Reply, recipient: str, params: dict) -> None:
        """RCPT TO."""

    def handle_data(self, reply: Reply) -> None:
        """DATA (reply 354), or the first BDAT of a message (reply 250)."""

    def handle_have_data(self, reply: Reply, data: bytes) -> None:
        """The whole message arrived; an error reply here refuses it before the queue sees it."""

    def handle_queued(self, reply: Reply, results: list) -> None:
        """The queue answered; ``results`` is ``[(envelope, id_or_error), ...]``."""

    def handle_rset(self, reply: Reply) -> None:
        """RSET."""

    def handle_tls(self, ssl_object) -> None:
        """The TLS handshake finished (STARTTLS or SMTPS)."""

    def handle_close(self) -> None:
        """The connection closed."""


def _overridden_hooks(validator_class) -> frozenset[str]:
    if validator_class is None:
        return frozenset()
    found = set()
    for name in HOOKS:
        impl = getattr(validator_class, name, None)
        if impl is not None and impl is not getattr(SmtpValidators, name, None):
            found.add(name)
    return frozenset(found)


def _queued_reply(reply: Reply, results) -> None:
    """Set the end-of-data reply from the queue's results."""
    ids = []
    for _envelope, result in results:
        if isinstance(result, Reply):
            reply.copy(result)
            return
        if isinstance(result, BaseException):
            err = getattr(result, "reply", None)
            reply.copy(err if isinstance(err, Reply) else R.queue_error)
            return
        ids.append(str(result))
    if not ids:
        reply.copy(R.queue_error)
        return
    reply.code = "250"
    reply.message = "2.6.0 Message queued as " + ", ".join(ids)


class SmtpSession(asyncio.Protocol):
    """One SMTP connection: the glue between a socket and the sans-IO core."""

    #: the proxy's (ip, port) when a PROXY header said who the client is, else None
    proxy_address: tuple | None = None

    def __init__(self, edge: SmtpEdge):
        self.edge = edge
        self.transport = None
        self.conn: ServerConnection | None = None
        self.validators = None
        #: the client's (ip, port)
        self.address: tuple = ("", 0)
        #: 'TLS' once encrypted, else None
        self.security: str | None = None
        #: the envelope being built (from MAIL on)
        self.envelope: Envelope | None = None
        #: the client's verified host name, if a validator found one (envelope.client['host'])
        self.client_host: str | None = None
        #: checks' results for this transaction (SPF at MAIL, ...); becomes
        #: envelope.auth_results when MAIL is accepted (the same dict)
        self.auth_results: dict = {}
        self._hooks = edge._hooks
        self._busy = False
        self._paused = False
        self._tls_handshaking = False
        self._task: asyncio.Task | None = None  # the handler running, kept from the GC
        self._closed = False
        self._draining = False
        self._admitted = False
        self._timer = None
        self._last = 0.0
        self._data_deadline: float | None = None
        self._loop = None

    # --- what validators read --------------------------------------
    @property
    def extended_smtp(self) -> bool:
        return self.conn.extended

    @property
    def ehlo_as(self) -> str | None:
        return self.conn.ehlo_as

    @property
    def auth(self) -> str | None:
        return self.conn.auth

    @property
    def protocol(self) -> str:
        """SMTP, ESMTP, ESMTPS, ESMTPA or ESMTPSA (RFC 3848)."""
        conn = self.conn
        if not conn.extended:
            return "SMTP"
        return "ESMTP" + ("S" if conn.secure else "") + ("A" if conn.auth else "")

    # --- asyncio.Protocol ------------------------------------------
    def connection_made(self, transport) -> None:
        self.edge._accepted.pop(self, None)
        peer = transport.get_extra_info("peername")
        self._start(transport, tuple(peer[:2]) if isinstance(peer, tuple) else (str(peer or ""), 0))

    def _start(self, transport, address: tuple) -> None:
        """Admit the client at ``address`` and greet it (after any PROXY header)."""
        self.transport = transport
        self._loop = loop = asyncio.get_running_loop()
        edge = self.edge
        self.address = address
        secure = transport.get_extra_info("ssl_object") is not None
        if secure:
            self.security = "TLS"
        self.conn = ServerConnection(edge.hostname, tls=edge.context is not None and not secure,
                                     secure=secure, **edge._session_options())
        if not edge._admit(self):
            transport.write(bytes(R.too_many_connections))
            transport.close()
            self._closed = True
            return
        self._admitted = True
        if self._hooks:
            self.validators = edge.validator_class(self)
        self._last = loop.time()
        self._timer = loop.call_later(edge.command_timeout, self._on_timer)
        if secure and "handle_tls" in self._hooks:
            self._call_quietly("handle_tls", transport.get_extra_info("ssl_object"))
        reply = Reply("220", f"{edge.hostname} ESMTP Mail Gateway")
        pending = self._run_hook("handle_banner", reply, (reply, self.address),
                                 self._banner_done, reply)
        if pending is not None:
            self._busy = True
            self._task = loop.create_task(self._finish(pending))

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        conn = self.conn
        if self._tls_handshaking:
            # the first bytes through the new TLS layer may come before start_tls() returns
            self._tls_active()
        conn.receive_data(data)
        self._last = self._loop.time()
        if self._busy:
            if conn.buffered > _PAUSE_ABOVE and not self._paused:
                self._paused = True
                self.transport.pause_reading()
            return
        self._process()

    def eof_received(self):
        return None  # close our side too

    def connection_lost(self, exc) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._admitted:
            self._admitted = False
            self.edge._release(self)
            if "handle_close" in self._hooks:
                self._call_quietly("handle_close")

    # --- processing ---------------------------------------------------
    def _process(self) -> None:
        """Handle every event the input allows, then write the replies at once."""
        conn = self.conn
        try:
            while not self._busy and not self._closed:
                ev = conn.next_event()
                if ev is None:
                    break
                pending = self._dispatch[type(ev)](self, ev)
                if pending is not None:
                    self._busy = True
                    self._task = self._loop.create_task(self._finish(pending))
                    break
        except Exception:
            log.exception("SMTP session from %s failed", self.address[0])
            self._abort_with(R.unavailable)
            return
        self._flush()

    async def _finish(self, pending) -> None:
        try:
            await pending
        except Exception:
            log.exception("SMTP session from %s failed", self.address[0])
            self._abort_with(R.unavailable)
            return
        self._busy = False
        if self._closed:
            return
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self._process()

    def _flush(self) -> None:
        conn = self.conn
        out = conn.data_to_send()
        if self._closed:
            return
        if out:
            self.transport.write(out)
        if conn.closing:
            self._close()
            return
        if conn.receiving_message:
            if self._data_deadline is None:
                self._data_deadline = deadline = self._loop.time() + self.edge.data_timeout
                timer = self._timer
                if timer is not None and timer.when() > deadline:
                    timer.cancel()
                    self._timer = self._loop.call_at(deadline, self._on_timer)
        elif self._data_deadline is not None:
            self._data_deadline = None
        if self._draining and not self._busy and not conn.receiving_message:
            self.transport.write(bytes(R.shutting_down))
            self._close()

    def _close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport.close()

    def _abort_with(self, reply: Reply) -> None:
        if not self._closed:
            self.transport.write(bytes(reply))
            self._close()

    def _on_timer(self) -> None:
        self._timer = None
        if self._closed:
            return
        now = self._loop.time()
        edge = self.edge
        if self._busy or self.conn.waiting_for_tls:
            deadline = now + edge.command_timeout
        else:
            deadline = self._last + edge.command_timeout
            if self._data_deadline is not None and self._data_deadline < deadline:
                deadline = self._data_deadline
            if now >= deadline:
                log.info("SMTP session from %s timed out", self.address[0])
                self.conn.timed_out()
                self._flush()
                return
        self._timer = self._loop.call_later(deadline - now, self._on_timer)

    def shutdown(self) -> None:
        """The edge is stopping: close now if idle, else after the message in progress."""
        self._draining = True
        if not self._closed and not self._busy and not self.conn.receiving_message:
            self._abort_with(R.shutting_down)

    # --- hooks ----------------------------------------------------------
    def _run_hook(self, name: str, reply: Reply, args: tuple, done, *done_args):
        """Call hook ``name`` if the validators have it, then ``done``.

        Returns None when everything ran now, or an awaitable that finishes
        the job (the hook was a coroutine).
        """
        if name in self._hooks:
            try:
                result = getattr(self.validators, name)(*args)
            except Exception:
                log.exception("validator %s failed", name)
                reply.copy(R.queue_error)
            else:
                if result is not None and inspect.isawaitable(result):
                    return self._await_hook(name, result, reply, done, done_args)
        done(*done_args)
        return None

    async def _await_hook(self, name, awaitable, reply, done, done_args) -> None:
        try:
            await awaitable
        except Exception:
            log.exception("validator %s failed", name)
            reply.copy(R.queue_error)
        done(*done_args)

    def _call_quietly(self, name: str, *args) -> None:
        """A hook whose reply nobody waits for (close, tls)."""
        try:
            result = getattr(self.validators, name)(*args)
            if result is not None and inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                background = self.edge._background
                background.add(task)
                task.add_done_callback(background.discard)
                task.add_done_callback(_log_task_error)
        except Exception:
            log.exception("validator %s failed", name)

    def _banner_done(self, reply: Reply) -> None:
        self.conn.banner(reply)
        if reply.code == "421" or reply.code == "221":
            self.conn.closing = True
        self._flush()

    # --- events -----------------------------------------------------------
    def _respond(self, ev) -> None:
        self.conn.respond()

    def _on_ehlo(self, ev: Ehlo):
        return self._run_hook("handle_ehlo", ev.reply, (ev.reply, ev.name), self._respond, ev)

    def _on_helo(self, ev: Helo):
        return self._run_hook("handle_helo", ev.reply, (ev.reply, ev.name), self._respond, ev)

    def _on_mail(self, ev: Mail):
        self.auth_results = {}
        return self._run_hook("handle_mail", ev.reply, (ev.reply, ev.sender, ev.params),
                              self._mail_done, ev)

    def _mail_done(self, ev: Mail) -> None:
        self.conn.respond()
        if self.conn.transaction is not None:
            self.envelope = Envelope(ev.sender)
            self.envelope.auth_results = self.auth_results

    def _on_rcpt(self, ev: Rcpt):
        return self._run_hook("handle_rcpt", ev.reply, (ev.reply, ev.recipient, ev.params),
                              self._rcpt_done, ev)

    def _rcpt_done(self, ev: Rcpt) -> None:
        self.conn.respond()
        if ev.reply.code[:1] == "2" and self.envelope is not None:
            self.envelope.recipients.append(ev.recipient)

    def _on_data(self, ev: DataStart):
        return self._run_hook("handle_data", ev.reply, (ev.reply,), self._respond, ev)

    def _on_rset(self, ev: Rset):
        return self._run_hook("handle_rset", ev.reply, (ev.reply,), self._rset_done, ev)

    def _rset_done(self, ev: Rset) -> None:
        self.conn.respond()
        if self.conn.transaction is None:
            self.envelope = None

    def _on_auth(self, ev: Auth):
        if "handle_auth" not in self._hooks:
            ev.reply.copy(R.auth_failed)
            self.conn.respond()
            return None
        return self._run_hook("handle_auth", ev.reply, (ev.reply, ev.credentials),
                              self._respond, ev)

    def _on_starttls(self, ev: StartTls):
        self.conn.respond()
        self.envelope = None
        if not self.conn.waiting_for_tls:
            return None
        self._flush()
        return self._start_tls()

    async def _start_tls(self) -> None:
        self._tls_handshaking = True
        try:
            transport = await self._loop.start_tls(
                self.transport, self, self.edge.context, server_side=True,
                ssl_handshake_timeout=self.edge.command_timeout)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.info("TLS handshake with %s failed: %s", self.address[0], exc)
            self._closed = True
            self.transport.abort()
            return
        if transport is None:  # the connection went away during the handshake
            self._closed = True
            return
        self.transport = transport
        if self._tls_handshaking:
            self._tls_active()
        if "handle_tls" in self._hooks:
            self._call_quietly("handle_tls", transport.get_extra_info("ssl_object"))

    def _tls_active(self) -> None:
        self._tls_handshaking = False
        self.security = "TLS"
        self.conn.tls_started()

    async def _have_data(self, ev: HaveData) -> None:
        reply = ev.reply
        try:
            if "handle_have_data" in self._hooks:
                result = self.validators.handle_have_data(reply, ev.data)
                if result is not None and inspect.isawaitable(result):
                    await result
            if reply.code[:1] == "2":
                envelope = self._build_envelope(ev)
                results = await self.edge.handoff(envelope)
                _queued_reply(reply, results)
                if "handle_queued" in self._hooks:
                    result = self.validators.handle_queued(reply, results)
                    if result is not None and inspect.isawaitable(result):
                        await result
                if reply.code[:1] == "2":
                    log.info("queued %s from %s", reply.message.rsplit(" ", 1)[-1],
                             self.address[0])
        except Exception:
            log.exception("message from %s not queued", self.address[0])
            reply.copy(R.queue_error)
        self.envelope = None
        self.conn.respond()

    def _build_envelope(self, ev: HaveData) -> Envelope:
        t = ev.transaction
        envelope = self.envelope
        if envelope is None:
            envelope = Envelope(t.sender, list(t.recipients))
        envelope.parse(ev.data)
        envelope.body = t.body
        envelope.smtputf8 = t.smtputf8
        envelope.ret = t.ret
        envelope.envid = t.envid
        envelope.auth = t.auth
        if t.rcpt_params:
            envelope.rcpt_params = dict(t.rcpt_params)
        conn = self.conn
        envelope.client = {
            "ip": self.address[0],
            "host": self.client_host,
            "name": conn.ehlo_as,
            "protocol": self.protocol,
            "auth": conn.auth,
        }
        return envelope

    _dispatch = {
        Ehlo: _on_ehlo,
        Helo: _on_helo,
        Mail: _on_mail,
        Rcpt: _on_rcpt,
        DataStart: _on_data,
        HaveData: _have_data,
        Rset: _on_rset,
        Auth: _on_auth,
        StartTls: _on_starttls,
    }


class _ProxyHeaderReader(asyncio.Protocol):
    """Reads the PROXY header of a connection, then hands it to an SmtpSession.

    Only edges with ``proxy_protocol`` use it; the session takes over the
    transport (``set_protocol``) once the header is read, so the SMTP hot
    path is the same as without a proxy. A peer that is not a trusted proxy
    is handed over at once, as a direct client.
    """

    def __init__(self, edge: SmtpEdge):
        self.edge = edge
        self.transport = None
        self.peer: tuple = ("", 0)
        self._buf = b""
        self._timer = None

    def connection_made(self, transport) -> None:
        self.edge._accepted.pop(self, None)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = tuple(peer[:2]) if isinstance(peer, tuple) else (str(peer or ""), 0)
        edge = self.edge
        if not edge._is_trusted_proxy(self.peer[0]):
            self._hand_over(self.peer, None, b"")
            return
        edge._proxy_pending.add(self)
        self._timer = asyncio.get_running_loop().call_later(edge.proxy_timeout, self._timed_out)

    def data_received(self, data: bytes) -> None:
        if self._timer is None:
            return
        buf = self._buf + data if self._buf else data
        try:
            info, used = parse_proxy_header(buf, self.edge._proxy_versions)
        except ProxyProtocolError as exc:
            log.warning("closed %s: invalid PROXY header: %s", self.peer[0], exc)
            self.close()
            return
        if info is None:
            self._buf = buf
            return
        self._done()
        client = info.client
        log.debug("PROXY %s from %s: client %s", info.command, self.peer[0], client)
        self._hand_over(client or self.peer, self.peer, buf[used:])

    def _hand_over(self, address: tuple, proxy: tuple | None, rest: bytes) -> None:
        session = SmtpSession(self.edge)
        session.proxy_address = proxy
        transport = self.transport
        transport.set_protocol(session)
        session._start(transport, address)
        if rest and not session._closed:
            session.data_received(rest)

    def _timed_out(self) -> None:
        self._timer = None
        log.warning("closed %s: no PROXY header within %gs", self.peer[0],
                    self.edge.proxy_timeout)
        self.close()

    def _done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._buf = b""
        self.edge._proxy_pending.discard(self)

    def close(self) -> None:
        """Close without a word: the client never saw a banner."""
        self._done()
        self.transport.close()

    def eof_received(self):
        return None

    def connection_lost(self, exc) -> None:
        self._done()


def _log_task_error(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("validator failed", exc_info=task.exception())


_PROXY_VERSIONS: dict = {False: None, True: (1, 2), "any": (1, 2), "v1": (1,), "v2": (2,)}


class SmtpEdge(ListeningEdge):
    """Receives mail over SMTP and hands each message to ``queue``.

    ``SmtpEdge(('', 25), queue).start()`` binds at once (``OSError`` for a
    bad address or a port in use) and serves on the running loop, or on the
    loop :func:`slimta.run_forever` starts.

    Limits (Postfix's defaults where it has one): ``max_size`` 10 MiB (0: no
    limit), ``max_recipients`` 1000, ``command_timeout`` 300 s (idle time
    waiting for the client), ``data_timeout`` 600 s (the whole message),
    ``max_bad_commands`` 20, ``max_auth_failures`` 3, ``max_connections``
    1000 and ``max_connections_per_ip`` 50 (421 4.7.0 at the banner).

    TLS: ``context`` (an ``ssl.SSLContext``) offers STARTTLS, or with
    ``tls_immediately`` serves SMTPS (port 465). AUTH: ``auth=True`` offers
    PLAIN, LOGIN and CRAM-MD5 (or pass a list of mechanisms); with
    ``auth_require_tls`` (default) PLAIN and LOGIN only over TLS.

    PROXY protocol (behind HAProxy and the like): ``proxy_protocol`` is
    False (off), ``'v1'``, ``'v2'`` or ``'any'`` (True: either, told apart
    by the first octet). A connection from ``trusted_proxies`` (IP addresses
    or networks; default loopback only, ``127.0.0.0/8`` and ``::1``) must
    start with a valid header, read within ``proxy_timeout`` (5 s): the
    header's source address becomes the client's everywhere (``address``,
    ``envelope.client['ip']``, ``max_connections_per_ip``), and the proxy's
    is kept in ``session.proxy_address``. A LOCAL header (health checks), v1
    UNKNOWN or a non-IP family keeps the proxy's own address. An invalid,
    incomplete or missing header closes the connection without a banner. A
    peer not in ``trusted_proxies`` is served as a direct client: it is
    never asked for a header and a header it sends is not honoured (it is
    an unknown SMTP command). Not combinable with ``tls_immediately``.
    """

    def __init__(
        self,
        listener,
        queue,
        max_size: int | None = None,
        validator_class: type | None = None,
        auth: bool | list[str] | tuple[str, ...] = False,
        context: ssl.SSLContext | None = None,
        tls_immediately: bool = False,
        command_timeout: float | None = None,
        data_timeout: float | None = None,
        hostname: str | None = None,
        *,
        auth_require_tls: bool = True,
        max_recipients: int | None = DEFAULT_MAX_RECIPIENTS,
        max_bad_commands: int | None = 20,
        max_auth_failures: int | None = 3,
        max_connections: int | None = 1000,
        max_connections_per_ip: int | None = 50,
        shutdown_timeout: float = 30.0,
        backlog: int = 1024,
        proxy_protocol: bool | str = False,
        trusted_proxies: list[str] | tuple[str, ...] = ("127.0.0.0/8", "::1"),
        proxy_timeout: float = 5.0,
    ):
        super().__init__(queue, hostname)
        if tls_immediately and context is None:
            raise ValueError("tls_immediately needs a context")
        versions = _PROXY_VERSIONS.get(proxy_protocol)
        if versions is None and proxy_protocol is not False:
            raise ValueError(f"proxy_protocol {proxy_protocol!r}: use False, 'v1', 'v2' or 'any'")
        if versions and tls_immediately:
            raise ValueError("proxy_protocol cannot be combined with tls_immediately")
        self._proxy_versions = versions
        self.trusted_proxies = tuple(ipaddress.ip_network(n, strict=False)
                                     for n in trusted_proxies)
        self.proxy_timeout = float(proxy_timeout)
        self._proxy_pending: set[_ProxyHeaderReader] = set()
        self.listener = listener
        self.max_size = DEFAULT_MAX_SIZE if max_size is None else (max_size or None)
        self.validator_class = validator_class
        if auth is True:
            self.auth_mechanisms: tuple[str, ...] = SERVER_MECHANISMS
        elif auth:
            self.auth_mechanisms = tuple(m.upper() for m in auth)
        else:
            self.auth_mechanisms = ()
        self.auth_require_tls = auth_require_tls
        self.context = context
        self.tls_immediately = tls_immediately
        self.command_timeout = 300.0 if command_timeout is None else float(command_timeout)
        self.data_timeout = 600.0 if data_timeout is None else float(data_timeout)
        self.max_recipients = max_recipients
        self.max_bad_commands = max_bad_commands
        self.max_auth_failures = max_auth_failures
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.shutdown_timeout = shutdown_timeout
        self.backlog = backlog
        self._hooks = _overridden_hooks(validator_class)
        self._sock = None
        self._server = None
        self._sessions: set[SmtpSession] = set()
        # protocols the loop created for an accepted socket, before connection_made
        # (a TLS handshake, a task step): drain() waits for them too; weak because a
        # failed handshake never calls connection_made
        self._accepted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._per_ip: dict[str, int] = {}
        self._all_closed: asyncio.Event | None = None
        self._background: set[asyncio.Future] = set()  # hooks nobody waits for

    def _session_options(self) -> dict:
        """What each ServerConnection is given (read at every connection, so changes apply)."""
        return {
            "max_size": self.max_size,
            "max_recipients": self.max_recipients,
            "max_bad_commands": self.max_bad_commands,
            "max_auth_failures": self.max_auth_failures,
            "auth_mechanisms": self.auth_mechanisms,
            "auth_require_tls": self.auth_require_tls,
        }

    # --- lifecycle ------------------------------------------------------
    async def _begin(self) -> None:
        loop = asyncio.get_running_loop()
        protocol_class = _ProxyHeaderReader if self._proxy_versions else SmtpSession

        def factory():
            protocol = protocol_class(self)
            self._accepted[protocol] = loop.time()
            return protocol

        self._server = await loop.create_server(
            factory, sock=self._sock, backlog=self.backlog,
            ssl=self.context if self.tls_immediately else None,
            ssl_handshake_timeout=self.command_timeout if self.tls_immediately else None)

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, let sessions end on their own within ``timeout``, then :meth:`stop`.

        ``timeout`` defaults to ``shutdown_timeout``; sessions still open then
        are shut down as by :meth:`stop` (421 when idle).
        """
        if self._server is not None:
            self._server.close()
        await asyncio.sleep(0)  # an accept task already scheduled creates its protocol
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.shutdown_timeout if timeout is None else timeout)
        while (self._sessions or self._proxy_pending or self._connecting(loop.time())) \
                and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await self.stop()

    def _connecting(self, now: float) -> bool:
        """Whether a socket accepted before the listener closed is still on its way to a session."""
        grace = self.command_timeout if self.tls_immediately else 5.0
        return any(now - created < grace for created in self._accepted.values())

    async def _end(self) -> None:
        if self._server is not None:
            self._server.close()
        for reader in list(self._proxy_pending):
            reader.close()
        for session in list(self._sessions):
            session.shutdown()
        if self._sessions:
            self._all_closed = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_closed.wait(), self.shutdown_timeout)
            except TimeoutError:
                for session in list(self._sessions):
                    log.warning("closing SMTP session from %s at shutdown", session.address[0])
                    session._closed = True
                    session.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()

    def _is_trusted_proxy(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        mapped = getattr(addr, "ipv4_mapped", None)
        if mapped is not None:
            addr = mapped
        return any(addr in net for net in self.trusted_proxies)

    # --- connection accounting -------------------------------------------
    def _admit(self, session: SmtpSession) -> bool:
        ip = session.address[0]
        if self.max_connections is not None and len(self._sessions) >= self.max_connections:
            log.warning("refused %s: %d connections open", ip, len(self._sessions))
            return False
        count = self._per_ip.get(ip, 0)
        if self.max_connections_per_ip is not None and count >= self.max_connections_per_ip:
            log.warning("refused %s: %d connections from it open", ip, count)
            return False
        self._per_ip[ip] = count + 1
        self._sessions.add(session)
        return True

    def _release(self, session: SmtpSession) -> None:
        self._sessions.discard(session)
        ip = session.address[0]
        count = self._per_ip.get(ip, 1) - 1
        if count <= 0:
            self._per_ip.pop(ip, None)
        else:
            self._per_ip[ip] = count
        if not self._sessions and self._all_closed is not None:
            self._all_closed.set()
