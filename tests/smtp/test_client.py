"""Tests for slimta.smtp.client: the sans-IO SMTP/LMTP client state machine.

Most tests wire a ClientConnection to the real sans-IO ServerConnection in
memory: what one side writes the other reads. Where the server cannot say
what a test needs (no DSN offered, LMTP, XOAUTH2, broken replies) the
server's bytes are written by hand. No sockets, no asyncio.
"""

from __future__ import annotations

import base64

import pytest
from chunking import split_at
from hypothesis import given, settings
from hypothesis import strategies as st
from smtphelp import HOST, NONCE

from slimta.smtp.client import (
    MAX_REPLY_LINE_LENGTH,
    MAX_REPLY_LINES,
    REPLY_TAGS,
    ClientConnection,
    ClientError,
)
from slimta.smtp.data import LINE_LENGTH_LIMIT, fold_long_lines, to_crlf
from slimta.smtp.reply import Reply
from slimta.smtp.server import Auth, HaveData, Mail, Rcpt, ServerConnection

FAST = settings(max_examples=200, deadline=None)
SECRETS = {"tim": "tanstaaftanstaaf", "jürgen": "pässwörd"}


def unfold(data: bytes) -> bytes:
    return data.replace(b"\r\n ", b"")


# ---------------------------------------------------------------------------
# message content helpers (slimta.smtp.data)
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", b""),
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb", b"a\r\nb"),
        (b"a\r\r\nb\n\n", b"a\r\n\r\nb\r\n\r\n"),
        (b"\n.\r\n", b"\r\n.\r\n"),
    ],
)
def test_to_crlf(content, expected):
    assert to_crlf(content) == expected


def test_to_crlf_returns_clean_content_as_is():
    content = b"line\r\n" * 100
    assert to_crlf(content) is content


def test_fold_limit_is_postfix_default():
    assert LINE_LENGTH_LIMIT == 998


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"abc\r\n", b"abc\r\n"),
        (b"abcd\r\n", b"abc\r\n d\r\n"),
        (b"abcdefg\r\n12\r\n", b"abc\r\n de\r\n fg\r\n12\r\n"),
        (b"abcdefgh", b"abc\r\n de\r\n fg\r\n h"),
        (b"12\r\nabcd\r\n12345", b"12\r\nabc\r\n d\r\n123\r\n 45"),
        (b"\r\n\r\nabcd", b"\r\n\r\nabc\r\n d"),
    ],
)
def test_fold_small_limit(content, expected):
    # a line is cut after `limit` octets; each continuation is a space and
    # limit - 1 octets, as Postfix's smtp_line_length_limit does
    assert fold_long_lines(content, 3) == expected


def test_fold_5000_octet_line():
    line = (bytes(range(33, 127)) * 54)[:5000]  # printable octets
    assert len(line) == 5000
    content = b"Subject: long\r\n\r\n" + line + b"\r\nend\r\n"
    folded = fold_long_lines(content)
    lines = folded.split(b"\r\n")
    assert lines[:2] == [b"Subject: long", b""]
    body = lines[2:-2]
    assert body[0] == line[:998]
    assert all(x[:1] == b" " and len(x) == 998 for x in body[1:-1])
    # 5000 = 998 + 4 * 997 + 14
    assert len(body) == 6 and body[-1] == b" " + line[-14:]
    assert lines[-2:] == [b"end", b""]
    assert unfold(folded) == content


def test_fold_boundaries():
    assert fold_long_lines(b"a" * 998 + b"\r\n") == b"a" * 998 + b"\r\n"
    assert fold_long_lines(b"a" * 999 + b"\r\n") == b"a" * 998 + b"\r\n a\r\n"
    assert fold_long_lines(b"a" * 998) == b"a" * 998
    assert fold_long_lines(b"a" * 999) == b"a" * 998 + b"\r\n a"


def test_fold_returns_content_as_is_when_nothing_is_long():
    content = (b"x" * 997 + b"\r\n") * 50
    assert fold_long_lines(content) is content


def test_fold_off_and_bad_limits():
    content = b"a" * 5000
    assert fold_long_lines(content, 0) is content
    with pytest.raises(ValueError):
        fold_long_lines(content, 1)


@FAST
@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                   max_size=12),
    limit=st.integers(2, 12),
    final=st.booleans(),
)
def test_fold_property(lines, limit, final):
    content = b"\r\n".join(lines) + (b"\r\n" if final else b"")
    folded = fold_long_lines(content, limit)
    out_lines = folded.split(b"\r\n")
    assert all(len(x) <= limit for x in out_lines)
    # every inserted break is CRLF SP; nothing else changes
    expected = []
    for line in content.split(b"\r\n"):
        pieces = [line[:limit]]
        pieces += [b" " + line[i:i + limit - 1] for i in range(limit, len(line), limit - 1)]
        expected.append(b"\r\n".join(pieces))
    assert folded == b"\r\n".join(expected)


# ---------------------------------------------------------------------------
# a client wired to the real sans-IO server
class Pair:
    """A ClientConnection and a ServerConnection talking in memory.

    ``handler(event)`` may change the server's replies; every event is kept
    in ``events``. ``send(data)`` gives the server the client's bytes and
    the client the server's answer, and returns the client's replies.
    """

    def __init__(self, handler=None, lmtp=False, client_kwargs=None, **kwargs):
        kwargs.setdefault("nonce", lambda: NONCE)
        self.server = ServerConnection(HOST, **kwargs)
        self.client = ClientConnection(lmtp, **(client_kwargs or {}))
        self.handler = handler
        self.events = []
        self.wire = []  # everything the client wrote
        self.server.banner(Reply("220", f"{HOST} ESMTP"))
        self.client.expect_banner()
        self.client.receive_data(self.server.data_to_send())
        assert self.replies() == [("BANNER", "220")]

    def send(self, data: bytes) -> list[tuple[str, str]]:
        self.wire.append(data)
        self.server.receive_data(data)
        while (ev := self.server.next_event()) is not None:
            self.events.append(ev)
            if self.handler is not None:
                self.handler(ev)
            self.server.respond()
        self.client.receive_data(self.server.data_to_send())
        return self.replies()

    def replies(self) -> list[tuple[str, str]]:
        """The tagged replies available, as ('TAG', 'code[ esc]')."""
        return [(tag, code(reply)) for tag, reply in self.all_replies()]

    def all_replies(self) -> list[tuple[str, Reply]]:
        out = []
        while (item := self.client.next_reply()) is not None:
            out.append(item)
        return out

    def ehlo(self) -> Pair:
        assert self.send(self.client.ehlo("client.example.com")) == [("EHLO", "250")]
        return self

    def of(self, kind) -> list:
        return [ev for ev in self.events if isinstance(ev, kind)]


