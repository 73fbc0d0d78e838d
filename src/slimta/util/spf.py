"""SPF (RFC 7208): may this client send mail for the sender's domain?

The check itself is pyspf's (the ``spf`` module of PyPI's ``pyspf``). pyspf
does blocking DNS lookups through dnspython; here they go to the name servers
of slimta's shared resolver (:func:`slimta.util.dns.get_resolver`, through
:meth:`~slimta.util.dns.Resolver.make_sync_resolver`) and run in a worker
thread, so the event loop never blocks and tests reach their own dnsmasq.

Checking by hand::

    from slimta.util.spf import check_spf

    result = await check_spf("192.0.2.7", "alice@example.test", "mail.example.test")
    result.result      # 'pass', 'fail', 'softfail', 'neutral', 'none', 'permerror', 'temperror'
    result.reason      # 'example.test does not designate 192.0.2.7 as permitted sender'

Enforcing in SMTP validators::

    from slimta.edge.smtp import SmtpValidators
    from slimta.util.spf import EnforceSpf

    spf = EnforceSpf()
    spf.set_enforcement("fail")                      # 550 5.7.23 SPF validation failed: ...
    spf.set_enforcement("temperror")                 # 451 4.7.24 SPF validation error: ...
    spf.set_enforcement("softfail", match_code="450",
                        match_message="4.7.23 Try again later ({reason})")

    class Validators(SmtpValidators):
        @spf.check
        def handle_mail(self, reply, sender, params):
            pass

        @spf.check
        def handle_rcpt(self, reply, recipient, params):
            pass

**Rules** (decisions, the same everywhere in this module):

- **Nothing is enforced by default.** Each result to refuse is named with
  :meth:`EnforceSpf.set_enforcement`; the default replies use the enhanced
  status codes of RFC 7372: ``5.7.23`` for a failed check, ``5.7.24``
  (``4.7.24`` for ``temperror``) for an error while checking.
- **One query per transaction.** The result is kept per connection for the
  same sender and HELO name; a decorated ``handle_rcpt`` reuses what
  ``handle_mail`` found.
- **Where the result goes.** ``envelope.auth_results['spf']`` (see
  :meth:`SpfResult.as_auth_result`, read by
  :class:`slimta.policy.authresults.AddAuthenticationResults`). At MAIL it is
  recorded in ``session.auth_results``, which the SMTP edge hands to the
  envelope it creates once MAIL is accepted; at RCPT on the envelope itself.
- **Clients not checked.** Loopback clients (``skip_loopback``) and clients
  that authenticated with AUTH (``skip_authenticated``) are not looked up:
  nothing is enforced or recorded for them.
- **The null sender** (bounces) is checked with the HELO identity
  (``postmaster@<helo>``, RFC 7208 §2.4); with neither a sender nor a HELO
  name the result is ``none`` without a query.
- **Untrusted text.** Reasons and explanations come partly from DNS: before
  they go into an SMTP reply, control characters become spaces, non-ASCII
  ``?``, and the text is cut to :data:`MAX_REASON` characters.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import ipaddress
import logging
import re
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import dns.exception
import dns.resolver
import spf as pyspf

from slimta.util import dns as slimta_dns
from slimta.util.aio import maybe_await

__all__ = ["DEFAULT_ENFORCEMENT", "MAX_REASON", "RESULTS", "EnforceSpf", "SpfResult", "check_spf"]

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

#: The results of an SPF check (RFC 7208 §2.6).
RESULTS = ("pass", "fail", "softfail", "neutral", "none", "permerror", "temperror")

#: The reply :meth:`EnforceSpf.set_enforcement` uses for a result when given no code or message.
DEFAULT_ENFORCEMENT: dict[str, tuple[str, str]] = {
    "pass": ("550", "5.7.23 SPF validation failed: {reason}"),
    "fail": ("550", "5.7.23 SPF validation failed: {reason}"),
    "softfail": ("550", "5.7.23 SPF validation failed: {reason}"),
    "neutral": ("550", "5.7.23 SPF validation failed: {reason}"),
    "none": ("550", "5.7.23 SPF validation failed: {reason}"),
    "permerror": ("550", "5.7.24 SPF validation error: {reason}"),
    "temperror": ("451", "4.7.24 SPF validation error: {reason}"),
}

#: The longest reason or explanation put into a reply, in characters.
MAX_REASON = 200

#: The fields a ``match_message`` template may use.
TEMPLATE_FIELDS = ("reason", "result", "sender", "domain", "ip", "helo", "explanation")

_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")


def _printable(text: str, limit: int = MAX_REASON) -> str:
    text = _UNPRINTABLE.sub(" ", text).encode("ascii", "replace").decode("ascii")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- pyspf's DNS, through our resolver ------------------------------------------

# The blocking resolver for the check running in this thread (set in the
# worker thread's own copy of the context, so concurrent checks never mix).
_SYNC_RESOLVER: contextvars.ContextVar[dns.resolver.Resolver | None] = contextvars.ContextVar(
    "slimta_spf_resolver", default=None
)
_PYSPF_LOOKUP = pyspf.DNSLookup


def _lookup(name: str, qtype: str, strict: Any = True, timeout: float = 30) -> list:
    """pyspf's ``DNSLookup`` contract on the resolver of the running check.

    Returns ``[((name, qtype), value), ...]``; an absent name or type is an
    empty list, a failure raises ``spf.TempError``. Outside a check made by
    this module pyspf's own lookup runs, so other users of pyspf see no change.
    """
    resolver = _SYNC_RESOLVER.get()
    if resolver is None:
        return _PYSPF_LOOKUP(name, qtype, strict, timeout)
    try:
        answer = resolver.resolve(
            name, qtype, search=False, raise_on_no_answer=False,
            lifetime=min(float(timeout), resolver.lifetime),
        )
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.Timeout as exc:
        raise pyspf.TempError(f"DNS timeout looking up {qtype} of {name}") from exc
    except dns.exception.DNSException as exc:
        # the details (our name servers' addresses) stay in the log, out of SMTP replies
        log.info("SPF: %s lookup of %s failed: %s", qtype, name, exc)
        raise pyspf.TempError(f"DNS lookup of {qtype} of {name} failed") from exc
    key = (name, qtype)
    records = []
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            records.append((key, rdata.address))
        elif qtype == "MX":
            records.append((key, (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            records.append((key, rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            records.append((key, rdata.strings))
    return records


pyspf.DNSLookup = _lookup


# --- the result ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpfResult:
    """The outcome of one SPF check.

    ``result`` is one of :data:`RESULTS`. ``identity`` is ``'mailfrom'``, or
    ``'helo'`` when the null sender was checked with the HELO name;
    ``sender`` the address checked (``postmaster@<helo>`` for the HELO
    identity) and ``domain`` its domain. ``reason`` says why in words of our
    own; ``explanation`` is pyspf's text (for ``fail``, the domain's own
    ``exp=`` text when it published one). ``reason`` and ``explanation`` are
    raw: :meth:`EnforceSpf.reply_for` makes them safe for a reply.
    """

    result: str
    ip: str
    sender: str
    domain: str
    helo: str | None
    identity: str
    reason: str
    explanation: str = ""

    def as_auth_result(self) -> dict[str, str]:
        """The result as stored in ``envelope.auth_results['spf']``.

        ``{'result': ..., 'smtp.mailfrom': <address>, 'reason': ...}``, with
        ``'smtp.helo': <name>`` instead of ``'smtp.mailfrom'`` for the HELO
        identity (RFC 8601 §2.7.2).
        """
        entry = {"result": self.result, "reason": self.reason}
        if self.identity == "helo":
            entry["smtp.helo"] = self.helo or self.domain
        else:
            entry["smtp.mailfrom"] = self.sender
        return entry


def _reason(result: str, domain: str, ip: str, problem: str) -> str:
    if result == "pass":
        return f"{domain} designates {ip} as permitted sender"
    if result == "fail":
        return f"{domain} does not designate {ip} as permitted sender"
    if result == "softfail":
        return f"{domain} does not designate {ip} as permitted sender (softfail)"
    if result == "neutral":
        return f"{ip} is neither permitted nor denied by {domain}"
    if result == "none":
        return f"{domain} does not publish an SPF record" if domain else "no identity to check"
    if result == "permerror":
        return f"permanent error in the SPF record of {domain}: {problem}"
    return f"temporary error checking SPF of {domain}: {problem}"


def _normalize_ip(ip: str) -> str:
    addr = ipaddress.ip_address(str(ip).partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _checkable(domain: str) -> bool:
    """Whether ``domain`` is a multi-label domain name (not an address literal)."""
    if not domain or domain.startswith("[") or len(domain) > 253 or "." not in domain:
        return False
    return all(0 < len(label) < 64 for label in domain.split("."))


def _check_blocking(
    resolver: dns.resolver.Resolver, ip: str, sender: str, helo: str | None,
    receiver: str | None, timeout: float,
) -> tuple[str, str, str, str, str]:
    """Run pyspf in this (worker) thread: (result, explanation, problem, identity, sender)."""
    _SYNC_RESOLVER.set(resolver)
    query = pyspf.query(ip, sender, helo or "", receiver=receiver, querytime=timeout)
    try:
        result, _code, explanation = query.check()
    except Exception as exc:  # a pyspf bug on odd input must not fail the SMTP command
        log.exception("SPF check of %s from %s failed", sender or helo, ip)
        return "temperror", "", f"SPF check failed: {exc}", query.ident, query.s
    problem = explanation or ""
    if result in ("permerror", "temperror"):  # pyspf's text without its prefix
        problem = problem.partition(" Error: ")[2] or problem
    return result, explanation or "", problem, query.ident, query.s


async def check_spf(
    ip: str,
    sender: str,
    helo: str | None,
    *,
    receiver: str | None = None,
    resolver: slimta_dns.Resolver | None = None,
    timeout: float = 20.0,
) -> SpfResult:
    """Check ``ip`` against the SPF policy of ``sender``'s domain.

    ``sender`` is the MAIL FROM address (``''`` for the null sender, which is
    checked as ``postmaster@<helo>``). ``receiver`` is this host's name (the
    ``%{r}`` macro). ``resolver`` (default: the shared one) gives the name
    servers and per-query timeouts; ``timeout`` bounds the whole check (RFC
    7208 §4.6.4 suggests 20 s): past it the result is ``temperror``. Never
    raises for DNS trouble; raises :class:`ValueError` when ``ip`` is not
    an IP address.
    """
    ip = _normalize_ip(ip)
    sender = sender or ""
    if not sender and not helo:
        return SpfResult("none", ip, "", "", None, "helo", _reason("none", "", ip, ""))
    identity_domain = (sender.rpartition("@")[2] if sender else helo or "").rstrip(".").lower()
    if not _checkable(identity_domain):  # RFC 7208 §4.3: malformed or single-label: none
        checked = sender or f"postmaster@{helo}"
        return SpfResult("none", ip, checked, identity_domain, helo or None,
                         "mailfrom" if sender else "helo",
                         f"{identity_domain or 'the sender'} is not a domain SPF can check")
    sync = (resolver or slimta_dns.get_resolver()).make_sync_resolver()
    # to_thread runs the check in a copy of this context: its resolver stays its own
    result, explanation, problem, identity, checked = await asyncio.to_thread(
        _check_blocking, sync, ip, sender, helo, receiver, timeout
    )
    domain = checked.rpartition("@")[2].rstrip(".").lower()
    if result not in RESULTS:  # pyspf's older names, just in case
        result = {"error": "temperror", "unknown": "permerror"}.get(result, "permerror")
    return SpfResult(
        result, ip, checked, domain, helo or None, identity,
        _reason(result, domain, ip, problem), explanation,
    )


# --- enforcement in SMTP validators --------------------------------------------------


class EnforceSpf:
    """Checks SPF in SMTP validators and refuses the results it is told to.

    ``timeout`` bounds each check (then ``temperror``); ``resolver`` defaults
    to the shared one; ``receiver`` (the ``%{r}`` macro) defaults to the
    edge's host name. Loopback clients (``skip_loopback``) and authenticated
    clients (``skip_authenticated``) are not checked. See the module
    docstring for where the result is recorded.
    """

    def __init__(
        self,
        timeout: float = 20.0,
        *,
        resolver: slimta_dns.Resolver | None = None,
        receiver: str | None = None,
        skip_loopback: bool = True,
        skip_authenticated: bool = True,
    ) -> None:
        self.timeout = timeout
        self.resolver = resolver
        self.receiver = receiver
        self.skip_loopback = skip_loopback
        self.skip_authenticated = skip_authenticated
        self.enforcement: dict[str, tuple[str, str]] = {}
        # per connection (the validators object): the last (sender, helo) and its result
        self._cache: weakref.WeakKeyDictionary[Any, tuple[tuple[str, str | None],
                                                          SpfResult | None]]
        self._cache = weakref.WeakKeyDictionary()

    def set_enforcement(
        self, result: str, match_code: str | None = None, match_message: str | None = None
    ) -> None:
        """Refuse ``result`` with ``match_code`` and ``match_message``.

        Defaults come from :data:`DEFAULT_ENFORCEMENT`. ``match_message`` is a
        template with the fields of :data:`TEMPLATE_FIELDS` (``{reason}``,
        ``{result}``, ``{sender}``, ``{domain}``, ``{ip}``, ``{helo}``,
        ``{explanation}``); an unknown field raises :class:`ValueError` here.
        """
        result = result.lower()
        if result not in RESULTS:
            raise ValueError(f"unknown SPF result {result!r}; one of {', '.join(RESULTS)}")
        code, message = DEFAULT_ENFORCEMENT[result]
        code = str(match_code) if match_code is not None else code
        message = match_message if match_message is not None else message
        if not re.fullmatch(r"[45]\d\d", code):
            raise ValueError(f"match_code must be a 4xx or 5xx reply code, not {code!r}")
        try:
            message.format(**dict.fromkeys(TEMPLATE_FIELDS, ""))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"bad match_message template {message!r}: {exc}") from None
        self.enforcement[result] = (code, message)

    def reply_for(self, result: SpfResult) -> tuple[str, str] | None:
        """The (code, message) refusing ``result``, or ``None`` when it is let through."""
        rule = self.enforcement.get(result.result)
        if rule is None:
            return None
        code, template = rule
        fields = {
            "reason": _printable(result.reason),
            "result": result.result,
            "sender": _printable(result.sender),
            "domain": _printable(result.domain),
            "ip": result.ip,
            "helo": _printable(result.helo or ""),
            "explanation": _printable(result.explanation),
        }
        return code, template.format(**fields)

    def _skipped(self, session: Any) -> str | None:
        address = getattr(session, "address", None)
        ip = address[0] if address else None
        if not ip:
            return None
        try:
            ip = _normalize_ip(ip)
        except ValueError:
            return None
        if self.skip_loopback and ipaddress.ip_address(ip).is_loopback:
            return None
        if self.skip_authenticated and getattr(session, "auth", None):
            return None
        return ip

    async def result_for(self, validators: Any, sender: str) -> SpfResult | None:
        """The result for ``sender`` on the connection of ``validators`` (cached per
        connection), or ``None`` when the client is not checked."""
        session = getattr(validators, "session", None)
        helo = getattr(session, "ehlo_as", None)
        key = (sender or "", helo)
        cached = self._cache.get(validators)
        if cached is not None and cached[0] == key:
            return cached[1]
        ip = self._skipped(session)
        result = None
        if ip is not None:
            receiver = self.receiver or getattr(getattr(session, "edge", None), "hostname", None)
            result = await check_spf(ip, sender or "", helo, receiver=receiver,
                                     resolver=self.resolver, timeout=self.timeout)
            log.info("SPF %s for %s from %s: %s", result.result, result.sender or "<>", ip,
                     result.reason)
        self._cache[validators] = (key, result)
        return result

    @staticmethod
    def record(envelope: Any, result: SpfResult) -> None:
        """Store ``result`` as ``envelope.auth_results['spf']``."""
        results = getattr(envelope, "auth_results", None) or {}
        results["spf"] = result.as_auth_result()
        envelope.auth_results = results

    def check(self, func: F) -> Callable[..., Awaitable[Any]]:
        """Decorate ``handle_mail`` or ``handle_rcpt`` of an
        :class:`~slimta.edge.smtp.SmtpValidators` subclass.

        The check runs first; a result given to :meth:`set_enforcement`
        changes the reply and the decorated hook is not called. The decorated
        ``handle_rcpt`` also records the result on the envelope. The hook
        becomes a coroutine (the edge awaits it).
        """
        name = getattr(func, "__name__", "")
        if name not in ("handle_mail", "handle_rcpt"):
            raise TypeError(f"EnforceSpf.check decorates handle_mail or handle_rcpt, not {name!r}")
        at_rcpt = name == "handle_rcpt"

        @functools.wraps(func)
        async def wrapper(validators: Any, reply: Any, address: str, *args: Any,
                          **kwargs: Any) -> Any:
            envelope = None
            if at_rcpt:
                envelope = getattr(getattr(validators, "session", None), "envelope", None)
                sender = envelope.sender if envelope is not None else ""
            else:
                sender = address
                # the edge hands the session's auth_results to the envelope
                # it creates once MAIL is accepted
                envelope = getattr(validators, "session", None)
                if envelope is not None and not hasattr(envelope, "auth_results"):
                    envelope = None
            result = await self.result_for(validators, sender or "")
            if result is not None:
                if envelope is not None:
                    self.record(envelope, result)
                refusal = self.reply_for(result)
                if refusal is not None:
                    reply.code, reply.message = refusal
                    log.info("refused %s from %s: SPF %s", result.sender or "<>", result.ip,
                             result.result)
                    return None
            return await maybe_await(func(validators, reply, address, *args, **kwargs))

        return wrapper
