"""Tests for slimta.smtp.server: the sans-IO SMTP server state machine.

Every test drives a ServerConnection with bytes and checks the replies by
their code and enhanced status code ("250 2.1.0"; "354" for replies without
one). No sockets, no asyncio.
"""

from __future__ import annotations

import hmac
import re

import pytest
from chunking import split_at
from hypothesis import given, settings
from hypothesis import strategies as st
from smtphelp import HOST, NONCE, b64

from slimta.smtp.data import dot_stuff
from slimta.smtp.reply import Reply
from slimta.smtp.server import (
    Auth,
    DataStart,
    Ehlo,
    HaveData,
    Helo,
    Mail,
    Rcpt,
    Rset,
    ServerConnection,
    StartTls,
)

GREETING = Reply("220", f"{HOST} ESMTP Mail Gateway")
FAST = settings(max_examples=200, deadline=None)

_CODE_RE = re.compile(r"(\d{3})(?:[ -]([245]\.\d{1,3}\.\d{1,3})(?= |$))?")
_LINE_RE = re.compile(rb"[2-5]\d\d[ -]")


def codes(out: bytes) -> list[str]:
    """One entry per reply: code and enhanced code of its last line ('250 2.1.0', '354')."""
    assert out == b"" or out.endswith(b"\r\n"), out
    result = []
    for line in out.decode("utf-8").split("\r\n")[:-1]:
        if line[3:4] == "-":
            continue
        m = _CODE_RE.match(line)
        assert m, line
        result.append(m.group(1) + (f" {m.group(2)}" if m.group(2) else ""))
    return result


def lines(out: bytes) -> list[str]:
    return out.decode("utf-8").split("\r\n")[:-1]


def set_reply(kind, code, message):
    """A handler that answers events of ``kind`` with ``Reply(code, message)``."""

    def handler(ev):
        if isinstance(ev, kind):
            ev.reply.code = code
            ev.reply.message = message

    return handler


class Session:
    """A ServerConnection and a loop that answers every event (through ``handler``)."""

    def __init__(self, greeting=GREETING, handler=None, **kwargs):
        kwargs.setdefault("nonce", lambda: NONCE)
        self.conn = ServerConnection(HOST, **kwargs)
        self.conn.banner(greeting)
        self.banner = self.conn.data_to_send()
        self.handler = handler
        self.events = []

    def feed(self, data: bytes, handler=None) -> bytes:
        self.conn.receive_data(data)
        self.pump(handler)
        return self.conn.data_to_send()

    def pump(self, handler=None):
        handler = handler or self.handler
        while (ev := self.conn.next_event()) is not None:
            self.events.append(ev)
            if handler is not None:
                handler(ev)
            self.conn.respond()

    def send(self, data: bytes, handler=None) -> list[str]:
        return codes(self.feed(data, handler))

    def kinds(self) -> list[str]:
        return [type(ev).__name__ for ev in self.events]


def ready(**kwargs) -> Session:
    """After EHLO."""
    s = Session(**kwargs)
    assert s.send(b"EHLO client.example.com\r\n") == ["250"]
    return s


def in_transaction(**kwargs) -> Session:
    """After EHLO, MAIL and one RCPT."""
    s = ready(**kwargs)
    assert s.send(b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.net>\r\n") == [
        "250 2.1.0", "250 2.1.5"]
    s.events.clear()
    return s


def ehlo_keywords(out: bytes) -> list[str]:
    ls = lines(out)
    assert all(x.startswith("250-") for x in ls[:-1]) and ls[-1].startswith("250 ")
    return [x[4:] for x in ls[1:]]


# ---------------------------------------------------------------------------
# greeting
def test_banner_is_sent():
    s = Session()
    assert s.banner == b"220 mx.example.com ESMTP Mail Gateway\r\n"
    assert not s.conn.closing


def test_banner_421_closes():
    s = Session(greeting=Reply("421", "4.7.0 Too many connections"))
    assert codes(s.banner) == ["421 4.7.0"]
    assert s.conn.closing
    assert s.feed(b"EHLO x\r\nQUIT\r\n") == b""
    assert s.events == []


def test_banner_554_refuses_all_but_quit():
    s = Session(greeting=Reply("554", "5.7.1 No SMTP service here"))
    assert codes(s.banner) == ["554 5.7.1"]
    assert s.send(b"EHLO x\r\nHELO x\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<a@b.c>\r\nDATA\r\n"
                  b"NOOP\r\nRSET\r\nFOO\r\nSTARTTLS\r\nAUTH PLAIN\r\n") == ["503 5.5.1"] * 10
    assert s.events == []
    assert not s.conn.closing
    assert s.send(b"QUIT\r\n") == ["221 2.0.0"]
    assert s.conn.closing


# ---------------------------------------------------------------------------
# EHLO / HELO
DEFAULT_KEYWORDS = ["8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES", "SMTPUTF8", "SIZE 10485760",
                    "CHUNKING", "BINARYMIME", "DSN"]


def test_ehlo_default_extensions():
    s = Session()
    out = s.feed(b"EHLO client.example.com\r\n")
    assert lines(out)[0] == "250-Hello client.example.com"
    assert ehlo_keywords(out) == DEFAULT_KEYWORDS
    assert s.conn.ehlo_as == "client.example.com" and s.conn.extended
    (ev,) = s.events
    assert isinstance(ev, Ehlo) and ev.name == "client.example.com"


def test_ehlo_size_value():
    assert "SIZE 1234" in ehlo_keywords(Session(max_size=1234).feed(b"EHLO c\r\n"))
    kw = ehlo_keywords(Session(max_size=None).feed(b"EHLO c\r\n"))
    assert "SIZE" in kw and not any(k.startswith("SIZE ") for k in kw)


def test_ehlo_starttls_only_when_available_and_not_secure():
    assert "STARTTLS" not in ehlo_keywords(Session().feed(b"EHLO c\r\n"))
    assert ehlo_keywords(Session(tls=True).feed(b"EHLO c\r\n")) == [*DEFAULT_KEYWORDS, "STARTTLS"]
    assert "STARTTLS" not in ehlo_keywords(Session(tls=True, secure=True).feed(b"EHLO c\r\n"))


MECHS = ("PLAIN", "LOGIN", "CRAM-MD5")


def test_ehlo_auth_requires_tls_for_plaintext_mechanisms():
    s = Session(tls=True, auth_mechanisms=MECHS)
    kw = ehlo_keywords(s.feed(b"EHLO c\r\n"))
    assert kw[-2:] == ["STARTTLS", "AUTH CRAM-MD5"]
    assert s.send(b"STARTTLS\r\n") == ["220 2.0.0"]
    s.conn.tls_started()
    kw = ehlo_keywords(s.feed(b"EHLO c\r\n"))
    assert "STARTTLS" not in kw
    assert kw[-1] == "AUTH PLAIN LOGIN CRAM-MD5"


def test_ehlo_auth_plaintext_only_over_tls_gives_no_auth():
    kw = ehlo_keywords(Session(auth_mechanisms=("PLAIN", "LOGIN")).feed(b"EHLO c\r\n"))
    assert not any(k.startswith("AUTH") for k in kw)


def test_ehlo_auth_allowed_without_tls():
    kw = ehlo_keywords(Session(auth_mechanisms=MECHS, auth_require_tls=False).feed(b"EHLO c\r\n"))
    assert kw[-1] == "AUTH PLAIN LOGIN CRAM-MD5"


def test_ehlo_auth_when_secure_from_start():
    kw = ehlo_keywords(Session(secure=True, auth_mechanisms=MECHS).feed(b"EHLO c\r\n"))
    assert kw[-1] == "AUTH PLAIN LOGIN CRAM-MD5"


def test_unsupported_mechanism_is_refused_at_construction():
    with pytest.raises(ValueError):
        ServerConnection(HOST, auth_mechanisms=("GSSAPI",))


def test_ehlo_needs_a_name():
    s = Session()
    assert s.send(b"EHLO\r\nEHLO   \r\nHELO\r\n") == ["501 5.5.4"] * 3
    assert s.events == [] and s.conn.ehlo_as is None


def test_ehlo_lowercase_and_lf_only():
    s = Session()
    assert s.send(b"ehlo c\nnoop\n") == ["250", "250 2.0.0"]


def test_ehlo_utf8_name():
    s = Session()
    out = s.feed("EHLO bücher.example\r\n".encode())
    assert lines(out)[0] == "250-Hello bücher.example"


