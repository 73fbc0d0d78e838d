"""EHLO keywords and ESMTP parameters (RFC 5321 §4.1.1.1 and §4.1.2, RFC 3461, RFC 1870).

:class:`Extensions` is what a server advertises after EHLO and what a client
learns from the reply. :func:`parse_params` splits the parameters after a
MAIL or RCPT path; the small ``parse_*`` checkers turn one parameter value
into a Python value. All of them raise :class:`ParamError`; which reply a
server sends for it is the server's business (``kind`` helps: ``'syntax'`` →
501 5.5.4, ``'unknown'`` → 555 5.5.4).

xtext (RFC 3461 §4): ``+XX`` escapes are decoded as bytes and the result as
UTF-8, so an SMTPUTF8 client that escapes UTF-8 octets is understood; both
upper- and lower-case hex digits are accepted (the RFC asks senders for upper
case, which :func:`xtext_encode` produces). In ORCPT values of address type
``utf-8`` (RFC 6533), ``\\x{HEX}`` escapes and raw UTF-8 are decoded too.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

__all__ = [
    "MAX_ENVID_LENGTH",
    "Extensions",
    "ParamError",
    "parse_body",
    "parse_envid",
    "parse_notify",
    "parse_orcpt",
    "parse_params",
    "parse_ret",
    "parse_size",
    "xtext_decode",
    "xtext_encode",
]

#: RFC 3461 §4.4: an ENVID is at most 100 characters.
MAX_ENVID_LENGTH = 100

# ehlo-keyword / esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
# esmtp-value = 1*(%d33-60 / %d62-126 / UTF8-non-ascii); C1 controls and
# surrogates (from undecodable bytes) are refused.
_PARAM_RE = re.compile(
    r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e\xa0-\ud7ff\ue000-\U0010ffff]+))?"
)
_XTEXT_VALID_RE = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-Fa-f]{2})*")
_UNITEXT_ESCAPE_RE = re.compile(r"\\x\{([0-9A-Fa-f]{2,6})\}")
_ATOM_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")


class ParamError(ValueError):
    """A bad ESMTP parameter.

    ``ParamError('syntax', 'bad SIZE value')``: ``kind`` is ``'syntax'`` (a
    malformed or duplicated parameter or value) or ``'unknown'`` (a parameter
    the server does not know); ``param`` names the parameter when known;
    ``str(error)`` is the reason, or the kind when no reason was given.
    """

    KINDS = ("syntax", "unknown")

    def __init__(self, kind: str = "syntax", reason: str = "", *, param: str | None = None):
        if kind not in self.KINDS:
            # A reason given as the only argument: keep it, the kind is syntax.
            kind, reason = "syntax", reason or kind
        super().__init__(reason or kind)
        self.kind = kind
        self.reason = reason
        self.param = param


class Extensions:
    """The EHLO keywords of a session, in order, each with an optional parameter.

    Keywords are case-insensitive and kept in upper case::

        ext = Extensions()
        ext.add('8BITMIME')
        ext.add('SIZE', 10485760)
        ext.add('AUTH', 'PLAIN LOGIN')
        ext.lines()  # ['8BITMIME', 'SIZE 10485760', 'AUTH PLAIN LOGIN']
    """

    __slots__ = ("_items",)

    def __init__(self, items: dict[str, str | None] | None = None) -> None:
        self._items: dict[str, str | None] = {}
        if items:
            for keyword, param in items.items():
                self.add(keyword, param)

    def add(self, keyword: str, param: str | int | None = None) -> None:
        """Add or replace a keyword; a replaced keyword keeps its place."""
        if not _KEYWORD_RE.fullmatch(keyword):
            raise ValueError(f"bad EHLO keyword: {keyword!r}")
        if param is not None:
            param = str(param)
            if "\r" in param or "\n" in param:
                raise ValueError("EHLO parameter must be one line")
        self._items[keyword.upper()] = param

    def drop(self, keyword: str) -> bool:
        """Remove a keyword; True if it was there."""
        return self._items.pop(keyword.upper(), _MISSING) is not _MISSING

    def __contains__(self, keyword: object) -> bool:
        return isinstance(keyword, str) and keyword.upper() in self._items

    def getparam(self, keyword: str) -> str | None:
        """The keyword's parameter string, or None (absent keyword or no parameter)."""
        return self._items.get(keyword.upper())

    def keywords(self) -> list[str]:
        """The keywords, upper case, in order."""
        return list(self._items)

    def lines(self) -> list[str]:
        """One line per keyword, for the EHLO reply after the greeting line."""
        return [k if p is None else f"{k} {p}" for k, p in self._items.items()]

    def copy(self) -> Extensions:
        """An independent copy."""
        new = Extensions.__new__(Extensions)
        new._items = dict(self._items)
        return new

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Extensions):
            return list(self._items.items()) == list(other._items.items())
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Extensions({self._items!r})"

    @classmethod
    def parse_ehlo(cls, message: str) -> tuple[str, Extensions]:
        """Read the text of a 250 reply to EHLO (lines without the ``250-`` prefixes).

        Returns the greeting line and the extensions of the other lines.
        Lines that are not ``KEYWORD [params]`` are skipped. The old
        ``AUTH=MECH ...`` form some servers send is read as AUTH unless a
        proper AUTH line is also there.
        """
        lines = message.replace("\r\n", "\n").split("\n")
        ext = cls()
        legacy_auth: str | None = None
        for line in lines[1:]:
            keyword, _, param = line.strip().partition(" ")
            param = param.strip() or None
            if keyword[:5].upper() == "AUTH=":
                legacy_auth = " ".join(filter(None, (keyword[5:], param)))
                continue
            if not _KEYWORD_RE.fullmatch(keyword):
                continue
            ext._items[keyword.upper()] = param
        if legacy_auth and "AUTH" not in ext._items:
            ext._items["AUTH"] = legacy_auth
        return lines[0], ext