def code(reply: Reply) -> str:
    esc = reply.enhanced_status_code
    return f"{reply.code} {esc}" if esc else reply.code


def feed(client: ClientConnection, data: bytes) -> list[tuple[str, Reply]]:
    client.receive_data(data)
    out = []
    while (item := client.next_reply()) is not None:
        out.append(item)
    return out


def tags(items) -> list[str]:
    return [tag for tag, _ in items]


def hand_written(ehlo_reply: bytes, lmtp: bool = False) -> ClientConnection:
    """A client after a banner and the given EHLO/LHLO reply."""
    client = ClientConnection(lmtp)
    client.expect_banner()
    client.lhlo("c") if lmtp else client.ehlo("c")
    got = feed(client, b"220 mx ESMTP\r\n" + ehlo_reply)
    assert tags(got) == ["BANNER", "LHLO" if lmtp else "EHLO"]
    return client


# ---------------------------------------------------------------------------
# whole transactions
def test_plain_transaction():
    p = Pair().ehlo()
    c = p.client
    assert "PIPELINING" in c.extensions and c.pipelining
    assert c.size_limit == 10 * 1024 * 1024
    assert p.send(c.mail("sender@example.com")) == [("MAIL", "250 2.1.0")]
    assert p.send(c.rcpt("rcpt@example.net")) == [("RCPT", "250 2.1.5")]
    assert p.send(c.data()) == [("DATA", "354")]
    content = b"Subject: hi\r\n\r\nHello.\r\n"
    assert p.send(c.message(content)) == [("DATA_END", "250 2.6.0")]
    (have,) = p.of(HaveData)
    assert have.data == content
    assert have.transaction.sender == "sender@example.com"
    assert have.transaction.recipients == ["rcpt@example.net"]
    assert p.send(c.rset()) == [("RSET", "250 2.0.0")]
    assert p.send(c.noop()) == [("NOOP", "250 2.0.0")]
    assert p.send(c.quit()) == [("QUIT", "221 2.0.0")]
    assert c.closing
    assert c.pending == ()


def test_wire_format_of_commands():
    c = hand_written(b"250 mx\r\n")
    assert c.mail("a@b.example") == b"MAIL FROM:<a@b.example>\r\n"
    assert c.mail("") == b"MAIL FROM:<>\r\n"
    assert c.rcpt("postmaster") == b"RCPT TO:<postmaster>\r\n"
    assert c.rcpt('"a b"@example.com') == b'RCPT TO:<"a b"@example.com>\r\n'
    assert c.rcpt("a b>@example.com") == b'RCPT TO:<"a b>"@example.com>\r\n'
    assert c.data() == b"DATA\r\n"
    assert c.rset() == b"RSET\r\n"
    assert c.noop() == b"NOOP\r\n"
    assert c.quit() == b"QUIT\r\n"
    assert c.helo("client.example.com") == b"HELO client.example.com\r\n"
    assert c.pending == ("MAIL", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "RSET", "NOOP", "QUIT",
                         "HELO")


def test_pipelined_transaction_one_write():
    p = Pair().ehlo()
    c = p.client
    rcpts = [f"r{i}@example.net" for i in range(5)]
    data = c.mail("s@example.com") + b"".join(c.rcpt(r) for r in rcpts) + c.data()
    assert c.pending == ("MAIL", *["RCPT"] * 5, "DATA")
    # all commands in one write; the replies come back in order, each tagged
    assert p.send(data) == [("MAIL", "250 2.1.0"), *[("RCPT", "250 2.1.5")] * 5, ("DATA", "354")]
    assert len(p.wire) == 2  # EHLO, then the pipelined group
    assert p.send(c.message(b"x\r\n")) == [("DATA_END", "250 2.6.0")]
    assert p.of(HaveData)[0].transaction.recipients == rcpts


def test_pipelined_replies_in_one_read_are_given_one_by_one():
    c = hand_written(b"250-mx\r\n250 PIPELINING\r\n")
    c.mail("a@b.c")
    c.rcpt("d@e.f")
    c.data()
    c.receive_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 Go ahead\r\n")
    assert c.next_reply()[0] == "MAIL"
    assert c.pending == ("RCPT", "DATA")
    assert c.next_reply()[0] == "RCPT"
    assert c.next_reply() == ("DATA", Reply("354", "Go ahead"))
    assert c.next_reply() is None


def test_rejected_rcpt_among_accepted():
    def handler(ev):
        if isinstance(ev, Rcpt) and ev.recipient.startswith("bad"):
            ev.reply.code, ev.reply.message = "550", "5.1.1 No such user"

    p = Pair(handler).ehlo()
    c = p.client
    data = (c.mail("s@example.com") + c.rcpt("good1@example.net") + c.rcpt("bad@example.net")
            + c.rcpt("good2@example.net") + c.data())
    got = p.send(data)
    assert got == [("MAIL", "250 2.1.0"), ("RCPT", "250 2.1.5"), ("RCPT", "550 5.1.1"),
                   ("RCPT", "250 2.1.5"), ("DATA", "354")]
    assert p.send(c.message(b"hi\r\n")) == [("DATA_END", "250 2.6.0")]
    assert p.of(HaveData)[0].transaction.recipients == ["good1@example.net", "good2@example.net"]


def test_all_rcpts_rejected_then_data_fails_and_message_is_refused():
    def handler(ev):
        if isinstance(ev, Rcpt):
            ev.reply.code, ev.reply.message = "550", "5.1.1 No"

    p = Pair(handler).ehlo()
    c = p.client
    got = p.send(c.mail("s@example.com") + c.rcpt("a@example.net") + c.data())
    assert got == [("MAIL", "250 2.1.0"), ("RCPT", "550 5.1.1"), ("DATA", "554 5.5.1")]
    with pytest.raises(RuntimeError):
        c.message(b"never sent as commands\r\n")
    assert p.send(c.rset()) == [("RSET", "250 2.0.0")]


def test_message_only_after_354():
    c = hand_written(b"250 mx\r\n")
    with pytest.raises(RuntimeError):
        c.message(b"x")
    c.mail("a@b.c")
    c.rcpt("d@e.f")
    c.data()
    with pytest.raises(RuntimeError):  # the 354 has not come yet
        c.message(b"x")
    feed(c, b"250 ok\r\n250 ok\r\n354 go\r\n")
    assert c.message(b"x") == b"x\r\n.\r\n"
    with pytest.raises(RuntimeError):  # once only
        c.message(b"x")


