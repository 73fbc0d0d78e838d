"""Tests for slimta.bounce: DSNs built, then parsed back with the email package and checked."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimta.bounce import RecipientStatus, build_dsn, dsn_requested
from slimta.envelope import Envelope
from slimta.smtp.reply import Reply

HOST = "mail.example.com"
ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600
HEADERS = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: lunch\r\n"
    b"Message-Id: <orig-1@example.com>\r\n"
)
ORIGINAL = HEADERS + b"\r\nSee you at noon.\r\n"
USER_UNKNOWN = Reply("550", "5.1.1 User unknown")


def make_envelope(data: bytes = ORIGINAL, sender: str | None = "alice@example.com",
                  rcpts: tuple[str, ...] = ("bob@example.net",), **params) -> Envelope:
    """An original message as the edge hands it over; ``params``: recipient → RCPT params."""
    env = Envelope(sender, [])
    for rcpt in rcpts:
        env.add_recipient(rcpt, **params.get(rcpt, {}))
    env.parse(data)
    env.timestamp = ARRIVAL
    return env


def status(rcpt: str = "bob@example.net", reply: Reply = USER_UNKNOWN,
           **kwargs) -> RecipientStatus:
    return RecipientStatus(rcpt, reply, **kwargs)


def dsn_of(env: Envelope, statuses: list[RecipientStatus] | None = None, **kwargs) -> Envelope:
    kwargs.setdefault("reporting_mta", HOST)
    kwargs.setdefault("now", NOW)
    dsn = build_dsn(env, statuses if statuses is not None else [status()], **kwargs)
    assert dsn is not None
    return dsn


def raw(dsn: Envelope) -> bytes:
    return b"".join(dsn.flatten())


def parse(dsn: Envelope) -> EmailMessage:
    """The DSN parsed back, checked to be well-formed MIME without defects."""
    msg = email.message_from_bytes(raw(dsn), policy=email.policy.default)
    for part in msg.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert len(msg.get_payload()) == 3
    return msg


def report(msg: EmailMessage) -> tuple[EmailMessage, list[EmailMessage]]:
    """The per-message fields and the per-recipient blocks of a message/delivery-status."""
    part = msg.get_payload()[1]
    assert part.get_content_type() == "message/delivery-status"
    blocks = part.get_payload()
    return blocks[0], blocks[1:]


def report_lines(dsn: Envelope) -> list[bytes]:
    """The raw lines of the delivery-status part's body."""
    data = raw(dsn)
    start = data.index(b"Content-Type: message/delivery-status")
    body = data[data.index(b"\r\n\r\n", start) + 4:]
    return body[: body.index(b"\r\n--")].split(b"\r\n")


# --- the message -----------------------------------------------------------------------


def test_top_level_headers():
    msg = parse(dsn_of(make_envelope()))
    assert str(msg["From"]) == f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
    assert msg["From"].addresses[0].display_name == "Mail Delivery System"
    assert str(msg["To"]) == "alice@example.com"
    assert str(msg["Subject"]) == "Undelivered Mail Returned to Sender"
    assert str(msg["Auto-Submitted"]) == "auto-replied"
    assert str(msg["MIME-Version"]) == "1.0"
    assert re.fullmatch(r"<[^<>@]+@" + re.escape(HOST) + ">", str(msg["Message-Id"]))
    date = str(msg["Date"])
    assert re.search(r" [+-]\d{4}$", date), date  # RFC 5322 numeric zone
    assert parsedate_to_datetime(date).timestamp() == NOW
    assert [p.get_content_type() for p in msg.get_payload()] == [
        "text/plain", "message/delivery-status", "message/rfc822",
    ]
    assert msg.get_payload()[0].get_content_charset() == "us-ascii"