def test_helo_single_line_and_keeps_limits():
    s = Session(max_size=1000)
    out = s.feed(b"HELO client.example.com\r\n")
    assert lines(out) == ["250 Hello client.example.com"]
    assert isinstance(s.events[0], Helo)
    assert s.conn.ehlo_as == "client.example.com" and not s.conn.extended
    assert s.send(b"MAIL FROM:<a@b.c> SIZE=1001\r\n") == ["552 5.3.4"]
    assert s.send(b"MAIL FROM:<a@b.c>\r\n") == ["250 2.1.0"]


def test_ehlo_rejected_by_validator():
    s = Session(handler=set_reply(Ehlo, "550", "5.7.1 Go away"))
    assert s.send(b"EHLO bad.example\r\n") == ["550 5.7.1"]
    assert s.conn.ehlo_as is None
    assert s.send(b"MAIL FROM:<a@b.c>\r\n") == ["503 5.5.1"]


def test_ehlo_greeting_changed_by_validator():
    s = Session(handler=set_reply(Ehlo, "250", "mx greets you\nsecond line"))
    out = s.feed(b"EHLO c\r\n")
    assert lines(out)[:2] == ["250-mx greets you", "250-second line"]
    assert ehlo_keywords(out)[1:] == DEFAULT_KEYWORDS


def test_ehlo_resets_transaction():
    s = in_transaction()
    assert s.send(b"EHLO again\r\n") == ["250"]
    assert s.conn.transaction is None
    assert s.send(b"RCPT TO:<a@b.c>\r\n") == ["503 5.5.1"]


# ---------------------------------------------------------------------------
# simple commands
@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (b"NOOP\r\n", ["250 2.0.0"]),
        (b"NOOP whatever\r\n", ["250 2.0.0"]),
        (b"VRFY postmaster\r\n", ["252 2.5.0"]),
        (b"VRFY\r\n", ["501 5.5.4"]),
        (b"EXPN list\r\n", ["502 5.5.1"]),
        (b"HELP\r\n", ["214 2.0.0"]),
        (b"HELP MAIL\r\n", ["214 2.0.0"]),
        (b"FOO bar\r\n", ["500 5.5.2"]),
        (b"\r\n", ["500 5.5.2"]),
        (b"MAILFROM:<a@b.c>\r\n", ["500 5.5.2"]),
        (b"RSET x\r\n", ["501 5.5.4"]),
        (b"STARTTLS\r\n", ["502 5.5.1"]),  # no TLS context
        (b"AUTH PLAIN\r\n", ["502 5.5.1"]),  # no mechanisms
    ],
)
def test_simple_commands(command, expected):
    s = ready()
    assert s.send(command) == expected
    assert s.events == [] or isinstance(s.events[0], Ehlo)
    assert not s.conn.closing


def test_commands_work_before_ehlo():
    s = Session()
    assert s.send(b"NOOP\r\nVRFY x\r\nHELP\r\nRSET\r\n") == [
        "250 2.0.0", "252 2.5.0", "214 2.0.0", "250 2.0.0"]


def test_quit():
    s = ready()
    assert s.send(b"QUIT\r\nNOOP\r\n") == ["221 2.0.0"]
    assert s.conn.closing
    assert s.feed(b"NOOP\r\n") == b""
    assert s.conn.next_event() is None


def test_rset_clears_transaction():
    s = in_transaction()
    assert s.send(b"RSET\r\n") == ["250 2.0.0"]
    assert isinstance(s.events[0], Rset)
    assert s.conn.transaction is None
    assert s.send(b"RCPT TO:<a@b.c>\r\n") == ["503 5.5.1"]
    assert s.send(b"MAIL FROM:<a@b.c>\r\n") == ["250 2.1.0"]


def test_respond_and_next_event_misuse():
    s = Session()
    with pytest.raises(RuntimeError):
        s.conn.respond()
    s.conn.receive_data(b"EHLO c\r\nNOOP\r\n")
    assert isinstance(s.conn.next_event(), Ehlo)
    with pytest.raises(RuntimeError):
        s.conn.next_event()
    s.conn.respond()
    assert s.conn.next_event() is None
    assert codes(s.conn.data_to_send()) == ["250", "250 2.0.0"]


# ---------------------------------------------------------------------------
# MAIL
def test_mail():
    s = ready()
    assert s.send(b"MAIL FROM:<sender@example.com>\r\n") == ["250 2.1.0"]
    ev = s.events[-1]
    assert isinstance(ev, Mail) and ev.sender == "sender@example.com" and ev.params == {}
    t = s.conn.transaction
    assert t.sender == "sender@example.com" and t.recipients == [] and t.body == "7BIT"


def test_mail_reply_text():
    s = ready()
    assert lines(s.feed(b"MAIL FROM:<a@b.c>\r\n")) == ["250 2.1.0 <a@b.c> Ok"]


def test_mail_null_sender():
    s = ready()
    assert s.send(b"MAIL FROM:<>\r\n") == ["250 2.1.0"]
    assert s.conn.transaction.sender == ""


def test_mail_before_ehlo():
    assert Session().send(b"MAIL FROM:<a@b.c>\r\n") == ["503 5.5.1"]


def test_mail_nested():
    s = in_transaction()
    assert s.send(b"MAIL FROM:<other@b.c>\r\n") == ["503 5.5.1"]
    assert s.conn.transaction.sender == "sender@example.com"


@pytest.mark.parametrize(
    "line", [b"MAIL\r\n", b"MAIL TO:<a@b.c>\r\n", b"MAIL FROM <a@b.c>\r\n", b"MAIL <a@b.c>\r\n"]
)
def test_mail_syntax(line):
    assert ready().send(line) == ["501 5.5.4"]


@pytest.mark.parametrize(
    "path",
    [b"", b"<>x", b"<a@>", b"<@b.c>", b"<a b@c.d>", b"<a@b..c>", b"<a@b.c", b"a@-b.c",
     b"<a@[1.2.3.999]>", b"<" + b"x" * 65 + b"@b.c>"],
)
def test_mail_bad_sender(path):
    assert ready().send(b"MAIL FROM:" + path + b"\r\n") == ["501 5.1.7"]


def test_mail_all_parameters():
    s = ready()
    assert s.send(b"MAIL FROM:<a@b.c> SIZE=1000 BODY=8BITMIME SMTPUTF8 AUTH=<> RET=HDRS "
                  b"ENVID=ab+2Bc\r\n") == ["250 2.1.0"]
    ev = s.events[-1]
    assert ev.params == {"SIZE": "1000", "BODY": "8BITMIME", "SMTPUTF8": None, "AUTH": "<>",
                         "RET": "HDRS", "ENVID": "ab+2Bc"}
    t = s.conn.transaction
    assert (t.size, t.body, t.smtputf8, t.auth, t.ret, t.envid) == (
        1000, "8BITMIME", True, None, "HDRS", "ab+c")


def test_mail_auth_parameter_decoded():
    s = ready()
    assert s.send(b"MAIL FROM:<a@b.c> AUTH=e+3Dmc2@example.com\r\n") == ["250 2.1.0"]
    assert s.conn.transaction.auth == "e=mc2@example.com"


@pytest.mark.parametrize("param", [b"FOO=BAR", b"XFORWARD", b"NOTIFY=NEVER"])
def test_mail_unknown_parameter(param):
    s = ready()
    assert s.send(b"MAIL FROM:<a@b.c> " + param + b"\r\n") == ["555 5.5.4"]
    assert s.conn.transaction is None


@pytest.mark.parametrize(
    "param",
    [b"SIZE=abc", b"SIZE", b"SIZE=-1", b"BODY=9BIT", b"BODY", b"SMTPUTF8=yes", b"RET=ALL",
     b"AUTH", b"ENVID=a+zz", b"SIZE=1 SIZE=2", b"=x"],
)
def test_mail_bad_parameter(param):
    s = ready()
    assert s.send(b"MAIL FROM:<a@b.c> " + param + b"\r\n") == ["501 5.5.4"]
    assert s.conn.transaction is None


def test_mail_size_over_max():
    s = ready(max_size=1000)
    assert s.send(b"MAIL FROM:<a@b.c> SIZE=1001\r\n") == ["552 5.3.4"]
    assert s.conn.transaction is None
    assert [type(e) for e in s.events] == [Ehlo]  # no Mail event for the validators
    assert s.send(b"MAIL FROM:<a@b.c> SIZE=1000\r\n") == ["250 2.1.0"]
    assert s.conn.transaction.size == 1000


