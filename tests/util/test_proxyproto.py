"""Tests for slimta.util.proxyproto: the PROXY protocol header parser (v1 and v2)."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time

import pytest

from slimta.edge.smtp import SmtpEdge, SmtpValidators
from slimta.util.proxyproto import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyInfo,
    ProxyProtocolError,
    parse_proxy_header,
)

V1_TCP4 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25\r\n"
V1_TCP6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 587\r\n"


def v2(command=0x1, fam=0x11, body=b"", length=None, version=0x2):
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([(version << 4) | command, fam]) + struct.pack("!H", size) + body


def inet(src="192.0.2.1", dst="198.51.100.2", sport=56324, dport=25):
    return (ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed
            + struct.pack("!HH", sport, dport))


def inet6(src="2001:db8::1", dst="2001:db8::2", sport=1, dport=25):
    return (ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
            + struct.pack("!HH", sport, dport))


def tlv(kind, value):
    return bytes([kind]) + struct.pack("!H", len(value)) + value


V2_TCP4 = v2(body=inet())
V2_TCP6 = v2(fam=0x21, body=inet6())
V2_TLVS = v2(body=inet() + tlv(0x01, b"smtp") + tlv(0x04, b"") + tlv(0xE0, b"x" * 300))
V2_LOCAL = v2(command=0x0, fam=0x00)
V2_UNIX = v2(fam=0x31, body=b"/run/a.sock".ljust(108, b"\0") + b"/run/b.sock".ljust(108, b"\0"))


# --- version 1 ----------------------------------------------------------------
def test_v1_tcp4():
    info, used = parse_proxy_header(V1_TCP4 + b"EHLO x\r\n")
    assert used == len(V1_TCP4)
    assert info == ProxyInfo(1, "PROXY", "INET", "STREAM", ("192.0.2.1", 56324),
                             ("198.51.100.2", 25))
    assert info.client == ("192.0.2.1", 56324)


def test_v1_tcp6():
    info, used = parse_proxy_header(V1_TCP6)
    assert used == len(V1_TCP6)
    assert info.family == "INET6"
    assert info.source == ("2001:db8::1", 65535)
    assert info.destination == ("2001:db8::2", 587)
    assert info.client == ("2001:db8::1", 65535)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n",
                                  b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"])
def test_v1_unknown_uses_the_real_connection(line):
    info, used = parse_proxy_header(line + b"QUIT\r\n")
    assert used == len(line)
    assert (info.version, info.command, info.family, info.source) == (1, "PROXY", "UNSPEC", None)
    assert info.client is None


def test_v1_longest_header_is_accepted():
    src = dst = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {src} {dst} 65535 65535\r\n".encode()
    assert len(line) == 104
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(line) == V1_MAX_LENGTH
    info, used = parse_proxy_header(line)
    assert used == V1_MAX_LENGTH and info.family == "UNSPEC"


def test_v1_oversize():
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 15) + b"\r\n"
    with pytest.raises(ProxyProtocolError, match="longer than 107"):
        parse_proxy_header(line)
    with pytest.raises(ProxyProtocolError, match="longer than 107"):
        parse_proxy_header(b"PROXY TCP4 " + b"1" * 200)


@pytest.mark.parametrize("header", [V1_TCP4, V1_TCP6, b"PROXY UNKNOWN\r\n"])
def test_v1_every_split_needs_more(header):
    for n in range(len(header)):
        assert parse_proxy_header(header[:n]) == (None, 0), n
    assert parse_proxy_header(header)[1] == len(header)


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",            # a field missing
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 25 1\r\n",       # one too many
    b"PROXY TCP4  192.0.2.1 198.51.100.2 56324 25\r\n",        # two spaces
    b"PROXY TCP4 2001:db8::1 198.51.100.2 56324 25\r\n",       # v6 address as TCP4
    b"PROXY TCP6 192.0.2.1 2001:db8::2 56324 25\r\n",          # v4 address as TCP6
    b"PROXY TCP4 192.0.2.256 198.51.100.2 56324 25\r\n",       # not an address
    b"PROXY TCP4 192.0.2.01 198.51.100.2 56324 25\r\n",        # leading zero
    b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 25\r\n",         # port out of range
    b"PROXY TCP4 192.0.2.1 198.51.100.2 056 25\r\n",           # port with leading zero
    b"PROXY TCP4 192.0.2.1 198.51.100.2 -1 25\r\n",            # negative port
    b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 25\r\n",
    b"PROXY UDP4 192.0.2.1 198.51.100.2 56324 25\r\n",         # unknown protocol
    b"PROXY UNKNOWNX\r\n",
    b"PROXY tcp4 192.0.2.1 198.51.100.2 56324 25\r\n",         # case matters
    b"PROXY TCP4 192.0.2.1 198.51.100.2 5\xb9 25\r\n",         # not ASCII
    b"PROXY\r\n",
    b"PROXY TCP4 192.0.2.1\n198.51.100.2 56324 25\r\n",       # bare LF
])
def test_v1_invalid(line):
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(line)


@pytest.mark.parametrize("data", [
    b"EHLO client.example\r\n", b"QUIT\r\n", b"PRO\r\n", b"PROXYTCP4", b"proxy ", b"E", b"\x00",
    b"PROXY TCP4 1.2.3.4\n", b"PROXY TCP4 1.2\r3",
])
def test_not_a_header_fails_at_once(data):
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(data)


def test_empty_input_needs_more():
    assert parse_proxy_header(b"") == (None, 0)


# --- version 2 ----------------------------------------------------------------
def test_v2_tcp4():
    info, used = parse_proxy_header(V2_TCP4 + b"EHLO x\r\n")
    assert used == len(V2_TCP4) == 28
    assert info == ProxyInfo(2, "PROXY", "INET", "STREAM", ("192.0.2.1", 56324),
                             ("198.51.100.2", 25))
    assert info.client == ("192.0.2.1", 56324)


def test_v2_tcp6():
    info, used = parse_proxy_header(V2_TCP6)
    assert used == 16 + 36
    assert info.family == "INET6"
    assert info.client == ("2001:db8::1", 1)
    assert info.destination == ("2001:db8::2", 25)


def test_v2_local_ignores_the_address_block():
    info, used = parse_proxy_header(V2_LOCAL + b"QUIT\r\n")
    assert used == 16
    assert (info.command, info.family, info.client) == ("LOCAL", "UNSPEC", None)
    # a LOCAL header may still carry (ignored) addresses
    header = v2(command=0x0, body=inet())
    info, used = parse_proxy_header(header)
    assert used == 28 and info.command == "LOCAL" and info.client is None


def test_v2_unspec_and_unix_use_the_real_connection():
    info, used = parse_proxy_header(v2(fam=0x00, body=b"ignored"))
    assert used == 23 and info.family == "UNSPEC" and info.client is None
    info, used = parse_proxy_header(V2_UNIX)
    assert used == 16 + 216
    assert (info.family, info.source, info.destination) == ("UNIX", "/run/a.sock", "/run/b.sock")
    assert info.client is None


def test_v2_tlvs_are_kept_and_checked():
    info, used = parse_proxy_header(V2_TLVS + b"rest")
    assert used == len(V2_TLVS)
    assert info.tlvs == ((0x01, b"smtp"), (0x04, b""), (0xE0, b"x" * 300))
    assert info.client == ("192.0.2.1", 56324)


@pytest.mark.parametrize("header", [V2_TCP4, V2_TCP6, V2_TLVS, V2_LOCAL, V2_UNIX])
def test_v2_every_split_needs_more(header):
    for n in range(len(header)):
        assert parse_proxy_header(header[:n]) == (None, 0), n
    assert parse_proxy_header(header)[1] == len(header)


@pytest.mark.parametrize("header, message", [
    (v2(version=0x1, body=inet()), "version 1 unsupported"),
    (v2(version=0x3, body=inet()), "version 3 unsupported"),
    (v2(command=0x2, body=inet()), "command 2 unknown"),
    (v2(fam=0x41, body=inet()), "family/transport 0x41 unknown"),
    (v2(fam=0x13, body=inet()), "family/transport 0x13 unknown"),
    (v2(body=inet()[:11]), "INET address block needs 12 octets, got 11"),
    (v2(fam=0x21, body=inet()), "INET6 address block needs 36 octets, got 12"),
    (v2(fam=0x31, body=b"x" * 215), "UNIX address block needs 216 octets, got 215"),
    (v2(body=inet() + b"\x01\x00"), "TLV truncated"),
    (v2(body=inet() + b"\x01\x00\x05abcd"), "TLV longer than the header"),
    (v2(body=inet() + tlv(1, b"ok") + b"\x02\x01\x00"), "TLV longer than the header"),
    (b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + inet(), "no PROXY header"),
])
def test_v2_invalid(header, message):
    with pytest.raises(ProxyProtocolError, match=message):
        parse_proxy_header(header)


@pytest.mark.parametrize("prefix", [b"\r\n\r\n\x00\r\nQUIX", b"\r\n\r\n\x00\r\nQUIT\n\x31",
                                    b"\r\n\r\n\x00\r\nQUIT\n\x21\x51", b"\r\r"])
def test_v2_invalid_prefix_fails_before_the_header_is_complete(prefix):
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(prefix)


def test_v2_largest_length():
    body = inet() + tlv(0xEE, b"z" * (65535 - 12 - 3))
    header = v2(body=body)
    assert len(header) == 16 + 65535
    assert parse_proxy_header(header[:-1]) == (None, 0)
    info, used = parse_proxy_header(header)
    assert used == len(header) and info.tlvs[0][1] == b"z" * 65520


# --- accepted versions ----------------------------------------------------------
def test_versions_restrict_what_is_accepted():
    assert parse_proxy_header(V1_TCP4, (1,))[1] == len(V1_TCP4)
    assert parse_proxy_header(V2_TCP4, (2,))[1] == len(V2_TCP4)
    with pytest.raises(ProxyProtocolError, match="no PROXY header"):
        parse_proxy_header(V2_TCP4, (1,))
    with pytest.raises(ProxyProtocolError, match="no PROXY header"):
        parse_proxy_header(V1_TCP4, (2,))
    with pytest.raises(ProxyProtocolError):
        parse_proxy_header(b"P", (2,))


# --- SmtpEdge behind a proxy (raw sockets) ------------------------------------------


class Seen(SmtpValidators):
    """Records what the session saw of the client, per connection."""

    log: list = []
    lock = threading.Lock()

    def handle_banner(self, reply, address):
        with self.lock:
            self.log.append((address, self.session.address, self.session.proxy_address))


@pytest.fixture
def seen():
    Seen.log = []
    return Seen


class Conn:
    """A client socket with a reply reader that keeps what it read ahead."""

    def __init__(self, port, source):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5,
                                             source_address=(source, 0))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def sendall(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One whole reply (multi-line ones included); b'' when the server closed first."""
        while True:
            pos = 0
            while (end := self.buf.find(b"\r\n", pos)) >= 0:
                if self.buf[pos + 3:pos + 4] == b" ":
                    reply, self.buf = self.buf[:end + 2], self.buf[end + 2:]
                    return reply
                pos = end + 2
            chunk = self.sock.recv(4096)
            if not chunk:
                return b""
            self.buf += chunk

    def closed_without_a_word(self) -> bool:
        try:
            return self.buf == b"" and self.sock.recv(4096) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connect(port, source="127.0.0.1") -> Conn:
    return Conn(port, source)


