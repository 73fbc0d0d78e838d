"""The ``Authentication-Results:`` field (RFC 8601), with DMARC (RFC 7489) evaluated here.

:class:`AddAuthenticationResults` is a queue policy. It reads what the
checks before it recorded on the envelope, evaluates DMARC for the domain of
the ``From:`` field, and puts one field on top of the header block::

    Authentication-Results: mx.example.org;
        spf=pass smtp.mailfrom=alice@example.test;
        dkim=pass header.d=example.test header.s=sel1 header.b=aBcDeFgH;
        dmarc=pass (p=reject) header.from=example.test

Use::

    queue.add_policy(DkimVerify())                           # records auth_results['dkim']
    queue.add_policy(AddAuthenticationResults("mx.example.org"))

**What it reads** (``envelope.auth_results``, a plain dict that the checks
create when missing):

- ``['spf']``: ``{'result': ..., 'smtp.mailfrom': <address>, 'reason': ...}``
  (or ``'smtp.helo'`` for the null sender), recorded by
  :class:`slimta.util.spf.EnforceSpf`;
- ``['dkim']``: a list, one ``{'result', 'domain', 'selector', 'reason',
  'header_b', ...}`` per signature, recorded by
  :class:`slimta.policy.dkim.DkimVerify`;
- ``['arc']``: ``{'result', 'reason', ...}``, written as ``arc=`` unless its
  result is ``none``.

A check that recorded nothing is left out; with nothing at all the field
says ``none`` (``Authentication-Results: mx.example.org; none``).

**DMARC** (RFC 7489 §6.6). The domain is that of the ``From:`` field: no
``From:`` gives ``dmarc=none``, mailboxes of more than one domain
``dmarc=permerror``. The policy record is the one ``v=DMARC1`` TXT record at
``_dmarc.<from-domain>``, else at ``_dmarc.<organizational-domain>``; none
(or more than one) gives ``dmarc=none``, a DNS failure ``dmarc=temperror``.
A record with an invalid ``p=`` counts as ``p=none`` when it has ``rua=``
and is ignored otherwise; other bad tags take their defaults. DMARC passes
when SPF passed for an *aligned* domain (the envelope sender's, ``aspf=``)
or a DKIM signature passed for an aligned ``d=`` (``adkim=``); relaxed
alignment (the default) compares organizational domains, strict ones the
domains themselves. The comment names the policy that applies to the
``From:`` domain (``sp=`` for a subdomain whose record was found at the
organizational domain): ``(p=reject)``. The result is also stored as
``envelope.auth_results['dmarc']`` (see :meth:`DmarcResult.as_auth_result`)
for later policies; this module only reports, it does not reject.

**Organizational domains** come from the Public Suffix List shipped with the
``publicsuffixlist`` package (no network access; a newer list comes with a
newer package). A name under a suffix the list does not know, such as
``.test``, is treated as if its last label were the public suffix.

**Forged fields** (RFC 8601 §5): ``Authentication-Results:`` fields already
in the message that carry our authserv-id are removed before ours is added
(``forged="rename"`` renames them to ``X-Original-Authentication-Results``,
``forged="keep"`` leaves them). Fields of other authserv-ids stay.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import getaddresses
from functools import lru_cache
from typing import Any

from publicsuffixlist import PublicSuffixList

from slimta.envelope import Envelope
from slimta.policy import QueuePolicy
from slimta.policy.headers import has_field
from slimta.util import dns as slimta_dns

__all__ = [
    "FIELD",
    "RENAMED_FIELD",
    "AddAuthenticationResults",
    "DmarcRecord",
    "DmarcResult",
    "evaluate_dmarc",
    "find_dmarc_record",
    "from_domain",
    "organizational_domain",
    "remove_forged",
]

#: The name of the field.
FIELD = "Authentication-Results"
#: What ``forged="rename"`` renames forged fields to.
RENAMED_FIELD = "X-Original-Authentication-Results"

_POLICIES = ("none", "quarantine", "reject")


# --- organizational domains and alignment -----------------------------------------

_psl: PublicSuffixList | None = None


@lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str:
    """The organizational domain of ``domain`` (RFC 7489 §3.2): the public suffix
    and one label more, from the Public Suffix List; ``domain`` itself when it is
    a public suffix. Lower case, without a final dot."""
    global _psl
    domain = domain.lower().rstrip(".")
    if _psl is None:
        _psl = PublicSuffixList()
    return _psl.privatesuffix(domain) or domain


def _aligned(domain: str | None, from_dom: str, mode: str) -> bool:
    if not domain:
        return False
    domain = domain.lower().rstrip(".")
    if mode == "s":
        return domain == from_dom
    return organizational_domain(domain) == organizational_domain(from_dom)


# --- the DMARC record -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """A parsed DMARC policy record (RFC 7489 §6.3): the tags DMARC evaluation uses.

    ``p`` and ``sp``: ``none``, ``quarantine`` or ``reject`` (``sp`` is
    ``p`` when absent); ``adkim`` and ``aspf``: ``r`` (relaxed) or ``s``
    (strict); ``pct``: 0-100. ``domain`` is where it was found.
    """

    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    domain: str = ""

    @classmethod
    def parse(cls, text: str, domain: str = "") -> DmarcRecord | None:
        """The record in ``text``, or ``None`` when it is no usable DMARC record."""
        tags: dict[str, str] = {}
        for i, part in enumerate(text.split(";")):
            name, sep, value = part.partition("=")
            name, value = name.strip().lower(), value.strip()
            if i == 0:
                if not sep or name != "v" or value != "DMARC1":
                    return None
                continue
            if sep and name and name not in tags:
                tags[name] = value
        p = tags.get("p", "").lower()
        sp = tags.get("sp", p).lower()
        if p not in _POLICIES or sp not in _POLICIES:
            if "mailto:" not in tags.get("rua", "").lower():
                return None
            p = sp = "none"  # §6.6.3 step 6: act as p=none when reports are wanted
        adkim = tags.get("adkim", "r").lower()
        aspf = tags.get("aspf", "r").lower()
        try:
            pct = int(tags.get("pct", "100"))
        except ValueError:
            pct = 100
        return cls(
            p=p, sp=sp,
            adkim=adkim if adkim in ("r", "s") else "r",
            aspf=aspf if aspf in ("r", "s") else "r",
            pct=pct if 0 <= pct <= 100 else 100,
            domain=domain,
        )


async def _record_at(domain: str, resolver: slimta_dns.Resolver) -> DmarcRecord | None:
    try:
        answer = await resolver.query_txt(f"_dmarc.{domain}")
    except slimta_dns.DnsNotFound:
        return None
    found = [t for t in answer.records if re.match(r"v\s*=\s*DMARC1\s*(;|$)", t)]
    if len(found) != 1:  # §6.6.3 step 2: none, or more than one: no DMARC
        return None
    return DmarcRecord.parse(found[0], domain)


async def find_dmarc_record(
    domain: str, resolver: slimta_dns.Resolver | None = None
) -> DmarcRecord | None:
    """The DMARC record for ``domain`` (RFC 7489 §6.6.3): at ``_dmarc.<domain>``,
    else at the organizational domain. Raises :class:`slimta.util.dns.DnsError`
    when DNS fails for now."""
    resolver = resolver or slimta_dns.get_resolver()
    domain = domain.lower().rstrip(".")
    record = await _record_at(domain, resolver)
    if record is None:
        org = organizational_domain(domain)
        if org != domain:
            record = await _record_at(org, resolver)
    return record


# --- evaluation -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """The DMARC verdict for one message.

    ``result``: ``pass``, ``fail``, ``none``, ``temperror`` or ``permerror``.
    ``policy``: what the domain asks for mail that fails (``none``,
    ``quarantine``, ``reject``), ``None`` without a record. ``spf_aligned``
    and ``dkim_aligned``: which aligned identifier passed.
    """

    result: str
    from_domain: str | None
    policy: str | None = None
    record: DmarcRecord | None = None
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str | None = None

    def as_auth_result(self) -> dict[str, Any]:
        """``{'result', 'header.from', 'policy', 'reason'}``, as stored in ``auth_results``."""
        return {
            "result": self.result,
            "header.from": self.from_domain,
            "policy": self.policy,
            "reason": self.reason,
        }


def from_domain(envelope: Envelope) -> str | None:
    """The domain of the ``From:`` field (lower case), ``None`` without one.

    Raises :class:`ValueError` when the field names mailboxes of more than
    one domain, or none that has a domain.
    """
    values = envelope.headers.get_all("From") or []
    if not values:
        return None
    domains = set()
    for _name, address in getaddresses([str(v) for v in values]):
        _local, at, domain = address.rpartition("@")
        domain = domain.strip().rstrip(".").lower()
        if not at or not domain:
            raise ValueError("a From mailbox without a domain")
        domains.add(domain)
    if len(domains) != 1:
        raise ValueError("no From domain" if not domains else "From domains differ")
    return domains.pop()


def _address_domain(value: str | None) -> str | None:
    if not value:
        return None
    return value.rpartition("@")[2].strip().rstrip(".").lower() or None


async def evaluate_dmarc(
    envelope: Envelope, resolver: slimta_dns.Resolver | None = None
) -> DmarcResult:
    """DMARC for ``envelope`` from the SPF and DKIM results in ``envelope.auth_results``."""
    try:
        domain = from_domain(envelope)
    except ValueError as exc:
        return DmarcResult("permerror", None, reason=str(exc))
    if domain is None:
        return DmarcResult("none", None, reason="no From field")
    try:
        record = await find_dmarc_record(domain, resolver)
    except slimta_dns.DnsError as exc:
        return DmarcResult("temperror", domain, reason=f"DMARC record lookup failed: {exc}")
    if record is None:
        return DmarcResult("none", domain, reason="no DMARC record")
    policy = record.p if record.domain == domain else record.sp
    results = getattr(envelope, "auth_results", None) or {}
    spf = results.get("spf") or {}
    spf_aligned = spf.get("result") == "pass" and _aligned(
        _address_domain(spf.get("smtp.mailfrom") or spf.get("smtp.helo")), domain, record.aspf
    )
    dkim_aligned = any(
        entry.get("result") == "pass"
        and _aligned(entry.get("domain") or entry.get("header_d"), domain, record.adkim)
        for entry in results.get("dkim") or ()
    )
    if spf_aligned or dkim_aligned:
        return DmarcResult("pass", domain, policy, record, spf_aligned, dkim_aligned)
    return DmarcResult("fail", domain, policy, record, reason="no aligned SPF or DKIM pass")


# --- forged fields ----------------------------------------------------------------

_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_TOKEN = re.compile(r"[^\s;()\"]+")


def _skip_cfws(text: str) -> str:
    """``text`` without its leading white space and comments (which may nest)."""
    i, depth = 0, 0
    while i < len(text):
        char = text[i]
        if char == "\\" and depth:
            i += 2
            continue
        if char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif not depth and not char.isspace():
            break
        i += 1
    return text[i:]


def _authserv_id(value: str) -> str | None:
    """The authserv-id at the start of an Authentication-Results value."""
    text = _skip_cfws(value)
    m = _QUOTED.match(text)
    if m:
        return re.sub(r"\\(.)", r"\1", m.group(1))
    m = _TOKEN.match(text)
    return m.group() if m else None


def remove_forged(envelope: Envelope, authserv_id: str, rename: str | None = None) -> int:
    """Remove (or rename to ``rename``) the ``Authentication-Results:`` fields with
    ``authserv_id``; other fields keep their place. Returns how many there were."""
    if not has_field(envelope, FIELD):
        return 0
    msg = envelope.headers
    ours = authserv_id.casefold()
    fields = list(msg.raw_items())
    kept: list[tuple[str, Any]] = []
    forged = 0
    for name, value in fields:
        if name.lower() == FIELD.lower():
            found = _authserv_id(str(value).replace("\r", " ").replace("\n", " "))
            if found is not None and found.casefold() == ours:
                forged += 1
                if rename:
                    kept.append((rename, value))
                continue
        kept.append((name, value))
    if forged:
        for name in {n.lower() for n, _ in fields}:
            del msg[name]
        for name, value in kept:
            msg.set_raw(name, value)
    return forged


# --- writing the field ------------------------------------------------------------

_PLAIN_VALUE = re.compile(r"[^\x00-\x20()<>@,;:\\\"/\[\]?=\x7f]+")
_ADDRESS_VALUE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]*@[A-Za-z0-9.-]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _value(text: Any) -> str:
    """A property value (RFC 8601 pvalue): as it is when it can be, else a quoted-string."""
    text = _CONTROL.sub(" ", str(text))
    if _PLAIN_VALUE.fullmatch(text) or _ADDRESS_VALUE.fullmatch(text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _resinfo(method: str, result: str, props: list[tuple[str, Any]],
             reason: Any = None, comment: str | None = None) -> str:
    parts = [f"{method}={result}"]
    if comment:
        parts.append(f"({comment})")
    if reason and result not in ("pass", "none"):
        parts.append(f"reason={_value(reason)}")
    parts.extend(f"{name}={_value(value)}" for name, value in props if value)
    return " ".join(parts)


class AddAuthenticationResults(QueuePolicy):
    """Adds an ``Authentication-Results:`` field with the SPF, DKIM, ARC and
    DMARC results (see the module docstring) and removes forged ones.

    ``authserv_id`` names this server (usually its host name). ``dmarc``:
    evaluate DMARC (default yes). ``forged``: ``"remove"`` (default),
    ``"rename"`` or ``"keep"`` fields that carry our authserv-id already.
    ``resolver`` defaults to the shared one.
    """

    def __init__(
        self,
        authserv_id: str,
        *,
        dmarc: bool = True,
        forged: str = "remove",
        resolver: slimta_dns.Resolver | None = None,
    ) -> None:
        if not authserv_id or not _PLAIN_VALUE.fullmatch(authserv_id):
            raise ValueError(f"authserv_id must be a token such as a host name: {authserv_id!r}")
        if forged not in ("remove", "rename", "keep"):
            raise ValueError("forged must be 'remove', 'rename' or 'keep'")
        self.authserv_id = authserv_id
        self.dmarc = dmarc
        self.forged = forged
        self.resolver = resolver

    def build_value(self, results: dict[str, Any]) -> str:
        """The field value for ``results`` (an ``auth_results`` dict, ``'dmarc'`` included)."""
        lines: list[str] = []
        spf = results.get("spf")
        if spf:
            if spf.get("smtp.mailfrom"):
                props = [("smtp.mailfrom", spf["smtp.mailfrom"])]
            else:
                props = [("smtp.helo", spf.get("smtp.helo"))]
            lines.append(_resinfo("spf", spf["result"], props, spf.get("reason")))
        for entry in results.get("dkim") or ():
            props = [
                ("header.d", entry.get("domain") or entry.get("header_d")),
                ("header.s", entry.get("selector")),
                ("header.b", entry.get("header_b")),
            ]
            lines.append(_resinfo("dkim", entry["result"], props, entry.get("reason")))
        arc = results.get("arc")
        if arc and arc.get("result") not in (None, "none"):
            lines.append(_resinfo("arc", arc["result"], [], arc.get("reason")))
        dmarc = results.get("dmarc")
        if dmarc:
            comment = f"p={dmarc['policy']}" if dmarc.get("policy") else None
            lines.append(_resinfo("dmarc", dmarc["result"], [("header.from", dmarc.get(
                "header.from"))], dmarc.get("reason"), comment))
        if not lines:
            return f"{self.authserv_id}; none"
        return f"{self.authserv_id};\n\t" + ";\n\t".join(lines)

    async def apply(self, envelope: Envelope) -> None:
        """Evaluate DMARC, drop forged fields, and put the field on top of ``envelope``."""
        if self.forged != "keep":
            rename = RENAMED_FIELD if self.forged == "rename" else None
            remove_forged(envelope, self.authserv_id, rename)
        results = getattr(envelope, "auth_results", None) or {}
        if self.dmarc:
            verdict = await evaluate_dmarc(envelope, self.resolver)
            results["dmarc"] = verdict.as_auth_result()
        envelope.auth_results = results
        envelope.prepend_header(FIELD, self.build_value(results))