# ---------------------------------------------------------------------------
# MAIL and RCPT parameters
def test_dsn_params_sent_when_offered():
    p = Pair().ehlo()
    c = p.client
    assert "DSN" in c.extensions
    data = (c.mail("s@example.com", ret="hdrs", envid="id+1=2 x")
            + c.rcpt("r@example.net", notify=["SUCCESS", "failure"],
                     orcpt="rfc822;r+x=y@example.net")
            + c.rcpt("q@example.net", notify="NEVER", orcpt="q@example.org")
            + c.data())
    assert p.send(data) == [("MAIL", "250 2.1.0"), ("RCPT", "250 2.1.5"), ("RCPT", "250 2.1.5"),
                            ("DATA", "354")]
    assert p.wire[-1].split(b"\r\n")[:3] == [
        b"MAIL FROM:<s@example.com> RET=HDRS ENVID=id+2B1+3D2+20x",
        b"RCPT TO:<r@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;r+2Bx+3Dy@example.net",
        b"RCPT TO:<q@example.net> NOTIFY=NEVER ORCPT=rfc822;q@example.org",
    ]
    p.send(c.message(b"x\r\n"))
    t = p.of(HaveData)[0].transaction
    assert t.ret == "HDRS"
    assert t.rcpt_params["r@example.net"] == {"notify": ["SUCCESS", "FAILURE"],
                                              "orcpt": "rfc822;r+x=y@example.net"}
    assert t.rcpt_params["q@example.net"] == {"notify": ["NEVER"], "orcpt": "rfc822;q@example.org"}


def test_envid_round_trip():
    p = Pair().ehlo()
    c = p.client
    p.send(c.mail("s@example.com", envid="a+b=c d") + c.rcpt("r@example.net") + c.data())
    p.send(c.message(b"x\r\n"))
    assert p.of(HaveData)[0].transaction.envid == "a+b=c d"


def test_utf8_orcpt_round_trip():
    p = Pair().ehlo()
    c = p.client
    got = p.send(c.mail("s@example.com", smtputf8=True)
                 + c.rcpt("jürgen@example.net", orcpt="rfc822;jürgen+x@exämple.net")
                 + c.rcpt("a@example.net", orcpt="utf-8;a\\b@example.net"))
    assert got == [("MAIL", "250 2.1.0"), ("RCPT", "250 2.1.5"), ("RCPT", "250 2.1.5")]
    assert p.wire[-1].split(b"\r\n")[1].endswith(
        b"ORCPT=utf-8;j\\x{FC}rgen\\x{2B}x@ex\\x{E4}mple.net")
    t = p.server.transaction
    assert t.rcpt_params["jürgen@example.net"]["orcpt"] == "utf-8;jürgen+x@exämple.net"
    assert t.rcpt_params["a@example.net"]["orcpt"] == "utf-8;a\\b@example.net"


def test_dsn_params_left_out_when_not_offered():
    c = hand_written(b"250-mx.example.com\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
    assert "DSN" not in c.extensions
    assert c.mail("a@b.c", ret="FULL", envid="x") == b"MAIL FROM:<a@b.c>\r\n"
    assert c.rcpt("d@e.f", notify=["FAILURE"], orcpt="rfc822;d@e.f") == b"RCPT TO:<d@e.f>\r\n"


def test_other_params_left_out_when_not_offered():
    c = hand_written(b"250 mx.example.com\r\n")
    assert len(c.extensions) == 0
    assert not c.pipelining and c.size_limit is None
    line = c.mail("a@b.c", size=100, body="8BITMIME", smtputf8=True, ret="FULL", envid="x",
                  auth="a@b.c")
    assert line == b"MAIL FROM:<a@b.c>\r\n"


def test_body_needs_the_matching_extension():
    c = hand_written(b"250-mx\r\n250-8BITMIME\r\n250 SIZE 0\r\n")
    assert c.size_limit is None  # SIZE 0: no limit
    assert c.mail("a@b.c", body="BINARYMIME", size=5) == b"MAIL FROM:<a@b.c> SIZE=5\r\n"
    assert c.mail("a@b.c", body="7bit") == b"MAIL FROM:<a@b.c> BODY=7BIT\r\n"
    c = hand_written(b"250-mx\r\n250-BINARYMIME\r\n250 CHUNKING\r\n")
    assert c.mail("a@b.c", body="8BITMIME") == b"MAIL FROM:<a@b.c>\r\n"
    assert c.mail("a@b.c", body="BINARYMIME") == b"MAIL FROM:<a@b.c> BODY=BINARYMIME\r\n"


def test_size_body_smtputf8_params_reach_the_server():
    p = Pair().ehlo()
    c = p.client
    got = p.send(c.mail("jürgen@exämple.com", size=1234, body="8bitmime", smtputf8=True))
    assert got == [("MAIL", "250 2.1.0")]
    (mail,) = p.of(Mail)
    assert mail.sender == "jürgen@exämple.com"
    assert mail.params == {"SIZE": "1234", "BODY": "8BITMIME", "SMTPUTF8": None}
    t = p.server.transaction
    assert (t.size, t.body, t.smtputf8) == (1234, "8BITMIME", True)


def test_size_over_the_server_limit():
    p = Pair(max_size=1000).ehlo()
    c = p.client
    assert c.size_limit == 1000
    assert p.send(c.mail("a@example.com", size=1001)) == [("MAIL", "552 5.3.4")]


def test_auth_param_only_when_auth_is_offered():
    c = hand_written(b"250-mx\r\n250 AUTH PLAIN\r\n")
    assert c.mail("a@b.c", auth="") == b"MAIL FROM:<a@b.c> AUTH=<>\r\n"
    assert c.mail("a@b.c", auth="<>") == b"MAIL FROM:<a@b.c> AUTH=<>\r\n"
    assert c.mail("a@b.c", auth="x+y=z@b.c") == b"MAIL FROM:<a@b.c> AUTH=x+2By+3Dz@b.c\r\n"
    p = Pair(auth_mechanisms=("PLAIN",), auth_require_tls=False).ehlo()
    assert p.send(p.client.mail("a@example.com", auth="x+y@example.com")) == [("MAIL", "250 2.1.0")]
    assert p.server.transaction.auth == "x+y@example.com"


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.mail("a@b.c\r\nRCPT TO:<x@y.z>"),
        lambda c: c.mail("a@b.c> SIZE=1"),
        lambda c: c.mail("a@b c.d"),
        lambda c: c.rcpt("a@<b.c>"),
        lambda c: c.rcpt("d@e.f\n"),
        lambda c: c.rcpt("d@e.f\x00"),
        lambda c: c.ehlo("c\r\nQUIT"),
        lambda c: c.ehlo("two words"),
        lambda c: c.helo("a\tb"),
        lambda c: c.lhlo("x\ny"),
        lambda c: c.mail("a@b.c", body="9BIT"),
        lambda c: c.mail("a@b.c", ret="ALL"),
        lambda c: c.mail("a@b.c", size=-1),
        lambda c: c.mail("a@b.c", envid="caf\u00e9"),
        lambda c: c.mail("a@b.c", envid="x" * 101),
        lambda c: c.mail("a@b.c", envid=""),
        lambda c: c.mail("a@b.c", envid="tab\there"),
        lambda c: c.rcpt("d@e.f", notify="NEVER,SUCCESS"),
        lambda c: c.rcpt("d@e.f", notify="SOMETIMES"),
        lambda c: c.rcpt("d@e.f", notify=[]),
        lambda c: c.rcpt("d@e.f", orcpt="rfc822;"),
        lambda c: c.rcpt("d@e.f", orcpt="rfc 822;d@e.f"),
    ],
)
def test_refused_arguments(call):
    c = hand_written(b"250-mx\r\n250-SIZE\r\n250-8BITMIME\r\n250 DSN\r\n")
    with pytest.raises(ValueError):
        call(c)
    assert c.pending == ()