def transaction(sock, first: bytes = b"") -> None:
    """EHLO, MAIL, RCPT, DATA, QUIT; ``first`` goes in the same write as EHLO."""
    sock.sendall(first + b"EHLO client.example\r\n")
    assert sock.reply().startswith(b"220 ")
    assert sock.reply().startswith(b"250-")
    for line, code in ((b"MAIL FROM:<a@example.test>", b"250"),
                       (b"RCPT TO:<b@example.test>", b"250"), (b"DATA", b"354"),
                       (b"Subject: hi\r\n\r\nbody\r\n.", b"250"), (b"QUIT", b"221")):
        sock.sendall(line + b"\r\n")
        reply = sock.reply()
        assert reply.startswith(code), (line, reply)


@pytest.mark.parametrize("header, ip", [
    (V1_TCP4, "192.0.2.1"),
    (V1_TCP6, "2001:db8::1"),
    (V2_TCP4, "192.0.2.1"),
    (V2_TCP6, "2001:db8::1"),
    (V2_TLVS, "192.0.2.1"),
])
def test_edge_uses_the_header_address(run_edge, seen, header, ip):
    edge = run_edge(proxy_protocol="any", validator_class=Seen)
    with connect(edge.port) as sock:
        sock.sendall(header)
        transaction(sock)
    (env,) = edge.queue.envelopes
    assert env.client["ip"] == ip
    ((address, session_address, proxy),) = seen.log
    assert address == session_address == (ip, 56324 if "192" in ip else
                                          (65535 if header is V1_TCP6 else 1))
    assert proxy[0] == "127.0.0.1"