def test_mail_size_without_limit():
    s = ready(max_size=None)
    assert s.send(b"MAIL FROM:<a@b.c> SIZE=99999999999\r\n") == ["250 2.1.0"]


def test_mail_non_ascii_needs_smtputf8():
    s = ready()
    assert s.send("MAIL FROM:<jürgen@example.com>\r\n".encode()) == ["553 5.6.7"]
    assert s.conn.transaction is None
    assert s.send("MAIL FROM:<jürgen@bücher.example> SMTPUTF8\r\n".encode()) == ["250 2.1.0"]
    assert s.conn.transaction.sender == "jürgen@bücher.example"
    assert s.conn.transaction.smtputf8


def test_mail_rejected_by_validator():
    s = ready(handler=set_reply(Mail, "550", "5.7.1 Sender rejected"))
    assert s.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n") == ["550 5.7.1", "503 5.5.1"]
    assert s.conn.transaction is None


def test_mail_421_from_validator_closes():
    s = ready(handler=set_reply(Mail, "421", "4.3.0 Try later"))
    assert s.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nQUIT\r\n") == ["421 4.3.0"]
    assert s.conn.closing


# ---------------------------------------------------------------------------
# RCPT
def test_rcpt():
    s = ready()
    assert s.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nRCPT TO:<Postmaster>\r\n") == [
        "250 2.1.0", "250 2.1.5", "250 2.1.5"]
    assert s.conn.transaction.recipients == ["d@e.f", "Postmaster"]
    ev = s.events[-2]
    assert isinstance(ev, Rcpt) and ev.recipient == "d@e.f" and ev.params == {}
    assert lines(s.feed(b"RCPT TO:<x@y.z>\r\n")) == ["250 2.1.5 <x@y.z> Ok"]


def test_rcpt_without_mail():
    assert ready().send(b"RCPT TO:<d@e.f>\r\n") == ["503 5.5.1"]


@pytest.mark.parametrize("line", [b"RCPT\r\n", b"RCPT FROM:<a@b.c>\r\n", b"RCPT <a@b.c>\r\n"])
def test_rcpt_syntax(line):
    assert in_transaction().send(line) == ["501 5.5.4"]


@pytest.mark.parametrize("path", [b"", b"<>", b"<a@>", b"<a@b.c", b"<postmaster@>", b"<a@@b>"])
def test_rcpt_bad_recipient(path):
    s = in_transaction()
    assert s.send(b"RCPT TO:" + path + b"\r\n") == ["501 5.1.3"]
    assert s.conn.transaction.recipients == ["rcpt@example.net"]


def test_rcpt_parameters():
    s = in_transaction()
    assert s.send(b"RCPT TO:<d@e.f> NOTIFY=success,FAILURE ORCPT=rfc822;d+2Bx@e.f\r\n") == [
        "250 2.1.5"]
    ev = s.events[-1]
    assert ev.params == {"NOTIFY": "success,FAILURE", "ORCPT": "rfc822;d+2Bx@e.f"}
    assert s.conn.transaction.rcpt_params["d@e.f"] == {
        "notify": ["SUCCESS", "FAILURE"], "orcpt": "rfc822;d+x@e.f"}
    assert "rcpt@example.net" not in s.conn.transaction.rcpt_params


@pytest.mark.parametrize(
    ("param", "expected"),
    [(b"FOO=1", "555 5.5.4"), (b"SIZE=10", "555 5.5.4"), (b"NOTIFY=SOMETIMES", "501 5.5.4"),
     (b"NOTIFY=NEVER,SUCCESS", "501 5.5.4"), (b"ORCPT=rfc822", "501 5.5.4"),
     (b"ORCPT", "501 5.5.4")],
)
def test_rcpt_bad_parameter(param, expected):
    s = in_transaction()
    assert s.send(b"RCPT TO:<d@e.f> " + param + b"\r\n") == [expected]
    assert s.conn.transaction.recipients == ["rcpt@example.net"]


def test_rcpt_non_ascii():
    s = in_transaction()
    assert s.send("RCPT TO:<用户@例子.广告>\r\n".encode()) == ["553 5.6.7"]
    s = ready()
    assert s.send("MAIL FROM:<a@b.c> SMTPUTF8\r\nRCPT TO:<用户@例子.广告>\r\n".encode()) == [
        "250 2.1.0", "250 2.1.5"]
    assert s.conn.transaction.recipients == ["用户@例子.广告"]


def test_max_recipients():
    s = ready(max_recipients=2)
    assert s.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<1@b.c>\r\nRCPT TO:<2@b.c>\r\n"
                  b"RCPT TO:<3@b.c>\r\nRCPT TO:<4@b.c>\r\n") == [
        "250 2.1.0", "250 2.1.5", "250 2.1.5", "452 4.5.3", "452 4.5.3"]
    assert s.conn.transaction.recipients == ["1@b.c", "2@b.c"]
    assert [type(e) for e in s.events].count(Rcpt) == 2
    assert s.send(b"DATA\r\nx\r\n.\r\n") == ["354", "250 2.6.0"]


def test_max_recipients_default_is_1000():
    s = ready()
    s.feed(b"MAIL FROM:<a@b.c>\r\n" + b"".join(b"RCPT TO:<r%d@b.c>\r\n" % i for i in range(1000)))
    assert len(s.conn.transaction.recipients) == 1000
    assert s.send(b"RCPT TO:<one-more@b.c>\r\n") == ["452 4.5.3"]


def test_rejected_recipients_do_not_count():
    def handler(ev):
        if isinstance(ev, Rcpt) and ev.recipient.startswith("bad"):
            ev.reply.code, ev.reply.message = "550", "5.1.1 No such user"

    s = ready(max_recipients=1, handler=handler)
    assert s.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<bad@b.c>\r\nRCPT TO:<good@b.c>\r\n") == [
        "250 2.1.0", "550 5.1.1", "250 2.1.5"]
    assert s.conn.transaction.recipients == ["good@b.c"]


def test_rcpt_rejected_by_validator_then_data_refused():
    s = ready(handler=set_reply(Rcpt, "550", "5.7.1 Relaying denied"))
    assert s.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f> NOTIFY=NEVER\r\nDATA\r\n") == [
        "250 2.1.0", "550 5.7.1", "554 5.5.1"]
    assert s.conn.transaction.recipients == []
    assert s.conn.transaction.rcpt_params == {}


def test_rcpt_421_from_validator_closes():
    s = in_transaction()
    s.handler = set_reply(Rcpt, "421", "4.3.0 Shutting down")
    assert s.send(b"RCPT TO:<d@e.f>\r\nDATA\r\nhello\r\n.\r\n") == ["421 4.3.0"]
    assert s.conn.closing
    assert not any(isinstance(e, (DataStart, HaveData)) for e in s.events)


# ---------------------------------------------------------------------------
# DATA
def test_data():
    s = in_transaction()
    assert s.send(b"DATA\r\n") == ["354"]
    assert isinstance(s.events[0], DataStart) and not s.events[0].bdat
    assert s.conn.receiving_message
    assert s.send(b"Subject: hi\r\n\r\n..dotted\r\n...\r\nend\r\n.\r\n") == ["250 2.6.0"]
    ev = s.events[-1]
    assert isinstance(ev, HaveData)
    assert ev.data == b"Subject: hi\r\n\r\n.dotted\r\n..\r\nend\r\n"
    assert ev.transaction.sender == "sender@example.com"
    assert ev.transaction.recipients == ["rcpt@example.net"]
    assert s.conn.transaction is None and not s.conn.receiving_message
    assert s.send(b"RCPT TO:<a@b.c>\r\n") == ["503 5.5.1"]


def test_data_reply_texts():
    s = in_transaction()
    out = s.feed(b"DATA\r\nx\r\n.\r\n")
    assert lines(out) == ["354 Start mail input; end with <CRLF>.<CRLF>",
                          "250 2.6.0 Message accepted for delivery"]


def test_data_pipelined_whole_session():
    s = Session()
    assert s.send(b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nDATA\r\nhello\r\n.\r\n"
                  b"MAIL FROM:<>\r\nRCPT TO:<g@h.i>\r\nDATA\r\n.\r\nQUIT\r\n") == [
        "250", "250 2.1.0", "250 2.1.5", "354", "250 2.6.0",
        "250 2.1.0", "250 2.1.5", "354", "250 2.6.0", "221 2.0.0"]
    data = [e.data for e in s.events if isinstance(e, HaveData)]
    assert data == [b"hello\r\n", b""]


