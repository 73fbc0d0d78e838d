"""DKIM signing and verification, and ARC sealing, with dkimpy.

Three policies:

* :class:`DkimSign` adds a ``DKIM-Signature:`` field (RFC 6376) to mail
  from the domains it has keys for: a queue policy (the signature is stored
  with the message) or a relay policy (signed before each attempt).
* :class:`DkimVerify` checks the DKIM signatures (and the ARC chain) of a
  received message and records the results in ``envelope.auth_results``,
  where the ``Authentication-Results`` policy reads them.
* :class:`ArcSeal` adds an ARC set (RFC 8617) to mail that is forwarded.

**Which key signs.** :class:`DkimSign` keys its signing by the domain of the
message's ``From:`` field (the first mailbox), the domain DMARC aligns with;
``by="envelope"`` uses the envelope sender's domain instead. Keys are given
per domain::

    DkimSign("sel1", "example.com", pem)                # mail from example.com only
    DkimSign.for_domains({
        "example.com": ("sel1", pem1),                  # d=example.com
        "example.org": ("sel2", pem2),
        "*.example.org": DkimKey("sel2", "example.org", pem2),  # subdomains, d=example.org
    })

A domain is matched exactly, then as ``*.parent`` for each parent, then
``*`` (a key for all mail, e.g. a relay that signs everything as itself).
Mail from a domain without a key is left unsigned, as is mail without a
``From:`` field (DKIM must sign ``From:``).

**What is signed.** The bytes the envelope gives back
(:meth:`~slimta.envelope.Envelope.flatten`), so the signature covers the
header block exactly as it will be sent, fields added by earlier policies
included. Canonicalization is relaxed/relaxed, the algorithm
``rsa-sha256`` (``ed25519-sha256``, RFC 8463, needs PyNaCl). ``headers``
names the fields to sign; the default is dkimpy's: the fields RFC 6376
recommends that the message has, with ``From`` signed once more than it
occurs so that none can be added. Policies that change the message must run
before signing. A relay that downgrades 8-bit mail to 7-bit for a next hop
without 8BITMIME changes the body after signing and breaks the signature;
``seven_bit=True`` makes the message 7-bit before it is signed, so there is
nothing left to downgrade.

**Order of policies** on a server that receives and forwards:

1. :class:`DkimVerify` (queue policy), first, so it sees the message as
   received: it records ``auth_results['dkim']`` and ``auth_results['arc']``;
2. the ``Authentication-Results`` queue policy, which writes those results
   in a field with our authserv-id (and ``arc=`` when there was a chain);
3. :class:`ArcSeal` (queue or relay policy) for forwarded mail: it needs the
   ``Authentication-Results`` field with its ``authserv_id`` and seals it;
4. :class:`DkimSign` (relay policy, or the last queue policy).

**Verification results** are stored as a plain dict on the envelope::

    envelope.auth_results["dkim"] = [
        {"result": "pass", "domain": "example.com", "selector": "sel1",
         "reason": None, "identity": "@example.com", "header_b": "aBcDeFgH"},
        ...                                          # one per DKIM-Signature, top first
    ]
    envelope.auth_results["arc"] = {"result": "pass" | "fail" | "none", "reason": ...,
                                   "instance": 2}

``result`` is an RFC 8601 result: ``pass``; ``fail`` (the body hash or the
signature does not match); ``neutral`` (a malformed signature, an expired
one, more signatures than ``max_signatures``); ``temperror`` (the key lookup
failed for now); ``permerror`` (no key, a bad key record, a key too short,
``rsa-sha1`` unless ``allow_sha1``). A message without a signature gets one
entry ``{"result": "none", "domain": None, "selector": None, ...}``.
``reason`` is a short text for the ``reason=`` / comment, or ``None``.

**DNS.** Keys (``<selector>._domainkey.<domain>`` TXT) are fetched through
the shared resolver of :mod:`slimta.util.dns` (or the one given), with its
cache, before dkimpy runs, so no blocking lookup happens; dkimpy then only
hashes and checks signatures (in a thread for messages over
``THREAD_THRESHOLD`` bytes, inline below).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dkim
import dkim.crypto
import dkim.util

from slimta.policy import QueuePolicy, RelayPolicy
from slimta.util import dns as slimta_dns

if TYPE_CHECKING:
    from slimta.envelope import Envelope

__all__ = ["ArcSeal", "DkimKey", "DkimSign", "DkimVerify", "load_private_key"]

log = logging.getLogger(__name__)


class _QuietLog(logging.LoggerAdapter):
    """dkimpy logs every failed check at ERROR; the results carry the reason, so DEBUG."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(min(level, logging.DEBUG), msg, *args, **kwargs)


