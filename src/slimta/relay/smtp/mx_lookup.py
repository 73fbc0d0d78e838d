"""Where mail for a domain goes: MX lookup for the MX relay (RFC 5321 §5.1, RFC 7505).

:meth:`MxLookup.targets` turns a domain into the ordered list of
:class:`MxTarget` (host name, IP address, port, preference) that the relay
tries one after the other::

    lookup = MxLookup(port=25)
    for target in await lookup.targets("example.com"):
        ...  # connect to (target.address, target.port); target.name for TLS and logs

The order:

1. MX records by preference, lowest first; hosts of equal preference in a
   random order (``rng``, injectable), drawn anew on every call.
2. Without any MX record (the domain exists but has none), the domain itself
   with preference 0: the implicit MX.
3. Each host name is resolved to its addresses, IPv4 (A) before IPv6 (AAAA)
   by default (``ip_versions``), each family shuffled; an address already in
   the list (two MX names for one server) is not repeated. At most
   ``max_hosts`` MX hosts are resolved.
4. A domain literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``) is its own
   single target: no DNS at all.

Failures are relay errors that the MX relay can hand back as they are
(per recipient of the domain):

- :class:`NullMxError` (permanent, ``556 5.1.10``): the domain's only MX is
  ``.``, it accepts no mail (RFC 7505). A ``.`` among other MX records is
  ignored (RFC 7505 forbids the mix; the other hosts may still take mail).
- :class:`NoMxHostsError` (permanent, ``550 5.1.2``): the domain does not
  exist, or has neither MX nor address records, or none of its MX hosts has
  an address.
- :class:`MxLookupError` (transient, ``451 4.4.3``): a DNS failure (timeout,
  SERVFAIL) left no target to try; also when a forced destination cannot be
  resolved, since that is a configuration problem an operator can fix.

A DNS failure on some MX hosts while others resolve is not an error: the
targets found are returned.

Routing per domain, both given as ``"host"``, ``"host:port"``,
``"[host]:port"`` or an IP address, names matched without regard to case:

- ``force_mx={domain: destination}``: no MX lookup for that domain; its mail
  goes to the destination (preference 0), whose name is resolved like an MX
  host's unless it is an IP address.
- ``override_mx={mx_host: destination}``: after the MX lookup, an MX host
  (or the implicit MX, the domain itself) with that name is replaced by the
  destination, keeping its preference. For MX hosts that are reached by
  another address than the public one.

Destinations without a port, and every MX host, use ``port`` (25).

Lookups go through a :class:`slimta.util.dns.Resolver` (by default the
process-wide one, looked up on each call), whose cache keeps every record
for its TTL; a repeated lookup within the TTL makes no query at all.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from slimta.relay import PermanentRelayError, TransientRelayError
from slimta.smtp.reply import Reply
from slimta.util.dns import DnsError, DnsNotFound, Resolver, get_resolver, parse_host_port

__all__ = [
    "MxHost",
    "MxLookup",
    "MxLookupError",
    "MxTarget",
    "NoMxHostsError",
    "NullMxError",
    "lookup_mx",
]

log = logging.getLogger(__name__)


# --- errors -------------------------------------------------------------------


class NullMxError(PermanentRelayError):
    """The domain publishes a null MX (RFC 7505): it accepts no mail."""

    def __init__(self, domain: str):
        self.domain = domain
        super().__init__(
            f"{domain} publishes a null MX",
            Reply("556", f"5.1.10 Recipient address has null MX ({domain})"),
        )


class NoMxHostsError(PermanentRelayError):
    """The domain does not exist, or nothing in DNS says where its mail goes."""

    def __init__(self, domain: str, detail: str):
        self.domain = domain
        super().__init__(
            f"{domain}: {detail}",
            Reply("550", f"5.1.2 Cannot route mail to {domain}: {detail}"),
        )


class MxLookupError(TransientRelayError):
    """DNS failed for the domain (timeout, SERVFAIL): try again later."""

    def __init__(self, domain: str, detail: str):
        self.domain = domain
        super().__init__(
            f"{domain}: {detail}",
            Reply("451", f"4.4.3 Temporary DNS failure routing mail to {domain}: {detail}"),
        )


# --- results ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MxHost:
    """A host to deliver to, before its name is resolved."""

    name: str
    preference: int
    port: int


@dataclass(frozen=True, slots=True)
class MxTarget:
    """One address to try: connect to ``(address, port)``.

    ``name`` is the host's name (the MX exchange, the domain for an implicit
    MX, or a forced/override destination): the TLS server name and what logs
    show. ``preference`` is the MX preference (0 for implicit, forced and
    literal destinations).
    """

    name: str
    address: str
    port: int
    preference: int


# --- the lookup ---------------------------------------------------------------


def _normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _domain_literal(domain: str) -> str | None:
    """The address of ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 §4.1.3)."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        address = _ip(inner[5:])
        return address if address and ":" in address else None
    address = _ip(inner)
    return address if address and ":" not in address else None


