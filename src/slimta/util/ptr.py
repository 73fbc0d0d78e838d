"""Forward-confirmed reverse DNS (FCrDNS) of SMTP clients, looked up in the background.

The client's host name is the name of a PTR record of its IP address **whose
own A (IPv4) or AAAA (IPv6) records include that address** (FCrDNS, as
Postfix's ``reverse_client_name`` checked against the forward lookup). A PTR
name that does not resolve back to the address proves nothing: anyone who
controls the reverse zone can claim any name.

The lookup starts when the client connects and runs while the SMTP dialogue
goes on; at the end of DATA its result is taken **without waiting**. If it
has not finished by then, nothing is recorded for that message (a later
message in the same connection may still get it). A confirmed name is
recorded with ``session.client_host`` and so lands in
``envelope.client['host']``; otherwise ``envelope.client['host']`` stays
``None``.

In SMTP validators, mix in :class:`PtrValidators`::

    from slimta.edge.smtp import SmtpEdge, SmtpValidators
    from slimta.util.ptr import PtrValidators

    class Validators(PtrValidators, SmtpValidators):
        def handle_banner(self, reply, address):
            ...                                   # your checks
            return super().handle_banner(reply, address)   # starts the lookup

    SmtpEdge(('', 25), queue, validator_class=Validators).start()

``PtrValidators`` comes before ``SmtpValidators`` (or any class of yours that
derives from it) in the bases. If you override ``handle_banner``,
``handle_have_data`` or ``handle_close``, call ``super()`` (and return or
await what it returns): the first starts the lookup, the second records the
result, the third cancels a lookup still running. Clients on a loopback
address are not looked up (set ``ptr_skip_loopback = False`` on your class
to change that, as tests do).

Without an SMTP session::

    from slimta.util.ptr import start_ptr_lookup, verify_ptr

    result = await verify_ptr("192.0.2.7")      # PtrResult(status='pass', host=..., ...)
    lookup = start_ptr_lookup("192.0.2.7")      # in the background
    ...
    lookup.result()                             # PtrResult, or None while running
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass
from typing import Any

from slimta.util.dns import DnsError, DnsNotFound, Resolver, get_resolver

__all__ = [
    "MAX_PTR_NAMES",
    "PtrLookup",
    "PtrResult",
    "PtrValidators",
    "start_ptr_lookup",
    "verify_ptr",
]

log = logging.getLogger(__name__)

#: PTR names checked by the forward lookup at most (as RFC 7208 §4.6.4 for SPF's ``ptr``).
MAX_PTR_NAMES = 10

#: How long a background lookup may run before it gives up, in seconds.
DEFAULT_TIMEOUT = 20.0


@dataclass(frozen=True, slots=True)
class PtrResult:
    """The outcome of a forward-confirmed reverse lookup of ``ip``.

    ``status`` is ``'pass'`` (``host`` is a PTR name whose A/AAAA records
    include ``ip``), ``'fail'`` (no PTR record, or none of the names resolves
    back to ``ip``) or ``'temperror'`` (a lookup failed or timed out before a
    name was confirmed). ``names`` are the PTR names, unverified: never use
    them as the client's identity.
    """

    ip: str
    status: str
    host: str | None = None
    names: tuple[str, ...] = ()


def _normalise(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(ip.split("%", 1)[0].strip())
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


async def _confirms(resolver: Resolver, name: str, addr: Any) -> bool:
    """Whether ``name``'s A (or AAAA) records include ``addr``; DnsError propagates."""
    try:
        if isinstance(addr, ipaddress.IPv4Address):
            answer = await resolver.query_a(name)
        else:
            answer = await resolver.query_aaaa(name)
    except DnsNotFound:
        return False
    for record in answer.records:
        try:
            if ipaddress.ip_address(record) == addr:
                return True
        except ValueError:
            continue
    return False


async def verify_ptr(ip: str, resolver: Resolver | None = None) -> PtrResult:
    """The FCrDNS result for ``ip`` (waits for the lookups).

    The PTR names are checked at once (the first :data:`MAX_PTR_NAMES`); the
    first name in the PTR answer's order that resolves back to ``ip`` is the
    host. Raises :class:`ValueError` when ``ip`` is not an IP address.
    """
    addr = _normalise(ip)
    ip = str(addr)
    resolver = resolver if resolver is not None else get_resolver()
    try:
        answer = await resolver.query_ptr(ip)
    except DnsNotFound:
        return PtrResult(ip, "fail")
    except DnsError as exc:
        log.info("PTR lookup of %s failed: %s", ip, exc)
        return PtrResult(ip, "temperror")
    names = tuple(n for n in answer.records if n and n != ".")
    checked = names[:MAX_PTR_NAMES]
    outcomes = await asyncio.gather(
        *(_confirms(resolver, name, addr) for name in checked), return_exceptions=True
    )
    errors = False
    for name, outcome in zip(checked, outcomes, strict=True):
        if outcome is True:
            return PtrResult(ip, "pass", name, names)
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, DnsError):
                raise outcome
            log.info("forward lookup of %s (PTR of %s) failed: %s", name, ip, outcome)
            errors = True
    return PtrResult(ip, "temperror" if errors else "fail", None, names)


