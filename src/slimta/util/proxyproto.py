"""The PROXY protocol header (HAProxy's spec, versions 1 and 2), sans-IO.

A proxy such as HAProxy that forwards a TCP connection puts one header in
front of the client's bytes saying who the client is. This module only
parses: :func:`parse_proxy_header` takes the bytes received so far and says
"need more", "here is the header and its length", or raises
:class:`ProxyProtocolError`. Deciding whom to believe is the caller's job
(see ``SmtpEdge(proxy_protocol=..., trusted_proxies=...)``).

Version 1 is one text line of at most 107 octets::

    PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\\r\\n
    PROXY TCP6 2001:db8::1 2001:db8::2 56324 25\\r\\n
    PROXY UNKNOWN ...\\r\\n

Version 2 is binary: a 12-octet signature, version/command, family/transport,
a 16-bit length, the addresses, then TLVs (parsed and length-checked, kept
as ``(type, value)`` pairs, otherwise ignored).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

__all__ = [
    "V1_MAX_LENGTH",
    "V2_SIGNATURE",
    "ProxyInfo",
    "ProxyProtocolError",
    "parse_proxy_header",
]

V1_PREFIX = b"PROXY "
#: the longest valid version 1 header, CRLF included
V1_MAX_LENGTH = 107
#: the first 12 octets of every version 2 header
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16  # signature, ver/cmd, fam, len

_V2_COMMANDS = {0x0: "LOCAL", 0x1: "PROXY"}
_V2_FAMILIES = {0x0: "UNSPEC", 0x1: "INET", 0x2: "INET6", 0x3: "UNIX"}
_V2_TRANSPORTS = {0x0: "UNSPEC", 0x1: "STREAM", 0x2: "DGRAM"}
_V2_ADDRESS_LENGTH = {"UNSPEC": 0, "INET": 12, "INET6": 36, "UNIX": 216}


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY header (or not of an accepted version)."""


@dataclass(frozen=True, slots=True)
class ProxyInfo:
    """One parsed PROXY header.

    ``command`` is ``'PROXY'`` (a relayed connection) or ``'LOCAL'`` (the
    proxy's own connection, e.g. a health check; v2 only). ``family`` is
    ``'INET'``, ``'INET6'``, ``'UNIX'`` or ``'UNSPEC'`` (v1 ``UNKNOWN``);
    ``source`` and ``destination`` are ``(ip, port)`` for INET/INET6, the
    socket path (str) for UNIX, and None otherwise. :attr:`client` is the
    address to use for the client, or None when the receiver must use the
    real connection's.
    """

    version: int
    command: str
    family: str
    transport: str = "STREAM"
    source: tuple | str | None = None
    destination: tuple | str | None = None
    tlvs: tuple[tuple[int, bytes], ...] = ()

    @property
    def client(self) -> tuple | None:
        """The client's ``(ip, port)`` when the header carries one, else None."""
        if self.command == "PROXY" and (self.family == "INET" or self.family == "INET6"):
            return self.source  # type: ignore[return-value]
        return None


def parse_proxy_header(
    data: bytes, versions: tuple[int, ...] = (1, 2)
) -> tuple[ProxyInfo | None, int]:
    """Parse a PROXY header at the start of ``data``.

    Returns ``(info, consumed)`` once the whole header is there (the bytes
    after ``consumed`` belong to the application), ``(None, 0)`` when
    ``data`` is a valid beginning that needs more bytes. Raises
    :class:`ProxyProtocolError` as soon as the bytes cannot become a valid
    header of one of ``versions``.
    """
    if not data:
        return None, 0
    first = data[0]
    if first == 0x50 and 1 in versions:  # 'P'
        return _parse_v1(data)
    if first == 0x0D and 2 in versions:  # '\r'
        return _parse_v2(data)
    raise ProxyProtocolError("no PROXY header")


