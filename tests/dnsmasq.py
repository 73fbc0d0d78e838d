"""DNS servers for tests: a real ``dnsmasq`` with given records, and a scripted one.

Tests use the ``dnsmasq`` fixture (tests/conftest.py)::

    def test_mx(dnsmasq):
        server = dnsmasq([
            "--mx-host=example.test,mx1.example.test,10",
            "--host-record=mx1.example.test,127.0.0.2",
        ])
        resolver = server.resolver()          # a slimta.util.dns.Resolver on it
        server.install()                      # or: make it the process-wide resolver

Each record is a dnsmasq option (``--mx-host``, ``--host-record``,
``--txt-record``, ``--ptr-record``, ``--cname``, ``--local-ttl=300``, ...; see
``man dnsmasq``). The server always runs with ``--no-daemon
--listen-address=127.0.0.1 --bind-interfaces --no-resolv --no-hosts
--local=/test/`` (plus ``--local`` for the reverse zones ``in-addr.arpa`` and
``ip6.arpa``) on a free port (UDP and TCP), so names under ``.test`` and
reverse names that have no record answer NXDOMAIN and nothing is forwarded
anywhere (other names are REFUSED). ``--host-record`` also makes the PTR. Records
have TTL 0 (never cached) unless ``--local-ttl=N`` is given. A missing
dnsmasq binary fails the test; it never skips (CI installs dnsmasq-base).

:class:`ScriptedDnsServer` answers from a Python function, for replies
dnsmasq cannot give (SERVFAIL, an SOA for negative caching, no reply at all).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from daemons import stop_process
from slimta.util import dns as slimta_dns

BASE_OPTIONS = (
    "--no-daemon",
    "--listen-address=127.0.0.1",
    "--bind-interfaces",
    "--no-resolv",
    "--no-hosts",
    "--local=/test/",
    "--local=/in-addr.arpa/",
    "--local=/ip6.arpa/",
    "--conf-file=/dev/null",
    "--pid-file=",
)


def dnsmasq_binary() -> str:
    """The dnsmasq program; fails the test when it is not installed."""
    path = shutil.which("dnsmasq")
    if path is None and os.path.exists("/usr/sbin/dnsmasq"):
        path = "/usr/sbin/dnsmasq"
    if path is None:
        pytest.fail("required program 'dnsmasq' is not installed (Debian: dnsmasq-base)")
    return path


def free_port() -> int:
    """A port free on 127.0.0.1 for both UDP and TCP (at the time of asking)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port


def _answers(port: int) -> bool:
    query = dns.message.make_query("ready.test", "A")
    try:
        dns.query.udp(query, "127.0.0.1", port=port, timeout=0.05)
    except (dns.exception.Timeout, OSError):
        return False
    return True


class DnsServer:
    """A name server on ``127.0.0.1:port``: point resolvers at :attr:`nameserver`."""

    host = "127.0.0.1"

    def __init__(
        self,
        port: int,
        process: subprocess.Popen | None = None,
        on_install: Callable[[slimta_dns.Resolver | None], None] | None = None,
    ):
        self.port = port
        self.process = process
        self._on_install = on_install

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:PORT"``, as ``SLIMTA_NAMESERVERS`` and ``Resolver`` take it."""
        return f"{self.host}:{self.port}"

    def resolver(self, **kwargs) -> slimta_dns.Resolver:
        """A new :class:`slimta.util.dns.Resolver` on this server (short timeouts by default)."""
        kwargs.setdefault("timeout", 1.0)
        kwargs.setdefault("lifetime", 2.0)
        return slimta_dns.Resolver([self.nameserver], **kwargs)

    def install(self, **kwargs) -> slimta_dns.Resolver:
        """Make :meth:`resolver` the process-wide resolver (the fixture puts the old one back)."""
        resolver = self.resolver(**kwargs)
        previous = slimta_dns.set_resolver(resolver)
        if self._on_install is not None:
            self._on_install(previous)
        return resolver

    def stop(self) -> None:
        """Stop the server (idempotent)."""
        if self.process is not None:
            stop_process(self.process)


