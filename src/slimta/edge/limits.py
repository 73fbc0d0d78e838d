"""Rate and abuse limits for SmtpEdge validators: connections, messages,
recipients and AUTH failures, counted in memory or in a shared Redis.

::

    from slimta.edge.limits import EdgeLimits, Limit
    from slimta.edge.smtp import SmtpValidators
    from slimta.util.ratelimit import RedisCounter

    limits = EdgeLimits(
        connections=Limit(60, 60),          # per client IP per minute
        messages=Limit(200, 3600),          # per AUTH user (else per IP) per hour
        recipients=Limit(1000, 3600),       # per AUTH user (else per IP) per hour
        auth_failures=Limit(5, 600),        # per IP; then a cool-down
        auth_cooldown=900,
        counter=RedisCounter("redis://127.0.0.1:6379/0"),  # default: MemoryCounter()
    )

    class Validators(SmtpValidators):
        @limits.check_banner
        def handle_banner(self, reply, address): ...

        @limits.check_auth
        def handle_auth(self, reply, creds): ...

        @limits.check_mail
        def handle_mail(self, reply, sender, params): ...

        @limits.check_rcpt
        def handle_rcpt(self, reply, recipient, params): ...

Each decorated hook becomes a coroutine (the edge awaits it). A limit left
``None`` is not checked. Each :class:`Limit` may carry its own counter;
otherwise the ``counter`` given to :class:`EdgeLimits` is used (one
:class:`~slimta.util.ratelimit.MemoryCounter` per ``EdgeLimits`` by
default). Several hosts share counts by giving them a
:class:`~slimta.util.ratelimit.RedisCounter` on the same server and prefix.

**Replies** (RFC 3463 enhanced codes; Postfix uses the same classes for its
anvil limits; the texts are attributes of :class:`EdgeLimits`, change them
on the instance):

=====================  =====  ====================================================
limit                  where  reply
=====================  =====  ====================================================
connections            banner ``421 4.7.0 Too many connections from your address,
                              try again later`` (421 closes the connection)
messages               MAIL   ``451 4.7.1 Too many messages, try again later``
recipients             RCPT   ``452 4.5.3 Too many recipients, try again later``
                              (RFC 5321 §4.5.3.1.10: 452 for too many
                              recipients; 4.5.3 is RFC 3463's "too many
                              recipients")
AUTH cool-down         AUTH,  ``421 4.7.0 Too many authentication failures, try
                       banner again later``
=====================  =====  ====================================================

**Rules**:

- Windows are fixed and start at a key's first hit (see
  :mod:`slimta.util.ratelimit`). Every attempt counts, refused ones too,
  as Postfix's anvil counts requests: a client that keeps trying while
  refused stays refused until the window ends.
- The limit is ``count`` per window: attempt ``count + 1`` is refused.
- The check runs before the decorated hook, which is not called when the
  limit refuses (no DNSBL lookup, say, for a client already refused).
- Messages and recipients are counted per authenticated user
  (``session.auth``) when there is one, else per client IP.
- AUTH failures: the decorated ``handle_auth`` runs first; a reply that is
  not 2xx counts one failure for the client's IP. After ``count`` failures
  within the window the IP is cooled down for ``auth_cooldown`` seconds:
  further AUTH attempts and new connections get the 421. (Exchanges that
  never reach ``handle_auth``, such as malformed or cancelled ones, are the
  edge's ``max_auth_failures``' business.)
- Clients are counted by address, aggregated as Postfix's anvil does
  (``smtpd_client_ipv4_prefix_length`` 32, ``smtpd_client_ipv6_prefix_length``
  84): ``ipv4_prefix``/``ipv6_prefix`` set how many leading bits count, so a
  client cannot escape its IPv6 limits by rotating addresses within its
  network. IPv4-mapped IPv6 addresses count as IPv4.
- Clients on loopback addresses (``exempt_loopback``, default true) and in
  ``exempt_networks`` are never counted nor refused.
- **Fail open**: a counter that fails (Redis down) is logged and lets the
  client through.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from slimta.smtp.reply import Reply
from slimta.util.aio import maybe_await
from slimta.util.dnsbl import client_ip
from slimta.util.ratelimit import Counter, MemoryCounter

__all__ = ["EdgeLimits", "Limit"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
Hook = Callable[..., Awaitable[Any]]


@dataclass(frozen=True)
class Limit:
    """At most ``count`` events per ``window`` seconds, counted by ``counter``
    (``None``: the :class:`EdgeLimits`' counter)."""

    count: int
    window: float
    counter: Counter | None = None

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("Limit count must be at least 1")
        if self.window <= 0:
            raise ValueError("Limit window must be positive")


def _as_limit(value: Limit | tuple[int, float] | None) -> Limit | None:
    if value is None or isinstance(value, Limit):
        return value
    count, window = value
    return Limit(count, window)


class EdgeLimits:
    """Connection, message, recipient and AUTH-failure limits, applied by
    decorating SmtpValidators hooks (see the module docstring).

    Limits may be given as :class:`Limit` or as ``(count, window_seconds)``.
    """

    connections_reply = Reply("421", "4.7.0 Too many connections from your address, "
                                     "try again later")
    messages_reply = Reply("451", "4.7.1 Too many messages, try again later")
    recipients_reply = Reply("452", "4.5.3 Too many recipients, try again later")
    auth_cooldown_reply = Reply("421", "4.7.0 Too many authentication failures, "
                                       "try again later")

    def __init__(
        self,
        *,
        connections: Limit | tuple[int, float] | None = None,
        messages: Limit | tuple[int, float] | None = None,
        recipients: Limit | tuple[int, float] | None = None,
        auth_failures: Limit | tuple[int, float] | None = None,
        auth_cooldown: float = 900.0,
        counter: Counter | None = None,
        exempt_loopback: bool = True,
        exempt_networks: Iterable[str] = (),
        ipv4_prefix: int = 32,
        ipv6_prefix: int = 84,
        prefix: str = "limits:",
    ):
        if auth_cooldown <= 0:
            raise ValueError("auth_cooldown must be positive")
        self.connections = _as_limit(connections)
        self.messages = _as_limit(messages)
        self.recipients = _as_limit(recipients)
        self.auth_failures = _as_limit(auth_failures)
        self.auth_cooldown = auth_cooldown
        self.counter: Counter = counter if counter is not None else MemoryCounter()
        self.exempt_loopback = exempt_loopback
        self.exempt_networks = [ipaddress.ip_network(n, strict=False) for n in exempt_networks]
        if not (0 <= ipv4_prefix <= 32 and 0 <= ipv6_prefix <= 128):
            raise ValueError("ipv4_prefix must be 0-32 and ipv6_prefix 0-128")
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self.prefix = prefix

    # --- helpers ------------------------------------------------------------
    def client_key(self, session: Any) -> str | None:
        """What a session's client is counted as (its address, or its network
        when the prefix is shorter than the address), or None when it is exempt
        or has no IP address."""
        ip = client_ip(session)
        if ip is None:
            return None
        addr = ipaddress.ip_address(ip)
        if self.exempt_loopback and addr.is_loopback:
            return None
        if any(addr in net for net in self.exempt_networks):
            return None
        bits = self.ipv4_prefix if addr.version == 4 else self.ipv6_prefix
        if bits == addr.max_prefixlen:
            return ip
        return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))

    def _client(self, validators: Any) -> str | None:
        return self.client_key(getattr(validators, "session", None))

    def _who(self, validators: Any, ip: str) -> str:
        user = getattr(validators.session, "auth", None)
        return f"user:{user}" if user else f"ip:{ip}"

    async def _hit(self, limit: Limit, key: str, window: float | None = None) -> int | None:
        counter = limit.counter if limit.counter is not None else self.counter
        try:
            return await counter.hit(self.prefix + key, window or limit.window)
        except Exception:
            log.warning("rate counter failed for %s; letting the client through", key,
                        exc_info=True)
            return None

    async def _over(self, limit: Limit, key: str) -> bool:
        count = await self._hit(limit, key)
        return count is not None and count > limit.count

    async def _cooling(self, ip: str) -> bool:
        limit = self.auth_failures
        if limit is None:
            return False
        counter = limit.counter if limit.counter is not None else self.counter
        try:
            return await counter.get(self.prefix + "authcool:" + ip) > 0
        except Exception:
            log.warning("rate counter failed for authcool:%s; letting the client through", ip,
                        exc_info=True)
            return False

    # --- decorators ---------------------------------------------------------
    def check_banner(self, func: F) -> Hook:
        """Decorate ``handle_banner``: the AUTH cool-down and connections per IP."""

        @functools.wraps(func)
        async def wrapper(self_: Any, reply: Reply, *args: Any, **kwargs: Any) -> Any:
            ip = self._client(self_)
            if ip is not None:
                if await self._cooling(ip):
                    log.info("refused %s: cooling down after AUTH failures", ip)
                    reply.copy(self.auth_cooldown_reply)
                    return None
                if self.connections is not None and await self._over(
                        self.connections, "conn:" + ip):
                    log.info("refused %s: too many connections", ip)
                    reply.copy(self.connections_reply)
                    return None
            return await maybe_await(func(self_, reply, *args, **kwargs))

        return wrapper

    def check_auth(self, func: F) -> Hook:
        """Decorate ``handle_auth``: refuse during a cool-down, count failures."""

        @functools.wraps(func)
        async def wrapper(self_: Any, reply: Reply, *args: Any, **kwargs: Any) -> Any:
            ip = self._client(self_)
            limit = self.auth_failures
            if ip is None or limit is None:
                return await maybe_await(func(self_, reply, *args, **kwargs))
            if await self._cooling(ip):
                log.info("refused AUTH from %s: cooling down", ip)
                reply.copy(self.auth_cooldown_reply)
                return None
            result = await maybe_await(func(self_, reply, *args, **kwargs))
            if reply.code[:1] != "2":
                failures = await self._hit(limit, "authfail:" + ip)
                if failures is not None and failures >= limit.count:
                    log.info("%s failed AUTH %d times: cooling down for %gs", ip, failures,
                             self.auth_cooldown)
                    await self._hit(limit, "authcool:" + ip, self.auth_cooldown)
            return result

        return wrapper

    def check_mail(self, func: F) -> Hook:
        """Decorate ``handle_mail``: messages per authenticated user or IP."""

        @functools.wraps(func)
        async def wrapper(self_: Any, reply: Reply, *args: Any, **kwargs: Any) -> Any:
            ip = self._client(self_)
            if ip is not None and self.messages is not None:
                who = self._who(self_, ip)
                if await self._over(self.messages, "msg:" + who):
                    log.info("refused MAIL from %s (%s): too many messages", ip, who)
                    reply.copy(self.messages_reply)
                    return None
            return await maybe_await(func(self_, reply, *args, **kwargs))

        return wrapper

    def check_rcpt(self, func: F) -> Hook:
        """Decorate ``handle_rcpt``: recipients per authenticated user or IP."""

        @functools.wraps(func)
        async def wrapper(self_: Any, reply: Reply, *args: Any, **kwargs: Any) -> Any:
            ip = self._client(self_)
            if ip is not None and self.recipients is not None:
                who = self._who(self_, ip)
                if await self._over(self.recipients, "rcpt:" + who):
                    log.info("refused RCPT from %s (%s): too many recipients", ip, who)
                    reply.copy(self.recipients_reply)
                    return None
            return await maybe_await(func(self_, reply, *args, **kwargs))

        return wrapper
