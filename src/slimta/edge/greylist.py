"""Greylisting: refuse a new (client network, sender, recipient) triplet for a
while, and accept it once the client retries after the delay.

Real MTAs retry a temporary failure; much bulk-sending software does not.
The first RCPT of an unknown triplet gets a temporary failure; a retry
within ``delay`` seconds still does; the first retry after ``delay`` is
accepted and whitelists the triplet for ``whitelist_for`` seconds (renewed
by every accepted message), so mail between known partners is never delayed
again. A triplet not retried within ``retry_window`` is forgotten::

    from slimta.edge.greylist import Greylist
    from slimta.edge.smtp import SmtpValidators

    greylist = Greylist(delay=300)        # or storage=RedisGreylistStorage(url) to share

    class Validators(SmtpValidators):
        @greylist
        def handle_rcpt(self, reply, recipient, params):
            ...                           # runs first; greylisting applies only if it accepts

**Rules**:

- The triplet is the client's network (IPv4 ``/24``, IPv6 ``/64``: a
  sender's pool of outgoing servers usually shares one; IPv4-mapped IPv6
  counts as IPv4), the envelope sender and the recipient, both lower-cased
  (the null sender is ``''``).
- The refusal is ``451 4.7.1 Greylisted, please try again later``
  (``match_code``/``match_message``; RFC 3463 4.7.1: delivery not
  authorized, temporary), the convention of Postgrey and Postfix's
  policy services.
- The decorated hook runs first: a recipient it refuses is refused as it
  says, never greylisted (so unknown users still get their 550).
- Exempt: authenticated sessions, loopback clients (``exempt_loopback``)
  and ``exempt_networks``.
- Times come from ``clock`` (``time()``; default the system clock), so
  tests use :class:`slimta.util.clock.ManualClock`. Storage TTLs only
  collect garbage; the decisions compare stored times with the clock.
- **Fail open**: a storage error is logged and the recipient passes.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import ipaddress
import itertools
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar, runtime_checkable

from slimta.smtp.reply import Reply
from slimta.util.aio import maybe_await
from slimta.util.clock import SystemClock
from slimta.util.dnsbl import client_ip
from slimta.util.redisclient import RedisClientOwner

__all__ = ["Greylist", "GreylistStorage", "MemoryGreylistStorage", "RedisGreylistStorage"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

DAY = 86400.0


@runtime_checkable
class GreylistStorage(Protocol):
    """Where greylist times live: keys to float timestamps, each with a lifetime."""

    async def get(self, key: str) -> float | None:
        """The value stored under ``key``, or None."""
        ...

    async def set(self, key: str, value: float, ttl: float) -> None:
        """Store ``value`` under ``key`` for ``ttl`` seconds."""
        ...

    async def add(self, key: str, value: float, ttl: float) -> float | None:
        """Store ``value`` unless ``key`` exists; return the existing value, or None if stored."""
        ...

    async def delete(self, key: str) -> None:
        """Forget ``key``."""
        ...


class MemoryGreylistStorage:
    """Greylist times in this process's memory; expired keys are swept out and
    at most ``max_keys`` are kept (those expiring first are forgotten)."""

    def __init__(self, *, clock: Any = None, max_keys: int = 1_000_000,
                 sweep_interval: float = 600.0):
        self.clock = clock if clock is not None else SystemClock()
        self.max_keys = max_keys
        self.sweep_interval = sweep_interval
        self._data: dict[str, tuple[float, float]] = {}  # key -> (value, expires)
        self._expiry: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._next_sweep = -math.inf

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> float | None:
        entry = self._data.get(key)
        if entry is None or entry[1] <= self.clock.time():
            return None
        return entry[0]

    async def set(self, key: str, value: float, ttl: float) -> None:
        now = self.clock.time()
        if now >= self._next_sweep:
            self._sweep(now)
        expires = now + ttl
        self._data[key] = (value, expires)
        heapq.heappush(self._expiry, (expires, next(self._seq), key))
        if len(self._data) > self.max_keys:
            self._sweep(now, self.max_keys)

    async def add(self, key: str, value: float, ttl: float) -> float | None:
        existing = await self.get(key)
        if existing is not None:
            return existing
        await self.set(key, value, ttl)
        return None

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def _sweep(self, now: float, keep: int | None = None) -> None:
        self._next_sweep = now + self.sweep_interval
        data, heap = self._data, self._expiry
        while heap and (heap[0][0] <= now or (keep is not None and len(data) > keep)):
            expires, _, key = heapq.heappop(heap)
            entry = data.get(key)
            if entry is not None and entry[1] == expires:
                del data[key]
        if len(heap) > 2 * len(data) + 1024:  # entries left by overwrites and deletes
            heap[:] = [(e, s, k) for e, s, k in heap if k in data and data[k][1] == e]
            heapq.heapify(heap)


class RedisGreylistStorage(RedisClientOwner):
    """Greylist times in Redis (``prefix + key``), shared by several hosts.

    ``redis`` is a URL or a ``redis.asyncio.Redis`` client.
    """

    def __init__(self, redis: Any = "redis://127.0.0.1:6379/0", prefix: str = "slimta:grey:"):
        super().__init__(redis, prefix)

    async def get(self, key: str) -> float | None:
        value = await self.client.get(self.prefix + key)
        return float(value) if value is not None else None

    async def set(self, key: str, value: float, ttl: float) -> None:
        await self.client.set(self.prefix + key, repr(value), px=max(1, math.ceil(ttl * 1000)))

    async def add(self, key: str, value: float, ttl: float) -> float | None:
        full = self.prefix + key
        stored = await self.client.set(full, repr(value), px=max(1, math.ceil(ttl * 1000)),
                                       nx=True)
        if stored:
            return None
        existing = await self.client.get(full)
        return float(existing) if existing is not None else None

    async def delete(self, key: str) -> None:
        await self.client.delete(self.prefix + key)


class Greylist:
    """Greylisting for ``handle_rcpt``; use an instance as the decorator (see
    the module docstring). One instance holds the state for every connection.

    ``delay`` (300 s) is how long a new triplet is refused, ``whitelist_for``
    (36 days) how long an accepted one stays accepted, ``retry_window``
    (2 days) how long a refused one waits for its retry.
    """

    def __init__(
        self,
        *,
        delay: float = 300.0,
        whitelist_for: float = 36 * DAY,
        retry_window: float = 2 * DAY,
        storage: GreylistStorage | None = None,
        clock: Any = None,
        ipv4_prefix: int = 24,
        ipv6_prefix: int = 64,
        exempt_loopback: bool = True,
        exempt_authenticated: bool = True,
        exempt_networks: Iterable[str] = (),
        match_code: str = "451",
        match_message: str = "4.7.1 Greylisted, please try again later",
    ):
        if delay < 0 or whitelist_for <= 0 or retry_window <= delay:
            raise ValueError("need delay >= 0, whitelist_for > 0 and retry_window > delay")
        self.delay = delay
        self.whitelist_for = whitelist_for
        self.retry_window = retry_window
        self.clock = clock if clock is not None else SystemClock()
        self.storage: GreylistStorage = (storage if storage is not None
                                         else MemoryGreylistStorage(clock=self.clock))
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self.exempt_loopback = exempt_loopback
        self.exempt_authenticated = exempt_authenticated
        self.exempt_networks = [ipaddress.ip_network(n, strict=False) for n in exempt_networks]
        self.match_code = match_code
        self.match_message = match_message

    def triplet(self, ip: str, sender: str, recipient: str) -> str:
        """The storage key of a triplet: a hash of network, sender and recipient."""
        addr = ipaddress.ip_address(ip)
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        prefix = self.ipv4_prefix if addr.version == 4 else self.ipv6_prefix
        net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
        raw = "\0".join((str(net), sender.lower(), recipient.lower()))
        return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()

    async def check(self, ip: str, sender: str, recipient: str) -> bool:
        """True when the triplet passes now (whitelisted, or retried after the delay)."""
        key = self.triplet(ip, sender, recipient)
        storage = self.storage
        now = self.clock.time()
        until = await storage.get("w:" + key)
        if until is not None and until > now:
            await storage.set("w:" + key, now + self.whitelist_for, self.whitelist_for)
            return True
        first = await storage.add("f:" + key, now, self.retry_window)
        if first is None:
            return False
        if now - first > self.retry_window or first > now:  # stale (or from the future)
            await storage.set("f:" + key, now, self.retry_window)
            return False
        if now - first >= self.delay:
            await storage.set("w:" + key, now + self.whitelist_for, self.whitelist_for)
            await storage.delete("f:" + key)
            return True
        return False

    def _exempt(self, session: Any, ip: str | None) -> bool:
        if ip is None:
            return True
        if self.exempt_authenticated and getattr(session, "auth", None):
            return True
        addr = ipaddress.ip_address(ip)
        if self.exempt_loopback and addr.is_loopback:
            return True
        return any(addr in net for net in self.exempt_networks)

    def __call__(self, func: F) -> Callable[..., Awaitable[Any]]:
        """Decorate ``handle_rcpt(self, reply, recipient, params)``."""

        @functools.wraps(func)
        async def wrapper(self_: Any, reply: Reply, recipient: str, *args: Any,
                          **kwargs: Any) -> Any:
            result = await maybe_await(func(self_, reply, recipient, *args, **kwargs))
            if reply.code[:1] != "2":
                return result
            session = getattr(self_, "session", None)
            ip = client_ip(session)
            if self._exempt(session, ip):
                return result
            envelope = getattr(session, "envelope", None)
            sender = envelope.sender if envelope is not None else ""
            try:
                passed = await self.check(ip, sender or "", recipient)
            except Exception:
                log.warning("greylist storage failed; letting %s through", ip, exc_info=True)
                return result
            if not passed:
                log.info("greylisted %s: <%s> -> <%s>", ip, sender, recipient)
                reply.code = self.match_code
                reply.message = self.match_message
            return result

        return wrapper

    check_rcpt = __call__