def test_notify_forms():
    c = hand_written(b"250-mx\r\n250 DSN\r\n")
    assert c.rcpt("d@e.f", notify="success, delay") == b"RCPT TO:<d@e.f> NOTIFY=SUCCESS,DELAY\r\n"
    assert c.rcpt("d@e.f", notify=("FAILURE", "FAILURE")) == b"RCPT TO:<d@e.f> NOTIFY=FAILURE\r\n"
    assert c.rcpt("d@e.f", orcpt="d@e.f") == b"RCPT TO:<d@e.f> ORCPT=rfc822;d@e.f\r\n"


# ---------------------------------------------------------------------------
# EHLO, HELO, extensions
def test_ehlo_fallback_to_helo():
    c = ClientConnection()
    c.expect_banner()
    c.ehlo("client.example.com")
    [_, (tag, reply)] = feed(c, b"220 old.example.com SMTP\r\n"
                                b"502 5.5.1 Command not implemented\r\n")
    assert tag == "EHLO" and c.ehlo_failed_use_helo(reply)
    assert len(c.extensions) == 0
    assert c.helo("client.example.com") == b"HELO client.example.com\r\n"
    assert feed(c, b"250 old.example.com\r\n") == [("HELO", Reply("250", "old.example.com"))]
    assert len(c.extensions) == 0 and not c.pipelining
    # then MAIL without parameters
    assert c.mail("a@b.c", size=10, body="8BITMIME") == b"MAIL FROM:<a@b.c>\r\n"


@pytest.mark.parametrize(("code_", "fallback"),
                         [("500", True), ("502", True), ("501", False), ("421", False),
                          ("554", False), ("250", False)])
def test_ehlo_failed_use_helo(code_, fallback):
    assert ClientConnection.ehlo_failed_use_helo(Reply(code_, "x")) is fallback


def test_ehlo_error_leaves_extensions_empty():
    c = ClientConnection()
    c.ehlo("c")
    assert feed(c, b"550-mx\r\n550 PIPELINING\r\n")[0][0] == "EHLO"
    assert len(c.extensions) == 0


def test_second_ehlo_replaces_extensions():
    c = hand_written(b"250-mx\r\n250-PIPELINING\r\n250 DSN\r\n")
    assert c.extensions.keywords() == ["PIPELINING", "DSN"]
    c.ehlo("c")
    assert len(c.extensions) == 0
    feed(c, b"250-mx\r\n250 SIZE 100\r\n")
    assert c.extensions.keywords() == ["SIZE"] and c.size_limit == 100


def test_ehlo_reply_with_enhanced_codes_and_legacy_auth():
    c = hand_written(b"250-2.0.0 mx greets you\r\n250-AUTH=LOGIN PLAIN\r\n"
                     b"250-8bitmime\r\n250 2.0.0 ENHANCEDSTATUSCODES\r\n")
    assert c.extensions.getparam("AUTH") == "LOGIN PLAIN"
    assert "8BITMIME" in c.extensions


def test_lhlo_extensions():
    c = hand_written(b"250-lmtp.example.com\r\n250-PIPELINING\r\n250 CHUNKING\r\n", lmtp=True)
    assert c.pipelining and "CHUNKING" in c.extensions
    assert c.lhlo("c") == b"LHLO c\r\n"
    assert len(c.extensions) == 0


# ---------------------------------------------------------------------------
# STARTTLS
def test_starttls_then_ehlo_again():
    p = Pair(tls=True).ehlo()
    c = p.client
    assert "STARTTLS" in c.extensions
    assert p.send(c.starttls()) == [("STARTTLS", "220 2.0.0")]
    assert p.server.waiting_for_tls
    # the TLS handshake happens here on both sides
    p.server.tls_started()
    c.tls_started()
    assert c.secure and len(c.extensions) == 0
    p.ehlo()
    assert "STARTTLS" not in c.extensions and "PIPELINING" in c.extensions


def test_starttls_injected_reply_is_discarded():
    c = hand_written(b"250-mx\r\n250 STARTTLS\r\n")
    c.starttls()
    # a man in the middle appends replies to the 220, in the same read
    c.receive_data(b"220 2.0.0 Ready to start TLS\r\n250-mx\r\n250 AUTH PLAIN\r\n")
    assert c.next_reply() == ("STARTTLS", Reply("220", "2.0.0 Ready to start TLS"))
    assert c.next_reply() is None
    c.receive_data(b"250 2.1.0 injected in a later read\r\n")
    assert c.next_reply() is None
    c.tls_started()
    assert c.next_reply() is None
    assert len(c.extensions) == 0
    # the session starts over: the first reply read now is the EHLO's
    c.ehlo("c")
    assert feed(c, b"250-mx\r\n250 8BITMIME\r\n") == [
        ("EHLO", Reply("250", "mx\n8BITMIME"))]
    assert c.extensions.keywords() == ["8BITMIME"]


def test_no_command_may_follow_starttls():
    c = hand_written(b"250-mx\r\n250 STARTTLS\r\n")
    c.starttls()
    with pytest.raises(RuntimeError):
        c.ehlo("c")  # not even pipelined behind it
    feed(c, b"220 go\r\n")
    with pytest.raises(RuntimeError):
        c.noop()
    c.tls_started()
    assert c.ehlo("c") == b"EHLO c\r\n"


