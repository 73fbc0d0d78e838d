"""SmtpEdge against ``openssl s_client``: STARTTLS negotiated by OpenSSL, then SMTP by hand.

``-quiet`` implies ``-ign_eof``, so lines starting with Q or R (QUIT, RCPT)
are sent to the server rather than taken as s_client commands.
"""

from __future__ import annotations

import queue
import subprocess
import threading

import pytest
from rawsmtp import dot_stuff, flat, message

MSG = message("openssl s_client")


class SClient:
    """An ``openssl s_client`` process driven line by line over its stdin and stdout."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.lines: queue.Queue[bytes] = queue.Queue()
        self.seen: list[bytes] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(b"")

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def reply(self, timeout: float = 10.0) -> tuple[int, list[str]]:
        texts = []
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                pytest.fail(f"no reply from s_client within {timeout}s; seen {self.seen!r}")
            if not line:
                pytest.fail(f"s_client output ended; seen {self.seen!r}; stderr "
                            f"{self.proc.stderr.read()!r}")
            self.seen.append(line)
            assert line.endswith(b"\r\n"), line
            texts.append(line[4:-2].decode())
            if line[3:4] == b" ":
                return int(line[:3]), texts

    def cmd(self, line: str) -> tuple[int, list[str]]:
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def finish(self, timeout: float = 10.0) -> int:
        self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def s_client(tool):
    path = tool("openssl")
    started = []

    def start(port: int, *extra: str) -> SClient:
        client = SClient([path, "s_client", "-connect", f"127.0.0.1:{port}", "-quiet", *extra])
        started.append(client)
        return client

    yield start
    for client in started:
        client.kill()


def test_openssl_starttls_interactive(run_edge, s_client, server_tls_context):
    edge = run_edge(context=server_tls_context)
    client = s_client(edge.port, "-starttls", "smtp")
    code, lines = client.cmd("EHLO client.example.com")
    assert code == 250 and lines[0] == "Hello client.example.com", lines
    assert "STARTTLS" not in lines, "STARTTLS offered again inside TLS"
    assert client.cmd("MAIL FROM:<a@example.com>")[0] == 250
    assert client.cmd("RCPT TO:<b@example.com>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(dot_stuff(MSG))
    code, lines = client.reply()
    assert (code, lines[0]) == (250, "2.6.0 Message queued as q000001")
    assert client.cmd("QUIT")[0] == 221
    assert client.finish() == 0
    [env] = edge.queue.envelopes
    assert (env.sender, env.recipients) == ("a@example.com", ["b@example.com"])
    assert flat(env) == MSG
    assert env.client["protocol"] == "ESMTPS"


def test_openssl_starttls_whole_session_on_stdin(run_edge, tool, server_tls_context):
    """The TESTING.md recipe: the whole session written to stdin at once."""
    edge = run_edge(context=server_tls_context)
    script = (b"EHLO client.example.com\r\nMAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n"
              b"DATA\r\n" + dot_stuff(MSG) + b"QUIT\r\n")
    proc = subprocess.run(
        [tool("openssl"), "s_client", "-connect", f"127.0.0.1:{edge.port}", "-starttls", "smtp",
         "-quiet"],
        input=script, capture_output=True, timeout=30)
    out = proc.stdout.decode(errors="replace")
    assert "250 2.6.0 Message queued as" in out, (out, proc.stderr)
    assert "221 2.0.0 Bye" in out
    [env] = edge.queue.envelopes
    assert flat(env) == MSG
    assert env.client["protocol"] == "ESMTPS"


def test_openssl_smtps(run_edge, s_client, server_tls_context):
    edge = run_edge(context=server_tls_context, tls_immediately=True, hostname="mx.example.com")
    client = s_client(edge.port)
    code, lines = client.reply()
    assert (code, lines) == (220, ["mx.example.com ESMTP Mail Gateway"])
    assert client.cmd("EHLO client.example.com")[0] == 250
    assert client.cmd("MAIL FROM:<a@example.com>")[0] == 250
    assert client.cmd("RCPT TO:<b@example.com>")[0] == 250
    assert client.cmd("DATA")[0] == 354
    client.send(dot_stuff(MSG))
    assert client.reply()[0] == 250
    assert client.cmd("QUIT")[0] == 221
    assert client.finish() == 0
    [env] = edge.queue.envelopes
    assert flat(env) == MSG
