"""`slimta send`: run as a subprocess against a real SmtpEdge."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from slimta.edge.smtp import SmtpValidators
from slimta.queue import QueueError
from slimta.smtp.reply import Reply

CLI = [sys.executable, "-c", "from slimta.app.cli import main; main()"]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))


def send(port, *args, input=None, env=None):
    return subprocess.run(
        [*CLI, "send", "--server", f"127.0.0.1:{port}", "--ehlo", "client.test", *args],
        capture_output=True, timeout=60, env=env or ENV,
        input=input, stdin=subprocess.DEVNULL if input is None else None,
    )


class CheckingValidators(SmtpValidators):
    def handle_auth(self, reply, creds):
        if not (creds.authcid == "relayuser" and creds.check_secret("s3cret")):
            reply.code, reply.message = "535", "5.7.8 Nope"

    def handle_rcpt(self, reply, recipient, params):
        if recipient.startswith("nobody@"):
            reply.code, reply.message = "550", "5.1.1 No such user"


def test_message_from_stdin(run_edge):
    edge = run_edge(hostname="mx.test")
    message = b"From: <a@example.com>\nSubject: piped\n\nhello\n.dot line\n"
    out = send(edge.port, "--from", "a@example.com", "--to", "b@example.org", input=message)
    assert out.returncode == 0, out.stderr
    assert out.stdout.decode().startswith("250 2.6.0 Message queued as q000001")
    [env] = edge.queue.envelopes
    assert env.sender == "a@example.com"
    assert env.recipients == ["b@example.org"]
    # bare LF lines became CRLF on the way; the dot line survived
    assert b"".join(env.flatten()) == message.replace(b"\n", b"\r\n")
    assert env.client["name"] == "client.test"


def test_built_test_message(run_edge):
    edge = run_edge()
    out = send(edge.port, "--from", "a@example.com", "--to", "b@example.org",
               "--to", "c@example.net", "--subject", "Hello there")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"250 ")
    [env] = edge.queue.envelopes
    assert env.recipients == ["b@example.org", "c@example.net"]
    headers = env.headers
    assert headers["Subject"] == "Hello there"
    assert headers["From"] == "<a@example.com>"
    assert headers["To"] == "<b@example.org>, <c@example.net>"
    assert headers["Date"] and headers["Message-Id"].endswith("@client.test>")
    assert b"test message" in env.message


def test_refused_recipient_is_exit_1(run_edge):
    edge = run_edge(validator_class=CheckingValidators)
    out = send(edge.port, "--from", "a@example.com", "--to", "nobody@example.org")
    assert out.returncode == 1
    assert b"550 5.1.1 No such user" in out.stdout
    assert edge.queue.envelopes == []


def test_partly_refused_prints_each_recipient(run_edge):
    edge = run_edge(validator_class=CheckingValidators)
    out = send(edge.port, "--from", "a@example.com", "--to", "b@example.org",
               "--to", "nobody@example.org")
    assert out.returncode == 1
    text = out.stdout.decode()
    assert "<b@example.org>: 250 2.6.0 Message queued as" in text
    assert "<nobody@example.org>: 550 5.1.1 No such user" in text
    [env] = edge.queue.envelopes
    assert env.recipients == ["b@example.org"]


def test_queue_failure_reply_is_exit_1(run_edge):
    edge = run_edge()
    edge.queue.fail_with = QueueError(Reply("451", "4.3.0 Try later"))
    out = send(edge.port, "--from", "a@example.com", "--to", "b@example.org")
    assert out.returncode == 1
    assert b"451 4.3.0 Try later" in out.stdout


def test_connection_refused_is_exit_2():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = send(port, "--from", "a@example.com", "--to", "b@example.org")
    assert out.returncode == 2
    assert b"failed" in out.stderr


def test_starttls_and_auth(run_edge, server_tls_context):
    edge = run_edge(context=server_tls_context, auth=True, validator_class=CheckingValidators)
    out = send(edge.port, "--from", "a@example.com", "--to", "b@example.org", "--tls",
               "--auth", "relayuser", "--password-env", "SEND_SECRET",
               env=dict(ENV, SEND_SECRET="s3cret"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(b"250 ")
    [env] = edge.queue.envelopes
    assert env.client["protocol"] == "ESMTPSA"
    assert env.client["auth"] == "relayuser"
    assert b"s3cret" not in out.stdout + out.stderr


def test_wrong_password_is_exit_1(run_edge, server_tls_context):
    edge = run_edge(context=server_tls_context, auth=True, validator_class=CheckingValidators)
    out = send(edge.port, "--from", "a@example.com", "--to", "b@example.org", "--tls",
               "--auth", "relayuser", "--password-env", "SEND_SECRET",
               env=dict(ENV, SEND_SECRET="wrong"))
    assert out.returncode == 1
    assert b"535 5.7.8 Nope" in out.stderr
    assert edge.queue.envelopes == []


def test_tls_required_but_not_offered_is_exit_2(run_edge):
    edge = run_edge()
    out = send(edge.port, "--from", "a@example.com", "--to", "b@example.org", "--tls")
    assert out.returncode == 2
    assert b"STARTTLS" in out.stderr
    assert edge.queue.envelopes == []


def test_usage_errors_are_exit_2(run_edge):
    edge = run_edge()
    cases = [
        ["--to", "b@example.org"],  # no --from
        ["--from", "a@example.com"],  # no --to
        ["--from", "a@example.com", "--to", "b@example.org", "--auth", "u"],  # no password
        ["--from", "a@example.com", "--to", "b@example.org", "--auth", "u",
         "--password-env", "SLIMTA_TEST_UNSET_VARIABLE"],
        ["--from", "a@example.com", "--to", "b@example.org", "--password-env", "X"],
    ]
    for args in cases:
        out = send(edge.port, *args)
        assert out.returncode == 2, (args, out.stderr)
    out = subprocess.run([*CLI, "send", "--server", "nocolon", "--from", "a@example.com",
                          "--to", "b@example.org"], capture_output=True, env=ENV, timeout=30)
    assert out.returncode == 2
    assert edge.queue.envelopes == []


def test_help_documents_exit_codes():
    out = subprocess.run([*CLI, "send", "--help"], capture_output=True, env=ENV, timeout=30)
    assert out.returncode == 0
    assert b"Exit codes" in out.stdout and b"--password-env" in out.stdout