_lib_log = _QuietLog(logging.getLogger(__name__ + ".dkimpy"), {})

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
#: Above this many bytes, signing and verifying run in a thread.
THREAD_THRESHOLD = 128 * 1024

KeyData = bytes | str | os.PathLike[str]


def load_private_key(private_key: KeyData, algorithm: str = "rsa-sha256") -> bytes:
    """The private key as dkimpy wants it, checked: raises :class:`ValueError` if unusable.

    ``private_key`` is the key itself (``bytes`` or ``str``: a PEM RSA key,
    PKCS#1 or PKCS#8, as ``opendkim-genkey`` and ``openssl genpkey`` write
    them; for ed25519 the base64 32-byte seed) or a :class:`~pathlib.Path`
    to a file holding it.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported DKIM algorithm {algorithm!r} (use one of {ALGORITHMS})")
    if isinstance(private_key, os.PathLike):
        data = Path(private_key).read_bytes()
    elif isinstance(private_key, str):
        data = private_key.encode("ascii")
    else:
        data = bytes(private_key)
    data = data.replace(b"\r\n", b"\n")
    if algorithm == "rsa-sha256":
        try:
            dkim.crypto.parse_pem_private_key(data)
        except (dkim.crypto.UnparsableKeyError, ValueError, IndexError) as exc:
            raise ValueError(f"not a PEM RSA private key: {exc}") from None
    else:
        try:
            import nacl.encoding
            import nacl.signing
        except ImportError:
            raise ValueError("ed25519-sha256 needs the PyNaCl package") from None
        data = data.strip()
        try:
            nacl.signing.SigningKey(data, encoder=nacl.encoding.Base64Encoder)
        except Exception as exc:
            raise ValueError(f"not a base64 ed25519 private key: {exc}") from None
    return data


@dataclass(frozen=True)
class DkimKey:
    """One signing key: ``d=domain``, ``s=selector``, the private key and its algorithm.

    The key is checked when the object is made (:func:`load_private_key`).
    """

    selector: str
    domain: str
    private_key: bytes = field(repr=False)
    algorithm: str = "rsa-sha256"

    def __post_init__(self) -> None:
        object.__setattr__(self, "private_key", load_private_key(self.private_key, self.algorithm))
        object.__setattr__(self, "domain", _norm_domain(self.domain))
        if not self.selector or not self.domain:
            raise ValueError("a DKIM key needs a selector and a domain")


def _norm_domain(domain: str) -> str:
    domain = domain.strip().rstrip(".").lower()
    try:
        return domain.encode("idna").decode("ascii") if not domain.isascii() else domain
    except UnicodeError:
        return domain


def _message_bytes(envelope: Envelope) -> bytes:
    head, body = envelope.flatten()
    return head + body


async def _cpu(func: Any, size: int, *args: Any, **kwargs: Any) -> Any:
    """Run ``func`` inline for small messages, in a thread for large ones."""
    if size > THREAD_THRESHOLD:
        return await asyncio.to_thread(func, *args, **kwargs)
    return func(*args, **kwargs)


def _prepend_fields(envelope: Envelope, lines: Sequence[bytes]) -> None:
    """Put header lines (``b"Name: value\\r\\n"``, maybe folded) on top, in their order."""
    for line in reversed(lines):
        name, _, value = line.decode("utf-8", "surrogateescape").partition(":")
        envelope.prepend_header(name.strip(), value.strip(" \t\r\n"))


class DkimSign(QueuePolicy, RelayPolicy):
    """Adds a ``DKIM-Signature:`` to mail from the domains it has keys for.

    ``DkimSign(selector, domain, private_key)`` signs mail from ``domain``
    (``d=domain; s=selector``); :meth:`for_domains` takes keys for several
    domains. See the module docstring for how the key is chosen, what is
    signed and where in the policies it belongs. ``headers`` lists the field
    names to sign (``From`` is required); ``by`` is ``"from"`` (the ``From:``
    field's domain, the default) or ``"envelope"`` (the envelope sender's).
    Usable as a queue policy and as a relay policy.
    """

    def __init__(
        self,
        selector: str,
        domain: str,
        private_key: KeyData,
        headers: Iterable[str] | None = None,
        *,
        algorithm: str = "rsa-sha256",
        by: str = "from",
        seven_bit: bool = False,
    ) -> None:
        key = DkimKey(selector, domain, private_key, algorithm)  # type: ignore[arg-type]
        self._setup({domain: key}, headers, by, seven_bit)

    @classmethod
    def for_domains(
        cls,
        keys: Mapping[str, DkimKey | tuple[str, KeyData] | tuple[str, KeyData, str]],
        headers: Iterable[str] | None = None,
        *,
        by: str = "from",
        seven_bit: bool = False,
    ) -> DkimSign:
        """A signer with a key per sender domain.

        ``keys`` maps a domain (``example.com``), a wildcard for its
        subdomains (``*.example.com``) or ``*`` (all mail) to a
        :class:`DkimKey`, or to ``(selector, private_key)`` or
        ``(selector, private_key, algorithm)`` which sign with ``d=`` that
        domain (not allowed for wildcards, which need a :class:`DkimKey`).
        """
        table: dict[str, DkimKey] = {}
        for pattern, value in keys.items():
            if isinstance(value, DkimKey):
                table[pattern] = value
                continue
            if pattern.startswith("*"):
                raise ValueError(f"{pattern!r}: a wildcard needs a DkimKey naming d=")
            selector, private_key, *rest = value
            algorithm = rest[0] if rest else "rsa-sha256"
            table[pattern] = DkimKey(selector, pattern, private_key, algorithm)  # type: ignore[arg-type]
        self = cls.__new__(cls)
        self._setup(table, headers, by, seven_bit)
        return self

    def _setup(
        self, keys: Mapping[str, DkimKey], headers: Iterable[str] | None, by: str, seven_bit: bool
    ) -> None:
        if by not in ("from", "envelope"):
            raise ValueError(f"by must be 'from' or 'envelope', not {by!r}")
        self.keys: dict[str, DkimKey] = {}
        for pattern, key in keys.items():
            pattern = pattern.strip().lower()
            if pattern.startswith("*."):
                pattern = "*." + _norm_domain(pattern[2:])
            elif pattern != "*":
                pattern = _norm_domain(pattern)
            self.keys[pattern] = key
        self.headers: list[bytes] | None = None
        if headers is not None:
            self.headers = [h.strip().lower().encode("ascii") for h in headers]
            if b"from" not in self.headers:
                raise ValueError("the From field must be signed (RFC 6376 section 5.4)")
        self.by = by
        self.seven_bit = seven_bit

    def signer_domain(self, envelope: Envelope) -> str | None:
        """The domain whose key signs ``envelope``: of ``From:`` or the envelope sender."""
        if self.by == "envelope":
            address = envelope.sender or ""
        else:
            values = envelope.headers.get_all("From") or []
            mailboxes = [addr for _, addr in getaddresses([str(v) for v in values]) if addr]
            address = mailboxes[0] if mailboxes else ""
        _, at, domain = address.rpartition("@")
        return _norm_domain(domain) if at and domain else None

    def key_for(self, domain: str | None) -> DkimKey | None:
        """The key for mail from ``domain``: exact, then ``*.parent``, then ``*``."""
        if domain:
            key = self.keys.get(domain)
            if key is not None:
                return key
            labels = domain.split(".")
            for i in range(1, len(labels)):
                key = self.keys.get("*." + ".".join(labels[i:]))
                if key is not None:
                    return key
        return self.keys.get("*")

    def sign(self, message: bytes, key: DkimKey) -> bytes:
        """The ``DKIM-Signature`` header line (folded, CRLF) for ``message`` with ``key``."""
        return dkim.sign(
            message,
            key.selector.encode("ascii"),
            key.domain.encode("ascii"),
            key.private_key,
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=key.algorithm.encode("ascii"),
            include_headers=self.headers,
            logger=_lib_log,
        )

    async def apply(self, envelope: Envelope) -> None:
        """Sign ``envelope`` when its domain has a key; otherwise leave it alone."""
        domain = self.signer_domain(envelope)
        key = self.key_for(domain)
        if key is None:
            return
        if self.seven_bit:
            envelope.encode_7bit()
        message = _message_bytes(envelope)
        try:
            line = await _cpu(self.sign, len(message), message, key)
        except dkim.DKIMException as exc:
            log.warning("DKIM: not signing mail from %s with d=%s: %s", domain, key.domain, exc)
            return
        _prepend_fields(envelope, [line])


# --- verification -------------------------------------------------------------


def _reason(exc: Exception) -> str:
    """dkimpy's message for ``exc``, without the ``b'...'`` around byte strings."""
    return re.sub(r"\bb'([^']*)'", r"\1", str(exc))