def test_starttls_refused_keeps_the_session():
    c = hand_written(b"250-mx\r\n250-STARTTLS\r\n250 DSN\r\n")
    c.starttls()
    assert feed(c, b"454 4.7.0 TLS not available\r\n250 2.0.0 noop\r\n")[0][0] == "STARTTLS"
    assert not c.secure and "DSN" in c.extensions
    assert c.noop() == b"NOOP\r\n"


def test_secure_from_the_start():
    c = ClientConnection(secure=True)
    assert c.secure
    assert c.best_auth_mechanism(offered=["PLAIN"]) == "PLAIN"


# ---------------------------------------------------------------------------
# AUTH
def auth_handler(ev):
    if isinstance(ev, Auth):
        secret = SECRETS.get(ev.credentials.authcid)
        if secret is None or not ev.credentials.check_secret(secret):
            ev.reply.code, ev.reply.message = "535", "5.7.8 Authentication credentials invalid"


def do_auth(p: Pair, mech: str, user: str, secret: str, authzid=None) -> list[tuple[str, str]]:
    """Run AUTH to the end, answering each 334; all tagged replies."""
    c = p.client
    p.wire.append(c.auth(mech, user, secret, authzid))
    p.server.receive_data(p.wire[-1])
    seen = []
    while True:
        while (ev := p.server.next_event()) is not None:
            p.events.append(ev)
            auth_handler(ev)
            p.server.respond()
        c.receive_data(p.server.data_to_send())
        replies = []
        while (item := c.next_reply()) is not None:
            replies.append(item)
        seen += [(t, code(r)) for t, r in replies]
        if not replies or replies[-1][1].code != "334":
            return seen
        p.wire.append(c.auth_continue(replies[-1][1]))
        p.server.receive_data(p.wire[-1])


@pytest.mark.parametrize(("mech", "rounds"), [("PLAIN", 0), ("LOGIN", 2), ("CRAM-MD5", 1)])
@pytest.mark.parametrize("user", ["tim", "jürgen"])
def test_auth_against_the_server(mech, rounds, user):
    p = Pair(auth_mechanisms=("PLAIN", "LOGIN", "CRAM-MD5"), auth_require_tls=False).ehlo()
    assert not p.client.authenticated
    got = do_auth(p, mech, user, SECRETS[user])
    assert got == [("AUTH", "334")] * rounds + [("AUTH", "235 2.7.0")]
    assert p.client.authenticated
    assert p.server.auth == user
    (ev,) = p.of(Auth)
    assert ev.credentials.mechanism == mech


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_auth_wrong_secret(mech):
    p = Pair(auth_mechanisms=("PLAIN", "LOGIN", "CRAM-MD5"), auth_require_tls=False).ehlo()
    got = do_auth(p, mech, "tim", "guess")
    assert got[-1] == ("AUTH", "535 5.7.8")
    assert not p.client.authenticated and p.server.auth is None
    # a second try is allowed
    assert do_auth(p, mech, "tim", SECRETS["tim"])[-1] == ("AUTH", "235 2.7.0")


def test_auth_plain_with_authzid():
    p = Pair(auth_mechanisms=("PLAIN",), auth_require_tls=False).ehlo()
    assert do_auth(p, "PLAIN", "tim", SECRETS["tim"], authzid="boss") == [("AUTH", "235 2.7.0")]
    assert p.of(Auth)[0].credentials.authzid == "boss"


def test_auth_plaintext_refused_by_server_without_tls():
    p = Pair(auth_mechanisms=("PLAIN", "CRAM-MD5")).ehlo()
    assert p.client.extensions.getparam("AUTH") == "CRAM-MD5"
    assert p.client.best_auth_mechanism(False) == "CRAM-MD5"
    assert do_auth(p, "PLAIN", "tim", SECRETS["tim"]) == [("AUTH", "538 5.7.11")]


def test_auth_xoauth2_hand_written():
    c = hand_written(b"250-smtp.example.com\r\n250 AUTH LOGIN PLAIN XOAUTH2\r\n")
    c.secure = True
    assert c.best_auth_mechanism(token=True) == "XOAUTH2"
    line = c.auth("XOAUTH2", "someuser@example.com", "ya29.token")
    expected = base64.b64encode(b"user=someuser@example.com\x01auth=Bearer ya29.token\x01\x01")
    assert line == b"AUTH XOAUTH2 " + expected + b"\r\n"
    assert feed(c, b"235 2.7.0 Accepted\r\n") == [("AUTH", Reply("235", "2.7.0 Accepted"))]
    assert c.authenticated


def test_auth_xoauth2_error_challenge():
    c = hand_written(b"250-smtp.example.com\r\n250 AUTH XOAUTH2\r\n")
    c.auth("XOAUTH2", "someuser@example.com", "expired")
    error = base64.b64encode(b'{"status":"401","schemes":"bearer","scope":"https://mail.google.com/"}')
    [(tag, reply)] = feed(c, b"334 " + error + b"\r\n")
    assert (tag, reply.code) == ("AUTH", "334")
    assert c.auth_continue(reply) == b"\r\n"  # an empty line
    [(tag, reply)] = feed(c, b"535-5.7.8 Username and Password not accepted.\r\n"
                             b"535 5.7.8 Learn more\r\n")
    assert tag == "AUTH" and reply.code == "535"
    assert not c.authenticated
    with pytest.raises(RuntimeError):
        c.auth_continue(Reply("334", ""))  # the exchange is over


def test_auth_bad_challenge_is_cancelled():
    c = hand_written(b"250-mx\r\n250 AUTH CRAM-MD5\r\n")
    assert c.auth("CRAM-MD5", "tim", "secret") == b"AUTH CRAM-MD5\r\n"
    [(_, reply)] = feed(c, b"334 !!!not base64\r\n")
    assert c.auth_continue(reply) == b"*\r\n"
    assert feed(c, b"501 5.7.0 Authentication cancelled\r\n")[0][0] == "AUTH"


def test_auth_misuse():
    c = hand_written(b"250-mx\r\n250 AUTH PLAIN LOGIN\r\n")
    with pytest.raises(ValueError):
        c.auth("GSSAPI", "tim", "x")
    with pytest.raises(ValueError):
        c.auth_continue(Reply("250", "x"))
    c.auth("LOGIN", "tim", "x")
    with pytest.raises(RuntimeError):
        c.auth("LOGIN", "tim", "x")


