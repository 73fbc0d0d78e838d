"""Relays to one fixed destination: a smarthost over SMTP, or an LMTP server."""

from __future__ import annotations

import socket
import ssl

from slimta.relay import Relay
from slimta.relay.smtp.pool import ConnectionPool
from slimta.relay.smtp.session import SessionOptions

__all__ = ["StaticLmtpRelay", "StaticSmtpRelay"]


def _options(*, lmtp: bool, context, tls_required: bool, tls_immediately: bool, credentials,
             ehlo_as, source_address, connect_timeout, command_timeout, data_timeout,
             starttls: bool = True) -> SessionOptions:
    if tls_immediately:
        tls = "immediate"
    elif tls_required:
        tls = "required"
    elif starttls:
        tls = "may"
    else:
        tls = "never"
    return SessionOptions(
        ehlo_as=ehlo_as or socket.getfqdn(), context=context, tls=tls, credentials=credentials,
        source_address=source_address, connect_timeout=connect_timeout,
        command_timeout=command_timeout, data_timeout=data_timeout, lmtp=lmtp)


class StaticSmtpRelay(Relay):
    """Delivers every envelope to ``host:port`` over SMTP, reusing connections.

    TLS is opportunistic: STARTTLS when the server offers it (with
    ``context``, or an unverified one). ``tls_required`` makes a server
    without STARTTLS a transient failure; ``tls_immediately`` speaks SMTPS.
    ``credentials`` is ``(user, secret)`` for AUTH (the best mechanism the
    server offers; PLAIN and LOGIN only over TLS). ``source_address`` is the
    local IP to connect from. Mail that needs SMTPUTF8 fails permanently
    (553 5.6.7) at a server without it; 8-bit mail to a server without
    8BITMIME is converted to 7 bits first.
    """

    lmtp = False

    def __init__(self, host: str, port: int = 25, pool_size: int | None = None,
                 context: ssl.SSLContext | None = None, tls_required: bool = False,
                 credentials: tuple[str, str] | None = None, ehlo_as: str | None = None,
                 source_address: str | None = None, connect_timeout: float = 30.0,
                 command_timeout: float = 300.0, data_timeout: float = 600.0,
                 idle_timeout: float = 10.0, tls_immediately: bool = False,
                 starttls: bool = True, path: str | None = None):
        super().__init__()
        self.host = host
        self.port = port
        self.options = _options(
            lmtp=self.lmtp, context=context, tls_required=tls_required,
            tls_immediately=tls_immediately, credentials=credentials, ehlo_as=ehlo_as,
            source_address=source_address, connect_timeout=connect_timeout,
            command_timeout=command_timeout, data_timeout=data_timeout, starttls=starttls)
        self.pool = ConnectionPool(self.options, host, port, path=path, size=pool_size,
                                   idle_timeout=idle_timeout)

    async def _attempt(self, envelope, attempts: int):
        return await self.pool.deliver(envelope)

    async def close(self) -> None:
        """Close idle connections (also done by ``stop()``)."""
        await self.pool.close()

    _end = close


class StaticLmtpRelay(StaticSmtpRelay):
    """Delivers every envelope to an LMTP server, with a result per recipient.

    ``host`` may be a Unix socket path (starting with ``/``); then ``port``
    is ignored. STARTTLS is not attempted unless ``context`` is given.
    """

    lmtp = True

    def __init__(self, host: str = "localhost", port: int = 24, **kwargs):
        path = host if host.startswith("/") else None
        kwargs.setdefault("starttls", kwargs.get("context") is not None)
        super().__init__(host, port, path=path, **kwargs)
