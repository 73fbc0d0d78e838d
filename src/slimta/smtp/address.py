"""Reverse-paths and forward-paths of MAIL and RCPT (RFC 5321 §4.1.2, RFC 6531).

:func:`parse_path` reads the argument of ``MAIL FROM:`` or ``RCPT TO:`` and
returns the mailbox, the ESMTP parameters that follow it, and whether the
mailbox needs SMTPUTF8. :func:`format_path` goes the other way for the client
side.

What is accepted, and why:

- ``<local@domain>``, with any number of spaces before ``<`` (many clients
  send ``MAIL FROM: <a@b>``). After ``>`` comes either nothing or whitespace
  and the parameters; anything else (``<a@b>x``) is an error.
- A bare address without angle brackets (``MAIL FROM:a@b``), as Postfix
  accepts outside its strict mode. The bare address ends at the first space,
  so it can never hold a space itself; what follows is the parameters.
- Local parts are dot-strings or quoted strings (with backslash pairs). Both
  may hold any non-ASCII character (RFC 6531), except C1 controls and lone
  surrogates, which only come from broken UTF-8 and would be a hazard in logs
  and headers.
- Domains are dot-separated labels of letters, digits and hyphens (no hyphen
  at either end, at most 63 octets for an ASCII label), or U-labels with
  non-ASCII characters; or address literals ``[1.2.3.4]`` and
  ``[IPv6:...]``, checked with :mod:`ipaddress`. General address literals
  (``[tag:content]``) are refused: no standardized tag but IPv6 exists.
- A source route (``<@a,@b:user@c>``) is checked and dropped, as RFC 5321
  §C asks.
- The returned address is the mailbox exactly as sent, without angle
  brackets: a quoted local part keeps its quotes, case is kept.
- Lengths are counted in UTF-8 octets: the whole path, brackets included, at
  most :data:`MAX_PATH_LENGTH` (256); the local part :data:`MAX_LOCAL_PART_LENGTH`
  (64); the domain :data:`MAX_DOMAIN_LENGTH` (255) (RFC 5321 §4.5.3.1). Real
  mail (VERP and SRS addresses) sometimes has longer local parts, so the
  limits can be raised per call.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = [
    "MAX_DOMAIN_LENGTH",
    "MAX_LOCAL_PART_LENGTH",
    "MAX_PATH_LENGTH",
    "AddressError",
    "format_path",
    "parse_path",
    "quote_local_part",
    "split_address",
]

#: RFC 5321 §4.5.3.1.3: a reverse-path or forward-path, brackets included.
MAX_PATH_LENGTH = 256
#: RFC 5321 §4.5.3.1.1.
MAX_LOCAL_PART_LENGTH = 64
#: RFC 5321 §4.5.3.1.2.
MAX_DOMAIN_LENGTH = 255
#: RFC 1035: one label of a domain name.
MAX_LABEL_LENGTH = 63


class AddressError(ValueError):
    """A path that is not valid; ``str(error)`` is a short reason for the reply text."""


# RFC 5322 atext without the non-ASCII extension, as a character class body.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"

# The common case: ``<dot-string@ascii-domain>`` then the end or whitespace.
_FAST_RE = re.compile(
    rf" *<([{_ATEXT}]+(?:\.[{_ATEXT}]+)*)@({_LABEL}(?:\.{_LABEL})*)>(?:[ \t]+|\Z)"
)
_ASCII_LABEL_RE = re.compile(_LABEL)
# Characters no address may hold: ASCII controls, DEL, C1 controls, surrogates.
_FORBIDDEN_RE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_DOT_STRING_RE = re.compile(
    rf"(?:[{_ATEXT}]|[^\x00-\x9f\ud800-\udfff])+(?:\.(?:[{_ATEXT}]|[^\x00-\x9f\ud800-\udfff])+)*"
)
# Characters that may appear in a domain name (validated label by label later).
_DOMAIN_CHARS_RE = re.compile(r"[A-Za-z0-9.\-]|[^\x00-\x9f\ud800-\udfff]")
_IPV4_RE = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")


def _octets(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))


def parse_path(
    text: str,
    *,
    allow_null: bool = False,
    allow_postmaster: bool = False,
    max_path_length: int = MAX_PATH_LENGTH,
    max_local_part_length: int = MAX_LOCAL_PART_LENGTH,
    max_domain_length: int = MAX_DOMAIN_LENGTH,
) -> tuple[str, str, bool]:
    """Parse what follows ``MAIL FROM:`` or ``RCPT TO:``.

    Returns ``(address, rest, has_non_ascii)``: the mailbox without angle
    brackets or source route, the text after the path with leading whitespace
    removed (the ESMTP parameters, for :func:`slimta.smtp.extensions.parse_params`),
    and whether the mailbox holds any non-ASCII character (it then needs
    SMTPUTF8).

    ``<>`` is accepted only with ``allow_null`` (address ``''``), ``<postmaster>``
    without a domain (any case, returned as sent) only with ``allow_postmaster``.
    Raises :class:`AddressError` otherwise.
    """
    m = _FAST_RE.match(text)
    if m is not None and (
        m.end(1) - m.start(1) <= max_local_part_length
        and m.end(2) - m.start(2) <= max_domain_length
        and m.end(2) - m.start(1) + 2 <= max_path_length
    ):
        return text[m.start(1):m.end(2)], text[m.end():], False
    # Not simple, or too long: the careful parser decides and says why.
    return _Parser(
        text, allow_null, allow_postmaster, max_path_length, max_local_part_length,
        max_domain_length,
    ).parse()


class _Parser:
    """The careful path parser, for everything the fast regex does not take."""

    __slots__ = (
        "allow_null", "allow_postmaster", "max_domain", "max_local", "max_path", "pos", "text",
    )

    def __init__(
        self, text: str, allow_null: bool, allow_postmaster: bool, max_path: int,
        max_local: int, max_domain: int,
    ) -> None:
        self.text = text
        self.pos = 0
        self.allow_null = allow_null
        self.allow_postmaster = allow_postmaster
        self.max_path = max_path
        self.max_local = max_local
        self.max_domain = max_domain

    def parse(self) -> tuple[str, str, bool]:
        text = self.text
        start = len(text) - len(text.lstrip(" \t"))
        if start == len(text):
            raise AddressError("missing address")
        self.pos = start
        if text[start] == "<":
            self.pos += 1
            if text.startswith(">", self.pos):
                if not self.allow_null:
                    raise AddressError("null address not allowed here")
                self.pos += 1
                address = ""
            else:
                address = self._route_and_mailbox(bracketed=True)
                if not text.startswith(">", self.pos):
                    raise AddressError("expected '>' after the address")
                self.pos += 1
            end = self.pos
            path_octets = _octets(text[start:end])
        else:
            address = self._route_and_mailbox(bracketed=False)
            end = self.pos
            if " " in address or "\t" in address:
                raise AddressError("an address with spaces needs angle brackets")
            path_octets = _octets(text[start:end]) + 2
        if end < len(text) and text[end] not in " \t":
            raise AddressError("unexpected characters after the address")
        if path_octets > self.max_path:
            raise AddressError("path too long")
        return address, text[end:].lstrip(" \t"), not address.isascii()

    # --- pieces -------------------------------------------------------
    def _route_and_mailbox(self, bracketed: bool) -> str:
        text = self.text
        if text.startswith("@", self.pos):
            # A-d-l = At-domain *( "," At-domain ) ":"
            while True:
                self.pos += 1  # the '@'
                self._domain(allow_literal=False)
                if text.startswith(",", self.pos):
                    self.pos += 1
                    if not text.startswith("@", self.pos):
                        raise AddressError("bad source route")
                    continue
                if text.startswith(":", self.pos):
                    self.pos += 1
                    break
                raise AddressError("bad source route")
        start = self.pos
        self._local_part()
        local_end = self.pos
        if not text.startswith("@", self.pos):
            local = text[start:local_end]
            at_end = local_end == len(text) or text[local_end] in (">" if bracketed else " \t")
            if local.lower() == "postmaster" and at_end:
                if self.allow_postmaster:
                    return local
                raise AddressError("postmaster without a domain not allowed here")
            raise AddressError("missing '@domain'")
        if _octets(text[start:local_end]) > self.max_local:
            raise AddressError("local part too long")
        self.pos += 1
        self._domain(allow_literal=True)
        return text[start:self.pos]

    def _local_part(self) -> None:
        text = self.text
        if text.startswith('"', self.pos):
            self._quoted_string()
            return
        m = _DOT_STRING_RE.match(text, self.pos)
        if m is None:
            raise AddressError("bad local part")
        self.pos = m.end()
        if text.startswith(".", self.pos):
            raise AddressError("bad local part")

    def _quoted_string(self) -> None:
        text = self.text
        i = self.pos + 1
        n = len(text)
        while i < n:
            c = text[i]
            if c == '"':
                self.pos = i + 1
                return
            if c == "\\":
                i += 1
                if i >= n:
                    break
                c = text[i]
                # quoted-pairSMTP = "\" %d32-126 (and UTF-8 under RFC 6531)
                if _FORBIDDEN_RE.match(c):
                    raise AddressError("bad character in quoted local part")
            elif _FORBIDDEN_RE.match(c):
                raise AddressError("bad character in quoted local part")
            i += 1
        raise AddressError("unterminated quoted local part")

    def _domain(self, allow_literal: bool) -> None:
        text = self.text
        start = self.pos
        if text.startswith("[", start):
            if not allow_literal:
                raise AddressError("address literal not allowed in source route")
            end = text.find("]", start)
            if end < 0:
                raise AddressError("unterminated address literal")
            _check_literal(text[start + 1:end])
            self.pos = end + 1
            return
        i = start
        n = len(text)
        match = _DOMAIN_CHARS_RE.match
        while i < n and match(text, i):
            i += 1
        domain = text[start:i]
        if not domain:
            raise AddressError("missing domain")
        if _octets(domain) > self.max_domain:
            raise AddressError("domain too long")
        for label in domain.split("."):
            _check_label(label)
        self.pos = i


def _check_label(label: str) -> None:
    if not label:
        raise AddressError("empty domain label")
    if label.isascii():
        if len(label) > MAX_LABEL_LENGTH or not _ASCII_LABEL_RE.fullmatch(label):
            raise AddressError("bad domain label")
    elif label[0] == "-" or label[-1] == "-":
        raise AddressError("bad domain label")


def _check_literal(body: str) -> None:
    if _IPV4_RE.fullmatch(body):
        try:
            ipaddress.IPv4Address(body)
        except ValueError:
            raise AddressError("bad IPv4 address literal") from None
        return
    tag, sep, value = body.partition(":")
    if not sep:
        raise AddressError("bad address literal")
    if tag.lower() != "ipv6":
        raise AddressError("unsupported address literal")
    if not value or "%" in value or "/" in value:
        raise AddressError("bad IPv6 address literal")
    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        raise AddressError("bad IPv6 address literal") from None


# --- the client side ----------------------------------------------------

def split_address(address: str) -> tuple[str, str]:
    """``'a@b'`` → ``('a', 'b')``; splits at the last ``@`` (a quoted local part may hold one).

    An address without ``@`` (``postmaster``) gives ``(address, '')``.
    """
    local, sep, domain = address.rpartition("@")
    if not sep:
        return address, ""
    return local, domain


def _is_quoted_string(local: str) -> bool:
    if len(local) < 2 or local[0] != '"' or local[-1] != '"':
        return False
    p = _Parser(local, False, False, MAX_PATH_LENGTH, MAX_LOCAL_PART_LENGTH, MAX_DOMAIN_LENGTH)
    try:
        p._quoted_string()
    except AddressError:
        return False
    return p.pos == len(local)


def quote_local_part(local: str) -> str:
    """The local part as it must be written in a path.

    A valid dot-string (or an already quoted string) is returned as it is;
    anything else is put in double quotes with ``"`` and ``\\`` escaped.
    """
    if _DOT_STRING_RE.fullmatch(local) or _is_quoted_string(local):
        return local
    escaped = local.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def format_path(address: str) -> str:
    """The path for ``MAIL FROM:`` or ``RCPT TO:``.

    ``'a b@c'`` → ``'<"a b"@c>'``; ``''`` → ``'<>'``; ``'postmaster'`` → ``'<postmaster>'``.
    """
    if not address:
        return "<>"
    local, domain = split_address(address)
    if not domain:
        return f"<{address}>"
    return f"<{quote_local_part(local)}@{domain}>"