def test_best_auth_mechanism():
    c = hand_written(b"250-mx\r\n250 AUTH LOGIN PLAIN CRAM-MD5 XOAUTH2\r\n")
    assert c.best_auth_mechanism(False) == "CRAM-MD5"
    assert c.best_auth_mechanism(True) == "CRAM-MD5"
    assert c.best_auth_mechanism(True, ["LOGIN", "plain"]) == "PLAIN"
    assert c.best_auth_mechanism(True, ["LOGIN"]) == "LOGIN"
    assert c.best_auth_mechanism(False, ["LOGIN", "PLAIN"]) is None
    assert c.best_auth_mechanism(offered=["PLAIN"]) is None  # not secure by default
    assert c.best_auth_mechanism(True, token=True) == "XOAUTH2"
    assert c.best_auth_mechanism(False, token=True) is None
    assert c.best_auth_mechanism(True, ["PLAIN"], token=True) is None
    assert hand_written(b"250 mx\r\n").best_auth_mechanism(True) is None


# ---------------------------------------------------------------------------
# BDAT
def test_bdat_binary_chunks_with_last():
    p = Pair().ehlo()
    c = p.client
    assert "CHUNKING" in c.extensions and "BINARYMIME" in c.extensions
    part1 = b"\x00\xff\r\n.\r\n\rbare CR\nbare LF"
    part2 = bytes(range(256)) + b".\r\n"
    data = (c.mail("s@example.com", body="BINARYMIME", size=len(part1 + part2))
            + c.rcpt("r@example.net") + c.bdat(part1) + c.bdat(part2, last=True))
    got = p.send(data)
    assert got == [("MAIL", "250 2.1.0"), ("RCPT", "250 2.1.5"), ("BDAT", "250 2.0.0"),
                   ("BDAT", "250 2.6.0")]
    (have,) = p.of(HaveData)
    assert have.data == part1 + part2  # byte for byte: no stuffing, no line endings touched
    assert have.transaction.body == "BINARYMIME"


def test_bdat_wire_format():
    c = hand_written(b"250-mx\r\n250 CHUNKING\r\n")
    assert c.bdat(b"abc") == b"BDAT 3\r\nabc"
    assert c.bdat(b"\r\n.\r\n", last=True) == b"BDAT 5 LAST\r\n\r\n.\r\n"
    assert c.bdat(b"", True) == b"BDAT 0 LAST\r\n"
    assert c.pending == ("BDAT", "BDAT", "BDAT")


# ---------------------------------------------------------------------------
# LMTP
def lmtp_transaction(c: ClientConnection, rcpts: list[str]) -> None:
    c.mail("s@example.com")
    for r in rcpts:
        c.rcpt(r)


def test_lmtp_one_data_end_reply_per_accepted_recipient():
    c = hand_written(b"250-lmtp\r\n250 PIPELINING\r\n", lmtp=True)
    lmtp_transaction(c, ["a@x", "b@x", "c@x"])
    c.data()
    got = feed(c, b"250 2.1.0 ok\r\n250 2.1.5 a\r\n550 5.1.1 b unknown\r\n250 2.1.5 c\r\n"
                  b"354 go\r\n")
    assert tags(got) == ["MAIL", "RCPT", "RCPT", "RCPT", "DATA"]
    c.message(b"hi\r\n")
    assert c.pending == ("DATA_END",)
    c.noop()
    got = feed(c, b"250 2.0.0 a delivered\r\n452 4.2.2 c over quota\r\n250 2.0.0 noop\r\n")
    assert [(t, code(r)) for t, r in got] == [
        ("DATA_END", "250 2.0.0"), ("DATA_END", "452 4.2.2"), ("NOOP", "250 2.0.0")]


