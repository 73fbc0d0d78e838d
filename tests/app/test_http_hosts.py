"""The HTTP edge and relay in the daemon: their config, and two `slimta serve` hosts
exchanging mail over HTTP (A: SMTP edge -> sqlite queue -> HttpRelay; B: HttpEdge ->
sqlite queue -> Maildir), with swaks as the client of A."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from test_serve import CLI, ENV, connect, free_port, run

from conftest import require_tool
from slimta.app.build import build
from slimta.app.config import (
    MASK,
    ConfigError,
    HttpEdgeConfig,
    HttpRelayConfig,
    Listener,
    parse_config,
)
from slimta.app.yamlload import load_yaml

HTTP = """\
edge:
  web:
    type: http
    queue: q
    listener: {interface: 127.0.0.1, port: 8025}
    uri: '^/mail$'
    hostname: mx.example.com
    max_size: 1000000
    auth: {token: s3cret}
queue:
  q: {type: memory, relay: next}
relay:
  next:
    type: http
    url: 'http://127.0.0.1:8026/mail'
    ehlo_as: relay.example.com
    timeout: 30
    idle_timeout: 5
    concurrent_connections: 4
    token: t0ken
"""


def parse(tmp_path: Path, text: str):
    path = tmp_path / "slimta.yaml"
    path.write_text(text)
    return parse_config(load_yaml(path))


def problems(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(tmp_path, text)
    return str(info.value)


# --- config ---------------------------------------------------------------------------

def test_http_edge_and_relay_config(tmp_path):
    config = parse(tmp_path, HTTP)
    edge = config.edge["web"]
    assert isinstance(edge, HttpEdgeConfig)
    assert edge.listener == [Listener(interface="127.0.0.1", port=8025)]
    assert edge.uri == "^/mail$" and edge.max_size == 1000000 and edge.auth.token == "s3cret"
    relay = config.relay["next"]
    assert isinstance(relay, HttpRelayConfig)
    assert relay.url == "http://127.0.0.1:8026/mail" and relay.pool_size == 4
    assert (relay.timeout, relay.idle_timeout, relay.ehlo_as) == (30, 5, "relay.example.com")
    masked = config.masked()
    assert masked["edge"]["web"]["auth"]["token"] == MASK
    assert masked["relay"]["next"]["token"] == MASK


def test_http_defaults(tmp_path):
    config = parse(tmp_path, "edge: {w: {type: http, queue: q}}\nqueue: {q: {type: memory, "
                   "relay: r}}\nrelay: {r: {type: http, url: 'https://mx.test/in'}}\n")
    edge, relay = config.edge["w"], config.relay["r"]
    assert edge.listener == [Listener(interface="127.0.0.1", port=8025)]
    assert (edge.uri, edge.auth, edge.max_size) == (None, None, 10 * 1024 * 1024)
    assert (relay.timeout, relay.idle_timeout, relay.pool_size) == (60, 10, None)


@pytest.mark.parametrize(("change", "message"), [
    (("    hostname: mx.example.com", "    hostnme: mx.example.com"),
     "slimta.yaml:7: edge.web.hostnme: unknown key (did you mean 'hostname'?)"),
    (("    auth: {token: s3cret}", "    auth: {token: s3cret, colour: red}"),
     "slimta.yaml:9: edge.web.auth.colour: unknown key"),
    (("    auth: {token: s3cret}", "    auth: {token: s3cret, users: {a: {password: b}}}"),
     "edge.web.auth: give exactly one of token, users and lookup_credentials"),
    (("    auth: {token: s3cret}", "    auth: {users: {a: {pasword: b}}}"),
     "edge.web.auth.users.a.pasword: unknown key"),
    (("    uri: '^/mail$'", "    uri: '(unclosed'"),
     "slimta.yaml:6: edge.web.uri: invalid regular expression"),
    (("    max_size: 1000000", "    max_size: -1"), "edge.web.max_size: expected a value >= 0"),
    (("    idle_timeout: 5", "    idle_timeout: 5\n    colour: red"),
     "slimta.yaml:19: relay.next.colour: unknown key"),
    (("    url: 'http://127.0.0.1:8026/mail'", "    url: 'ftp://x/'"),
     "relay.next.url: expected an http:// or https:// URL"),
    (("    url: 'http://127.0.0.1:8026/mail'\n", ""), "relay.next.url: required key missing"),
    (("    token: t0ken", "    token: t0ken\n    credentials: {username: u, password: p}"),
     "relay.next.credentials: give token or credentials, not both"),
    (("    type: http\n    url", "    type: htttp\n    url"), "unknown relay type 'htttp'"),
], ids=["edge-key", "auth-key", "auth-two", "user-key", "uri", "max_size", "relay-key", "url",
        "no-url", "relay-auth", "relay-type"])
def test_http_config_errors(tmp_path, change, message):
    assert change[0] in HTTP
    assert message in problems(tmp_path, HTTP.replace(*change))


def test_http_users_and_credentials_are_masked(tmp_path):
    config = parse(tmp_path, HTTP.replace("auth: {token: s3cret}",
                                          "auth: {users: {alice: {password: pw1}}}")
                   .replace("token: t0ken", "credentials: {username: me, password: pw2}"))
    masked = config.masked()
    assert masked["edge"]["web"]["auth"]["users"]["alice"]["password"] == MASK
    assert masked["relay"]["next"]["credentials"]["password"] == MASK


async def test_build_http_edge_and_relay(tmp_path):
    from slimta.edge.http import HttpEdge
    from slimta.relay.http import HttpRelay

    config = parse(tmp_path, HTTP)
    port = free_port()
    config.edge["web"].listener = [Listener(interface="127.0.0.1", port=port)]
    app = build(config)
    [edge] = app.edges["web"]
    relay = app.relays["next"]
    assert isinstance(edge, HttpEdge) and isinstance(relay, HttpRelay)
    assert edge.hostname == "mx.example.com" and edge.max_size == 1000000
    assert edge.uri_pattern.pattern == "^/mail$"
    assert relay.headers == {"Authorization": "Bearer t0ken"}
    assert (relay.pool_size, relay.timeout, relay.idle_timeout) == (4, 30, 5)
    app.start()
    try:
        await app.started()
        async with aiohttp.ClientSession() as client, \
                client.post(f"http://127.0.0.1:{port}/mail", data=b"x") as resp:
            assert resp.status == 401
    finally:
        await app.stop()


def test_build_http_auth_forms(tmp_path):
    config = parse(tmp_path, HTTP.replace("auth: {token: s3cret}", "auth: {users: {a: "
                                          "{password: '{PLAIN}b'}}}")
                   .replace("token: t0ken", "credentials: {username: me, password: pw}"))
    app = build(config)
    assert app.edges["web"][0]._basic.spec == {"a": "{PLAIN}b"}
    assert app.relays["next"].headers == {"Authorization": "Basic bWU6cHc="}
    config = parse(tmp_path, HTTP.replace("auth: {token: s3cret}",
                                          "auth: {lookup_credentials: users}")
                   + "lookup:\n  users: {type: config, key_template: '{username}', "
                     "map: {a: {password: b}}}\n")
    assert build(config).edges["web"][0]._basic._lookup is not None
    with pytest.raises(ConfigError) as info:  # refused with its line when the file is read
        parse(tmp_path, HTTP.replace("auth: {token: s3cret}", "auth: {lookup_credentials: nope}"))
    assert "slimta.yaml:9: edge.web.auth.lookup_credentials: no lookup named 'nope'" \
        in str(info.value)


def test_slimta_check_http_config(tmp_path):
    (tmp_path / "slimta.yaml").write_text(HTTP)
    out = run("check", "-c", str(tmp_path / "slimta.yaml"))
    assert out.returncode == 0, out.stderr
    assert "s3cret" not in out.stdout and "t0ken" not in out.stdout
    assert "type: http" in out.stdout


# --- two hosts --------------------------------------------------------------------------

HOST_A = """
process:
  slimta: {{data_dir: data}}