def test_dsn_envelope():
    original = make_envelope()
    original.receiver = "mx.example.com"
    dsn = dsn_of(original)
    assert dsn.sender == ""
    assert dsn.recipients == ["alice@example.com"]
    assert dsn.timestamp is None
    assert dsn.receiver is None
    assert dsn.smtputf8 is False
    assert dsn.body == "7BIT"
    assert raw(dsn).isascii()
    assert dsn.headers["Subject"] == "Undelivered Mail Returned to Sender"
    again = Envelope("", ["alice@example.com"])
    again.parse(raw(dsn))
    assert b"".join(again.flatten()) == raw(dsn)
    assert b"\r\n" in raw(dsn)
    assert re.search(rb"(?<!\r)\n", raw(dsn)) is None  # CRLF only


def test_human_readable_part():
    env = make_envelope(rcpts=("bob@example.net", "carol@example.net"))
    statuses = [
        status(remote_mta="mx.example.net"),
        status("carol@example.net", Reply("552", "5.2.2 Mailbox full\nTry later")),
    ]
    text = parse(dsn_of(env, statuses)).get_payload()[0].get_content()
    assert HOST in text
    assert "<bob@example.net>" in text
    assert "mx.example.net" in text
    assert "550 5.1.1 User unknown" in text
    assert "<carol@example.net>" in text
    assert "552-5.2.2 Mailbox full" in text and "552 5.2.2 Try later" in text
    assert "automatically" in text
    assert "copy of your message" in text


def test_human_part_with_non_ascii_reply_text():
    env = make_envelope()
    msg = parse(dsn_of(env, [status(reply=Reply("550", "5.1.1 Benutzer unbekannt: M\u00fcller"))]))
    text_part = msg.get_payload()[0]
    assert text_part.get_content_charset() == "utf-8"
    assert text_part["Content-Transfer-Encoding"] == "quoted-printable"
    assert "M\u00fcller" in text_part.get_content()
    _, (block,) = report(msg)
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt: M?ller"


# --- per-message fields -----------------------------------------------------------------


def test_per_message_fields():
    env = make_envelope()
    env.envid = "QQ314159"
    fields, _ = report(parse(dsn_of(env)))
    assert fields.keys() == ["Original-Envelope-Id", "Reporting-MTA", "Arrival-Date"]
    assert fields["Original-Envelope-Id"] == "QQ314159"
    assert fields["Reporting-MTA"] == f"dns; {HOST}"
    assert parsedate_to_datetime(fields["Arrival-Date"]).timestamp() == ARRIVAL


def test_no_envid_no_original_envelope_id():
    fields, _ = report(parse(dsn_of(make_envelope())))
    assert "Original-Envelope-Id" not in fields
    assert fields["Reporting-MTA"] == f"dns; {HOST}"


def test_arrival_argument_and_unknown_arrival():
    env = make_envelope()
    fields, _ = report(parse(dsn_of(env, arrival=ARRIVAL - 60)))
    assert parsedate_to_datetime(fields["Arrival-Date"]).timestamp() == ARRIVAL - 60
    env.timestamp = None
    fields, _ = report(parse(dsn_of(env)))
    assert "Arrival-Date" not in fields


# --- per-recipient fields ---------------------------------------------------------------


def test_per_recipient_fields():
    env = make_envelope(rcpts=("bob@example.net",),
                        **{"bob@example.net": {"orcpt": "rfc822;robert@example.org"}})
    st_ = status(remote_mta="mx.example.net", last_attempt=NOW - 10)
    _, (block,) = report(parse(dsn_of(env, [st_])))
    assert block.keys() == [
        "Original-Recipient", "Final-Recipient", "Action", "Status", "Remote-MTA",
        "Diagnostic-Code", "Last-Attempt-Date",
    ]
    assert block["Original-Recipient"] == "rfc822;robert@example.org"
    assert block["Final-Recipient"] == "rfc822; bob@example.net"
    assert block["Action"] == "failed"
    assert block["Status"] == "5.1.1"
    assert block["Remote-MTA"] == "dns; mx.example.net"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    assert parsedate_to_datetime(block["Last-Attempt-Date"]).timestamp() == NOW - 10


def test_optional_recipient_fields_left_out():
    _, (block,) = report(parse(dsn_of(make_envelope())))
    assert block.keys() == ["Final-Recipient", "Action", "Status", "Diagnostic-Code"]


