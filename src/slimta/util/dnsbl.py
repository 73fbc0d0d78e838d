"""DNS blocklists (DNSBL): is a client's IP address listed, and why?

A DNSBL publishes each listed address as an A record under its zone: the
octets of an IPv4 address reversed (``127.0.0.2`` is looked up as
``2.0.0.127.zen.test``), an IPv6 address as its 32 nibbles reversed
(``2001:db8::1`` as ``1.0.0.0.…8.b.d.0.1.0.0.2.zen.test``, RFC 5782). The A
record's address (the *return code*, e.g. ``127.0.0.2``) tells why; a TXT
record under the same name carries a human-readable reason.

Checking one list or several::

    from slimta.util.dnsbl import DnsBlocklist, DnsBlocklistGroup

    zen = DnsBlocklist("zen.test", ignore=["127.255.255.0/24"])
    if await zen.check("192.0.2.7"):
        print(await zen.get_reason("192.0.2.7"))

    group = DnsBlocklistGroup(threshold=2.0)
    group.add("zen.test", weight=2.0)
    group.add("bl.test")                 # weight 1.0
    group.add("psbl.test")
    await group.score("192.0.2.7")       # sum of the weights of the lists listing it
    await group.check("192.0.2.7")       # score >= threshold

Rejecting listed clients in SMTP validators::

    from slimta.edge.smtp import SmtpValidators
    from slimta.util.dnsbl import check_dnsbl

    class Validators(SmtpValidators):
        @check_dnsbl("zen.test", match_code="554")
        def handle_banner(self, reply, address):
            pass

        @check_dnsbl(group, match_message="5.7.1 Blocked: {reason}")
        def handle_rcpt(self, reply, recipient, params):
            pass

**Rules** (decisions, the same everywhere in this module):

- **Fail open.** A lookup that fails (timeout, SERVFAIL, no name server)
  never lists an address; the failure is logged as a warning. NXDOMAIN is the
  normal "not listed" answer.
- **Return codes.** Only A records inside ``127.0.0.0/8`` list an address
  (RFC 5782 §2.3); anything else (a resolver that rewrites NXDOMAIN, say) is
  logged and ignored. ``ignore`` names further codes or networks that do not
  count, such as Spamhaus's error codes ``127.255.255.0/24``.
- **Loopback clients are not looked up** by :func:`check_dnsbl` (no query is
  sent) unless ``skip_loopback=False``. The classes themselves look up
  whatever address they are given.
- **IPv4-mapped IPv6 addresses** (``::ffff:192.0.2.7``, as a dual-stack
  listener reports IPv4 clients) are looked up as the IPv4 address.
- **Reasons** from TXT records are untrusted text from the network: before
  they go into an SMTP reply, control characters are replaced by spaces,
  non-ASCII by ``?``, and the text is cut to :data:`MAX_REASON` characters.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from slimta.util.aio import maybe_await
from slimta.util.dns import DnsError, DnsNotFound, Resolver, get_resolver

__all__ = [
    "MAX_REASON",
    "DnsBlocklist",
    "DnsBlocklistGroup",
    "DnsblResult",
    "check_dnsbl",
    "client_ip",
    "reverse_ip",
]

log = logging.getLogger(__name__)

#: The longest TXT reason put into an SMTP reply, in characters.
MAX_REASON = 200

_LISTING_NET = ipaddress.ip_network("127.0.0.0/8")
_UNSAFE = re.compile(r"[\x00-\x1f\x7f]+")
_SPACES = re.compile(r"\s+")

F = TypeVar("F", bound=Callable[..., Any])


# --- addresses ----------------------------------------------------------------


def _parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``ip`` as an address object; IPv4-mapped IPv6 as IPv4, zone ids dropped."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0].strip())
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def reverse_ip(ip: str) -> str:
    """The DNSBL label sequence for ``ip`` (RFC 5782 §2.1 and §2.4).

    ``'192.0.2.7'`` gives ``'7.2.0.192'``; an IPv6 address gives its 32
    nibbles in reverse order, dot-separated. Raises :class:`ValueError` when
    ``ip`` is not an IP address.
    """
    addr = _parse_ip(ip)
    if isinstance(addr, ipaddress.IPv4Address):
        return ".".join(reversed(str(addr).split(".")))
    return ".".join(reversed(addr.exploded.replace(":", "")))


def client_ip(session: Any) -> str | None:
    """The IP address of an SMTP session's client (``session.address[0]``), normalised.

    ``None`` when the session has no usable IP address (a Unix socket, say).
    """
    address = getattr(session, "address", None)
    if not address:
        return None
    try:
        return str(_parse_ip(str(address[0])))
    except ValueError:
        return None


def _sanitize(text: str) -> str:
    text = _UNSAFE.sub(" ", text)
    text = text.encode("ascii", "replace").decode("ascii")
    text = _SPACES.sub(" ", text).strip()
    if len(text) > MAX_REASON:
        text = text[: MAX_REASON - 3].rstrip() + "..."
    return text


# --- results ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DnsblResult:
    """What the blocklists said about one address.

    ``matches`` maps each list that lists ``ip`` to its return code;
    ``score`` is the sum of those lists' weights, ``listed`` whether it
    reached the threshold. ``failed`` names the lists whose lookup failed or
    timed out (they count as not listing).
    """

    ip: str
    listed: bool
    score: float = 0.0
    matches: dict[str, str] = field(default_factory=dict)
    failed: tuple[str, ...] = ()


# --- one list -----------------------------------------------------------------


class DnsBlocklist:
    """One DNS blocklist zone, e.g. ``DnsBlocklist('zen.test')``.

    ``ignore`` holds return codes (``'127.0.0.255'``) or networks
    (``'127.255.255.0/24'``) that do not mean "listed". ``resolver`` is a
    :class:`slimta.util.dns.Resolver`; by default the shared one, looked up at
    each query.
    """

    def __init__(
        self,
        address: str,
        ignore: Iterable[str] | str | None = None,
        *,
        resolver: Resolver | None = None,
    ):
        self.address = address.strip().strip(".").lower()
        if not self.address:
            raise ValueError("a DNSBL needs a zone name")
        if isinstance(ignore, str):
            ignore = [ignore]
        self.ignore = tuple(ipaddress.ip_network(i.strip(), strict=False) for i in ignore or ())
        self._resolver = resolver

    def __repr__(self) -> str:
        return f"<DnsBlocklist {self.address}>"

    @property
    def resolver(self) -> Resolver:
        """The resolver this list asks: the one given, else the shared one."""
        return self._resolver if self._resolver is not None else get_resolver()

    def query_name(self, ip: str) -> str:
        """The name looked up for ``ip``: ``reverse_ip(ip) + '.' + address``."""
        return f"{reverse_ip(ip)}.{self.address}"

    def _counts(self, code: str) -> bool:
        try:
            addr = ipaddress.IPv4Address(code)
        except ValueError:
            return False
        if addr not in _LISTING_NET:
            log.warning("DNSBL %s answered %s, outside 127.0.0.0/8: ignored", self.address, code)
            return False
        return not any(addr in net for net in self.ignore)

    async def lookup(self, ip: str) -> str | None:
        """The return code listing ``ip``, or ``None`` when it is not listed.

        Raises :class:`slimta.util.dns.DnsError` when the lookup fails and
        :class:`ValueError` when ``ip`` is not an IP address.
        """
        name = self.query_name(ip)
        try:
            answer = await self.resolver.query_a(name)
        except DnsNotFound:
            return None
        for code in answer.records:
            if self._counts(code):
                return code
        return None

    async def evaluate(self, ip: str, timeout: float | None = None) -> DnsblResult:
        """Look ``ip`` up, failing open: a failure or timeout is logged and not listed."""
        ip = str(_parse_ip(ip))
        try:
            async with asyncio.timeout(timeout):
                code = await self.lookup(ip)
        except TimeoutError:
            log.warning("DNSBL %s: lookup of %s timed out after %ss", self.address, ip, timeout)
            return DnsblResult(ip, False, failed=(self.address,))
        except DnsError as exc:
            log.warning("DNSBL %s: lookup of %s failed: %s", self.address, ip, exc)
            return DnsblResult(ip, False, failed=(self.address,))
        if code is None:
            return DnsblResult(ip, False)
        return DnsblResult(ip, True, 1.0, {self.address: code})

    async def check(self, ip: str, timeout: float | None = None) -> bool:
        """Whether the list lists ``ip`` (``False`` when the lookup fails)."""
        return (await self.evaluate(ip, timeout)).listed

    async def get_reason(self, ip: str, timeout: float | None = None) -> str | None:
        """The list's TXT reason for ``ip``, sanitised; ``None`` if there is none or it failed.

        Several TXT records are joined with ``'; '``.
        """
        name = self.query_name(ip)
        try:
            async with asyncio.timeout(timeout):
                answer = await self.resolver.query_txt(name)
        except DnsNotFound:
            return None
        except (DnsError, TimeoutError) as exc:
            log.warning("DNSBL %s: TXT lookup of %s failed: %s", self.address, ip,
                        exc or "timed out")
            return None
        text = _sanitize("; ".join(answer.records))
        return text or None


# --- several lists ------------------------------------------------------------


class DnsBlocklistGroup:
    """Several blocklists with weights: an address is listed when the weights
    of the lists listing it add up to ``threshold``.

    ``blocklists`` may hold zone names, :class:`DnsBlocklist` objects, or
    ``(list, weight)`` pairs; :meth:`add` adds more. All lists are asked at
    once. With the default weights (1.0) and threshold (1.0), one list is
    enough.
    """

    def __init__(
        self,
        blocklists: Iterable[DnsBlocklist | str | tuple[DnsBlocklist | str, float]] = (),
        threshold: float = 1.0,
        *,
        resolver: Resolver | None = None,
    ):
        self.threshold = threshold
        self._resolver = resolver
        self.members: list[tuple[DnsBlocklist, float]] = []
        for entry in blocklists:
            if isinstance(entry, tuple):
                self.add(entry[0], entry[1])
            else:
                self.add(entry)

    def __repr__(self) -> str:
        names = ", ".join(f"{bl.address}={w:g}" for bl, w in self.members)
        return f"<DnsBlocklistGroup [{names}] threshold={self.threshold:g}>"

    def add(
        self,
        blocklist: DnsBlocklist | str,
        weight: float = 1.0,
        ignore: Iterable[str] | str | None = None,
    ) -> DnsBlocklist:
        """Add a list (a zone name or a :class:`DnsBlocklist`) with ``weight``; returns it."""
        if isinstance(blocklist, str):
            blocklist = DnsBlocklist(blocklist, ignore, resolver=self._resolver)
        elif ignore is not None:
            raise ValueError("ignore is given to the DnsBlocklist itself")
        self.members.append((blocklist, float(weight)))
        return blocklist

    #: the name python-slimta used
    add_dnsbl = add

    async def evaluate(self, ip: str, timeout: float | None = None) -> DnsblResult:
        """Ask every list at once; lists that fail or are still unanswered after
        ``timeout`` seconds are logged and count as not listing."""
        ip = str(_parse_ip(ip))
        tasks = {
            asyncio.ensure_future(bl.lookup(ip)): (bl, weight) for bl, weight in self.members
        }
        if not tasks:
            return DnsblResult(ip, False)
        try:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
        finally:  # also when the caller is cancelled: no lookup outlives it
            for task in tasks:
                if not task.done():
                    task.cancel()
        matches: dict[str, str] = {}
        failed: list[str] = []
        score = 0.0
        for task, (bl, weight) in tasks.items():
            if task in pending:
                log.warning("DNSBL %s: lookup of %s timed out after %ss", bl.address, ip, timeout)
                failed.append(bl.address)
                continue
            exc = task.exception()
            if exc is not None:
                log.warning("DNSBL %s: lookup of %s failed: %s", bl.address, ip, exc)
                failed.append(bl.address)
                continue
            code = task.result()
            if code is not None:
                matches[bl.address] = code
                score += weight
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        return DnsblResult(ip, bool(matches) and score >= self.threshold, score, matches,
                           tuple(failed))

    async def score(self, ip: str, timeout: float | None = None) -> float:
        """The sum of the weights of the lists that list ``ip``."""
        return (await self.evaluate(ip, timeout)).score

    async def matches(self, ip: str, timeout: float | None = None) -> dict[str, str]:
        """``{zone: return code}`` for each list that lists ``ip``."""
        return (await self.evaluate(ip, timeout)).matches

    async def check(self, ip: str, timeout: float | None = None) -> bool:
        """Whether :meth:`score` reaches :attr:`threshold`."""
        return (await self.evaluate(ip, timeout)).listed

    async def get_reasons(
        self, ip: str, zones: Iterable[str] | None = None, timeout: float | None = None
    ) -> dict[str, str]:
        """``{zone: reason}`` from the TXT records of ``zones`` (default: all lists).

        Lists without a reason (or whose TXT lookup failed) are left out.
        """
        wanted = None if zones is None else set(zones)
        lists = [bl for bl, _ in self.members if wanted is None or bl.address in wanted]
        reasons = await asyncio.gather(*(bl.get_reason(ip, timeout) for bl in lists))
        return {bl.address: r for bl, r in zip(lists, reasons, strict=True) if r}


# --- the validator decorator --------------------------------------------------


_PLACEHOLDER = re.compile(r"\{(reason|ip|blocklist)\}")


def _render(template: str, result: DnsblResult, reason: str) -> str:
    """Fill the placeholders in one pass (a reason containing ``{ip}`` stays as it is)."""
    values = {"reason": reason, "ip": result.ip, "blocklist": ", ".join(result.matches)}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def check_dnsbl(
    blocklist: str | DnsBlocklist | DnsBlocklistGroup,
    match_code: str = "550",
    match_message: str = "5.7.1 Access denied",
    timeout: float | None = 10.0,
    *,
    skip_loopback: bool = True,
) -> Callable[[F], Callable[..., Awaitable[Any]]]:
    """Decorate an :class:`~slimta.edge.smtp.SmtpValidators` hook (``handle_banner``,
    ``handle_rcpt``, or any hook whose first argument is the reply) to refuse
    clients whose IP address (``self.session.address``) is listed.

    ``blocklist`` is a zone name, a :class:`DnsBlocklist` or a
    :class:`DnsBlocklistGroup`. When the client is listed, the reply becomes
    ``match_code``/``match_message`` and the decorated hook is not called;
    otherwise the hook runs as usual. The decorated hook becomes a coroutine
    (the edge awaits it).

    ``match_message`` is a template: ``{reason}`` becomes the lists' TXT
    reasons (joined with ``'; '``; ``'listed by <zones>'`` when no list gave
    one), ``{ip}`` the client's address and ``{blocklist}`` the listing zones.
    The TXT records are only looked up when the template has ``{reason}``.
    Without placeholders the message is used as given.

    ``timeout`` bounds the whole check, TXT lookups included; lookups that
    fail or time out let the client through (logged). The answer is kept for
    the rest of the connection, so checking every RCPT costs one lookup.
    Clients on a loopback address are never looked up unless
    ``skip_loopback`` is false. For ``handle_banner``, RFC 5321 §3.1 suggests
    ``match_code='554'``.
    """
    if isinstance(blocklist, str):
        target: DnsBlocklist | DnsBlocklistGroup = DnsBlocklist(blocklist)
    else:
        target = blocklist
    key = object()  # this decorator's slot in the per-connection cache

    async def verdict(validators: Any) -> tuple[DnsblResult, str] | None:
        cache = validators.__dict__.setdefault("_slimta_dnsbl", {})
        if key in cache:
            return cache[key]
        ip = client_ip(getattr(validators, "session", None))
        outcome = None
        if ip is not None and not (skip_loopback and ipaddress.ip_address(ip).is_loopback):
            outcome = await _decide(target, ip, match_message, timeout)
        cache[key] = outcome
        return outcome

    def decorator(func: F) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(func)
        async def wrapper(self: Any, reply: Any, *args: Any, **kwargs: Any) -> Any:
            outcome = await verdict(self)
            if outcome is not None:
                result, message = outcome
                reply.code = match_code
                reply.message = message
                log.info("refused %s: listed by %s (score %g)", result.ip,
                         ", ".join(f"{z}={c}" for z, c in result.matches.items()), result.score)
                return None
            return await maybe_await(func(self, reply, *args, **kwargs))

        return wrapper

    return decorator


async def _decide(
    target: DnsBlocklist | DnsBlocklistGroup, ip: str, template: str, timeout: float | None
) -> tuple[DnsblResult, str] | None:
    """``(result, reply message)`` when ``ip`` is listed, else ``None``; fails open."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    try:
        result = await target.evaluate(ip, timeout)
    except ValueError:
        return None
    if not result.listed:
        return None
    reason = ""
    if "{reason}" in template:
        left = None if deadline is None else max(0.0, deadline - loop.time())
        if isinstance(target, DnsBlocklistGroup):
            reasons = await target.get_reasons(ip, result.matches, left)
            reason = "; ".join(reasons.values())
        else:
            reason = await target.get_reason(ip, left) or ""
        reason = _sanitize(reason) or "listed by " + ", ".join(result.matches)
    return result, _render(template, result, reason)
