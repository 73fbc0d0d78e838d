"""SmtpEdge against swaks, the Swiss Army Knife for SMTP (a Perl client).

swaks exits non-zero when a transaction fails; each test checks its exit
status and then what reached the queue. The message file has no final CRLF:
swaks sends it, then ``CRLF.CRLF``, so the queued message is the file plus CRLF.
"""

from __future__ import annotations

import subprocess

import pytest
from rawsmtp import flat

from slimta.edge.smtp import SmtpValidators

DATA = (b"From: <a@example.com>\r\nTo: <b@example.com>\r\nSubject: swaks interop\r\n"
        b"Message-Id: <swaks.1@client.example.com>\r\n\r\n"
        b"first line\r\n.a line with a leading dot\r\n..two\r\nlast line")
EXPECTED = DATA + b"\r\n"


class Credentials(SmtpValidators):
    def handle_auth(self, reply, creds):
        if creds.authcid != "user" or not creds.check_secret("secret"):
            reply.code = "535"
            reply.message = "5.7.8 Authentication credentials invalid"


@pytest.fixture
def swaks(tool, tmp_path):
    """``swaks(edge, *args)``: run swaks against the edge; returns the CompletedProcess."""
    path = tool("swaks")
    data = tmp_path / "message.eml"
    data.write_bytes(DATA)

    def run(edge, *args, to="b@example.com"):
        cmd = [path, "--server", f"127.0.0.1:{edge.port}", "--timeout", "10",
               "--from", "a@example.com", "--to", to, "--helo", "client.example.com",
               "--data", f"@{data}", *args]
        return subprocess.run(cmd, capture_output=True, timeout=60)

    return run


def check(proc, expect_rc=0):
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == expect_rc, output
    return output


def test_swaks_plain(run_edge, swaks):
    edge = run_edge()
    out = check(swaks(edge))
    assert "250 2.6.0 Message queued as q000001" in out
    [env] = edge.queue.envelopes
    assert env.sender == "a@example.com"
    assert env.recipients == ["b@example.com"]
    assert flat(env) == EXPECTED
    assert env.client["protocol"] == "ESMTP"
    assert env.client["name"] == "client.example.com"


def test_swaks_pipeline_several_recipients(run_edge, swaks):
    edge = run_edge()
    out = check(swaks(edge, "--pipeline", to="b@example.com,c@example.com,d@example.net"))
    assert "250 2.6.0" in out
    [env] = edge.queue.envelopes
    assert env.recipients == ["b@example.com", "c@example.com", "d@example.net"]
    assert flat(env) == EXPECTED


def test_swaks_starttls(run_edge, swaks, server_tls_context):
    edge = run_edge(context=server_tls_context)
    out = check(swaks(edge, "--tls"))
    assert "STARTTLS" in out
    [env] = edge.queue.envelopes
    assert flat(env) == EXPECTED
    assert env.client["protocol"] == "ESMTPS"


def test_swaks_tls_on_connect(run_edge, swaks, server_tls_context):
    edge = run_edge(context=server_tls_context, tls_immediately=True)
    check(swaks(edge, "--tls-on-connect"))
    [env] = edge.queue.envelopes
    assert flat(env) == EXPECTED
    assert env.client["protocol"] == "ESMTPS"


def test_swaks_starttls_pipeline(run_edge, swaks, server_tls_context):
    edge = run_edge(context=server_tls_context)
    check(swaks(edge, "--tls", "--pipeline", to="b@example.com,c@example.com"))
    [env] = edge.queue.envelopes
    assert env.recipients == ["b@example.com", "c@example.com"]
    assert flat(env) == EXPECTED


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_swaks_auth(run_edge, swaks, server_tls_context, mechanism):
    edge = run_edge(context=server_tls_context, auth=True, validator_class=Credentials)
    out = check(swaks(edge, "--tls", "--auth", mechanism, "--auth-user", "user",
                      "--auth-password", "secret"))
    assert "235 " in out
    [env] = edge.queue.envelopes
    assert flat(env) == EXPECTED
    assert env.client["protocol"] == "ESMTPSA"
    assert env.client["auth"] == "user"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_swaks_auth_wrong_password(run_edge, swaks, server_tls_context, mechanism):
    edge = run_edge(context=server_tls_context, auth=True, validator_class=Credentials)
    proc = swaks(edge, "--tls", "--auth", mechanism, "--auth-user", "user",
                 "--auth-password", "wrong")
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode != 0, out
    assert "535 5.7.8" in out
    assert edge.queue.envelopes == []


def test_swaks_auth_plain_in_cleartext_refused(run_edge, swaks, server_tls_context):
    edge = run_edge(context=server_tls_context, auth=True, validator_class=Credentials)
    proc = swaks(edge, "--auth", "PLAIN", "--auth-user", "user", "--auth-password", "secret")
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode != 0, out
    # PLAIN is not offered before STARTTLS, so swaks does not even try it
    assert "-> AUTH" not in out
    assert "requested type not available" in out
    assert edge.queue.envelopes == []


def test_swaks_rejected_recipient_fails(run_edge, swaks):
    class NoSuchUser(SmtpValidators):
        def handle_rcpt(self, reply, recipient, params):
            reply.code = "550"
            reply.message = "5.1.1 No such user"

    edge = run_edge(validator_class=NoSuchUser)
    proc = swaks(edge)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode != 0, out
    assert "550 5.1.1 No such user" in out
    assert edge.queue.envelopes == []
