"""One asynchronous DNS resolver (dnspython) shared by everything in slimta.

Relays (MX lookups), DNSBL, SPF, DKIM/DMARC and PTR checks all ask the same
:class:`Resolver`, so one setting points all of them at the same name servers::

    from slimta.util import dns

    dns.set_resolver(dns.Resolver(["127.0.0.1:5354"], timeout=1.0, lifetime=3.0))
    answer = await dns.query_mx("example.test")
    for mx in answer.records:            # MxRecord(preference=10, exchange='mx1.example.test')
        ...
    answer.ttl                          # seconds the answer stays valid

**Where the name servers come from**, first match wins:

1. the ``nameservers`` argument of :class:`Resolver` (the daemon's config);
2. the environment variable ``SLIMTA_NAMESERVERS``, e.g.
   ``127.0.0.1:5354,127.0.0.2:53`` (commas or spaces between entries);
3. ``/etc/resolv.conf`` (the system's resolver configuration).

An entry is an IP address with an optional port: ``127.0.0.1``,
``127.0.0.1:5354``, ``::1``, ``[::1]:5354``; the port defaults to ``port``
(53). **Tests must never fall through to the system resolver**: they build a
``Resolver`` pointing at their own ``dnsmasq`` (see ``tests/dnsmasq.py``) or
set ``SLIMTA_NAMESERVERS``.

**Results** are :class:`Answer` objects: the records as plain Python values
(``str`` addresses and names, :class:`MxRecord`) and the TTL. Names are
lower-case A-labels without the final dot; the root name is ``"."`` (the
target of a null MX, RFC 7505).

**Errors** are one of two exceptions:

- :class:`DnsNotFound`: a definitive answer that there is nothing: the name
  does not exist (NXDOMAIN, ``nxdomain=True``) or has no record of that type
  (NOERROR with an empty answer, ``nxdomain=False``). A malformed name also
  raises it. Do not retry.
- :class:`DnsError`: a temporary failure: timeout, SERVFAIL or REFUSED from
  every name server, an unusable reply, no name server configured. Retry
  later.

**Caching.** By default a :class:`Resolver` keeps answers in a
:class:`DnsCache` for their TTL, capped at one hour; definitive negative
answers are kept for the negative TTL of the zone's SOA (RFC 2308), capped at
one minute, and not at all when the reply carries no SOA. Temporary failures
are never cached. Concurrent identical queries share one request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

__all__ = [
    "NAMESERVERS_ENV",
    "Answer",
    "DnsCache",
    "DnsError",
    "DnsNotFound",
    "MxRecord",
    "Resolver",
    "get_resolver",
    "parse_host_port",
    "query_a",
    "query_aaaa",
    "query_mx",
    "query_ptr",
    "query_txt",
    "set_resolver",
]

log = logging.getLogger(__name__)

#: The environment variable read when no name servers are given.
NAMESERVERS_ENV = "SLIMTA_NAMESERVERS"

#: The system resolver configuration, the last resort.
RESOLV_CONF = "/etc/resolv.conf"

T = TypeVar("T")
_Key = tuple[str, int]


# --- errors -------------------------------------------------------------------


class DnsNotFound(Exception):
    """A definitive negative answer: do not retry.

    ``nxdomain`` is true when the name does not exist at all (NXDOMAIN), false
    when it exists without records of the type asked for (or is malformed).
    """

    def __init__(self, name: str, rdtype: str, nxdomain: bool, msg: str | None = None):
        self.name = name
        self.rdtype = rdtype
        self.nxdomain = nxdomain
        if msg is None:
            what = "does not exist" if nxdomain else f"has no {rdtype} record"
            msg = f"{name} {what}"
        super().__init__(msg)


class DnsError(Exception):
    """A temporary DNS failure (timeout, SERVFAIL, no name servers): retry later."""

    def __init__(self, name: str, rdtype: str, msg: str):
        self.name = name
        self.rdtype = rdtype
        super().__init__(msg)


# --- results ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, order=True)
class MxRecord:
    """One MX record: ``preference`` (lower is tried first) and ``exchange``.

    ``exchange`` is a host name, lower-case and without the final dot;
    ``"."`` for the root, as in a null MX (RFC 7505).
    """

    preference: int
    exchange: str

    @property
    def is_null(self) -> bool:
        """Whether the exchange is the root name ``"."`` (RFC 7505 null MX)."""
        return self.exchange == "."


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    """A positive answer: the records found for ``name`` and how long they last.

    ``records`` holds plain values (``str`` or :class:`MxRecord`), never empty;
    ``ttl`` is the smallest TTL along the answer (CNAMEs included), in whole
    seconds; an answer served from the cache has the time left.
    """

    name: str
    records: tuple[T, ...]
    ttl: int

    def __iter__(self) -> Iterator[T]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)


# --- the cache ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Negative:
    name: str
    rdtype: str
    nxdomain: bool
    msg: str

    def error(self) -> DnsNotFound:
        return DnsNotFound(self.name, self.rdtype, self.nxdomain, self.msg)


class DnsCache:
    """Answers kept for their TTL: positive ones up to ``max_ttl`` seconds,
    negative ones (:class:`DnsNotFound`) up to ``max_negative_ttl``.

    Holds at most ``max_entries`` entries; the oldest go first. ``clock``
    (monotonic seconds) is injectable so tests can move time.
    """

    def __init__(
        self,
        *,
        max_ttl: float = 3600.0,
        max_negative_ttl: float = 60.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: dict[_Key, tuple[float, Answer[Any] | _Negative]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget everything."""
        self._entries.clear()

    def get(self, key: _Key) -> Answer[Any] | _Negative | None:
        """The live entry for ``key`` (an answer with its remaining TTL), or ``None``."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, value = entry
        left = expires - self.clock()
        if left <= 0:
            del self._entries[key]
            return None
        if isinstance(value, Answer):
            return dataclasses.replace(value, ttl=int(left))
        return value

    def put(self, key: _Key, value: Answer[Any] | _Negative, ttl: float) -> None:
        """Keep ``value`` for ``ttl`` seconds, capped; a TTL of 0 keeps nothing."""
        cap = self.max_ttl if isinstance(value, Answer) else self.max_negative_ttl
        ttl = min(ttl, cap)
        if ttl <= 0 or self.max_entries <= 0:
            return
        self._entries.pop(key, None)
        while len(self._entries) >= self.max_entries:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (self.clock() + ttl, value)


# --- configuration ------------------------------------------------------------

_BRACKETED = re.compile(r"^\[([^\]]+)\](?::(\d+))?$")


def parse_host_port(text: str, default_port: int) -> tuple[str, int]:
    """Split ``host``, ``host:port``, ``[host]:port``, ``[v6]`` or a bare IPv6 address.

    Raises :class:`ValueError` for an empty host or a port outside 1-65535.
    """
    text = text.strip()
    m = _BRACKETED.match(text)
    if m:
        host, port_text = m.group(1), m.group(2)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:  # a name, an IPv4 address or a bare IPv6 address
        host, port_text = text, None
    port = default_port if port_text is None else int(port_text)
    if not host or "[" in host or "]" in host or not 0 < port < 65536:
        raise ValueError(f"invalid host and port: {text!r}")
    return host, port


def _parse_nameservers(
    entries: str | Sequence[str | tuple[str, int]], default_port: int
) -> list[tuple[str, int]]:
    if isinstance(entries, str):
        entries = [e for e in re.split(r"[,\s]+", entries) if e]
    result = []
    for entry in entries:
        host, port = entry if isinstance(entry, tuple) else parse_host_port(entry, default_port)
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(f"a name server must be an IP address: {entry!r}") from None
        result.append((host, port))
    return result


def _read_resolv_conf(path: str) -> list[tuple[str, int]]:
    system = dns.resolver.Resolver(configure=False)
    try:
        system.read_resolv_conf(path)
    except (OSError, dns.exception.DNSException) as exc:
        log.warning("no name servers from %s: %s", path, exc)
        return []
    result = []
    for ns in system.nameservers:
        if isinstance(ns, dns.nameserver.Do53Nameserver):
            result.append((ns.address, ns.port))
        elif isinstance(ns, str):
            result.append((ns, 53))
    return result


def _text(name: dns.name.Name) -> str:
    if name == dns.name.root:
        return "."
    return name.to_text(omit_final_dot=True).lower()


def _negative_ttl(response: dns.message.Message | None) -> int:
    """The negative-caching TTL of RFC 2308 §5: from the SOA in the authority section."""
    if response is None:
        return 0
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return min(rrset.ttl, next(iter(rrset)).minimum)
    return 0


# --- the resolver -------------------------------------------------------------


class Resolver:
    """An asynchronous resolver over dnspython, with a cache.

    ``nameservers``: entries as in the module docstring (a list, or one string
    with commas); when ``None``, ``$SLIMTA_NAMESERVERS``, else ``resolv_conf``.
    ``port`` is the port of entries without one. ``timeout`` is how long to
    wait for one name server's reply, ``lifetime`` the limit for a whole query
    (all servers and retries). ``cache`` is a :class:`DnsCache`, ``True`` for a
    new one with the defaults, or ``False``/``None`` for none.
    """

    def __init__(
        self,
        nameservers: str | Sequence[str | tuple[str, int]] | None = None,
        *,
        port: int = 53,
        timeout: float = 2.0,
        lifetime: float = 5.0,
        cache: DnsCache | bool | None = True,
        resolv_conf: str = RESOLV_CONF,
    ):
        if nameservers is None and os.environ.get(NAMESERVERS_ENV, "").strip():
            nameservers = os.environ[NAMESERVERS_ENV]
            self.source = NAMESERVERS_ENV
        elif nameservers is None:
            self.source = resolv_conf
        else:
            self.source = "arguments"
        if nameservers is None:
            self.nameservers = _read_resolv_conf(resolv_conf)
        else:
            self.nameservers = _parse_nameservers(nameservers, port)
        self.timeout = timeout
        self.lifetime = lifetime
        if cache is True:
            cache = DnsCache()
        self.cache: DnsCache | None = cache if isinstance(cache, DnsCache) else None
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._configure(self._resolver)
        self._inflight: dict[_Key, asyncio.Future[Any]] = {}

    def __repr__(self) -> str:
        servers = ",".join(f"{h}:{p}" for h, p in self.nameservers)
        return f"<Resolver {servers or 'no nameservers'} from {self.source}>"

    def _configure(self, resolver: dns.resolver.BaseResolver) -> None:
        resolver.nameservers = [dns.nameserver.Do53Nameserver(h, p) for h, p in self.nameservers]
        resolver.timeout = self.timeout
        resolver.lifetime = self.lifetime
        resolver.use_edns(0, 0, 1232)

    def make_sync_resolver(self) -> dns.resolver.Resolver:
        """A blocking dnspython resolver with the same servers and timeouts (no cache).

        For libraries that only do blocking lookups; run them in a thread.
        """
        resolver = dns.resolver.Resolver(configure=False)
        self._configure(resolver)
        return resolver

    async def resolve(self, name: str, rdtype: str) -> dns.resolver.Answer:
        """The raw dnspython answer for ``name``/``rdtype``, uncached, errors mapped."""
        label = rdtype.upper()
        if not self.nameservers:
            raise DnsError(name, label, f"no name servers configured ({self.source})")
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError, ValueError) as exc:
            raise DnsNotFound(name, label, False, f"invalid name {name!r}: {exc}") from None
        try:
            return await self._resolver.resolve(qname, label, search=False)
        except dns.resolver.NXDOMAIN as exc:
            raise DnsNotFound(_text(qname), label, True) from exc
        except dns.resolver.NoAnswer as exc:
            raise DnsNotFound(_text(qname), label, False) from exc
        except dns.resolver.YXDOMAIN as exc:
            raise DnsNotFound(_text(qname), label, True, f"{name}: name too long") from exc
        except dns.exception.Timeout as exc:
            raise DnsError(_text(qname), label, f"{label} lookup of {name} timed out") from exc
        except dns.exception.DNSException as exc:
            raise DnsError(_text(qname), label, f"{label} lookup of {name} failed: {exc}") from exc

    async def _query(
        self, name: str, rdtype: str, convert: Callable[[dns.resolver.Answer], Sequence[T]]
    ) -> Answer[T]:
        key = (name.lower().rstrip(".") or ".", dns.rdatatype.from_text(rdtype))
        if self.cache is not None:
            hit = self.cache.get(key)
            if isinstance(hit, _Negative):
                raise hit.error()
            if hit is not None:
                return hit
        loop = asyncio.get_running_loop()
        pending = self._inflight.get(key)
        if pending is None or pending.get_loop() is not loop:
            pending = loop.create_task(self._fetch(key, name, rdtype, convert))
            self._inflight[key] = pending
            pending.add_done_callback(lambda task: self._finished(key, task))
        # shield: one cancelled caller must not cancel the others' request
        return await asyncio.shield(pending)

    def _finished(self, key: _Key, task: asyncio.Future[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # retrieved: the callers got it

    async def _fetch(
        self,
        key: _Key,
        name: str,
        rdtype: str,
        convert: Callable[[dns.resolver.Answer], Sequence[T]],
    ) -> Answer[T]:
        try:
            raw = await self.resolve(name, rdtype)
        except DnsNotFound as exc:
            if self.cache is not None and isinstance(exc.__cause__, dns.exception.DNSException):
                cause = exc.__cause__
                response = None
                if isinstance(cause, dns.resolver.NXDOMAIN):
                    responses = cause.responses()
                    response = next(iter(responses.values()), None)
                elif isinstance(cause, dns.resolver.NoAnswer):
                    response = cause.response()
                ttl = _negative_ttl(response)
                negative = _Negative(exc.name, exc.rdtype, exc.nxdomain, str(exc))
                self.cache.put(key, negative, ttl)
            raise
        answer = Answer(_text(raw.qname), tuple(convert(raw)), raw.chaining_result.minimum_ttl)
        if self.cache is not None:
            self.cache.put(key, answer, answer.ttl)
        return answer

    async def query_mx(self, domain: str) -> Answer[MxRecord]:
        """The MX records of ``domain``, sorted by preference then name."""
        return await self._query(
            domain,
            "MX",
            lambda raw: sorted(MxRecord(r.preference, _text(r.exchange)) for r in raw),
        )

    async def query_a(self, name: str) -> Answer[str]:
        """The IPv4 addresses of ``name``, in the server's order."""
        return await self._query(name, "A", lambda raw: [r.address for r in raw])

    async def query_aaaa(self, name: str) -> Answer[str]:
        """The IPv6 addresses of ``name`` (compressed form), in the server's order."""
        return await self._query(
            name, "AAAA", lambda raw: [str(ipaddress.IPv6Address(r.address)) for r in raw]
        )

    async def query_txt(self, name: str) -> Answer[str]:
        """The TXT records of ``name``, one ``str`` per record.

        The character-strings of one record are joined without separators
        (as SPF, DKIM and DMARC want) and decoded as UTF-8, invalid bytes
        replaced. For the raw bytes use :meth:`resolve`.
        """
        return await self._query(
            name,
            "TXT",
            lambda raw: [b"".join(r.strings).decode("utf-8", "replace") for r in raw],
        )

    async def query_ptr(self, ip: str) -> Answer[str]:
        """The names of the PTR records for the IPv4 or IPv6 address ``ip``.

        Raises :class:`ValueError` when ``ip`` is not an IP address.
        """
        try:
            rname = dns.reversename.from_address(ip)
        except (dns.exception.SyntaxError, ValueError):
            raise ValueError(f"not an IP address: {ip!r}") from None
        return await self._query(rname.to_text(), "PTR", lambda raw: [_text(r.target) for r in raw])