def test_edge_header_and_commands_in_one_write(run_edge):
    edge = run_edge(proxy_protocol=True)
    with connect(edge.port) as sock:
        transaction(sock, first=V2_TCP4)
    assert [e.client["ip"] for e in edge.queue.envelopes] == ["192.0.2.1"]


@pytest.mark.parametrize("header", [V1_TCP4, V2_TCP6])
def test_edge_header_in_pieces(run_edge, header):
    edge = run_edge(proxy_protocol="any")
    with connect(edge.port) as sock:
        for i in range(0, len(header), 7):
            sock.sendall(header[i:i + 7])
            time.sleep(0.01)
        transaction(sock)
    assert edge.queue.envelopes[0].client["ip"] in ("192.0.2.1", "2001:db8::1")


@pytest.mark.parametrize("header", [V2_LOCAL, b"PROXY UNKNOWN\r\n",
                                    v2(fam=0x00, body=b"x"), V2_UNIX])
def test_edge_local_and_unknown_keep_the_proxy_address(run_edge, seen, header):
    edge = run_edge(proxy_protocol="any", validator_class=Seen)
    with connect(edge.port, source="127.0.0.7") as sock:
        sock.sendall(header)
        transaction(sock)
    assert edge.queue.envelopes[0].client["ip"] == "127.0.0.7"
    ((address, _, proxy),) = seen.log
    assert address[0] == proxy[0] == "127.0.0.7"