def test_original_recipient_only_where_orcpt_given():
    env = make_envelope(rcpts=("bob@example.net", "carol@example.net"),
                        **{"carol@example.net": {"orcpt": "rfc822;carol@example.org"}})
    _, blocks = report(parse(dsn_of(env, [status(), status("carol@example.net")])))
    assert [b["Final-Recipient"] for b in blocks] == [
        "rfc822; bob@example.net", "rfc822; carol@example.net",
    ]
    assert "Original-Recipient" not in blocks[0]
    assert blocks[1]["Original-Recipient"] == "rfc822;carol@example.org"


@pytest.mark.parametrize(
    ("reply", "action", "expected"),
    [
        (Reply("550", "5.7.1 Relaying denied"), "failed", "5.7.1"),
        (Reply("550", "No such user"), "failed", "5.0.0"),
        (Reply("451", "Try again later"), "failed", "4.0.0"),  # expired after 4xx
        (Reply("450", "4.4.1 Connection timed out"), "failed", "4.4.1"),
        (Reply("421", "Busy"), "delayed", "4.0.0"),
        (Reply("250", "Ok"), "delivered", "2.0.0"),
        (Reply("999", "strange"), "failed", "5.0.0"),
        (Reply("", ""), "delayed", "4.0.0"),
    ],
)
def test_status(reply, action, expected):
    env = make_envelope(**{"bob@example.net": {"notify": ["SUCCESS", "FAILURE", "DELAY"]}})
    _, (block,) = report(parse(dsn_of(env, [status(reply=reply)], action=action)))
    assert block["Status"] == expected
    assert block["Action"] == action


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (Reply("550", "5.1.1 User unknown"), "smtp; 550 5.1.1 User unknown"),
        (Reply("550", "User unknown"), "smtp; 550 User unknown"),
        (Reply("550", "5.1.1"), "smtp; 550 5.1.1"),
        (Reply("550", "5.1.1 first line\nsecond line"), "smtp; 550 5.1.1 first line second line"),
        (Reply("550", "  lots   of\tspace  "), "smtp; 550 lots of space"),
    ],
)
def test_diagnostic_code(reply, expected):
    _, (block,) = report(parse(dsn_of(make_envelope(), [status(reply=reply)])))
    assert block["Diagnostic-Code"] == expected


def test_long_diagnostic_code_is_folded():
    text = " ".join(f"word{i}" for i in range(60))
    dsn = dsn_of(make_envelope(), [status(reply=Reply("550", f"5.1.1 {text}"))])
    lines = report_lines(dsn)
    assert all(len(line) <= 78 for line in lines), lines
    start = next(i for i, line in enumerate(lines) if line.startswith(b"Diagnostic-Code:"))
    assert lines[start + 1].startswith(b" ")  # folded: a continuation line
    _, (block,) = report(parse(dsn))
    assert block["Diagnostic-Code"] == f"smtp; 550 5.1.1 {text}"
    assert block.keys() == ["Final-Recipient", "Action", "Status", "Diagnostic-Code"]


def test_huge_word_in_reply_cannot_make_a_long_line():
    dsn = dsn_of(make_envelope(), [status(reply=Reply("550", "5.1.1 " + "x" * 5000))])
    assert all(len(line) < 998 for line in raw(dsn).split(b"\r\n"))
    _, (block,) = report(parse(dsn))
    assert block["Diagnostic-Code"].replace(" ", "") == "smtp;5505.1.1" + "x" * 5000


def test_huge_utf8_word_cannot_make_a_long_line():
    env = make_envelope()
    env.smtputf8 = True
    dsn = dsn_of(env, [status(reply=Reply("550", "5.1.1 " + "\u20ac" * 2000))])
    assert dsn.smtputf8 is True
    assert all(len(line) < 998 for line in raw(dsn).split(b"\r\n"))


def test_long_address_is_never_cut():
    rcpt = "a" * 64 + "@" + ".".join(["sub" + "d" * 56] * 4) + ".example"
    _, (block,) = report(parse(dsn_of(make_envelope(rcpts=(rcpt,)), [status(rcpt)])))
    assert block["Final-Recipient"] == f"rfc822; {rcpt}"