# --- the shared resolver ------------------------------------------------------

_shared: Resolver | None = None


def get_resolver() -> Resolver:
    """The process-wide resolver; the first call builds one from the environment."""
    global _shared
    if _shared is None:
        _shared = Resolver()
    return _shared


def set_resolver(resolver: Resolver | None) -> Resolver | None:
    """Make ``resolver`` the process-wide one (``None``: build a new one on next use).

    Returns the previous one (or ``None``), so callers can put it back.
    """
    global _shared
    previous, _shared = _shared, resolver
    return previous


async def query_mx(domain: str) -> Answer[MxRecord]:
    """:meth:`Resolver.query_mx` on the shared resolver."""
    return await get_resolver().query_mx(domain)


async def query_a(name: str) -> Answer[str]:
    """:meth:`Resolver.query_a` on the shared resolver."""
    return await get_resolver().query_a(name)


async def query_aaaa(name: str) -> Answer[str]:
    """:meth:`Resolver.query_aaaa` on the shared resolver."""
    return await get_resolver().query_aaaa(name)


async def query_txt(name: str) -> Answer[str]:
    """:meth:`Resolver.query_txt` on the shared resolver."""
    return await get_resolver().query_txt(name)


async def query_ptr(ip: str) -> Answer[str]:
    """:meth:`Resolver.query_ptr` on the shared resolver."""
    return await get_resolver().query_ptr(ip)