@pytest.mark.parametrize("data", [
    b"EHLO client.example\r\n",                                # no header at all
    b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n",            # invalid v1
    b"PROXY UNKNOWN " + b"x" * 100,                            # v1 too long
    v2(command=0x2, body=inet()),                              # invalid v2
    v2(body=inet() + b"\x01\x00\x09abc"),                      # TLV overrun
])
def test_edge_invalid_header_closes_without_banner(run_edge, seen, data):
    edge = run_edge(proxy_protocol="any", validator_class=Seen)
    with connect(edge.port) as sock:
        sock.sendall(data)
        assert sock.closed_without_a_word()
    assert seen.log == [] and edge.queue.envelopes == []


@pytest.mark.parametrize("mode, header", [("v1", V2_TCP4), ("v2", V1_TCP4)])
def test_edge_other_version_than_configured_closes(run_edge, mode, header):
    edge = run_edge(proxy_protocol=mode)
    with connect(edge.port) as sock:
        sock.sendall(header)
        assert sock.closed_without_a_word()


@pytest.mark.parametrize("mode, header", [("v1", V1_TCP4), ("v2", V2_TCP4)])
def test_edge_configured_version(run_edge, mode, header):
    edge = run_edge(proxy_protocol=mode)
    with connect(edge.port) as sock:
        sock.sendall(header)
        transaction(sock)
    assert edge.queue.envelopes[0].client["ip"] == "192.0.2.1"