def test_data_dot_stuffing_round_trip():
    message = b".starts with a dot\r\n..two\r\n.\r\n\r\nlast\r\n"
    s = in_transaction()
    assert s.send(b"DATA\r\n" + dot_stuff(message)) == ["354", "250 2.6.0"]
    assert s.events[-1].data == message


def test_data_one_byte_at_a_time():
    s = in_transaction()
    wire = b"DATA\r\nSubject: x\r\n\r\n..a\r\nb\r\n.\r\nNOOP\r\n"
    out = b"".join(s.feed(wire[i:i + 1]) for i in range(len(wire)))
    assert codes(out) == ["354", "250 2.6.0", "250 2.0.0"]
    assert s.events[-1].data == b"Subject: x\r\n\r\n.a\r\nb\r\n"


def test_data_without_mail_or_rcpt():
    s = ready()
    assert s.send(b"DATA\r\n") == ["503 5.5.1"]
    assert s.send(b"MAIL FROM:<a@b.c>\r\nDATA\r\n") == ["250 2.1.0", "554 5.5.1"]


def test_data_with_argument():
    assert in_transaction().send(b"DATA now\r\n") == ["501 5.5.4"]


def test_data_after_binarymime():
    s = ready()
    assert s.send(b"MAIL FROM:<a@b.c> BODY=BINARYMIME\r\nRCPT TO:<d@e.f>\r\nDATA\r\n") == [
        "250 2.1.0", "250 2.1.5", "503 5.5.1"]
    assert s.conn.transaction.body == "BINARYMIME"


def test_data_refused_by_validator_leaves_command_mode():
    s = in_transaction(handler=set_reply(DataStart, "554", "5.7.1 No data for you"))
    assert s.send(b"DATA\r\nNOOP\r\n") == ["554 5.7.1", "250 2.0.0"]
    assert not s.conn.receiving_message


def test_have_data_reply_changed():
    s = in_transaction(handler=set_reply(HaveData, "451", "4.3.0 Queue unavailable"))
    assert s.send(b"DATA\r\nhello\r\n.\r\nNOOP\r\n") == ["354", "451 4.3.0", "250 2.0.0"]
    assert s.conn.transaction is None


def test_empty_message():
    s = in_transaction()
    assert s.send(b"DATA\r\n.\r\n") == ["354", "250 2.6.0"]
    assert s.events[-1].data == b""


def test_long_text_lines_accepted():
    line = b"x" * 5000 + b"\r\n"
    s = in_transaction()
    assert s.send(b"DATA\r\n" + line * 3 + b".\r\n") == ["354", "250 2.6.0"]
    assert s.events[-1].data == line * 3


def test_message_exactly_max_size():
    content = b"a" * 98 + b"\r\n"
    s = in_transaction(max_size=100)
    assert s.send(b"DATA\r\n" + content + b".\r\n") == ["354", "250 2.6.0"]
    assert s.events[-1].data == content


def test_message_over_max_size():
    s = in_transaction(max_size=100)
    assert s.send(b"DATA\r\n" + b"a" * 99 + b"\r\n.\r\nNOOP\r\n") == [
        "354", "552 5.3.4", "250 2.0.0"]
    assert not any(isinstance(e, HaveData) for e in s.events)
    assert s.conn.transaction is None
    assert not s.conn.closing


def test_message_over_max_size_is_not_buffered():
    s = in_transaction(max_size=10_000)
    assert s.send(b"DATA\r\n") == ["354"]
    block = b"z" * 998 + b"\r\n"
    for _ in range(200):
        assert s.feed(block) == b""
        assert s.conn.buffered == 0
    assert s.send(b".\r\n") == ["552 5.3.4"]