@pytest.mark.parametrize("newline", ["\r\n", "\n", "\r"])
def test_reply_text_cannot_inject_fields_or_parts(newline):
    evil = newline.join([
        "5.1.1 Bad recipient",
        "X-Injected: yes",
        "",
        "Final-Recipient: rfc822; evil@example.org",
        "Action: delivered",
        "",
        "--boundary",
        "Content-Type: text/html",
    ])
    env = make_envelope()
    msg = parse(dsn_of(env, [status(reply=Reply("550", evil), remote_mta="mx\r\nX-Bad: 1")]))
    fields, blocks = report(msg)
    assert len(blocks) == 1
    (block,) = blocks
    assert block["Final-Recipient"] == "rfc822; bob@example.net"
    assert block["Action"] == "failed"
    assert block["Remote-MTA"] == "dns; mxX-Bad:1"
    for fieldset in (msg, fields, block):
        assert "X-Injected" not in fieldset
        assert "X-Bad" not in fieldset
    assert block.get_all("Final-Recipient") == ["rfc822; bob@example.net"]
    assert block["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 Bad recipient X-Injected: yes Final-Recipient: rfc822; "
        "evil@example.org Action: delivered --boundary Content-Type: text/html"
    )
    assert [p.get_content_type() for p in msg.walk()].count("text/html") == 0


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=600))
def test_any_reply_text_gives_a_valid_dsn(text):
    dsn = dsn_of(make_envelope(), [status(reply=Reply("550", text))])
    assert raw(dsn).isascii()
    assert all(len(line) < 998 for line in raw(dsn).split(b"\r\n"))
    fields, blocks = report(parse(dsn))
    assert fields["Reporting-MTA"] == f"dns; {HOST}"
    assert len(blocks) == 1
    assert blocks[0]["Final-Recipient"] == "rfc822; bob@example.net"
    assert blocks[0]["Diagnostic-Code"].startswith("smtp; 550")


# --- the returned original --------------------------------------------------------------


def test_full_original_returned():
    msg = parse(dsn_of(make_envelope()))
    part = msg.get_payload()[2]
    assert part.get_content_type() == "message/rfc822"
    inner = part.get_payload(0)
    assert inner["Subject"] == "lunch"
    assert inner["Message-Id"] == "<orig-1@example.com>"
    assert inner.get_payload(decode=True) == b"See you at noon.\r\n"
    assert ORIGINAL in raw(dsn_of(make_envelope()))