def start_dnsmasq(
    records: Sequence[str],
    *,
    attempts: int = 5,
    on_install: Callable[[slimta_dns.Resolver | None], None] | None = None,
) -> DnsServer:
    """Start dnsmasq with ``records`` (dnsmasq options) and wait until it answers."""
    binary = dnsmasq_binary()
    output = ""
    for _ in range(attempts):
        port = free_port()
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(
                [binary, *BASE_OPTIONS, f"--port={port}", *records],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + 10
            while process.poll() is None and time.monotonic() < deadline:
                if _answers(port):
                    return DnsServer(port, process, on_install)
                time.sleep(0.02)
            DnsServer(port, process).stop()
            log.seek(0)
            output = log.read().decode(errors="replace")
        if "in use" not in output:  # only a lost race for the port is worth another try
            break
    pytest.fail(f"dnsmasq did not start ({' '.join(records)}):\n{output}")


class DnsmasqFactory:
    """``factory(records)`` starts a dnsmasq; ``close()`` stops them all.

    :meth:`DnsServer.install` on a server it started makes that server the
    process-wide resolver (``slimta.util.dns.set_resolver``) until ``close()``,
    which puts the previous one back.
    """

    def __init__(self):
        self.servers: list[DnsServer] = []
        self._previous: list[slimta_dns.Resolver | None] = []

    def __call__(self, records: Sequence[str] = ()) -> DnsServer:
        server = start_dnsmasq(records, on_install=self._previous.append)
        self.servers.append(server)
        return server

    def close(self) -> None:
        for server in self.servers:
            server.stop()
        if self._previous:
            slimta_dns.set_resolver(self._previous[0])
            self._previous.clear()

    def __enter__(self) -> DnsmasqFactory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ScriptedDnsServer:
    """A UDP name server on 127.0.0.1 whose replies come from ``handler``.

    ``handler(query)`` gets the parsed :class:`dns.message.Message` and
    returns the reply message, or ``None`` to send nothing (a server that
    times out). :meth:`reply` builds a reply with a given rcode. Use as a
    context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, handler: Callable[[dns.message.Message], dns.message.Message | None]):
        self.handler = handler
        self.queries: list[dns.message.Message] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port = self._sock.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def nameserver(self) -> str:
        """``"127.0.0.1:PORT"``."""
        return f"127.0.0.1:{self.port}"

    @staticmethod
    def reply(query: dns.message.Message, rcode: int = dns.rcode.NOERROR) -> dns.message.Message:
        """An empty reply to ``query`` with ``rcode``; add records to its sections."""
        response = dns.message.make_response(query)
        response.set_rcode(rcode)
        return response

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                wire, peer = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            with contextlib.suppress(Exception):
                query = dns.message.from_wire(wire)
                self.queries.append(query)
                response = self.handler(query)
                if response is not None:
                    self._sock.sendto(response.to_wire(), peer)

    def start(self) -> ScriptedDnsServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self._sock.close()

    def __enter__(self) -> ScriptedDnsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def shared_resolver(resolver: slimta_dns.Resolver) -> Iterator[slimta_dns.Resolver]:
    """Make ``resolver`` the process-wide resolver for the ``with`` block, then put the
    previous one back."""
    previous = slimta_dns.set_resolver(resolver)
    try:
        yield resolver
    finally:
        slimta_dns.set_resolver(previous)


@contextlib.contextmanager
def silent_udp_port() -> Iterator[int]:
    """A UDP port on 127.0.0.1 that receives queries and never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def zone(
    records: dict[tuple[str, str], list[str]],
    *,
    ttl: int = 300,
    rcodes: dict[str, int] | None = None,
    soa_minimum: int | None = None,
) -> Callable[[dns.message.Message], dns.message.Message | None]:
    """A :class:`ScriptedDnsServer` handler serving a small zone.

    ``records`` maps ``(name, type)`` to rdata texts (``{("a.test", "MX"):
    ["10 mx.a.test."]}``); ``rcodes`` forces an rcode per name (e.g.
    ``dns.rcode.SERVFAIL``); other names answer NXDOMAIN, known names without
    the type an empty NOERROR. With ``soa_minimum``, negative replies carry
    an SOA (TTL ``ttl``, minimum ``soa_minimum``), which allows negative caching.
    """
    known = {name.rstrip(".").lower() for name, _ in records}

    def handle(query: dns.message.Message) -> dns.message.Message:
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        if rcodes and name in rcodes:
            return ScriptedDnsServer.reply(query, rcodes[name])
        texts = records.get((name, rdtype))
        if texts:
            response = ScriptedDnsServer.reply(query)
            rrset = dns.rrset.from_text_list(question.name, ttl, "IN", rdtype, texts)
            response.answer.append(rrset)
            return response
        rcode = dns.rcode.NOERROR if name in known else dns.rcode.NXDOMAIN
        response = ScriptedDnsServer.reply(query, rcode)
        if soa_minimum is not None:
            soa = f"ns.test. hostmaster.test. 1 3600 600 86400 {soa_minimum}"
            response.authority.append(dns.rrset.from_text("test.", ttl, "IN", "SOA", soa))
        return response

    return handle