@pytest.mark.parametrize("content", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\n\n", b"\r\r\n", b"x\n\r\n"])
def test_bare_newline_in_data(content):
    s = in_transaction()
    out = s.feed(b"DATA\r\n" + content + b"\r\n.\r\nNOOP\r\n")
    assert codes(out) == ["354", "550 5.6.11", "250 2.0.0"]
    assert not s.conn.closing
    assert not any(isinstance(e, HaveData) for e in s.events)
    assert s.conn.transaction is None


@pytest.mark.parametrize("bogus", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\rX"])
@pytest.mark.parametrize("then", [b"", b"RSET\r\nMAIL FROM:<evil@example.com>\r\n",
                                  b"QUIT\r\n\r\n.\r\nNOOP\r\n"])
def test_bogus_end_of_data_closes(bogus, then):
    s = in_transaction()
    assert s.send(b"DATA\r\nSubject: x\r\n\r\nhello" + bogus + then) == ["354", "550 5.6.11"]
    assert s.conn.closing
    assert not any(isinstance(e, (HaveData, Mail)) for e in s.events)
    assert s.feed(b"\r\n.\r\nQUIT\r\n") == b""


@pytest.mark.parametrize("bogus", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\rX"])
def test_bogus_end_of_data_split_anywhere(bogus):
    wire = b"hello" + bogus + b"MAIL FROM:<evil@example.com>\r\n\r\n.\r\n"
    for cut in range(1, len(wire)):
        s = in_transaction()
        assert s.send(b"DATA\r\n") == ["354"]
        out = s.feed(wire[:cut]) + s.feed(wire[cut:])
        assert codes(out) == ["550 5.6.11"], cut
        assert s.conn.closing


# ---------------------------------------------------------------------------
# BDAT
def test_bdat_chunks():
    s = in_transaction()
    out = s.feed(b"BDAT 5\r\nhello")
    assert lines(out) == ["250 2.0.0 5 octets received"]
    (ev,) = s.events
    assert isinstance(ev, DataStart) and ev.bdat
    assert s.conn.receiving_message
    assert s.send(b"BDAT 6 LAST\r\n world") == ["250 2.6.0"]
    ev = s.events[-1]
    assert isinstance(ev, HaveData) and ev.data == b"hello world"
    assert [type(e) for e in s.events] == [DataStart, HaveData]  # one DataStart per message
    assert s.conn.transaction is None


def test_bdat_last_only():
    s = in_transaction()
    assert s.send(b"BDAT 11 LAST\r\nhello world") == ["250 2.6.0"]
    assert s.events[-1].data == b"hello world"


def test_bdat_zero_last():
    s = in_transaction()
    assert s.send(b"BDAT 3\r\nabcBDAT 0 LAST\r\n") == ["250 2.0.0", "250 2.6.0"]
    assert s.events[-1].data == b"abc"


def test_bdat_pipelined_with_mail_and_rcpt():
    s = Session()
    assert s.send(b"EHLO c\r\nMAIL FROM:<a@b.c> BODY=BINARYMIME\r\nRCPT TO:<d@e.f>\r\n"
                  b"RCPT TO:<g@h.i>\r\nBDAT 4\r\nab\r\nBDAT 2 LAST\r\ncdQUIT\r\n") == [
        "250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "250 2.0.0", "250 2.6.0", "221 2.0.0"]
    assert s.kinds() == ["Ehlo", "Mail", "Rcpt", "Rcpt", "DataStart", "HaveData"]
    ev = s.events[-1]
    assert ev.data == b"ab\r\ncd"
    assert ev.transaction.recipients == ["d@e.f", "g@h.i"]
    assert ev.transaction.body == "BINARYMIME"


def test_bdat_binary_clean():
    payload = b"\x00\r\n.\r\nMAIL FROM:<x@y.z>\r\n\nbare\rcr\n.\n\r.\r\xff\xfe" * 20
    s = in_transaction()
    assert s.send(b"BDAT %d LAST\r\n" % len(payload) + payload + b"NOOP\r\n") == [
        "250 2.6.0", "250 2.0.0"]
    assert s.events[-1].data == payload


def test_bdat_split_one_byte_at_a_time():
    payload = b"line\r\n.\r\n\n"
    wire = b"BDAT %d LAST\r\n" % len(payload) + payload + b"NOOP\r\n"
    s = in_transaction()
    out = b"".join(s.feed(wire[i:i + 1]) for i in range(len(wire)))
    assert codes(out) == ["250 2.6.0", "250 2.0.0"]
    assert s.events[-1].data == payload


def test_bdat_without_mail_consumes_chunk():
    s = ready()
    # the 6 octets "NOOP\r\n" are the chunk, not a command
    assert s.send(b"BDAT 6\r\nNOOP\r\nNOOP\r\n") == ["503 5.5.1", "250 2.0.0"]
    assert s.send(b"BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n") == ["503 5.5.1", "250 2.0.0"]
    assert not s.conn.closing
    assert [type(e) for e in s.events] == [Ehlo]


def test_bdat_without_rcpt_consumes_chunk():
    s = ready()
    assert s.send(b"MAIL FROM:<a@b.c>\r\nBDAT 6 LAST\r\nQUIT\r\nNOOP\r\n") == [
        "250 2.1.0", "503 5.5.1", "250 2.0.0"]


def test_bdat_over_max_size():
    s = in_transaction(max_size=10)
    assert s.send(b"BDAT 11 LAST\r\n" + b"x" * 11 + b"NOOP\r\n") == ["552 5.3.4", "250 2.0.0"]
    assert s.conn.transaction is None
    assert not any(isinstance(e, (DataStart, HaveData)) for e in s.events)


def test_bdat_over_max_size_in_later_chunk():
    s = in_transaction(max_size=10)
    assert s.send(b"BDAT 6\r\nabcdef") == ["250 2.0.0"]
    assert s.send(b"BDAT 5 LAST\r\nghijkNOOP\r\n") == ["552 5.3.4", "250 2.0.0"]
    assert s.conn.transaction is None
    assert s.send(b"BDAT 1 LAST\r\nx") == ["503 5.5.1"]
    assert not any(isinstance(e, HaveData) for e in s.events)


def test_bdat_exactly_max_size():
    s = in_transaction(max_size=10)
    assert s.send(b"BDAT 4\r\nabcdBDAT 6 LAST\r\nefghij") == ["250 2.0.0", "250 2.6.0"]
    assert s.events[-1].data == b"abcdefghij"


def test_bdat_huge_chunk_is_discarded_not_buffered():
    s = in_transaction(max_size=1000)
    assert s.send(b"BDAT 1000000 LAST\r\n") == []
    for _ in range(99):
        assert s.feed(b"y" * 10_000) == b""
        assert s.conn.buffered == 0
    assert s.send(b"y" * 10_000 + b"NOOP\r\n") == ["552 5.3.4", "250 2.0.0"]


@pytest.mark.parametrize(
    "line", [b"BDAT\r\n", b"BDAT x\r\n", b"BDAT 5 NOTLAST\r\n", b"BDAT -1\r\n", b"BDAT 1 2 3\r\n",
             "BDAT ²\r\n".encode(), "BDAT ١٢\r\n".encode(), b"BDAT 0x10\r\n"],
)
def test_bdat_bad_syntax_closes(line):
    s = in_transaction()
    assert s.send(line + b"NOOP\r\n") == ["501 5.5.4"]
    assert s.conn.closing


def test_bdat_refused_by_validator():
    s = in_transaction(handler=set_reply(DataStart, "550", "5.7.1 No thanks"))
    assert s.send(b"BDAT 4\r\nabcdNOOP\r\n") == ["550 5.7.1", "250 2.0.0"]
    assert s.conn.transaction is None
    assert s.send(b"BDAT 2 LAST\r\nxy") == ["503 5.5.1"]


def test_have_data_after_bdat_reply_changed():
    s = in_transaction(handler=set_reply(HaveData, "554", "5.6.0 Rejected content"))
    assert s.send(b"BDAT 2 LAST\r\nhi") == ["554 5.6.0"]
    assert s.conn.transaction is None


def test_data_after_bdat_chunk():
    s = in_transaction()
    assert s.send(b"BDAT 3\r\nabcDATA\r\n") == ["250 2.0.0", "503 5.5.1"]


def test_rset_drops_chunks():
    s = in_transaction()
    assert s.send(b"BDAT 3\r\nabcRSET\r\n") == ["250 2.0.0", "250 2.0.0"]
    assert s.send(b"MAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\nBDAT 2 LAST\r\nde") == [
        "250 2.1.0", "250 2.1.5", "250 2.6.0"]
    assert s.events[-1].data == b"de"  # not "abcde"
    assert sum(isinstance(e, DataStart) for e in s.events) == 2  # one per message


# ---------------------------------------------------------------------------
# STARTTLS
def test_starttls_discards_pipelined_input():
    s = ready(tls=True)
    assert s.send(b"STARTTLS\r\nNOOP\r\n") == ["220 2.0.0"]
    assert isinstance(s.events[-1], StartTls)
    assert s.conn.waiting_for_tls
    # cleartext that arrives while the handshake runs is dropped too
    assert s.feed(b"MAIL FROM:<a@b.c>\r\n") == b""
    s.conn.tls_started()
    assert not s.conn.waiting_for_tls and s.conn.secure
    s.pump()
    assert s.conn.data_to_send() == b""
    assert s.conn.buffered == 0
    assert s.kinds() == ["Ehlo", "StartTls"]


def test_starttls_resets_session():
    s = in_transaction(tls=True)
    assert s.send(b"STARTTLS\r\n") == ["220 2.0.0"]
    s.conn.tls_started()
    assert s.conn.ehlo_as is None and s.conn.transaction is None and not s.conn.extended
    assert s.send(b"MAIL FROM:<a@b.c>\r\n") == ["503 5.5.1"]
    assert s.send(b"EHLO c\r\nSTARTTLS\r\n") == ["250", "503 5.5.1"]
    assert s.send(b"MAIL FROM:<a@b.c>\r\n") == ["250 2.1.0"]


def test_starttls_syntax():
    assert ready(tls=True).send(b"STARTTLS now\r\n") == ["501 5.5.4"]


def test_starttls_when_secure():
    assert ready(tls=True, secure=True).send(b"STARTTLS\r\n") == ["503 5.5.1"]


def test_starttls_refused_by_validator():
    s = ready(tls=True, handler=set_reply(StartTls, "454", "4.7.0 TLS not available"))
    assert s.send(b"STARTTLS\r\nNOOP\r\n") == ["454 4.7.0", "250 2.0.0"]
    assert not s.conn.waiting_for_tls and not s.conn.secure


def test_starttls_forgets_auth():
    s = ready(tls=True, auth_mechanisms=MECHS, auth_require_tls=False)
    assert s.send(f"AUTH PLAIN {b64(chr(0) + 'user' + chr(0) + 'pw')}\r\n".encode()) == [
        "235 2.7.0"]
    assert s.conn.auth == "user"
    assert s.send(b"STARTTLS\r\n") == ["220 2.0.0"]
    s.conn.tls_started()
    assert s.conn.auth is None


# ---------------------------------------------------------------------------
# AUTH
def auth_session(**kwargs) -> Session:
    kwargs.setdefault("auth_mechanisms", MECHS)
    kwargs.setdefault("secure", True)
    return ready(**kwargs)


def plain(user="user", password="pw", authzid=""):
    return b64(f"{authzid}\0{user}\0{password}")


def check_pw(secret="pw"):
    def handler(ev):
        if isinstance(ev, Auth) and not ev.credentials.check_secret(secret):
            ev.reply.code, ev.reply.message = "535", "5.7.8 Authentication credentials invalid"

    return handler


def test_auth_plain_initial_response():
    s = auth_session(handler=check_pw())
    assert s.send(f"AUTH PLAIN {plain()}\r\n".encode()) == ["235 2.7.0"]
    ev = s.events[-1]
    assert isinstance(ev, Auth)
    assert ev.credentials.mechanism == "PLAIN" and ev.credentials.authcid == "user"
    assert ev.credentials.check_secret("pw") and not ev.credentials.check_secret("nope")
    assert s.conn.auth == "user"


def test_auth_plain_with_challenge():
    s = auth_session()
    out = s.feed(b"AUTH PLAIN\r\n")
    assert out == b"334 \r\n"  # RFC 4954: "334" SP [base64]
    assert s.send(plain(authzid="boss").encode() + b"\r\n") == ["235 2.7.0"]
    assert s.events[-1].credentials.authzid == "boss"


def test_auth_login():
    s = auth_session(handler=check_pw("secret"))
    assert s.feed(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"  # Username:
    assert s.feed(b64("alice").encode() + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"  # Password:
    assert s.send(b64("secret").encode() + b"\r\n") == ["235 2.7.0"]
    creds = s.events[-1].credentials
    assert creds.mechanism == "LOGIN" and creds.authcid == "alice"
    assert creds.check_secret("secret")
    assert s.conn.auth == "alice"


def test_auth_login_initial_response():
    s = auth_session()
    assert s.feed(f"AUTH LOGIN {b64('alice')}\r\n".encode()) == b"334 UGFzc3dvcmQ6\r\n"
    assert s.send(b64("pw").encode() + b"\r\n") == ["235 2.7.0"]


def test_auth_cram_md5():
    s = auth_session(secure=False, handler=check_pw("tanstaaftanstaaf"))
    out = s.feed(b"AUTH CRAM-MD5\r\n")
    challenge = f"<{NONCE}@{HOST}>"
    assert out == f"334 {b64(challenge)}\r\n".encode()
    digest = hmac.new(b"tanstaaftanstaaf", challenge.encode(), "md5").hexdigest()
    assert s.send(b64(f"tim {digest}").encode() + b"\r\n") == ["235 2.7.0"]
    creds = s.events[-1].credentials
    assert creds.mechanism == "CRAM-MD5" and creds.authcid == "tim"
    assert creds.check_secret("tanstaaftanstaaf") and not creds.check_secret("wrong")


def test_auth_cram_md5_wrong_secret():
    s = auth_session(handler=check_pw("right"))
    s.feed(b"AUTH CRAM-MD5\r\n")
    digest = hmac.new(b"wrong", f"<{NONCE}@{HOST}>".encode(), "md5").hexdigest()
    assert s.send(b64(f"tim {digest}").encode() + b"\r\n") == ["535 5.7.8"]
    assert s.conn.auth is None and s.conn.auth_failures == 1


def test_auth_plain_needs_tls():
    s = auth_session(secure=False, tls=True)
    assert s.send(f"AUTH PLAIN {plain()}\r\n".encode()) == ["538 5.7.11"]
    assert s.send(b"AUTH LOGIN\r\n") == ["538 5.7.11"]
    assert s.conn.auth_failures == 2
    assert not any(isinstance(e, Auth) for e in s.events)
    assert s.send(b"STARTTLS\r\n") == ["220 2.0.0"]
    s.conn.tls_started()
    assert s.send(f"EHLO c\r\nAUTH PLAIN {plain()}\r\n".encode()) == ["250", "235 2.7.0"]


def test_auth_plain_without_tls_when_allowed():
    s = auth_session(secure=False, auth_require_tls=False)
    assert s.send(f"AUTH PLAIN {plain()}\r\n".encode()) == ["235 2.7.0"]


def test_auth_failures_close_the_session():
    s = auth_session(handler=check_pw("right"))
    bad = f"AUTH PLAIN {plain(password='wrong')}\r\n".encode()
    assert s.send(bad) == ["535 5.7.8"]
    assert s.send(bad) == ["535 5.7.8"]
    assert not s.conn.closing
    assert s.send(bad + b"NOOP\r\n") == ["535 5.7.8", "421 4.7.0"]
    assert s.conn.closing and s.conn.auth is None
    assert s.feed(f"AUTH PLAIN {plain(password='right')}\r\n".encode()) == b""


def test_auth_failures_limit_configurable():
    s = auth_session(handler=check_pw("right"), max_auth_failures=1)
    assert s.send(f"AUTH PLAIN {plain(password='x')}\r\n".encode()) == ["535 5.7.8", "421 4.7.0"]
    assert s.conn.closing


def test_auth_538_counts_as_failure():
    s = auth_session(secure=False, max_auth_failures=2)
    assert s.send(b"AUTH PLAIN\r\nAUTH PLAIN\r\nNOOP\r\n") == [
        "538 5.7.11", "538 5.7.11", "421 4.7.0"]
    assert s.conn.closing


def test_auth_not_advertised_and_order():
    assert ready().send(b"AUTH PLAIN\r\n") == ["502 5.5.1"]
    assert Session(auth_mechanisms=MECHS, secure=True).send(b"AUTH PLAIN\r\n") == ["503 5.5.1"]


def test_auth_unknown_mechanism_and_syntax():
    s = auth_session(auth_mechanisms=("PLAIN",))
    assert s.send(b"AUTH GSSAPI\r\n") == ["504 5.5.4"]
    assert s.send(b"AUTH CRAM-MD5\r\n") == ["504 5.5.4"]  # known, but not configured
    assert s.send(b"AUTH\r\n") == ["501 5.5.4"]
    assert s.send(b"AUTH PLAIN a b\r\n") == ["501 5.5.4"]


def test_auth_twice_and_during_transaction():
    s = auth_session()
    assert s.send(f"AUTH PLAIN {plain()}\r\n".encode()) == ["235 2.7.0"]
    assert s.send(f"AUTH PLAIN {plain()}\r\n".encode()) == ["503 5.5.1"]
    s = auth_session()
    assert s.send(f"MAIL FROM:<a@b.c>\r\nAUTH PLAIN {plain()}\r\n".encode()) == [
        "250 2.1.0", "503 5.5.1"]


def test_auth_cancelled():
    s = auth_session()
    assert s.feed(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert s.send(b"*\r\n") == ["501 5.7.0"]
    assert s.send(b"NOOP\r\n") == ["250 2.0.0"]
    assert s.conn.auth_failures == 0


@pytest.mark.parametrize(
    "line", [b"AUTH PLAIN !!!notbase64\r\n", f"AUTH PLAIN {b64('no-nuls')}\r\n".encode(),
             b"AUTH CRAM-MD5 " + b64("initial").encode() + b"\r\n"],
)
def test_auth_malformed(line):
    s = auth_session()
    assert s.send(line) == ["501 5.5.2"]
    assert s.conn.auth_failures == 1
    assert s.send(b"NOOP\r\n") == ["250 2.0.0"]


def test_auth_long_initial_response_is_not_a_long_line():
    s = auth_session()
    response = plain(user="u" * 1000, password="p" * 3000)
    assert len(response) > 512
    assert s.send(f"AUTH PLAIN {response}\r\n".encode()) == ["235 2.7.0"]
    assert s.events[-1].credentials.authcid == "u" * 1000


def test_auth_long_response_after_challenge():
    s = auth_session()
    assert s.feed(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert s.send(plain(password="p" * 3000).encode() + b"\r\n") == ["235 2.7.0"]


def test_auth_then_mail():
    s = auth_session()
    assert s.send(f"AUTH PLAIN {plain()}\r\nMAIL FROM:<a@b.c>\r\n".encode()) == [
        "235 2.7.0", "250 2.1.0"]


# ---------------------------------------------------------------------------
# limits and bad input
def test_command_line_limit():
    s = ready()
    line = b"NOOP " + b"x" * 505 + b"\r\n"
    assert len(line) == 512
    assert s.send(line) == ["250 2.0.0"]
    assert s.send(b"NOOP " + b"x" * 506 + b"\r\n") == ["500 5.5.2"]
    assert s.send(b"NOOP\r\n") == ["250 2.0.0"]


def test_long_line_reply_text():
    assert lines(ready().feed(b"x" * 600 + b"\r\n")) == ["500 5.5.2 Line too long"]


def test_long_line_is_not_executed():
    s = ready()
    assert s.send(b"MAIL FROM:<" + b"a" * 600 + b"@b.c>\r\n") == ["500 5.5.2"]
    assert s.conn.transaction is None and [type(e) for e in s.events] == [Ehlo]


@pytest.mark.parametrize("step", [1, 7, 100, 511, 512, 513])
def test_long_line_over_many_reads(step):
    s = ready()
    wire = b"NOOP " + b"x" * 3000 + b"\r\nNOOP\r\n"
    out = b""
    for i in range(0, len(wire), step):
        out += s.feed(wire[i:i + step])
        assert s.conn.buffered <= 512 + step
    assert codes(out) == ["500 5.5.2", "250 2.0.0"]


def test_long_line_that_looks_like_a_command_later():
    # the tail of a discarded line must not be read as a command
    s = ready()
    out = s.feed(b"X" * 600) + s.feed(b"QUIT\r\nNOOP\r\n")
    assert codes(out) == ["500 5.5.2", "250 2.0.0"]
    assert not s.conn.closing


@pytest.mark.parametrize("line", [b"NO\x00OP\r\n", b"MAIL FROM:<a\x00@b.c>\r\n", b"\x00\r\n",
                                  b"EHLO a\x00b\r\n"])
def test_nul_in_command(line):
    s = ready()
    assert s.send(line) == ["500 5.5.2"]
    assert s.conn.transaction is None
    assert s.send(b"NOOP\r\n") == ["250 2.0.0"]


@pytest.mark.parametrize("line", [b"EHLO \xff\xfe\r\n", b"MAIL FROM:<\xe9t\xe9@b.c>\r\n",
                                  b"\x80\r\n", b"NOOP \xc3\r\n"])
def test_non_utf8_command(line):
    s = ready()
    assert s.send(line) == ["500 5.5.2"]
    assert s.conn.ehlo_as == "client.example.com" and s.conn.transaction is None
    assert s.send(b"NOOP\r\n") == ["250 2.0.0"]


def test_bare_cr_in_command_is_refused():
    # it would otherwise be echoed, bare, in the reply ("250 Hello a\rb")
    s = ready()
    assert s.send(b"EHLO a\rb\r\nHELO x\ry\r\n") == ["500 5.5.2", "500 5.5.2"]
    assert s.conn.ehlo_as == "client.example.com"


def test_max_bad_commands():
    s = ready(max_bad_commands=3)
    assert s.send(b"FOO\r\nMAIL\r\nRCPT TO:<a@b.c>\r\nNOOP\r\n") == [
        "500 5.5.2", "501 5.5.4", "503 5.5.1", "421 4.7.0"]
    assert s.conn.closing
    assert s.feed(b"NOOP\r\n") == b""


def test_max_bad_commands_default_20():
    s = ready()
    assert s.send(b"FOO\r\n" * 19) == ["500 5.5.2"] * 19
    assert s.send(b"FOO\r\n") == ["500 5.5.2", "421 4.7.0"]
    assert s.conn.closing


def test_max_bad_commands_counts_long_lines_and_nul():
    s = ready(max_bad_commands=2)
    assert s.send(b"x" * 600 + b"\r\nA\x00\r\nNOOP\r\n") == ["500 5.5.2", "500 5.5.2", "421 4.7.0"]


def test_max_bad_commands_none():
    s = ready(max_bad_commands=None)
    assert s.send(b"FOO\r\n" * 100) == ["500 5.5.2"] * 100
    assert not s.conn.closing


def test_one_421_when_both_limits_hit():
    s = auth_session(max_bad_commands=2, max_auth_failures=1)
    assert s.send(b"FOO\r\n") == ["500 5.5.2"]
    # a malformed AUTH is both a bad command and an AUTH failure
    assert s.send(b"AUTH PLAIN !!!\r\n") == ["501 5.5.2", "421 4.7.0"]
    assert s.conn.closing


def test_one_421_when_validator_closes_on_last_auth_failure():
    s = auth_session(max_auth_failures=1, handler=set_reply(Auth, "421", "4.7.0 Go away"))
    assert s.send(f"AUTH PLAIN {plain()}\r\nNOOP\r\n".encode()) == ["421 4.7.0"]
    assert s.conn.closing and s.conn.auth is None and s.conn.auth_failures == 1


def test_timed_out():
    s = ready()
    s.conn.timed_out()
    assert lines(s.conn.data_to_send()) == ["421 4.4.2 Connection timed out"]
    assert s.conn.closing
    s.conn.timed_out()
    assert s.conn.data_to_send() == b""
    assert s.feed(b"NOOP\r\n") == b""


def test_timed_out_in_data():
    s = in_transaction()
    assert s.send(b"DATA\r\npartial\r\n") == ["354"]
    s.conn.timed_out()
    assert codes(s.conn.data_to_send()) == ["421 4.4.2"]
    assert s.feed(b".\r\n") == b""
    assert not any(isinstance(e, HaveData) for e in s.events)


def test_no_timeout_reply_after_quit():
    s = ready()
    assert s.send(b"QUIT\r\n") == ["221 2.0.0"]
    s.conn.timed_out()
    assert s.conn.data_to_send() == b""


# ---------------------------------------------------------------------------
# properties
class Recorder:
    """A deterministic validator; records what it saw."""

    def __init__(self):
        self.seen = []

    def __call__(self, ev):
        kind = type(ev)
        if kind is Mail and ev.sender.startswith("bad"):
            ev.reply.code, ev.reply.message = "550", "5.7.1 Sender rejected"
        elif kind is Rcpt and ev.recipient.startswith("reject"):
            ev.reply.code, ev.reply.message = "550", "5.1.1 No such user"
        elif kind is Rcpt and ev.recipient.startswith("close"):
            ev.reply.code, ev.reply.message = "421", "4.3.0 Closing"
        elif kind is Auth and not ev.credentials.check_secret("pw"):
            ev.reply.code, ev.reply.message = "535", "5.7.8 Authentication credentials invalid"
        elif kind is HaveData:
            ev.reply.message = f"2.6.0 {len(ev.data)} octets queued"
        self.seen.append(describe(ev))


def describe(ev):
    kind = type(ev).__name__
    if isinstance(ev, (Ehlo, Helo)):
        detail = ev.name
    elif isinstance(ev, Mail):
        detail = (ev.sender, sorted(ev.params.items()))
    elif isinstance(ev, Rcpt):
        detail = (ev.recipient, sorted(ev.params.items()))
    elif isinstance(ev, DataStart):
        detail = ev.bdat
    elif isinstance(ev, HaveData):
        detail = (ev.data, ev.transaction.sender, tuple(ev.transaction.recipients))
    elif isinstance(ev, Auth):
        detail = (ev.credentials.mechanism, ev.credentials.authcid)
    else:
        detail = None
    return kind, detail, ev.reply.code, ev.reply.message


def property_connection(**overrides):
    kwargs = {"max_size": 120, "max_recipients": 3, "max_bad_commands": 30,
              "auth_mechanisms": MECHS, "auth_require_tls": False, "nonce": lambda: NONCE}
    kwargs.update(overrides)
    conn = ServerConnection(HOST, **kwargs)
    conn.banner(GREETING)
    return conn


def drive(chunks, **overrides):
    """Feed ``chunks`` one by one, answering every event; return (events, output)."""
    conn = property_connection(**overrides)
    rec = Recorder()
    out = [conn.data_to_send()]
    for chunk in chunks:
        conn.receive_data(chunk)
        while (ev := conn.next_event()) is not None:
            rec(ev)
            conn.respond()
        out.append(conn.data_to_send())
    return rec.seen, b"".join(out), conn


_CRAM = hmac.new(b"pw", f"<{NONCE}@{HOST}>".encode(), "md5").hexdigest()

# A whole session exercising most paths, as one byte stream.
SESSION = b"".join([
    b"EHLO client.example.com\r\n",
    b"HELP\r\nVRFY someone\r\nEXPN list\r\nFOO\r\n",
    b"MAIL FROM:<a@example.com> SIZE=100 BODY=8BITMIME\r\n",
    b"RCPT TO:<b@example.com>\r\nRCPT TO:<reject@example.com>\r\n",
    b"RCPT TO:<c@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c+2Bx@example.com\r\n",
    b"RCPT TO:<bad address>\r\nRCPT TO:<d@example.com> FOO=1\r\n",
    b"DATA\r\n", dot_stuff(b"Subject: hi\r\n\r\n.dotted\r\n..\r\n\r\nend\r\n"),
    b"MAIL FROM:<bad@example.com>\r\nRCPT TO:<x@example.com>\r\n",
    b"MAIL FROM:<>\r\nRCPT TO:<p@example.com>\r\nBDAT 10\r\n0123\r\n.\r\nX",
    b"BDAT 5 LAST\r\n\n.\r\nx",
    b"MAIL FROM:<a@example.com>\r\nRCPT TO:<q@example.com>\r\nDATA\r\nbare\nlf\r\n.\r\n",
    b"MAIL FROM:<a@example.com> SIZE=1000\r\n",
    b"MAIL FROM:<a@example.com>\r\nRCPT TO:<q@example.com>\r\nDATA\r\n",
    b"x" * 200 + b"\r\n.\r\n",
    b"BDAT 4\r\nNOOPRSET\r\n", b"N" * 700 + b"\r\n", b"NO\x00OP\r\n", b"\xff\xfe\r\n",
    f"AUTH PLAIN {plain(password='wrong')}\r\n".encode(),
    b"AUTH LOGIN\r\n", b64("user").encode(), b"\r\n", b64("pw").encode(), b"\r\n",
    b"RSET\r\nNOOP\r\n",
    "MAIL FROM:<jürgen@example.com>\r\nMAIL FROM:<jürgen@example.com> SMTPUTF8\r\n".encode(),
    "RCPT TO:<用户@例子.广告>\r\nRCPT TO:<e@example.com>\r\nRCPT TO:<f@example.com>\r\n".encode(),
    b"RCPT TO:<g@example.com>\r\n",
    b"DATA\r\nhi\r\n.\r\n",
    b"MAIL FROM:<a@example.com> BODY=BINARYMIME\r\nRCPT TO:<g@example.com>\r\nDATA\r\n",
    b"BDAT 3 LAST\r\n\x00\r\x00QUIT\r\nNOOP\r\n",
])


def test_session_stream_sanity():
    seen, out, conn = drive([SESSION])
    got = codes(out)
    assert conn.closing and got[-1] == "221 2.0.0"
    assert sum(k[0] == "HaveData" for k in seen) == 4
    for code in ["252 2.5.0", "502 5.5.1", "550 5.1.1", "501 5.1.3", "555 5.5.4", "550 5.7.1",
                 "503 5.5.1", "550 5.6.11", "552 5.3.4", "500 5.5.2", "535 5.7.8", "235 2.7.0",
                 "553 5.6.7", "452 4.5.3", "214 2.0.0", "334"]:
        assert code in got, code
    assert conn.auth == "user"


def test_session_stream_one_byte_at_a_time():
    whole = drive([SESSION])[:2]
    assert drive([SESSION[i:i + 1] for i in range(len(SESSION))])[:2] == whole


@FAST
@given(cuts=st.lists(st.integers(0, len(SESSION)), max_size=60))
def test_property_any_split_of_a_session(cuts):
    assert drive(split_at(SESSION, cuts))[:2] == drive([SESSION])[:2]


# Pieces of sessions, good and bad, to make arbitrary streams from.
_PIECES = [
    b"EHLO c\r\n", b"HELO c\r\n", b"MAIL FROM:<a@b.c>\r\n", b"MAIL FROM:<bad@b.c>\r\n",
    b"MAIL FROM:<> SIZE=50 BODY=BINARYMIME\r\n", b"MAIL FROM:<a@b.c> SIZE=999\r\n",
    b"RCPT TO:<d@e.f>\r\n", b"RCPT TO:<reject@e.f>\r\n", b"RCPT TO:<d@e.f> NOTIFY=NEVER\r\n",
    b"DATA\r\n", b"hello\r\n", b"..dot\r\n", b".\r\n", b"\r\n.\r\n", b"\n.\n", b"\r\n.\n",
    b"\n.\r\n", b"bare\nlf\r\n", b"bare\rcr\r\n", b"x" * 130 + b"\r\n", b"BDAT 3\r\n",
    b"BDAT 2 LAST\r\n", b"BDAT 0 LAST\r\n", b"abc", b"RSET\r\n", b"NOOP\r\n", b"FOO\r\n",
    b"VRFY x\r\n", b"STARTTLS\r\n", b"AUTH PLAIN\r\n", f"AUTH PLAIN {plain()}\r\n".encode(),
    b"AUTH LOGIN\r\n", b"AUTH CRAM-MD5\r\n", b64(f"user {_CRAM}").encode() + b"\r\n",
    b64("user").encode() + b"\r\n", b"*\r\n", b"N" * 600, b"\r\n", b"\r", b"\n", b"\x00",
    b"\xff", b".",
]
# Pieces that end a session (or a transaction): rarer, or nothing gets far.
_ENDERS = [b"QUIT\r\n", b"RCPT TO:<close@e.f>\r\n"]
_TXN = b"EHLO c\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<d@e.f>\r\n"
_PRELUDES = [b"", b"EHLO c\r\n", _TXN, _TXN + b"DATA\r\n", _TXN + b"BDAT 7\r\n",
             b"EHLO c\r\nAUTH LOGIN\r\n", b"EHLO c\r\nAUTH CRAM-MD5\r\n"]
_piece = st.one_of(
    st.sampled_from(_PIECES), st.sampled_from(_PIECES), st.sampled_from(_PIECES),
    st.binary(max_size=8),
    st.integers(0, 9).flatmap(lambda n: st.sampled_from(_ENDERS) if n == 0 else st.just(b"")),
)
_stream = st.tuples(st.sampled_from(_PRELUDES), st.lists(_piece, max_size=40)).map(
    lambda t: t[0] + b"".join(t[1]))


@FAST
@given(stream=_stream, cuts=st.lists(st.integers(0, 2000), max_size=30))
def test_property_any_split_of_any_stream(stream, cuts):
    whole = drive([stream])
    split = drive(split_at(stream, cuts))
    assert split[:2] == whole[:2]
    assert split[2].closing == whole[2].closing


_GARBAGE_VERBS = [b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"BDAT", b"RSET", b"NOOP",
                  b"QUIT", b"STARTTLS", b"AUTH", b"VRFY", b"HELP", b"EXPN", b"AUTH PLAIN",
                  b"AUTH LOGIN", b"AUTH CRAM-MD5", b"BDAT 3", b"BDAT 0 LAST", b"BDAT 2 LAST"]
_GARBAGE_ARGS = st.one_of(
    st.binary(max_size=40),
    st.text(max_size=30).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"<a@b.c>", b"<>", "<jü@b.c> SMTPUTF8".encode(), b"<a@b.c> SIZE=5",
                     b"<a@b.c> BODY=BINARYMIME", b"=", b"*", b"AGEAYg==", b"<a@[IPv6:::1]>",
                     b"<a@[1.2.3.4]> NOTIFY=SUCCESS ORCPT=utf-8;a\\x{FC}", b"<@x,@y:a@b>"]),
)
_GARBAGE_LINE = st.tuples(
    st.one_of(st.sampled_from(_GARBAGE_VERBS), st.binary(max_size=6)),
    st.sampled_from([b"", b" ", b"  "]),
    _GARBAGE_ARGS,
    st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\r\n.\r\n", b"\n.\n", b"\r\n\r\n"]),
).map(b"".join)
_garbage = st.tuples(
    st.sampled_from(_PRELUDES),
    st.lists(st.one_of(_GARBAGE_LINE, st.binary(max_size=60), _piece), max_size=40),
).map(lambda t: [t[0], *t[1]])
_REPLIES = [None, ("550", "5.7.1 No"), ("421", "4.3.0 Bye"), ("451", "4.3.0 Later"),
            ("250", "2.0.0 Fine"), ("354", "Go ahead"), ("220", "2.0.0 Go"), ("235", "2.7.0 Ok"),
            ("535", "5.7.8 No"), ("250", "multi\nline\nreply")]
_CONFIGS = [
    {},
    {"tls": True},
    {"secure": True, "max_size": None, "max_recipients": None, "max_bad_commands": None},
    {"max_size": 10, "max_recipients": 1, "max_bad_commands": 5, "max_auth_failures": 1},
    {"auth_mechanisms": (), "tls": True, "auth_require_tls": True},
]


@FAST
@given(pieces=_garbage, replies=st.lists(st.sampled_from(_REPLIES), max_size=20),
       config=st.sampled_from(_CONFIGS), rejected=st.booleans(), timeout=st.booleans())
def test_property_garbage_never_raises(pieces, replies, config, rejected, timeout):
    kwargs = {"max_size": 120, "max_recipients": 3, "auth_mechanisms": MECHS,
              "auth_require_tls": False, "nonce": lambda: NONCE}
    kwargs.update(config)
    conn = ServerConnection(HOST, **kwargs)
    conn.banner(Reply("554", "5.7.1 Go away") if rejected else GREETING)
    out = [conn.data_to_send()]
    n = 0
    for piece in pieces:
        conn.receive_data(piece)
        while (ev := conn.next_event()) is not None:
            choice = replies[n % len(replies)] if replies else None
            n += 1
            if choice is not None:
                ev.reply.code, ev.reply.message = choice
            conn.respond()
        if conn.waiting_for_tls:
            conn.tls_started()
        out.append(conn.data_to_send())
    if timeout:
        conn.timed_out()
    out.append(conn.data_to_send())
    data = b"".join(out)
    assert data.endswith(b"\r\n")
    for line in data.split(b"\r\n")[:-1]:
        assert _LINE_RE.match(line), line
        assert b"\r" not in line and b"\n" not in line, line


def test_non_ascii_command_word_is_unknown():
    # str.upper() would turn the dotless i into I and run QUIT
    conn = ServerConnection("mx.test")
    conn.banner(Reply("220", "mx.test ESMTP"))
    conn.data_to_send()
    conn.receive_data("qu\u0131t\r\n".encode())
    assert conn.next_event() is None
    assert conn.data_to_send().startswith(b"500 5.5.2")
    assert not conn.closing