def test_lmtp_data_end_count_is_per_transaction():
    c = hand_written(b"250 lmtp\r\n", lmtp=True)
    lmtp_transaction(c, ["a@x", "b@x"])
    c.data()
    feed(c, b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    c.message(b"1\r\n")
    assert tags(feed(c, b"250 a\r\n250 b\r\n")) == ["DATA_END", "DATA_END"]
    lmtp_transaction(c, ["a@x", "b@x"])
    c.data()
    feed(c, b"250 ok\r\n550 no\r\n250 ok\r\n354 go\r\n")
    c.message(b"2\r\n")
    c.quit()
    assert tags(feed(c, b"250 b\r\n221 bye\r\n")) == ["DATA_END", "QUIT"]


def test_lmtp_replies_override():
    c = hand_written(b"250 lmtp\r\n", lmtp=True)
    lmtp_transaction(c, ["a@x"])
    c.data()
    feed(c, b"250 ok\r\n250 ok\r\n354 go\r\n")
    c.message(b"x\r\n", replies=3)
    assert c.pending == ("DATA_END",) * 3


def test_lmtp_bdat_last_pipelined():
    c = hand_written(b"250-lmtp\r\n250-PIPELINING\r\n250 CHUNKING\r\n", lmtp=True)
    lmtp_transaction(c, ["a@x", "b@x", "c@x"])
    c.bdat(b"part", last=False)
    c.bdat(b"rest", last=True)
    c.rset()
    got = feed(c, b"250 ok\r\n250 a\r\n250 b\r\n550 c\r\n250 chunk\r\n"
                  b"250 a delivered\r\n451 b later\r\n250 reset\r\n")
    assert [(t, r.code) for t, r in got] == [
        ("MAIL", "250"), ("RCPT", "250"), ("RCPT", "250"), ("RCPT", "550"), ("BDAT", "250"),
        ("BDAT", "250"), ("BDAT", "451"), ("RSET", "250")]


def test_lmtp_bdat_last_without_accepted_recipients_gets_no_reply():
    # RFC 2033 §4.3: zero replies when no RCPT succeeded
    c = hand_written(b"250-lmtp\r\n250 CHUNKING\r\n", lmtp=True)
    lmtp_transaction(c, ["a@x"])
    c.bdat(b"data", last=True)
    c.rset()
    assert c.pending == ("MAIL", "RCPT", "BDAT", "RSET")
    got = feed(c, b"250 ok\r\n550 no\r\n250 reset\r\n")
    assert tags(got) == ["MAIL", "RCPT", "RSET"]


def test_smtp_ignores_lmtp_counting():
    c = hand_written(b"250 mx\r\n")
    lmtp_transaction(c, ["a@x", "b@x"])
    c.data()
    feed(c, b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    c.message(b"x\r\n")
    assert c.pending == ("DATA_END",)
    c.bdat(b"x", last=True)
    assert c.pending == ("DATA_END", "BDAT")


# ---------------------------------------------------------------------------
# unsolicited replies and closing
def test_early_421_is_unsolicited():
    p = Pair().ehlo()
    p.server.timed_out()  # the server gives up on an idle client
    p.client.receive_data(p.server.data_to_send())
    [(tag, reply)] = p.all_replies()
    assert (tag, code(reply)) == ("UNSOLICITED", "421 4.4.2")
    assert p.client.closing


def test_421_in_answer_to_a_command_takes_its_tag():
    c = hand_written(b"250-mx\r\n250 PIPELINING\r\n")
    c.mail("a@b.c")
    c.rcpt("d@e.f")
    got = feed(c, b"421 4.3.2 Shutting down\r\n")
    assert [(t, r.code) for t, r in got] == [("MAIL", "421")]
    assert c.closing and c.pending == ("RCPT",)


def test_421_banner():
    c = ClientConnection()
    c.expect_banner()
    assert feed(c, b"421 4.7.0 Too busy\r\n") == [("BANNER", Reply("421", "4.7.0 Too busy"))]
    assert c.closing


def test_reply_before_expect_banner_is_unsolicited():
    c = ClientConnection()
    assert feed(c, b"220 hi\r\n") == [("UNSOLICITED", Reply("220", "hi"))]
    assert not c.closing


# ---------------------------------------------------------------------------
# reading replies
def one(data: bytes, **kwargs) -> Reply:
    c = ClientConnection(**kwargs)
    c.noop()
    [(tag, reply)] = feed(c, data)
    assert tag == "NOOP"
    return reply


def test_multiline_reply():
    r = one(b"250-first line\r\n250-second line\r\n250 last line\r\n")
    assert (r.code, r.message) == ("250", "first line\nsecond line\nlast line")


def test_multiline_reply_with_enhanced_code_on_every_line():
    data = b"550-5.1.1 The email account does not exist.\r\n550 5.1.1 Please check it.\r\n"
    r = one(data)
    assert r.enhanced_status_code == "5.1.1"
    assert r.text == "The email account does not exist.\nPlease check it."
    assert bytes(r) == data  # writes back the way it came


def test_enhanced_code_only_when_its_class_matches():
    r = one(b"250 5.1.1 odd\r\n")
    assert r.enhanced_status_code is None and r.message == "5.1.1 odd"
    r = one(b"451 4.3.0\r\n")
    assert r.enhanced_status_code == "4.3.0" and r.text == ""
    r = one(b"250 2.1.0x not a code\r\n")
    assert r.enhanced_status_code is None
    r = one(b"250 2.1000.0 too long\r\n")
    assert r.enhanced_status_code is None


def test_enhanced_code_kept_on_lines_that_differ():
    r = one(b"550-5.1.1 a\r\n550-5.7.1 b\r\n550 5.1.1 c\r\n")
    assert r.enhanced_status_code == "5.1.1"
    assert r.text == "a\n5.7.1 b\nc"


def test_mismatched_codes_take_the_last_line():
    r = one(b"250-all is well\r\n550 5.0.0 or not\r\n")
    assert r.code == "550"
    assert r.message == "all is well\n5.0.0 or not"


def test_lines_without_text():
    assert one(b"250\r\n") == Reply("250", "")
    r = one(b"250-\r\n250-\r\n250\r\n")
    assert (r.code, r.message) == ("250", "\n\n")
    assert one(b"250 \r\n").message == ""


def test_bare_lf_line_endings():
    r = one(b"250-a\n250 b\n")
    assert r.message == "a\nb"
    assert one(b"250-a\r\n250 b\n").message == "a\nb"


def test_undecodable_text_is_replaced():
    assert one(b"250 caf\xe9\r\n").message == "caf\ufffd"
    assert one("250 café\r\n".encode()).message == "café"


@pytest.mark.parametrize(
    "data",
    [
        b"hello\r\n",
        b"25 short\r\n",
        b"2500 long code\r\n",
        b"250x\r\n",
        b"650 no such class\r\n",
        b"150 no such class\r\n",
        b"\r\n",
        b"250-a\r\nnot a reply\r\n",
        b"25\xff\r\n",
        b"\xef\xbb\xbf250 BOM\r\n",
        b"HTTP/1.1 400 Bad Request\r\n",
    ],
)
def test_garbage_raises(data):
    c = ClientConnection()
    c.noop()
    c.receive_data(data)
    with pytest.raises(ClientError):
        c.next_reply()
    # the session is over: the error stays, further data is ignored
    c.receive_data(b"250 ok\r\n")
    with pytest.raises(ClientError):
        c.next_reply()


def test_limits_have_names_and_defaults():
    assert MAX_REPLY_LINE_LENGTH == 65536
    assert MAX_REPLY_LINES == 1000
    c = ClientConnection()
    assert (c.max_reply_line_length, c.max_reply_lines) == (65536, 1000)
    assert c.line_length_limit == LINE_LENGTH_LIMIT


def test_line_length_limit_bounds_the_buffer():
    limit = MAX_REPLY_LINE_LENGTH
    assert one(b"250 " + b"x" * (limit - 4) + b"\r\n").code == "250"
    c = ClientConnection()
    c.noop()
    c.receive_data(b"250 " + b"x" * (limit - 4) + b"\r")  # still may end with CRLF
    assert c.next_reply() is None
    c.receive_data(b"x")
    with pytest.raises(ClientError):
        c.next_reply()
    c = ClientConnection()
    c.noop()
    c.receive_data(b"250 " + b"x" * (limit - 3) + b"\r\n")  # complete but one octet too long
    with pytest.raises(ClientError):
        c.next_reply()


def test_line_length_limit_never_buffers_an_endless_line():
    c = ClientConnection(max_reply_line_length=100)
    c.noop()
    c.receive_data(b"250-ok\r\n")
    for _ in range(3):
        c.receive_data(b"y" * 30)
        assert c.next_reply() is None  # 90 octets of a line: may still end
    c.receive_data(b"y" * 30)
    with pytest.raises(ClientError):  # 120 without an end: never buffered further
        c.next_reply()


def test_line_count_limit():
    lines = b"250-x\r\n" * (MAX_REPLY_LINES - 1) + b"250 x\r\n"
    assert one(lines).message.count("\n") == MAX_REPLY_LINES - 1
    c = ClientConnection()
    c.noop()
    c.receive_data(b"250-x\r\n" * MAX_REPLY_LINES + b"250 x\r\n")
    with pytest.raises(ClientError):
        c.next_reply()
    c = ClientConnection(max_reply_lines=3)
    c.noop()
    c.receive_data(b"250-x\r\n" * 4)  # more than three lines
    with pytest.raises(ClientError):
        c.next_reply()


def test_partial_reply_waits():
    c = ClientConnection()
    c.noop()
    for piece in (b"2", b"50-fir", b"st\r", b"\n250", b" last", b"\r"):
        c.receive_data(piece)
        assert c.next_reply() is None
    c.receive_data(b"\n")
    assert c.next_reply() == ("NOOP", Reply("250", "first\nlast"))


def test_receive_empty_data_is_harmless():
    c = ClientConnection()
    c.receive_data(b"")
    assert c.next_reply() is None


def test_reply_tags_are_all_listed():
    assert {"BANNER", "EHLO", "LHLO", "HELO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA",
            "DATA_END", "BDAT", "RSET", "NOOP", "QUIT", "UNSOLICITED"} == REPLY_TAGS


def test_repr():
    c = ClientConnection(lmtp=True)
    c.noop()
    assert repr(c) == "ClientConnection(LMTP, pending=('NOOP',))"


# ---------------------------------------------------------------------------
# message content through the server
def send_message(content: bytes, **client_kwargs) -> tuple[bytes, bytes]:
    """Send ``content`` through DATA; (what the client wrote, what the server got)."""
    p = Pair(client_kwargs=client_kwargs).ehlo()
    c = p.client
    p.send(c.mail("s@example.com") + c.rcpt("r@example.net") + c.data())
    wire = c.message(content)
    assert p.send(wire) == [("DATA_END", "250 2.6.0")]
    return wire, p.of(HaveData)[0].data


def test_dot_stuffing_round_trip():
    content = (b".starts with a dot\r\n..two dots\r\n.\r\nmiddle\r\n.\r\n"
               b"\r\n.\r\n\r\nlast line .\r\n.")
    wire, got = send_message(content)
    assert wire.startswith(b"..starts")
    assert b"\r\n...two dots\r\n" in wire and b"\r\n..\r\n" in wire
    assert wire.endswith(b"\r\n..\r\n.\r\n")
    assert got == content + b"\r\n"  # the missing final CRLF was added


def test_bare_line_endings_become_crlf():
    # a bare LF before a dot line would be "SMTP smuggling" for a lax receiver
    content = b"Subject: x\n\nline\n.\nQUIT\rMAIL FROM:<evil@example.com>\r\n"
    wire, got = send_message(content)
    assert got == b"Subject: x\r\n\r\nline\r\n.\r\nQUIT\r\nMAIL FROM:<evil@example.com>\r\n"
    assert b"\r\n..\r\n" in wire


def test_empty_message():
    wire, got = send_message(b"")
    assert wire == b".\r\n" and got == b""


def test_long_line_folded_on_the_way():
    line = b"x" * 5000
    content = b"Subject: long\r\n\r\n" + line + b"\r\n"
    wire, got = send_message(content)
    assert max(len(x) for x in wire.split(b"\r\n")) == 998
    assert unfold(got) == content
    assert got.split(b"\r\n")[2] == b"x" * 998


def test_folding_can_be_turned_off():
    content = b"x" * 5000 + b"\r\n"
    _, got = send_message(content, line_length_limit=0)
    assert got == content


def test_bad_line_length_limit():
    with pytest.raises(ValueError):
        ClientConnection(line_length_limit=1)


@FAST
@given(st.binary(max_size=300))
def test_any_content_round_trips(content):
    _, got = send_message(content, line_length_limit=0)
    expected = to_crlf(content)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert got == expected


# ---------------------------------------------------------------------------
# any chunking of the server's bytes gives the same tagged replies
SERVER_SCRIPT = (
    b"220-mx.example.com ESMTP\r\n220 2.0.0 ready\r\n"
    b"250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 DSN\n"
    b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550-5.1.1 no\r\n550 5.1.1 such user\r\n"
    b"250 2.1.5 ok\r\n354 go\r\n"
    b"250 2.6.0 queued as X\r\n"
    b"250\r\n250-\r\n250 \r\n250 2.0.0 reset\r\n221 2.0.0 bye\r\n"
    b"421 4.4.2 timeout\r\n"
)


def script_client() -> ClientConnection:
    c = ClientConnection()
    c.expect_banner()
    c.ehlo("c")
    return c


def run_script(pieces: list[bytes]) -> list[tuple[str, str, str]]:
    c = script_client()
    out = []
    sent_mail = False
    for piece in pieces:
        c.receive_data(piece)
        while (item := c.next_reply()) is not None:
            tag, reply = item
            out.append((tag, reply.code, reply.message))
            if tag == "EHLO" and not sent_mail:
                sent_mail = True
                c.mail("a@b.c", size=10)
                c.rcpt("d@e.f")
                c.rcpt("g@e.f")
                c.rcpt("h@e.f")
                c.data()
            elif tag == "DATA":
                c.message(b"x\r\n")
                c.noop()
                c.noop()
                c.rset()
                c.quit()
    return out


EXPECTED_SCRIPT = run_script([SERVER_SCRIPT])


def test_script_replies():
    assert [t for t, _, _ in EXPECTED_SCRIPT] == [
        "BANNER", "EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA", "DATA_END", "NOOP", "NOOP",
        "RSET", "QUIT", "UNSOLICITED"]
    assert EXPECTED_SCRIPT[4] == ("RCPT", "550", "5.1.1 no\nsuch user")


@FAST
@given(st.lists(st.integers(0, len(SERVER_SCRIPT)), max_size=40))
def test_any_chunking_gives_the_same_replies(cuts):
    assert run_script(split_at(SERVER_SCRIPT, cuts)) == EXPECTED_SCRIPT


_REPLY_TEXT = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FF), max_size=20)