_MISSING = object()


# --- MAIL and RCPT parameters -------------------------------------------

def parse_params(text: str) -> dict[str, str | None]:
    """Split ESMTP parameters into a dict.

    ``'SIZE=100  BODY=8BITMIME SMTPUTF8'`` gives
    ``{'SIZE': '100', 'BODY': '8BITMIME', 'SMTPUTF8': None}``. Parameters
    are separated by one or more spaces; keys are upper-cased, values kept
    as sent. A malformed parameter or a key given twice raises
    ``ParamError('syntax')``.
    """
    params: dict[str, str | None] = {}
    if not text:
        return params
    match = _PARAM_RE.fullmatch
    for token in text.split(" "):
        if not token:
            continue
        m = match(token)
        if m is None:
            raise ParamError("syntax", f"bad parameter {token[:40]!r}")
        key = m.group(1).upper()
        if key in params:
            raise ParamError("syntax", f"duplicate parameter {key}", param=key)
        params[key] = m.group(2)
    return params


def _need(value: str | None, name: str) -> str:
    if not value:
        raise ParamError("syntax", f"{name} needs a value", param=name)
    return value


def parse_size(value: str | None) -> int:
    """SIZE (RFC 1870): ASCII digits only."""
    value = _need(value, "SIZE")
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise ParamError("syntax", "bad SIZE value", param="SIZE")
    return int(value)


_BODY_VALUES = frozenset({"7BIT", "8BITMIME", "BINARYMIME"})


def parse_body(value: str | None) -> str:
    """BODY (RFC 6152, RFC 3030): ``'7BIT'``, ``'8BITMIME'`` or ``'BINARYMIME'``, any case in."""
    body = _need(value, "BODY").upper()
    if body not in _BODY_VALUES:
        raise ParamError("syntax", "bad BODY value", param="BODY")
    return body


def parse_ret(value: str | None) -> str:
    """RET (RFC 3461 §4.3): ``'FULL'`` or ``'HDRS'``, any case in."""
    ret = _need(value, "RET").upper()
    if ret not in ("FULL", "HDRS"):
        raise ParamError("syntax", "bad RET value", param="RET")
    return ret


_NOTIFY_VALUES = ("SUCCESS", "FAILURE", "DELAY")


def parse_notify(value: str | None) -> list[str]:
    """NOTIFY (RFC 3461 §4.1): ``['NEVER']`` alone, or some of SUCCESS, FAILURE, DELAY.

    Case-insensitive; the result is upper case, in the order sent, without
    repeats.
    """
    items = _need(value, "NOTIFY").upper().split(",")
    if items == ["NEVER"]:
        return items
    out: list[str] = []
    for item in items:
        if item not in _NOTIFY_VALUES:
            raise ParamError("syntax", "bad NOTIFY value", param="NOTIFY")
        if item not in out:
            out.append(item)
    return out


