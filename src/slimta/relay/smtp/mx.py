"""MxSmtpRelay: deliver to each recipient domain's MX hosts."""

from __future__ import annotations

import asyncio
import logging
import ssl

from slimta.relay import PermanentRelayError, Relay, RelayError, TransientRelayError
from slimta.relay.smtp.mx_lookup import MxLookup
from slimta.relay.smtp.pool import ConnectionPool
from slimta.relay.smtp.static import _options

__all__ = ["MxSmtpRelay"]

log = logging.getLogger(__name__)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


class MxSmtpRelay(Relay):
    """Delivers over SMTP to the MX hosts of each recipient's domain.

    One attempt groups the recipients by domain and delivers to all domains
    at once, so no split policy is needed. For each domain the MX hosts are
    tried in preference order (random among equals, the domain itself when it
    has no MX); when one cannot be connected to or refuses at the greeting,
    the next is tried within the same attempt. A null MX (RFC 7505) fails
    permanently with 556 5.1.10, a domain with no usable host with 5.1.2, a
    DNS failure transiently with 4.4.3. Lookups are cached up to their TTL.

    Takes the options of :class:`~slimta.relay.smtp.static.StaticSmtpRelay`
    (TLS, AUTH credentials, ``source_address``, timeouts, ``pool_size`` per
    destination) plus ``resolver`` (a :class:`slimta.util.dns.Resolver`),
    ``port`` (25), ``force_mx``/``override_mx`` (see
    :class:`~slimta.relay.smtp.mx_lookup.MxLookup`).
    """

    def __init__(self, *, resolver=None, port: int = 25, force_mx: dict | None = None,
                 override_mx: dict | None = None, pool_size: int | None = None,
                 context: ssl.SSLContext | None = None, tls_required: bool = False,
                 credentials: tuple[str, str] | None = None, ehlo_as: str | None = None,
                 source_address: str | None = None, connect_timeout: float = 30.0,
                 command_timeout: float = 300.0, data_timeout: float = 600.0,
                 idle_timeout: float = 10.0, rng=None):
        super().__init__()
        self.lookup = MxLookup(resolver, port=port, force_mx=force_mx, override_mx=override_mx,
                               rng=rng)
        self.options = _options(
            lmtp=False, context=context, tls_required=tls_required, tls_immediately=False,
            credentials=credentials, ehlo_as=ehlo_as, source_address=source_address,
            connect_timeout=connect_timeout, command_timeout=command_timeout,
            data_timeout=data_timeout)
        self.pool_size = pool_size
        self.idle_timeout = idle_timeout
        self._pools: dict[tuple[str, int], ConnectionPool] = {}

    def force_mx(self, domain: str, destination: str) -> None:
        """Send mail for ``domain`` to ``destination`` (``host[:port]``), skipping DNS."""
        self.lookup.force_mx(domain, destination)

    def override_mx(self, mx_host: str, destination: str) -> None:
        """Connect to ``destination`` wherever DNS names the MX host ``mx_host``."""
        self.lookup.override_mx(mx_host, destination)

    async def _attempt(self, envelope, attempts: int):
        by_domain: dict[str, list[str]] = {}
        for rcpt in envelope.recipients:
            by_domain.setdefault(_domain(rcpt), []).append(rcpt)
        outcomes = await asyncio.gather(*(
            self._deliver_domain(domain, envelope.copy(rcpts))
            for domain, rcpts in by_domain.items()))
        results: dict = {}
        for (_, rcpts), outcome in zip(by_domain.items(), outcomes, strict=True):
            if isinstance(outcome, RelayError):
                for rcpt in rcpts:
                    results[rcpt] = outcome
            else:
                results.update(outcome)
        return results

    async def _deliver_domain(self, domain: str, envelope):
        try:
            targets = await self.lookup.targets(domain)
        except RelayError as exc:
            return exc
        last_error: RelayError | None = None
        for target in targets:
            pool = self._pool(target)
            try:
                return await pool.deliver(envelope)
            except RelayError as exc:
                if not getattr(exc, "at_connect", False):
                    return exc
                log.info("MX %s [%s] for %s: %s; trying the next", target.name,
                         target.address, domain, exc)
                if isinstance(exc, PermanentRelayError):
                    # a 5xx greeting says nothing about the recipients: like
                    # Postfix (smtp_skip_5xx_greeting) defer rather than bounce,
                    # whichever MX host happened to be tried last
                    exc = TransientRelayError(str(exc), exc.reply)
                last_error = exc
        return last_error

    def _pool(self, target) -> ConnectionPool:
        key = (target.address, target.port)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = ConnectionPool(
                self.options, target.address, target.port, size=self.pool_size,
                idle_timeout=self.idle_timeout, server_name=target.name)
        return pool

    async def _end(self) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every idle connection."""
        pools, self._pools = self._pools, {}
        await asyncio.gather(*(p.close() for p in pools.values()), return_exceptions=True)