def test_edge_missing_header_times_out_without_banner(run_edge, seen):
    edge = run_edge(proxy_protocol="any", proxy_timeout=0.3, validator_class=Seen)
    for partial in (b"", V2_TCP4[:20], V1_TCP4[:10]):
        with connect(edge.port) as sock:
            sock.sendall(partial)
            start = time.monotonic()
            assert sock.closed_without_a_word()
            assert 0.2 < time.monotonic() - start < 3
    assert seen.log == []


def test_edge_untrusted_peer_is_direct_and_its_header_ignored(run_edge, seen):
    edge = run_edge(proxy_protocol="any", trusted_proxies=["127.0.0.5", "10.0.0.0/8"],
                    validator_class=Seen)
    with connect(edge.port, source="127.0.0.6") as sock:
        assert sock.reply().startswith(b"220 ")  # no header expected
        sock.sendall(V1_TCP4)
        assert sock.reply() == b"500 5.5.2 Syntax error, command unrecognized\r\n"
        sock.sendall(V2_TCP4 + b"\r\n")
        assert sock.reply().startswith(b"500 5.5.2 Syntax error, command unrecognized\r\n")
    with connect(edge.port, source="127.0.0.6") as sock:
        transaction(sock)
    assert edge.queue.envelopes[0].client["ip"] == "127.0.0.6"
    assert [entry[2] for entry in seen.log] == [None, None]
    # the trusted one must send a header
    with connect(edge.port, source="127.0.0.5") as sock:
        sock.sendall(V1_TCP4)
        transaction(sock)
    assert edge.queue.envelopes[1].client["ip"] == "192.0.2.1"
    with connect(edge.port, source="127.0.0.5") as sock:
        sock.sendall(b"EHLO x\r\n")
        assert sock.closed_without_a_word()


def test_edge_without_proxy_protocol_treats_a_header_as_a_bad_command(run_edge):
    edge = run_edge()
    with connect(edge.port) as sock:
        assert sock.reply().startswith(b"220 ")
        sock.sendall(V1_TCP4)
        assert sock.reply() == b"500 5.5.2 Syntax error, command unrecognized\r\n"


def test_edge_connection_limit_counts_the_header_address(run_edge):
    edge = run_edge(proxy_protocol="any", max_connections_per_ip=1)
    first = connect(edge.port)
    first.sendall(V1_TCP4)
    assert first.reply().startswith(b"220 ")
    with connect(edge.port) as second:  # same client behind the same proxy
        second.sendall(V2_TCP4)
        assert second.reply() == b"421 4.7.0 Too many connections, try again later\r\n"
        assert second.closed_without_a_word()
    with connect(edge.port) as third:  # another client behind the same proxy
        third.sendall(b"PROXY TCP4 192.0.2.2 198.51.100.2 1 25\r\n")
        assert third.reply().startswith(b"220 ")
    first.close()


def test_edge_stop_closes_connections_waiting_for_a_header(run_edge):
    edge = run_edge(proxy_protocol="any", proxy_timeout=60)
    with connect(edge.port) as sock:
        sock.sendall(V1_TCP4[:5])
        time.sleep(0.1)
        start = time.monotonic()
        edge.call(edge.edge.stop(), timeout=10)
        assert sock.closed_without_a_word()
        assert time.monotonic() - start < 5


def test_edge_options_are_checked(server_tls_context):
    with pytest.raises(ValueError, match="proxy_protocol 'v3'"):
        SmtpEdge(("127.0.0.1", 0), None, proxy_protocol="v3")
    with pytest.raises(ValueError, match="tls_immediately"):
        SmtpEdge(("127.0.0.1", 0), None, proxy_protocol="any", context=server_tls_context,
                 tls_immediately=True)
    with pytest.raises(ValueError):
        SmtpEdge(("127.0.0.1", 0), None, proxy_protocol="any", trusted_proxies=["nonsense"])
    edge = SmtpEdge(("127.0.0.1", 0), None, proxy_protocol="any")
    assert edge._is_trusted_proxy("127.0.0.1") and edge._is_trusted_proxy("::1")
    assert edge._is_trusted_proxy("::ffff:127.0.0.9")
    assert not edge._is_trusted_proxy("192.0.2.1") and not edge._is_trusted_proxy("x")