def parse_orcpt(value: str | None) -> str:
    """ORCPT (RFC 3461 §4.2): ``addr-type ';' xtext`` → ``'rfc822;a@b.c'``, decoded.

    The address type is kept as sent. For the ``utf-8`` type (RFC 6533) the
    ``\\x{HEX}`` escapes and raw UTF-8 are decoded as well. Control
    characters in the decoded address are refused (it ends up in DSN
    headers).
    """
    value = _need(value, "ORCPT")
    addr_type, sep, encoded = value.partition(";")
    if not sep or not _ATOM_RE.fullmatch(addr_type) or not encoded:
        raise ParamError("syntax", "bad ORCPT value", param="ORCPT")
    try:
        if addr_type.lower() == "utf-8":
            address = _unitext_decode(encoded)
        else:
            address = xtext_decode(encoded)
    except ParamError:
        raise ParamError("syntax", "bad ORCPT value", param="ORCPT") from None
    if not address or _CONTROL_RE.search(address):
        raise ParamError("syntax", "bad ORCPT value", param="ORCPT")
    return f"{addr_type};{address}"


def parse_envid(value: str | None) -> str:
    """ENVID (RFC 3461 §4.4): xtext, decoded; printable ASCII, at most 100 characters."""
    value = _need(value, "ENVID")
    try:
        envid = xtext_decode(value)
    except ParamError:
        raise ParamError("syntax", "bad ENVID value", param="ENVID") from None
    if not envid.isascii() or not envid.isprintable() or len(envid) > MAX_ENVID_LENGTH:
        raise ParamError("syntax", "bad ENVID value", param="ENVID")
    return envid


# --- xtext --------------------------------------------------------------

def xtext_decode(s: str) -> str:
    """Decode RFC 3461 xtext: ``'a+2Bb'`` → ``'a+b'``.

    Characters must be printable ASCII other than ``+`` and ``=``; each
    ``+XX`` is one octet, and the octets are read as UTF-8. Anything else
    raises ``ParamError('syntax')``.
    """
    if not _XTEXT_VALID_RE.fullmatch(s):
        raise ParamError("syntax", "bad xtext")
    if "+" not in s:
        return s
    # Each '+' is followed by two hex digits (checked above).
    parts = s.split("+")
    out = bytearray(parts[0].encode("ascii"))
    for part in parts[1:]:
        out.append(int(part[:2], 16))
        out += part[2:].encode("ascii")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ParamError("syntax", "bad xtext: not UTF-8") from None


_XTEXT_PLAIN = frozenset(chr(c) for c in range(0x21, 0x7F)) - {"+", "="}


def xtext_encode(s: str) -> str:
    """Encode as RFC 3461 xtext: printable ASCII but ``+`` and ``=`` as is, the rest ``+XX``.

    Non-ASCII characters are escaped octet by octet from their UTF-8 form.
    """
    plain = _XTEXT_PLAIN
    if all(c in plain for c in s):
        return s
    out = []
    for c in s:
        if c in plain:
            out.append(c)
        else:
            out.extend(f"+{b:02X}" for b in c.encode("utf-8"))
    return "".join(out)


def _unitext_decode(s: str) -> str:
    r"""RFC 6533 utf-8-addr-xtext / utf-8-addr-unitext: ``\x{HEX}`` escapes, raw UTF-8.

    ``+XX`` escapes are accepted too (a ``+`` cannot be literal in this
    form, so there is no ambiguity).
    """

    def code_point(m: re.Match[str]) -> str:
        cp = int(m.group(1), 16)
        if cp < 0x20 or 0x7F <= cp < 0xA0 or 0xD800 <= cp < 0xE000 or cp > 0x10FFFF:
            raise ParamError("syntax", "bad \\x{} escape")
        return chr(cp)

    if "\\" in s:
        parts = []
        last = 0
        for m in _UNITEXT_ESCAPE_RE.finditer(s):
            parts.append(xtext_decode(_unitext_plain(s[last:m.start()])))
            parts.append(code_point(m))
            last = m.end()
        parts.append(xtext_decode(_unitext_plain(s[last:])))
        return "".join(parts)
    return xtext_decode(_unitext_plain(s))


def _unitext_plain(s: str) -> str:
    # Raw UTF-8 is allowed in unitext; turn it into +XX so xtext rules apply.
    if s.isascii():
        if "\\" in s:
            raise ParamError("syntax", "bad backslash in ORCPT")
        return s
    return "".join(c if c.isascii() else xtext_encode(c) for c in s)