def test_ret_hdrs_returns_headers_only():
    env = make_envelope()
    env.ret = "HDRS"
    dsn = dsn_of(env)
    part = parse(dsn).get_payload()[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert part.get_payload(decode=True) == HEADERS
    assert b"See you at noon" not in raw(dsn)
    assert "header section" in parse(dsn).get_payload()[0].get_content()


def test_ret_full_returns_everything():
    env = make_envelope()
    env.ret = "FULL"
    assert parse(dsn_of(env)).get_payload()[2].get_content_type() == "message/rfc822"


def test_large_original_returns_headers_only():
    env = make_envelope(ORIGINAL + b"x" * 1000 + b"\r\n")
    part = parse(dsn_of(env, max_returned_size=len(ORIGINAL) + 500)).get_payload()[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert part.get_payload(decode=True) == HEADERS
    exact = make_envelope()
    part = parse(dsn_of(exact, max_returned_size=len(ORIGINAL))).get_payload()[2]
    assert part.get_content_type() == "message/rfc822"


def test_default_size_limit():
    big = make_envelope(ORIGINAL + (b"y" * 998 + b"\r\n") * 300)
    assert parse(dsn_of(big)).get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_header_section_over_the_limit_is_cut_after_a_whole_field():
    headers = HEADERS + b"X-Long: one\r\n two\r\n three\r\n" + b"X-Last: end\r\n"
    env = make_envelope(headers + b"\r\nbody\r\n")
    limit = len(HEADERS) + 20  # inside the folded X-Long field
    part = parse(dsn_of(env, max_returned_size=limit)).get_payload()[2]
    assert part.get_payload(decode=True) == HEADERS


def test_delayed_and_delivered_return_headers_only():
    env = make_envelope(**{"bob@example.net": {"notify": ["SUCCESS", "DELAY"]}})
    env.ret = "FULL"
    for action in ("delayed", "delivered"):
        dsn = dsn_of(env, [status(reply=Reply("250", "2.0.0 Ok"))], action=action)
        part = parse(dsn).get_payload()[2]
        assert part.get_content_type() == "text/rfc822-headers"
        assert part.get_payload(decode=True) == HEADERS


def test_eight_bit_original_body_survives():
    body = b"Caf\xc3\xa9 and a raw latin-1 byte: \xe9\r\n"
    env = make_envelope(HEADERS + b"\r\n" + body)
    dsn = dsn_of(env)
    assert dsn.body == "8BITMIME"
    assert HEADERS + b"\r\n" + body in raw(dsn)
    msg = parse(dsn)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    part = msg.get_payload()[2]
    assert part.get_content_type() == "message/rfc822"
    assert part["Content-Transfer-Encoding"] == "8bit"
    inner = part.get_payload(0)
    assert inner["Subject"] == "lunch"
    assert inner.get_payload(decode=True) == body


def test_eight_bit_dsn_can_be_made_seven_bit():
    data = (HEADERS + b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\nCaf\xc3\xa9\r\n")
    dsn = dsn_of(make_envelope(data))
    assert dsn.encode_7bit() is True
    assert raw(dsn).isascii()
    inner = parse(dsn).get_payload()[2].get_payload(0)
    assert inner.get_content() == "Caf\u00e9\r\n"


def test_binary_original():
    body = b"\x00\x01binary\xff" + b"z" * 2000 + b"\r\n"
    env = make_envelope(HEADERS + b"\r\n" + body)
    dsn = dsn_of(env)
    assert dsn.body == "BINARYMIME"
    assert body in raw(dsn)
    part = parse(dsn).get_payload()[2]
    assert part["Content-Transfer-Encoding"] == "binary"


def test_lf_original_is_returned_with_crlf():
    env = make_envelope(ORIGINAL.replace(b"\r\n", b"\n"))
    dsn = dsn_of(env)
    assert ORIGINAL in raw(dsn)
    env.ret = "HDRS"
    assert parse(dsn_of(env)).get_payload()[2].get_payload(decode=True) == HEADERS


def test_original_without_header_section():
    env = make_envelope(b"\r\njust a body\r\n")
    inner = parse(dsn_of(env)).get_payload()[2].get_payload(0)
    assert inner.keys() == []
    assert inner.get_payload(decode=True) == b"just a body\r\n"
    env.ret = "HDRS"
    assert parse(dsn_of(env)).get_payload()[2].get_payload(decode=True) == b""


def test_multipart_original_keeps_its_own_structure():
    data = (
        HEADERS
        + b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="inner"\r\n\r\n'
        b"--inner\r\nContent-Type: text/plain\r\n\r\npart one\r\n"
        b"--inner\r\nContent-Type: text/plain\r\n\r\npart two\r\n"
        b"--inner--\r\n"
    )
    msg = parse(dsn_of(make_envelope(data)))
    inner = msg.get_payload()[2].get_payload(0)
    assert [p.get_content() for p in inner.get_payload()] == ["part one", "part two"]


def test_headers_changed_after_parse_are_returned():
    env = make_envelope()
    env.prepend_header("Received", "from client.example.com by mx.example.com")
    inner = parse(dsn_of(env)).get_payload()[2].get_payload(0)
    assert inner["Received"] == "from client.example.com by mx.example.com"


# --- who gets a DSN ---------------------------------------------------------------------


@pytest.mark.parametrize("sender", ["", None])
def test_null_sender_is_never_bounced(sender):
    env = make_envelope(sender=sender)
    assert build_dsn(env, [status()], reporting_mta=HOST) is None


def test_no_statuses_no_dsn():
    assert build_dsn(make_envelope(), [], reporting_mta=HOST) is None


def test_notify_never_suppresses():
    env = make_envelope(**{"bob@example.net": {"notify": ["NEVER"]}})
    for action in ("failed", "delayed", "delivered"):
        assert build_dsn(env, [status()], action=action, reporting_mta=HOST) is None


def test_notify_success_gives_a_delivered_dsn():
    env = make_envelope(**{"bob@example.net": {"notify": ["SUCCESS"]}})
    env.envid = "env-42"
    dsn = dsn_of(env, [status(reply=Reply("250", "2.0.0 Ok"))], action="delivered")
    msg = parse(dsn)
    assert str(msg["Subject"]) == "Delivery Status Notification (Success)"
    fields, (block,) = report(msg)
    assert fields["Original-Envelope-Id"] == "env-42"
    assert block["Action"] == "delivered"
    assert block["Status"] == "2.0.0"
    assert "Diagnostic-Code" not in block  # the reply was not from a remote MTA
    assert "was delivered" in msg.get_payload()[0].get_content()
    # A failure is not reported to a sender who asked for success only.
    assert build_dsn(env, [status()], reporting_mta=HOST) is None


def test_delivered_dsn_with_remote_reply_has_diagnostic_code():
    env = make_envelope(**{"bob@example.net": {"notify": ["SUCCESS"]}})
    st_ = status(reply=Reply("250", "2.0.0 Ok: queued as 4F2"), remote_mta="mx.example.net")
    _, (block,) = report(parse(dsn_of(env, [st_], action="delivered")))
    assert block["Remote-MTA"] == "dns; mx.example.net"
    assert block["Diagnostic-Code"] == "smtp; 250 2.0.0 Ok: queued as 4F2"


def test_no_success_dsn_without_notify():
    env = make_envelope()
    assert build_dsn(env, [status(reply=Reply("250", "Ok"))], action="delivered",
                     reporting_mta=HOST) is None


def test_delay_dsn_only_when_asked_for():
    reply = Reply("451", "4.4.1 No answer from host")
    assert build_dsn(make_envelope(), [status(reply=reply)], action="delayed",
                     reporting_mta=HOST) is None
    failure_only = make_envelope(**{"bob@example.net": {"notify": ["FAILURE"]}})
    assert build_dsn(failure_only, [status(reply=reply)], action="delayed",
                     reporting_mta=HOST) is None
    env = make_envelope(**{"bob@example.net": {"notify": ["FAILURE", "DELAY"]}})
    msg = parse(dsn_of(env, [status(reply=reply, last_attempt=NOW)], action="delayed"))
    assert str(msg["Subject"]) == "Delivery Status Notification (Delay)"
    _, (block,) = report(msg)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.4.1"
    assert block["Diagnostic-Code"] == "smtp; 451 4.4.1 No answer from host"
    assert "keep trying" in msg.get_payload()[0].get_content()


def test_mixed_recipients_are_filtered():
    rcpts = ("default@example.net", "never@example.net", "success@example.net",
             "failure@example.net")
    env = make_envelope(rcpts=rcpts, **{
        "never@example.net": {"notify": ["NEVER"]},
        "success@example.net": {"notify": ["SUCCESS"]},
        "failure@example.net": {"notify": ["FAILURE"], "orcpt": "rfc822;f@example.org"},
    })
    msg = parse(dsn_of(env, [status(r) for r in rcpts]))
    _, blocks = report(msg)
    assert [b["Final-Recipient"] for b in blocks] == [
        "rfc822; default@example.net", "rfc822; failure@example.net",
    ]
    assert blocks[1]["Original-Recipient"] == "rfc822;f@example.org"
    text = msg.get_payload()[0].get_content()
    assert "never@example.net" not in text and "success@example.net" not in text


@pytest.mark.parametrize(
    ("notify", "failed", "delayed", "delivered"),
    [
        (None, True, False, False),
        (["NEVER"], False, False, False),
        (["FAILURE"], True, False, False),
        (["DELAY"], False, True, False),
        (["SUCCESS"], False, False, True),
        (["SUCCESS", "FAILURE", "DELAY"], True, True, True),
    ],
)
def test_dsn_requested(notify, failed, delayed, delivered):
    env = make_envelope(**({"bob@example.net": {"notify": notify}} if notify else {}))
    assert dsn_requested(env, "bob@example.net", "failed") is failed
    assert dsn_requested(env, "bob@example.net", "delayed") is delayed
    assert dsn_requested(env, "bob@example.net", "delivered") is delivered


def test_unknown_action_is_refused():
    with pytest.raises(ValueError, match="action"):
        build_dsn(make_envelope(), [status()], action="relayed", reporting_mta=HOST)


def test_statuses_may_be_any_iterable():
    dsn = build_dsn(make_envelope(), iter([status()]), reporting_mta=HOST)
    assert dsn is not None


# --- internationalized mail (RFC 6533) ------------------------------------------------------


def test_smtputf8_original_gives_a_global_dsn():
    data = "From: \u00c5sa <\u00e5sa@ex\u00e4mple.com>\r\nSubject: h\u00e9j\r\n\r\nHej!\r\n"
    env = make_envelope(data.encode(), sender="\u00e5sa@ex\u00e4mple.com",
                        rcpts=("b\u00f8b@example.net",),
                        **{"b\u00f8b@example.net": {"orcpt": "utf-8;b\u00f8b@example.net"}})
    env.smtputf8 = True
    dsn = dsn_of(env, [status("b\u00f8b@example.net")])
    assert dsn.smtputf8 is True
    assert dsn.body == "8BITMIME"
    assert dsn.recipients == ["\u00e5sa@ex\u00e4mple.com"]
    msg = email.message_from_bytes(raw(dsn), policy=email.policy.default)
    assert str(msg["To"]) == "\u00e5sa@ex\u00e4mple.com"
    assert [p.get_content_type() for p in msg.get_payload()] == [
        "text/plain", "message/global-delivery-status", "message/global",
    ]
    # The email package reads message/global-delivery-status as one message:
    # the per-message fields are its headers, the recipient blocks its body.
    report_part = msg.get_payload()[1].get_payload(0)
    assert report_part["Reporting-MTA"] == f"dns; {HOST}"
    recipients = email.message_from_bytes(report_part.get_payload(decode=True),
                                          policy=email.policy.default)
    assert recipients["Original-Recipient"] == "utf-8;b\u00f8b@example.net"
    assert recipients["Final-Recipient"] == "utf-8; b\u00f8b@example.net"
    assert recipients["Status"] == "5.1.1"
    inner = msg.get_payload()[2].get_payload(0)
    assert inner["Subject"] == "h\u00e9j"


def test_smtputf8_original_with_ascii_content_gives_a_plain_dsn():
    env = make_envelope()
    env.smtputf8 = True
    dsn = dsn_of(env)
    assert dsn.smtputf8 is False
    assert parse(dsn).get_payload()[1].get_content_type() == "message/delivery-status"


def test_smtputf8_headers_only_is_message_global_headers():
    env = make_envelope("Subject: h\u00e9j\r\n\r\nbody\r\n".encode())
    env.smtputf8 = True
    env.ret = "HDRS"
    part = email.message_from_bytes(raw(dsn_of(env)), policy=email.policy.default).get_payload()[2]
    assert part.get_content_type() == "message/global-headers"
    assert part.get_payload(0)["Subject"] == "h\u00e9j"


def test_non_ascii_addresses_in_a_plain_dsn_use_utf8_addr_xtext():
    env = make_envelope(rcpts=("b\u00f8b+x@example.net",),
                        **{"b\u00f8b+x@example.net": {"orcpt": "utf-8;b\u00f8b+x@example.net"}})
    dsn = dsn_of(env, [status("b\u00f8b+x@example.net")])
    assert raw(dsn).isascii()
    _, (block,) = report(parse(dsn))
    assert block["Final-Recipient"] == "utf-8; b\\x{F8}b\\x{2B}x@example.net"
    assert block["Original-Recipient"] == "utf-8;b\\x{F8}b\\x{2B}x@example.net"