class MxLookup:
    """MX routing for a relay: see the module docstring.

    ``resolver`` defaults to :func:`slimta.util.dns.get_resolver` at each call.
    ``rng`` (anything with ``shuffle``) orders equal preferences and addresses.
    ``ip_versions`` lists the address families to use, in order: ``(4, 6)``,
    ``(6, 4)``, ``(4,)``... ``max_hosts`` bounds how many MX hosts are resolved.
    """

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        port: int = 25,
        force_mx: Mapping[str, str] | None = None,
        override_mx: Mapping[str, str] | None = None,
        ip_versions: Sequence[int] = (4, 6),
        max_hosts: int = 10,
        rng: random.Random | None = None,
    ):
        if not ip_versions or set(ip_versions) - {4, 6}:
            raise ValueError(f"ip_versions must list 4 and/or 6, not {ip_versions!r}")
        self.resolver = resolver
        self.port = port
        self.ip_versions = tuple(ip_versions)
        self.max_hosts = max_hosts
        self.rng = rng if rng is not None else random.Random()
        self._force: dict[str, tuple[str, int]] = {}
        self._override: dict[str, tuple[str, int]] = {}
        for domain, destination in (force_mx or {}).items():
            self.force_mx(domain, destination)
        for host, destination in (override_mx or {}).items():
            self.override_mx(host, destination)

    def force_mx(self, domain: str, destination: str) -> None:
        """Send ``domain``'s mail to ``destination`` (``host[:port]``) without an MX lookup."""
        self._force[_normalize(domain)] = parse_host_port(destination, self.port)

    def override_mx(self, mx_host: str, destination: str) -> None:
        """Connect to ``destination`` (``host[:port]``) whenever an MX lookup yields ``mx_host``."""
        self._override[_normalize(mx_host)] = parse_host_port(destination, self.port)

    def _resolver(self) -> Resolver:
        return self.resolver if self.resolver is not None else get_resolver()

    async def hosts(self, domain: str) -> list[MxHost]:
        """The hosts for ``domain`` in the order to try, names not yet resolved.

        Raises :class:`NullMxError`, :class:`NoMxHostsError` or
        :class:`MxLookupError`; never returns an empty list.
        """
        key = _normalize(domain)
        if not key:
            raise NoMxHostsError(domain or '""', "empty domain")
        forced = self._force.get(key)
        if forced is not None:
            return [MxHost(forced[0], 0, forced[1])]
        literal = _domain_literal(domain.strip())
        if literal is not None:
            return [MxHost(literal, 0, self.port)]
        try:
            answer = await self._resolver().query_mx(key)
        except DnsNotFound as exc:
            if exc.nxdomain:
                raise NoMxHostsError(domain, "domain does not exist") from exc
            hosts = [MxHost(key, 0, self.port)]  # the implicit MX
        except DnsError as exc:
            raise MxLookupError(domain, str(exc)) from exc
        else:
            records = answer.records
            if all(record.is_null for record in records):
                raise NullMxError(domain)
            by_preference: dict[int, list[MxHost]] = {}
            for record in records:
                if not record.is_null:
                    host = MxHost(record.exchange, record.preference, self.port)
                    by_preference.setdefault(record.preference, []).append(host)
            hosts = []
            for preference in sorted(by_preference):
                group = by_preference[preference]
                self.rng.shuffle(group)
                hosts.extend(group)
        return [self._overridden(host) for host in hosts]

    def _overridden(self, host: MxHost) -> MxHost:
        destination = self._override.get(host.name)
        if destination is None:
            return host
        return MxHost(destination[0], host.preference, destination[1])

    async def _addresses(self, name: str) -> tuple[list[str], DnsError | None]:
        """The addresses of ``name`` in family order, and a temporary failure if any."""
        literal = _ip(name)
        if literal is not None:
            return [literal], None
        resolver = self._resolver()
        queries = {4: resolver.query_a, 6: resolver.query_aaaa}
        results = await asyncio.gather(
            *(queries[version](name) for version in self.ip_versions), return_exceptions=True
        )
        addresses: list[str] = []
        failure: DnsError | None = None
        for result in results:
            if isinstance(result, DnsError):
                failure = result
            elif isinstance(result, DnsNotFound):
                continue
            elif isinstance(result, BaseException):
                raise result
            else:
                family = list(result.records)
                self.rng.shuffle(family)
                addresses.extend(family)
        return addresses, failure

    async def targets(self, domain: str) -> list[MxTarget]:
        """The addresses to try for ``domain``, in order: see the module docstring.

        Raises :class:`NullMxError`, :class:`NoMxHostsError` or
        :class:`MxLookupError`; never returns an empty list.
        """
        hosts = (await self.hosts(domain))[: max(1, self.max_hosts)]
        resolved = await asyncio.gather(*(self._addresses(host.name) for host in hosts))
        targets: list[MxTarget] = []
        seen: set[tuple[str, int]] = set()
        failures: list[str] = []
        for host, (addresses, failure) in zip(hosts, resolved, strict=True):
            if failure is not None:
                log.debug("MX host %s of %s: %s", host.name, domain, failure)
                failures.append(str(failure))
            for address in addresses:
                if (address, host.port) not in seen:
                    seen.add((address, host.port))
                    targets.append(MxTarget(host.name, address, host.port, host.preference))
        if targets:
            return targets
        forced = _normalize(domain) in self._force
        if failures or forced:
            detail = "; ".join(failures) or f"forced destination {hosts[0].name} has no address"
            raise MxLookupError(domain, detail)
        if [host.name for host in hosts] == [_normalize(domain)]:
            raise NoMxHostsError(domain, "no MX, A or AAAA record")
        names = ", ".join(host.name for host in hosts)
        raise NoMxHostsError(domain, f"no address for MX host {names}")


async def lookup_mx(
    domain: str,
    *,
    resolver: Resolver | None = None,
    port: int = 25,
    rng: random.Random | None = None,
) -> list[MxTarget]:
    """``MxLookup(resolver, port=port, rng=rng).targets(domain)``: a one-off lookup."""
    return await MxLookup(resolver, port=port, rng=rng).targets(domain)
