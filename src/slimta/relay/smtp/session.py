"""One outbound SMTP or LMTP connection: asyncio glue around the sans-IO client.

:class:`ClientSession` connects, greets, upgrades to TLS, authenticates and
delivers envelopes, turning each remote reply into the per-recipient result
contract of :mod:`slimta.relay` (5xx permanent, 4xx and network trouble
transient, each error carrying the remote reply and the command it answered).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass

from slimta.relay import PermanentRelayError, RelayError, TransientRelayError
from slimta.smtp.client import ClientConnection, ClientError
from slimta.smtp.reply import Reply

__all__ = ["ClientSession", "SessionOptions", "error_for"]

log = logging.getLogger(__name__)


@dataclass
class SessionOptions:
    """How a relay connects and talks (shared by every session of a relay)."""

    ehlo_as: str = "localhost"
    context: ssl.SSLContext | None = None
    tls: str = "may"  # "may" (opportunistic), "required", "never", "immediate" (SMTPS)
    credentials: tuple[str, str] | None = None
    source_address: str | None = None
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    lmtp: bool = False
    pipelining: bool = True  # use PIPELINING when the server offers it


def error_for(reply: Reply, command: str) -> RelayError:
    """The relay error for a remote failure ``reply`` to ``command`` (5xx permanent)."""
    cls = PermanentRelayError if reply.code[:1] == "5" else TransientRelayError
    return cls(f"{command} failure: {reply}", reply)


def _transient(text: str) -> TransientRelayError:
    return TransientRelayError(text, Reply("451", f"4.4.2 {text}"))


def _opportunistic_context() -> ssl.SSLContext:
    # opportunistic TLS (Postfix's "may"): encrypt, but do not verify the peer
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _Protocol(asyncio.Protocol):
    def __init__(self, session: ClientSession):
        self.session = session

    def data_received(self, data: bytes) -> None:
        self.session._received(data)

    def connection_lost(self, exc) -> None:
        self.session._lost(exc)

    def eof_received(self):
        return None


class ClientSession:
    """A connection to one SMTP/LMTP server, reusable for many envelopes."""

    def __init__(self, options: SessionOptions, peer: str):
        self.options = options
        self.peer = peer
        self.conn = ClientConnection(lmtp=options.lmtp)
        self.transport: asyncio.Transport | None = None
        self.protocol = _Protocol(self)
        self.closed = False
        self.secure = False
        self.deliveries = 0
        self.mail_answered = False  # the server replied to MAIL in the current transaction
        self.last_used = 0.0
        self.server_name = peer
        self._waiter: asyncio.Future | None = None

    # --- connecting ---------------------------------------------------
    @classmethod
    async def connect(cls, options: SessionOptions, host: str, port: int | None = None,
                      path: str | None = None, server_name: str | None = None) -> ClientSession:
        """Connect and greet (banner, EHLO/LHLO, STARTTLS, AUTH).

        Raises RelayError with ``at_connect`` set, so an MX relay knows it
        may try the next host.
        """
        try:
            return await cls._connect(options, host, port, path, server_name)
        except RelayError as exc:
            exc.at_connect = True
            raise

    @classmethod
    async def _connect(cls, options: SessionOptions, host: str, port: int | None,
                       path: str | None, server_name: str | None) -> ClientSession:
        peer = path or f"{host}:{port}"
        session = cls(options, peer)
        session.server_name = server_name or host
        loop = asyncio.get_running_loop()
        ssl_ctx = None
        if options.tls == "immediate":
            ssl_ctx = options.context or _opportunistic_context()
        try:
            if path is not None:
                coro = loop.create_unix_connection(lambda: session.protocol, path)
            else:
                local = (options.source_address, 0) if options.source_address else None
                coro = loop.create_connection(
                    lambda: session.protocol, host, port, local_addr=local, ssl=ssl_ctx,
                    server_hostname=session.server_name if ssl_ctx else None)
            transport, _ = await asyncio.wait_for(coro, options.connect_timeout)
        except (OSError, TimeoutError) as exc:
            raise TransientRelayError(
                f"connection to {peer} failed: {exc}",
                Reply("451", f"4.4.1 Connection to {peer} failed")) from exc
        session.transport = transport
        session.secure = ssl_ctx is not None
        try:
            await session._greet()
        except BaseException:
            session.abort()
            raise
        return session

    async def _greet(self) -> None:
        options = self.options
        self.conn.expect_banner()
        banner = await self._reply("BANNER")
        if banner.code[:1] != "2":
            raise error_for(banner, "connect")
        await self._hello()
        ext = self.conn.extensions
        if options.tls in ("may", "required") and not self.secure:
            if "STARTTLS" in ext:
                self._write(self.conn.starttls())
                reply = await self._reply("STARTTLS")
                if reply.code == "220":
                    await self._start_tls()
                    await self._hello()
                elif options.tls == "required":
                    raise error_for(reply, "STARTTLS")
            elif options.tls == "required":
                raise TransientRelayError(
                    f"{self.peer} does not offer STARTTLS",
                    Reply("451", "4.7.0 TLS is required but the server does not offer it"))
        if options.credentials is not None:
            await self._auth()

    async def _hello(self) -> None:
        name = self.options.ehlo_as
        if self.options.lmtp:
            self._write(self.conn.lhlo(name))
            reply = await self._reply("LHLO")
            if reply.code[:1] != "2":
                raise error_for(reply, "LHLO")
            return
        self._write(self.conn.ehlo(name))
        reply = await self._reply("EHLO")
        if reply.code[:1] == "2":
            return
        if reply.code in ("500", "502"):
            self._write(self.conn.helo(name))
            reply = await self._reply("HELO")
            if reply.code[:1] == "2":
                return
            raise error_for(reply, "HELO")
        raise error_for(reply, "EHLO")

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = self.options.context or _opportunistic_context()
        try:
            self.transport = await asyncio.wait_for(
                loop.start_tls(self.transport, self.protocol, ctx,
                               server_hostname=self.server_name),
                self.options.connect_timeout)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise TransientRelayError(
                f"TLS handshake with {self.peer} failed: {exc}",
                Reply("451", "4.7.5 TLS handshake failed")) from exc
        self.conn.tls_started()
        self.secure = True

    async def _auth(self) -> None:
        user, secret = self.options.credentials
        mech = self.conn.best_auth_mechanism(self.secure)
        if mech is None:
            raise TransientRelayError(
                f"{self.peer}: no usable AUTH mechanism",
                Reply("451", "4.7.0 No usable authentication mechanism offered"))
        self._write(self.conn.auth(mech, user, secret))
        while True:
            _, reply = await self._next()
            if reply.code == "334":
                self._write(self.conn.auth_continue(reply))
                continue
            if reply.code[:1] != "2":
                raise error_for(reply, "AUTH")
            return

    # --- I/O ------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise _transient(f"connection to {self.peer} lost")
        self.transport.write(data)

    def _received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _lost(self, exc) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _next(self, timeout: float | None = None) -> tuple[str, Reply]:
        timeout = self.options.command_timeout if timeout is None else timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                item = self.conn.next_reply()
            except ClientError as exc:
                self.abort()
                raise _transient(f"bad reply from {self.peer}: {exc}") from exc
            if item is not None:
                return item
            if self.closed:
                raise _transient(f"connection to {self.peer} lost")
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.abort()
                raise _transient(f"timed out waiting for {self.peer}")
            self._waiter = loop.create_future()
            try:
                await asyncio.wait_for(self._waiter, remaining)
            except TimeoutError:
                pass
            finally:
                self._waiter = None

    async def _reply(self, tag: str, timeout: float | None = None) -> Reply:
        got, reply = await self._next(timeout)
        if got == "UNSOLICITED" or reply.code == "421":
            self.abort()
            raise error_for(reply, tag)
        return reply

    # --- delivering ----------------------------------------------------
    def prepare(self, envelope):
        """Adapt ``envelope`` to what the server offers; raises PermanentRelayError."""
        ext = self.conn.extensions
        if envelope.smtputf8 and "SMTPUTF8" not in ext:
            raise PermanentRelayError(
                f"{self.peer} does not support SMTPUTF8",
                Reply("553", "5.6.7 The next hop does not support SMTPUTF8 addresses"))
        body = getattr(envelope, "body", "7BIT") or "7BIT"
        if (body == "BINARYMIME" and not ("BINARYMIME" in ext and "CHUNKING" in ext)) or (
                body == "8BITMIME" and "8BITMIME" not in ext):
            envelope = envelope.copy()
            envelope.encode_7bit()
            envelope.body = "7BIT"
        return envelope

    async def deliver(self, envelope) -> dict:
        """One transaction; ``{recipient: None | Reply | RelayError}`` or raises RelayError."""
        self.mail_answered = False
        envelope = self.prepare(envelope)
        conn = self.conn
        ext = conn.extensions
        header, body = envelope.flatten()
        content = header + body
        use_bdat = "CHUNKING" in ext
        rcpt_params = getattr(envelope, "rcpt_params", None) or {}
        try:
            out = [conn.mail(envelope.sender, size=len(content),
                             body=None if envelope.body == "7BIT" else envelope.body,
                             smtputf8=envelope.smtputf8, ret=envelope.ret, envid=envelope.envid)]
            for rcpt in envelope.recipients:
                params = rcpt_params.get(rcpt) or {}
                out.append(conn.rcpt(rcpt, notify=params.get("notify"),
                                     orcpt=params.get("orcpt")))
        except ValueError as exc:
            # an envelope that did not come through an SMTP edge may hold anything
            raise PermanentRelayError(
                f"cannot send this envelope: {exc}",
                Reply("550", "5.5.4 Invalid address or parameter in the envelope")) from exc
        pipelined = conn.pipelining and self.options.pipelining
        # LMTP's BDAT LAST is not pipelined behind the RCPTs: when every RCPT
        # was refused RFC 2033 has the server send no reply to it, but Dovecot
        # sends one 503, so the next reply could not be told apart. It is sent
        # once a recipient was accepted, and then gets one reply per recipient.
        data_pipelined = pipelined and not (self.options.lmtp and use_bdat)
        if pipelined:
            if data_pipelined:
                out.append(conn.bdat(content, last=True) if use_bdat else conn.data())
            self._write(b"".join(out))
            mail = await self._reply("MAIL")
            self.mail_answered = True
            rcpt_replies = [await self._reply("RCPT") for _ in envelope.recipients]
            data_reply = None
            if data_pipelined:
                data_reply = await self._reply("BDAT" if use_bdat else "DATA",
                                               self.options.data_timeout if use_bdat else None)
        else:
            self._write(out[0])
            mail = await self._reply("MAIL")
            self.mail_answered = True
            rcpt_replies = []
            if mail.code[:1] == "2":
                for piece in out[1:]:
                    self._write(piece)
                    rcpt_replies.append(await self._reply("RCPT"))
            data_reply = None
        if mail.code[:1] != "2":
            await self._reset()
            raise error_for(mail, "MAIL")
        results: dict = {}
        accepted = []
        for rcpt, reply in zip(envelope.recipients, rcpt_replies, strict=True):
            if reply.code[:1] == "2":
                accepted.append(rcpt)
            else:
                results[rcpt] = error_for(reply, "RCPT")
        if not accepted:
            if data_reply is not None and data_reply.code == "354":
                # a server that took DATA without recipients: end the empty message
                self._write(self.conn.message(b""))
                await self._reply("DATA_END", self.options.data_timeout)
            await self._reset()
            return results
        if not data_pipelined:
            if use_bdat:
                self._write(conn.bdat(content, last=True))
                data_reply = await self._reply("BDAT", self.options.data_timeout)
            else:
                self._write(conn.data())
                data_reply = await self._reply("DATA")
        if not use_bdat:
            if data_reply.code != "354":
                await self._reset()
                return self._all(results, accepted, error_for(data_reply, "DATA"))
            self._write(conn.message(content))
            data_reply = await self._reply("DATA_END", self.options.data_timeout)
        if self.options.lmtp:
            # one reply per accepted recipient; the first one was read above
            replies = [data_reply]
            for _ in accepted[1:]:
                replies.append(await self._reply("DATA_END", self.options.data_timeout))
            for rcpt, reply in zip(accepted, replies, strict=True):
                results[rcpt] = reply if reply.code[:1] == "2" else error_for(reply, "DATA")
        else:
            outcome = data_reply if data_reply.code[:1] == "2" else error_for(data_reply, "DATA")
            self._all(results, accepted, outcome)
        self.deliveries += 1
        return results

    @staticmethod
    def _all(results: dict, recipients, outcome) -> dict:
        for rcpt in recipients:
            results[rcpt] = outcome
        return results

    async def _reset(self) -> None:
        try:
            self._write(self.conn.rset())
            await self._reply("RSET")
        except RelayError:
            self.abort()

    # --- ending ------------------------------------------------------------
    @property
    def usable(self) -> bool:
        """Still connected, with no unexpected reply waiting (e.g. a 421 timeout)."""
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        try:
            item = self.conn.next_reply()
        except ClientError:
            return False
        return item is None

    async def quit(self) -> None:
        """Say QUIT (briefly waiting for the 221) and close."""
        if self.closed or self.transport is None:
            return
        try:
            self._write(self.conn.quit())
            await self._next(timeout=5)
        except (RelayError, ClientError):
            pass
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