def _choose_key_record(records: Sequence[str]) -> str | None:
    """The DKIM key record among the TXT records at a selector name."""
    for text in records:
        if text.lstrip().startswith("v=DKIM1"):
            return text
    candidates = [t for t in records if "p=" in t]
    return candidates[0] if candidates else (records[0] if records else None)


def _key_name(selector: bytes, domain: bytes) -> str:
    return (selector + b"._domainkey." + domain).decode("ascii", "replace").lower().rstrip(".")


@dataclass
class _KeyLookup:
    record: str | None = None
    error: str | None = None  # "temperror" or "permerror"
    reason: str | None = None


class DkimVerify(QueuePolicy):
    """Checks the DKIM signatures (and ARC chain) of a message; records the results.

    As a queue policy, :meth:`apply` stores ``envelope.auth_results['dkim']``
    (and ``['arc']`` unless ``arc=False``), as the module docstring
    describes. A validator can call :meth:`verify` on the data in
    ``handle_have_data`` to act on the results before the message is
    accepted.

    ``resolver``: a :class:`slimta.util.dns.Resolver` (default: the shared
    one, looked up at each call). ``minkey``: the shortest RSA key accepted
    (bits). ``max_signatures``: at most this many signatures are checked,
    the rest get ``neutral``. ``allow_sha1``: accept ``rsa-sha1``, which RFC
    8301 forbids (default no: such signatures get ``permerror``).
    """

    def __init__(
        self,
        resolver: slimta_dns.Resolver | None = None,
        *,
        minkey: int = 1024,
        max_signatures: int = 5,
        allow_sha1: bool = False,
        arc: bool = True,
    ) -> None:
        self.resolver = resolver
        self.minkey = minkey
        self.max_signatures = max_signatures
        self.allow_sha1 = allow_sha1
        self.arc = arc

    async def _fetch(self, names: Iterable[str]) -> dict[str, _KeyLookup]:
        resolver = self.resolver or slimta_dns.get_resolver()
        unique = list(dict.fromkeys(names))

        async def one(name: str) -> _KeyLookup:
            try:
                answer = await resolver.query_txt(name)
            except slimta_dns.DnsNotFound:
                return _KeyLookup(error="permerror", reason="no key for signature")
            except slimta_dns.DnsError as exc:
                return _KeyLookup(error="temperror", reason=f"key lookup failed: {exc}")
            record = _choose_key_record(answer.records)
            if record is None:
                return _KeyLookup(error="permerror", reason="no key for signature")
            return _KeyLookup(record=record)

        found = await asyncio.gather(*(one(n) for n in unique))
        return dict(zip(unique, found, strict=True))

    @staticmethod
    def _dnsfunc(keys: Mapping[str, _KeyLookup]) -> Any:
        def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
            if isinstance(name, bytes):
                name = name.decode("ascii", "replace")
            lookup = keys.get(name.lower().rstrip("."))
            if lookup is None or lookup.record is None:
                if lookup is not None and lookup.error == "temperror":
                    raise dkim.DnsTimeoutError(lookup.reason or "temporary DNS failure")
                return None
            return lookup.record.encode("utf-8")

        return dnsfunc

    # phase 1 (maybe in a thread): parse the message and its signatures
    def _parse(self, message: bytes) -> tuple[dkim.DKIM, list[Any]]:
        d = dkim.DKIM(message, logger=_lib_log, minkey=self.minkey)
        count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
        sigs: list[Any] = []
        for idx in range(count):
            if idx >= self.max_signatures:
                sigs.append(("neutral", None, None, "too many signatures, not checked"))
                continue
            try:
                prep = d.verify_headerprep(idx)
            except dkim.DKIMException as exc:
                sigs.append(("neutral", None, None, f"bad signature: {_reason(exc)}"))
                continue
            sigs.append(prep[0])
        return d, sigs

    # phase 3 (maybe in a thread): the crypto
    def _check(
        self, d: dkim.DKIM, sigs: list[Any], keys: Mapping[str, _KeyLookup]
    ) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        dnsfunc = self._dnsfunc(keys)
        for idx, sig in enumerate(sigs):
            if isinstance(sig, tuple):  # not checked: (result, domain, selector, reason)
                result, domain, selector, reason = sig
                entry = {"result": result, "domain": domain, "selector": selector,
                         "reason": reason, "identity": None, "header_b": None}
                entry.update(self._tags(d, idx))
                results.append(entry)
                continue
            entry = self._describe(sig)
            entry["result"], entry["reason"] = self._check_one(d, idx, sig, keys, dnsfunc)
            results.append(entry)
        return results

    @staticmethod
    def _tags(d: dkim.DKIM, idx: int) -> dict[str, Any]:
        """domain/selector of a signature that could not be prepared, if readable."""
        values = [v for n, v in d.headers if n.lower() == b"dkim-signature"]
        try:
            sig = dkim.util.parse_tag_value(values[idx])
        except Exception:
            return {}
        found = {}
        if sig.get(b"d"):
            found["domain"] = sig[b"d"].decode("ascii", "replace").strip().lower()
        if sig.get(b"s"):
            found["selector"] = sig[b"s"].decode("ascii", "replace").strip()
        return found

    @staticmethod
    def _describe(sig: Mapping[bytes, bytes]) -> dict[str, Any]:
        def text(tag: bytes) -> str | None:
            value = sig.get(tag)
            return None if value is None else value.decode("ascii", "replace").strip()

        domain = text(b"d")
        b = re.sub(r"\s+", "", text(b"b") or "")
        return {
            "result": None,
            "domain": domain.lower() if domain else domain,
            "selector": text(b"s"),
            "reason": None,
            "identity": text(b"i") or (f"@{domain}" if domain else None),
            "header_b": b[:8] or None,
        }

    def _check_one(
        self, d: dkim.DKIM, idx: int, sig: Mapping[bytes, bytes],
        keys: Mapping[str, _KeyLookup], dnsfunc: Any,
    ) -> tuple[str, str | None]:
        if sig.get(b"a") == b"rsa-sha1" and not self.allow_sha1:
            return "permerror", "rsa-sha1 is not accepted (RFC 8301)"
        lookup = keys.get(_key_name(sig[b"s"], sig[b"d"]))
        if lookup is None or lookup.record is None:
            error = lookup.error if lookup is not None else "permerror"
            reason = lookup.reason if lookup is not None else "no key for signature"
            return error or "permerror", reason
        try:
            dkim.evaluate_pk(_key_name(sig[b"s"], sig[b"d"]), lookup.record.encode("utf-8"))
        except dkim.DKIMException as exc:
            return "permerror", f"bad key record: {_reason(exc)}"
        try:
            ok = d.verify(idx, dnsfunc=dnsfunc)
        except dkim.ValidationError:
            # the only ValidationError after the signature was parsed: bh= differs
            return "fail", "body hash did not verify"
        except dkim.KeyFormatError as exc:
            return "permerror", _reason(exc)
        except dkim.DKIMException as exc:
            return "neutral", _reason(exc)
        if ok:
            return "pass", None
        return "fail", "signature did not verify"

    async def verify(self, message: bytes) -> list[dict[str, Any]]:
        """The results for each ``DKIM-Signature`` of ``message`` (raw bytes), top first."""
        d, sigs = await _cpu(self._parse, len(message), message)
        if not sigs:
            return [{"result": "none", "domain": None, "selector": None,
                     "reason": "message not signed", "identity": None, "header_b": None}]
        names = [_key_name(s[b"s"], s[b"d"]) for s in sigs if not isinstance(s, tuple)]
        keys = await self._fetch(names)
        return await _cpu(self._check, len(message), d, sigs, keys)

    def _arc_parse(self, message: bytes) -> tuple[dkim.ARC, list[str]]:
        a = dkim.ARC(message, logger=_lib_log, minkey=self.minkey)
        _, arc_headers = a.sorted_arc_headers()
        names = []
        for _, (name, value) in arc_headers:
            if name.lower() in (b"arc-seal", b"arc-message-signature"):
                try:
                    tags = dkim.util.parse_tag_value(value)
                    names.append(_key_name(tags[b"s"], tags[b"d"]))
                except Exception:
                    continue
        return a, names

    async def verify_arc(self, message: bytes) -> dict[str, Any]:
        """The ARC chain's validation (RFC 8617): ``{'result': 'pass'|'fail'|'none', ...}``."""
        a, names = await _cpu(self._arc_parse, len(message), message)
        keys = await self._fetch(names) if names else {}
        try:
            cv, details, reason = await _cpu(a.verify, len(message), dnsfunc=self._dnsfunc(keys))
        except dkim.DKIMException as exc:
            cv, details, reason = dkim.CV_Fail, [], _reason(exc)
        result = "fail" if cv is None else cv.decode("ascii")
        reason = _reason(Exception(reason))
        instance = max((r.get("instance", 0) for r in details), default=0)
        if result == "pass":
            reason = None
        elif any(k.error == "temperror" for k in keys.values()):
            reason = f"{reason} (temporary DNS failure)"
        return {"result": result, "reason": reason, "instance": instance}

    async def apply(self, envelope: Envelope) -> None:
        """Verify ``envelope`` and store the results in ``envelope.auth_results``."""
        message = _message_bytes(envelope)
        results = getattr(envelope, "auth_results", None) or {}
        results["dkim"] = await self.verify(message)
        if self.arc:
            results["arc"] = await self.verify_arc(message)
        envelope.auth_results = results  # type: ignore[attr-defined]
        for entry in results["dkim"]:
            log.debug("DKIM %s d=%s s=%s %s", entry["result"], entry["domain"],
                      entry["selector"], entry["reason"] or "")