edge:
  in: {{type: smtp, queue: out, listener: '127.0.0.1:{smtp}'}}
queue:
  out:
    type: sqlite
    relay: b
    retry: {{maximum: 5, delay: '1'}}
    policies: [{{type: add_received_header}}]
relay:
  b: {{type: http, url: '{url}', token: tok123, ehlo_as: a.example.test}}
"""

HOST_B = """
process:
  slimta: {{data_dir: data}}
edge:
  web:
    type: http
    queue: in
    listener: '127.0.0.1:{http}'
    uri: '^/mail$'
    hostname: b.example.test
    auth: {{token: tok123}}
queue:
  in: {{type: sqlite, relay: md, policies: [{{type: add_received_header}}]}}
relay:
  md: {{type: maildir, path: 'mail', fsync: false}}
"""


def serve(directory: Path, text: str) -> subprocess.Popen:
    directory.mkdir(exist_ok=True)
    (directory / "slimta.yaml").write_text(text)
    err = open(directory / "stderr.log", "wb")  # noqa: SIM115 - closed by the process's end
    return subprocess.Popen([*CLI, "serve", "-c", str(directory / "slimta.yaml")],
                            stdout=subprocess.DEVNULL, stderr=err, env=ENV, cwd=directory)


def wait_listening(port: int, proc: subprocess.Popen) -> None:
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return
        except ConnectionRefusedError:
            assert proc.poll() is None, proc.args
            time.sleep(0.05)
    raise AssertionError("the server did not start")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    finally:
        proc.kill()


def maildir(directory: Path, count: int, timeout: float = 60) -> list[bytes]:
    new = directory / "data/mail/new"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if new.is_dir() and len(os.listdir(new)) >= count:
            break
        time.sleep(0.1)
    return [(new / f).read_bytes() for f in sorted(os.listdir(new))] if new.is_dir() else []


def swaks(port: int, subject: str) -> None:
    out = subprocess.run(
        [require_tool("swaks"), "--server", f"127.0.0.1:{port}", "--timeout", "20",
         "--from", "alice@a.example.test", "--to", "bob@b.example.test",
         "--header", f"Subject: {subject}", "--body", "over HTTP"],
        capture_output=True, timeout=60)
    assert out.returncode == 0, (out.stdout + out.stderr).decode(errors="replace")


class Gate:
    """A small HTTP server in a thread before B: answers the first POST with 503 (451
    4.3.0), then passes requests on to B and B's answer back."""

    def __init__(self, target: str):
        self.target = target
        self.statuses: list[int] = []
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        if not self.statuses:
            self.statuses.append(503)
            return web.Response(status=503, text="busy\n", headers={
                "X-Smtp-Reply": '451; message="4.3.0 Try again in a moment"'})
        headers = [(k, v) for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length")]
        from multidict import CIMultiDict
        async with aiohttp.ClientSession() as client, \
                client.post(self.target, data=body, headers=CIMultiDict(headers)) as resp:
            self.statuses.append(resp.status)
            return web.Response(status=resp.status, body=await resp.read(), headers={
                k: v for k, v in resp.headers.items() if k.lower() == "x-smtp-reply"})

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/mail", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        self.loop.run_until_complete(site.start())
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def test_host_to_host_over_http(tmp_path):
    smtp, http = free_port(), free_port()
    b = serve(tmp_path / "b", HOST_B.format(http=http))
    a = serve(tmp_path / "a", HOST_A.format(smtp=smtp, url=f"http://127.0.0.1:{http}/mail"))
    try:
        wait_listening(http, b)
        connect(smtp, a).quit()
        swaks(smtp, "host to host")
        [message] = maildir(tmp_path / "b", 1)
        assert b"Subject: host to host" in message and b"over HTTP" in message
        # B's Received names A's X-Ehlo and HTTP; A's is below it
        received = [line for line in message.split(b"\r\n") if line.startswith(b"Received:")]
        assert len(received) == 2, message
        assert b"a.example.test" in message.split(b"Received:")[1]
        assert b"with HTTP" in message.split(b"Received:")[1]
        assert b"Return-Path: <alice@a.example.test>" in message
        b.send_signal(signal.SIGHUP)  # B reloads: its HTTP edge hands over its socket
        time.sleep(0.5)
        swaks(smtp, "after reload")
        assert b"Subject: after reload" in maildir(tmp_path / "b", 2)[1] + \
            maildir(tmp_path / "b", 2)[0]
        assert b.poll() is None
    finally:
        stop(a)
        stop(b)
    for name in ("a", "b"):
        log = (tmp_path / name / "stderr.log").read_text()
        assert "Traceback" not in log, log


def test_host_b_defers_with_503_and_a_retries(tmp_path):
    smtp, http = free_port(), free_port()
    b = serve(tmp_path / "b", HOST_B.format(http=http))
    try:
        wait_listening(http, b)
        with Gate(f"http://127.0.0.1:{http}/mail") as gate:
            a = serve(tmp_path / "a", HOST_A.format(
                smtp=smtp, url=f"http://127.0.0.1:{gate.port}/mail"))
            try:
                connect(smtp, a).quit()
                started = time.monotonic()
                swaks(smtp, "deferred once")
                [message] = maildir(tmp_path / "b", 1)
                assert b"Subject: deferred once" in message
                assert gate.statuses == [503, 200]
                assert time.monotonic() - started >= 0.9  # the retry waited its delay
            finally:
                stop(a)
        log = (tmp_path / "a" / "stderr.log").read_text()
        assert "4.3.0 Try again in a moment" in log, log
    finally:
        stop(b)