def _parse_v1(data: bytes) -> tuple[ProxyInfo | None, int]:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        head = data[:len(V1_PREFIX)]
        if not V1_PREFIX.startswith(head):
            raise ProxyProtocolError("no PROXY header")
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"v1 header longer than {V1_MAX_LENGTH} octets")
        if b"\n" in data or b"\r" in data[:-1]:
            raise ProxyProtocolError("v1 header with a bare CR or LF")
        return None, 0
    if not data.startswith(V1_PREFIX):
        raise ProxyProtocolError("no PROXY header")
    consumed = end + 2
    try:
        line = data[len(V1_PREFIX):end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("v1 header not ASCII") from None
    if line.startswith("UNKNOWN") and (len(line) == 7 or line[7] == " "):
        return ProxyInfo(1, "PROXY", "UNSPEC"), consumed
    parts = line.split(" ")
    if len(parts) != 5:
        raise ProxyProtocolError("v1 header needs: protocol source destination sport dport")
    proto, src, dst, sport, dport = parts
    if proto == "TCP4":
        family, cls = "INET", ipaddress.IPv4Address
    elif proto == "TCP6":
        family, cls = "INET6", ipaddress.IPv6Address
    else:
        raise ProxyProtocolError(f"v1 protocol {proto!r} is not TCP4, TCP6 or UNKNOWN")
    try:
        src_ip = str(cls(src))
        dst_ip = str(cls(dst))
    except ValueError:
        raise ProxyProtocolError(f"v1 address not {proto}") from None
    source = (src_ip, _v1_port(sport))
    destination = (dst_ip, _v1_port(dport))
    return ProxyInfo(1, "PROXY", family, "STREAM", source, destination), consumed


def _v1_port(text: str) -> int:
    if not (text.isdigit() and text.isascii()) or len(text) > 5 or (
            len(text) > 1 and text[0] == "0"):
        raise ProxyProtocolError(f"v1 port {text!r} invalid")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"v1 port {text!r} out of range")
    return port


def _parse_v2(data: bytes) -> tuple[ProxyInfo | None, int]:
    if len(data) < _V2_FIXED:
        if not V2_SIGNATURE.startswith(data[:12]):
            raise ProxyProtocolError("no PROXY header")
        if len(data) > 12:
            _v2_command(data[12])
        if len(data) > 13:
            _v2_family(data[13])
        return None, 0
    if data[:12] != V2_SIGNATURE:
        raise ProxyProtocolError("no PROXY header")
    command = _v2_command(data[12])
    family, transport = _v2_family(data[13])
    length = int.from_bytes(data[14:16], "big")
    consumed = _V2_FIXED + length
    if len(data) < consumed:
        return None, 0
    if command == "LOCAL" or family == "UNSPEC":
        # the proxy's own connection, or an unknown one: the receiver uses the
        # real connection's addresses and skips the block (TLVs included)
        return ProxyInfo(2, command, family, transport), consumed
    need = _V2_ADDRESS_LENGTH[family]
    if length < need:
        raise ProxyProtocolError(f"v2 {family} address block needs {need} octets, got {length}")
    block = data[_V2_FIXED:consumed]
    if family == "INET":
        source = (str(ipaddress.IPv4Address(block[0:4])), int.from_bytes(block[8:10], "big"))
        destination = (str(ipaddress.IPv4Address(block[4:8])), int.from_bytes(block[10:12], "big"))
    elif family == "INET6":
        source = (str(ipaddress.IPv6Address(block[0:16])), int.from_bytes(block[32:34], "big"))
        destination = (str(ipaddress.IPv6Address(block[16:32])),
                       int.from_bytes(block[34:36], "big"))
    else:
        source = _unix_path(block[0:108])
        destination = _unix_path(block[108:216])
    tlvs = _v2_tlvs(block, need) if length > need else ()
    return ProxyInfo(2, command, family, transport, source, destination, tlvs), consumed


def _v2_command(octet: int) -> str:
    if octet >> 4 != 2:
        raise ProxyProtocolError(f"v2 version {octet >> 4} unsupported")
    command = _V2_COMMANDS.get(octet & 0x0F)
    if command is None:
        raise ProxyProtocolError(f"v2 command {octet & 0x0F} unknown")
    return command


def _v2_family(octet: int) -> tuple[str, str]:
    family = _V2_FAMILIES.get(octet >> 4)
    transport = _V2_TRANSPORTS.get(octet & 0x0F)
    if family is None or transport is None:
        raise ProxyProtocolError(f"v2 family/transport 0x{octet:02x} unknown")
    return family, transport


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")


def _v2_tlvs(block: bytes, pos: int) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    end = len(block)
    while pos < end:
        if end - pos < 3:
            raise ProxyProtocolError("v2 TLV truncated")
        kind = block[pos]
        size = int.from_bytes(block[pos + 1:pos + 3], "big")
        pos += 3
        if end - pos < size:
            raise ProxyProtocolError("v2 TLV longer than the header")
        tlvs.append((kind, bytes(block[pos:pos + size])))
        pos += size
    return tuple(tlvs)