# --- ARC ------------------------------------------------------------------------


class ArcSeal(QueuePolicy, RelayPolicy):
    """Adds an ARC set (``ARC-Seal``, ``ARC-Message-Signature``,
    ``ARC-Authentication-Results``, RFC 8617) to forwarded mail.

    The message must carry an ``Authentication-Results`` field (spelled so)
    with ``authserv_id``: its results are copied into the
    ``ARC-Authentication-Results`` of the new set, and its ``arc=`` result
    gives the chain validation status (``cv=``; none for a message without
    a chain). A message without that field, or one with a chain whose result
    is missing, is left unsealed (logged). Run it after the
    ``Authentication-Results`` policy (see the module docstring).
    ``headers``: the fields the ARC-Message-Signature covers (default as for
    :class:`DkimSign`). Usable as a queue policy and as a relay policy.
    """

    def __init__(
        self,
        selector: str,
        domain: str,
        private_key: KeyData,
        authserv_id: str,
        headers: Iterable[str] | None = None,
    ) -> None:
        self.key = DkimKey(selector, domain, private_key)  # type: ignore[arg-type]
        self.authserv_id = authserv_id
        self.headers: list[bytes] | None = None
        if headers is not None:
            self.headers = [h.strip().lower().encode("ascii") for h in headers]
            if b"from" not in self.headers:
                raise ValueError("the From field must be signed (RFC 6376 section 5.4)")

    def seal(self, message: bytes) -> list[bytes]:
        """The new ARC set's header lines for ``message``, top first; empty if none."""
        return dkim.arc_sign(
            message,
            self.key.selector.encode("ascii"),
            self.key.domain.encode("ascii"),
            self.key.private_key,
            self.authserv_id.encode("ascii"),
            include_headers=self.headers,
            logger=_lib_log,
        )

    async def apply(self, envelope: Envelope) -> None:
        """Seal ``envelope``, or leave it as it is when it cannot be sealed."""
        message = _message_bytes(envelope)
        try:
            lines = await _cpu(self.seal, len(message), message)
        except dkim.DKIMException as exc:
            log.warning("ARC: not sealing: %s", exc)
            return
        if not lines:
            log.warning(
                "ARC: not sealing: no Authentication-Results from %s (or no arc= result "
                "for an existing chain)", self.authserv_id)
            return
        _prepend_fields(envelope, lines)