class PtrLookup:
    """A :func:`verify_ptr` of ``ip`` running as a task (needs a running loop).

    :meth:`result` takes the result without waiting; :meth:`wait` waits for
    it. After ``timeout`` seconds the lookup gives up with ``'temperror'``.
    """

    def __init__(
        self, ip: str, *, resolver: Resolver | None = None, timeout: float | None = DEFAULT_TIMEOUT
    ):
        self.ip = str(_normalise(ip))
        self.timeout = timeout
        self._resolver = resolver
        self._task: asyncio.Task[PtrResult] = asyncio.get_running_loop().create_task(self._run())

    def __repr__(self) -> str:
        state = "done" if self.done else "running"
        return f"<PtrLookup {self.ip} {state}>"

    async def _run(self) -> PtrResult:
        try:
            async with asyncio.timeout(self.timeout):
                return await verify_ptr(self.ip, self._resolver)
        except TimeoutError:
            log.info("FCrDNS lookup of %s timed out after %ss", self.ip, self.timeout)
            return PtrResult(self.ip, "temperror")
        except Exception:
            log.exception("FCrDNS lookup of %s failed", self.ip)
            return PtrResult(self.ip, "temperror")

    @property
    def done(self) -> bool:
        """Whether the lookup has finished (or was cancelled)."""
        return self._task.done()

    def result(self) -> PtrResult | None:
        """The result if the lookup has finished, else ``None``; never waits."""
        task = self._task
        if not task.done() or task.cancelled():
            return None
        return task.result()

    async def wait(self, timeout: float | None = None) -> PtrResult | None:
        """Wait up to ``timeout`` seconds for the result (``None`` if it is not there by then).

        Waiting does not cancel the lookup.
        """
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._task)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the waiter itself was cancelled, not the lookup
        return self.result()

    def cancel(self) -> None:
        """Stop the lookup if it still runs."""
        self._task.cancel()


def start_ptr_lookup(
    ip: str, *, resolver: Resolver | None = None, timeout: float | None = DEFAULT_TIMEOUT
) -> PtrLookup:
    """Start a background FCrDNS lookup of ``ip`` on the running loop."""
    return PtrLookup(ip, resolver=resolver, timeout=timeout)


class PtrValidators:
    """A mixin for :class:`~slimta.edge.smtp.SmtpValidators`: starts an FCrDNS
    lookup of the client at the banner and records a confirmed host name in
    ``session.client_host`` (hence ``envelope.client['host']``) at the end of
    each message, without waiting for it.

    Put it before ``SmtpValidators`` in the bases and call ``super()`` from
    your own ``handle_banner``, ``handle_have_data`` and ``handle_close``.
    Class attributes: ``ptr_skip_loopback`` (no lookup for loopback clients,
    default ``True``), ``ptr_timeout`` (seconds before a lookup gives up),
    ``ptr_resolver`` (``None``: the shared resolver). ``self.ptr_lookup`` is
    the :class:`PtrLookup` (``None`` when none was started).
    """

    ptr_skip_loopback: bool = True
    ptr_timeout: float | None = DEFAULT_TIMEOUT
    ptr_resolver: Resolver | None = None
    ptr_lookup: PtrLookup | None = None
    session: Any

    def ptr_start(self) -> PtrLookup | None:
        """Start the lookup of the session's client unless it is running or not wanted."""
        if self.ptr_lookup is not None:
            return self.ptr_lookup
        address = getattr(self.session, "address", None)
        try:
            addr = _normalise(str(address[0])) if address else None
        except ValueError:
            addr = None
        if addr is None or (self.ptr_skip_loopback and addr.is_loopback):
            return None
        self.ptr_lookup = PtrLookup(str(addr), resolver=self.ptr_resolver,
                                    timeout=self.ptr_timeout)
        return self.ptr_lookup

    def ptr_collect(self) -> PtrResult | None:
        """Record the result in ``session.client_host`` if the lookup has finished; never waits.

        Returns the result (``None`` while the lookup runs or when none was started).
        """
        lookup = self.ptr_lookup
        result = lookup.result() if lookup is not None else None
        if result is not None and result.status == "pass":
            self.session.client_host = result.host
        return result

    def handle_banner(self, reply: Any, address: tuple) -> Any:
        """Start the lookup, then run the next class's ``handle_banner``."""
        self.ptr_start()
        parent = getattr(super(), "handle_banner", None)
        return parent(reply, address) if parent is not None else None

    def handle_have_data(self, reply: Any, data: bytes) -> Any:
        """Record the host name if known by now, then run the next class's ``handle_have_data``."""
        self.ptr_collect()
        parent = getattr(super(), "handle_have_data", None)
        return parent(reply, data) if parent is not None else None

    def handle_close(self) -> Any:
        """Cancel a lookup still running, then run the next class's ``handle_close``."""
        if self.ptr_lookup is not None:
            self.ptr_lookup.cancel()
        parent = getattr(super(), "handle_close", None)
        return parent() if parent is not None else None
