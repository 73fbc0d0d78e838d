"""Interop: a real HAProxy in front of SmtpEdge, sending PROXY v1 and v2 headers.

HAProxy (Debian ``haproxy``) runs in the foreground (``-db``) with a
``mode tcp`` frontend on 127.0.0.1 or ::1 and one server line with
``send-proxy`` or ``send-proxy-v2``. smtplib connects to HAProxy from a
chosen source address (127.0.0.5), so the edge's TCP peer (HAProxy,
127.0.0.1) and the client address the header carries differ.
"""

from __future__ import annotations

import contextlib
import logging
import smtplib
import socket
import subprocess
import threading
import time

import pytest

from conftest import require_tool
from daemons import stop_process
from slimta.edge.smtp import SmtpValidators

CONFIG = """\
global
    maxconn 100
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend smtp
    bind {bind}:{port}
    default_backend edge
backend edge
{backend_options}
    server s 127.0.0.1:{edge_port} {server_options}
"""


def _free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class HAProxy:
    """``haproxy -db -f cfg`` in the foreground; stopped by its pid."""

    def __init__(self, tmp_path, edge_port, server_options, bind="127.0.0.1",
                 backend_options=""):
        self.host = bind
        self.port = _free_port(bind)
        cfg = tmp_path / "haproxy.cfg"
        cfg.write_text(CONFIG.format(bind=bind if ":" not in bind else f"[{bind}]",
                                     port=self.port, edge_port=edge_port,
                                     server_options=server_options,
                                     backend_options=backend_options))
        self.log = tmp_path / "haproxy.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen([require_tool("haproxy"), "-db", "-f", str(cfg)],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        deadline = time.monotonic() + 10
        while True:
            # from an address of its own, so tests can tell this probe apart
            with socket.socket(family) as s:
                s.bind(("::1" if ":" in bind else "127.0.0.9", 0))
                if s.connect_ex((bind, self.port)) == 0:
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"haproxy did not start: {self.log.read_text()}")
            time.sleep(0.05)

    def stop(self):
        stop_process(self.proc)
        self._log.close()


@pytest.fixture
def haproxy(tmp_path):
    started = []

    def start(edge_port, server_options, **kwargs):
        proxy = HAProxy(tmp_path, edge_port, server_options, **kwargs)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


class Seen(SmtpValidators):
    """Records (client address, proxy address) for each greeted session."""

    log: list = []
    lock = threading.Lock()

    def handle_banner(self, reply, address):
        with self.lock:
            self.log.append((address[0], (self.session.proxy_address or ("",))[0]))


@pytest.fixture
def seen():
    Seen.log = []
    return Seen


def send_one(host, port, source):
    with smtplib.SMTP(host, port, timeout=10, source_address=(source, 0)) as client:
        code, _ = client.ehlo("client.example")
        assert code == 250
        refused = client.sendmail("a@example.test", ["b@example.test"],
                                  b"Subject: via haproxy\r\n\r\nhello\r\n")
        assert refused == {}


@pytest.mark.parametrize("server_options, mode", [
    ("send-proxy", "v1"), ("send-proxy-v2", "v2"), ("send-proxy", "any"),
    ("send-proxy-v2", "any"),
])
def test_haproxy_header_gives_the_client_address(run_edge, haproxy, seen, server_options, mode):
    edge = run_edge(proxy_protocol=mode, validator_class=Seen)
    proxy = haproxy(edge.port, server_options)
    send_one("127.0.0.1", proxy.port, "127.0.0.5")
    send_one("127.0.0.1", proxy.port, "127.0.0.6")
    assert [e.client["ip"] for e in edge.queue.envelopes] == ["127.0.0.5", "127.0.0.6"]
    # the TCP peer of the edge was HAProxy on 127.0.0.1, not the client
    assert ("127.0.0.5", "127.0.0.1") in seen.log
    assert ("127.0.0.6", "127.0.0.1") in seen.log


@pytest.mark.parametrize("server_options", ["send-proxy", "send-proxy-v2"])
def test_haproxy_ipv6_client(run_edge, haproxy, server_options):
    edge = run_edge(proxy_protocol="any")
    proxy = haproxy(edge.port, server_options, bind="::1")
    send_one("::1", proxy.port, "::1")
    assert [e.client["ip"] for e in edge.queue.envelopes] == ["::1"]


def test_haproxy_without_proxy_protocol_on_the_edge_sees_haproxy(run_edge, haproxy):
    # the control case: no header sent, none expected, the client is HAProxy
    edge = run_edge()
    proxy = haproxy(edge.port, "")
    send_one("127.0.0.1", proxy.port, "127.0.0.5")
    assert [e.client["ip"] for e in edge.queue.envelopes] == ["127.0.0.1"]


def test_haproxy_header_from_untrusted_proxy_is_not_honoured(run_edge, haproxy):
    edge = run_edge(proxy_protocol="any", trusted_proxies=["192.0.2.0/24"])
    proxy = haproxy(edge.port, "send-proxy")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10,
                                  source_address=("127.0.0.5", 0)) as sock:
        # HAProxy's header reaches the edge as an unknown command
        data = b""
        while data.count(b"\r\n") < 2:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        banner, answer, _ = data.split(b"\r\n")
        assert banner.startswith(b"220 ")
        assert answer == b"500 5.5.2 Syntax error, command unrecognized"
    assert edge.queue.envelopes == []


def test_haproxy_to_an_edge_expecting_a_header_that_never_comes(run_edge, haproxy):
    edge = run_edge(proxy_protocol="any", proxy_timeout=0.5)
    proxy = haproxy(edge.port, "")  # HAProxy configured without send-proxy
    client = smtplib.SMTP(timeout=10, source_address=("127.0.0.5", 0))
    start = time.monotonic()
    with pytest.raises(smtplib.SMTPServerDisconnected), contextlib.closing(client):
        client.connect("127.0.0.1", proxy.port)  # reads the banner, which never comes
    assert 0.4 < time.monotonic() - start < 5
    assert edge.queue.envelopes == []


def test_haproxy_health_checks_use_local(run_edge, haproxy, seen, caplog):
    caplog.set_level(logging.DEBUG, logger="slimta.edge.smtp")
    edge = run_edge(proxy_protocol="v2", validator_class=Seen)
    proxy = haproxy(edge.port, "send-proxy-v2 check check-send-proxy inter 100ms",
                    backend_options="    option smtpchk EHLO haproxy.test")
    deadline = time.monotonic() + 5
    while not seen.log and time.monotonic() < deadline:
        time.sleep(0.05)
    # a health check: the client address is HAProxy's own
    assert ("127.0.0.1", "127.0.0.1") in seen.log
    assert "PROXY LOCAL from 127.0.0.1: client None" in caplog.text
    send_one("127.0.0.1", proxy.port, "127.0.0.5")
    assert [e.client["ip"] for e in edge.queue.envelopes] == ["127.0.0.5"]