@FAST
@given(
    replies=st.lists(
        st.tuples(st.sampled_from(["220", "250", "354", "421", "451", "550"]),
                  st.lists(_REPLY_TEXT, min_size=1, max_size=4)),
        min_size=1, max_size=8),
    lf_only=st.booleans(),
    cuts=st.lists(st.integers(0, 2000), max_size=20),
)
def test_random_replies_any_chunking(replies, lf_only, cuts):
    eol = b"\n" if lf_only else b"\r\n"
    data = b"".join(
        b"".join((f"{code_}-{t}" if i < len(lines) - 1 else f"{code_} {t}").encode() + eol
                 for i, t in enumerate(lines))
        for code_, lines in replies)
    whole = ClientConnection()
    for _ in replies:
        whole.noop()
    expected = feed(whole, data)
    assert [(t, r.code) for t, r in expected] == [("NOOP", c_) for c_, _ in replies]
    for (_, reply), (_, lines) in zip(expected, replies, strict=True):
        assert reply.message == "\n".join(lines) or reply.enhanced_status_code
    chunked = ClientConnection()
    for _ in replies:
        chunked.noop()
    got = []
    for piece in split_at(data, cuts):
        got += feed(chunked, piece)
    assert [(t, r.code, r.message) for t, r in got] == [
        (t, r.code, r.message) for t, r in expected]
