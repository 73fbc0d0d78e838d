"""SmtpEdge under Postfix's smtp-source: many parallel sessions, every message queued, byte-exact.

smtp-source builds each message itself (From, To, Date, Message-Id, then
``-l`` octets of numbered 80-column lines). To know the exact bytes it sends,
each test first runs the same smtp-source options once against Postfix's
smtp-sink with ``-d`` (one dump file per transaction) and takes the reference
from that dump: the sender and recipients (X-Mail-Args, X-Rcpt-Args), the HELO
name, and the message. Every message SmtpEdge queued must equal the reference
except for the Date and Message-Id values, which must be well-formed and (the
Message-Id) different in every message.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
from rawsmtp import flat, wait_until

from daemons import free_port

SENDER = "a@example.com"
RCPT = "b@example.com"
HELO = "client.example.com"

_DATE = re.compile(rb"^Date: \w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}( \([^)]*\))?$")
_MSGID = re.compile(rb"^Message-Id: <([0-9a-f]+\.[0-9a-f]+\.[0-9a-f]+)@client\.example\.com>$")


def _strip_angle(arg: bytes) -> str:
    value = arg.decode().split()[0]
    return value[1:-1] if value.startswith("<") and value.endswith(">") else value


class Reference:
    """One transaction as smtp-sink dumped it."""

    def __init__(self, dump: bytes):
        lines = dump.split(b"\n")
        assert lines[-2:] == [b"", b""], "a dump ends with an empty line"
        self.sender = None
        self.recipients = []
        self.helo = None
        i = 0
        while not lines[i].startswith(b"Received: "):
            name, _, value = lines[i].partition(b": ")
            if name == b"X-Mail-Args":
                self.sender = _strip_angle(value)
            elif name == b"X-Rcpt-Args":
                self.recipients.append(_strip_angle(value))
            elif name == b"X-Helo-Args":
                self.helo = value.decode()
            i += 1
        i += 1
        while lines[i].startswith(b"\t"):  # the rest of smtp-sink's Received header
            i += 1
        # smtp-sink writes lines with LF; smtp-source sent them with CRLF
        self.message = b"\r\n".join(lines[i:-2]) + b"\r\n"


def normalize(message: bytes) -> tuple[bytes, bytes]:
    """The message with its Date and Message-Id values replaced, and the Message-Id."""
    head, sep, body = message.partition(b"\r\n\r\n")
    assert sep, f"no end of header in {message[:200]!r}"
    out, msgid = [], None
    for line in head.split(b"\r\n"):
        if line.startswith(b"Date: "):
            assert _DATE.match(line), line
            line = b"Date: <date>"
        elif line.startswith(b"Message-Id: "):
            m = _MSGID.match(line)
            assert m, line
            msgid = m.group(1)
            line = b"Message-Id: <id>"
        out.append(line)
    assert msgid is not None, head
    return b"\r\n".join(out) + sep + body, msgid


def _source_args(tool, port: int, *options: str) -> list[str]:
    return [tool("smtp-source"), "-M", HELO, "-f", SENDER, "-t", RCPT, *options,
            f"127.0.0.1:{port}"]


@pytest.fixture
def reference(tool):
    """``reference(*options)``: what ``smtp-source -m 1 <options>`` sends, per smtp-sink -d."""
    sink = tool("smtp-sink")
    cache = {}
    tmpdirs = []

    def capture(*options: str) -> Reference:
        if options in cache:
            return cache[options]
        d = tempfile.mkdtemp(prefix="slimta-sink-")
        tmpdirs.append(d)
        os.chmod(d, 0o777)  # smtp-sink writes as the -u user
        port = free_port()
        as_root = ["-u", "nobody"] if os.geteuid() == 0 else []
        proc = subprocess.Popen([sink, *as_root, "-d", f"{d}/msg.", f"127.0.0.1:{port}", "10"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            def listening():
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    return True
                except OSError:
                    return False

            assert wait_until(listening, timeout=5), "smtp-sink did not start"
            done = subprocess.run(_source_args(tool, port, "-s", "1", "-m", "1", *options),
                                  capture_output=True, timeout=30)
            assert done.returncode == 0, done
            assert wait_until(lambda: len(os.listdir(d)) == 1, timeout=5), os.listdir(d)
            path = pathlib.Path(d, os.listdir(d)[0])
            assert wait_until(lambda: path.read_bytes().endswith(b"\n\n"), timeout=5)
            ref = Reference(path.read_bytes())
        finally:
            proc.kill()
            proc.wait(5)
        cache[options] = ref
        return ref

    yield capture
    for d in tmpdirs:
        shutil.rmtree(d, ignore_errors=True)


def run_source(tool, edge, *options: str, timeout: float = 60):
    start = time.monotonic()
    proc = subprocess.run(_source_args(tool, edge.port, *options), capture_output=True,
                          timeout=timeout)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    return elapsed


def check_all(edge, ref: Reference, count: int) -> None:
    envelopes = list(edge.queue.envelopes)
    assert len(envelopes) == count
    expected, _ = normalize(ref.message)
    ids = set()
    for env in envelopes:
        assert env.sender == ref.sender == SENDER
        assert env.recipients == ref.recipients
        assert env.client["name"] == ref.helo == HELO
        assert env.client["protocol"] == "SMTP"  # smtp-source says HELO
        got, msgid = normalize(flat(env))
        assert got == expected
        ids.add(msgid)
    assert len(ids) == count, "some messages were queued twice or mixed up"


def test_smtp_source_20_sessions_kept_alive(run_edge, tool, reference):
    ref = reference("-l", "1024", "-d")
    assert ref.message.count(b"\r\n\r\n") >= 1 and len(ref.message) > 1024
    edge = run_edge()
    run_source(tool, edge, "-s", "20", "-m", "500", "-l", "1024", "-d")
    check_all(edge, ref, 500)


def test_smtp_source_one_connection_per_message(run_edge, tool, reference):
    ref = reference("-l", "1024")
    edge = run_edge()
    run_source(tool, edge, "-s", "20", "-m", "300", "-l", "1024")
    check_all(edge, ref, 300)


def test_smtp_source_100k_messages(run_edge, tool, reference):
    ref = reference("-l", "102400", "-d")
    assert len(ref.message) > 102400
    edge = run_edge()
    run_source(tool, edge, "-s", "5", "-m", "40", "-l", "102400", "-d")
    check_all(edge, ref, 40)


def test_smtp_source_several_recipients(run_edge, tool, reference):
    ref = reference("-l", "300", "-r", "3", "-d")
    assert len(ref.recipients) == 3
    edge = run_edge()
    run_source(tool, edge, "-s", "4", "-m", "40", "-l", "300", "-r", "3", "-d")
    check_all(edge, ref, 40)

