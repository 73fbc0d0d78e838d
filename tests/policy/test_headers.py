"""Tests for slimta.policy.headers: Date, Message-Id and Received."""

from __future__ import annotations

import email
import email.utils
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import slimta
from slimta.envelope import Envelope
from slimta.policy import apply_queue_policies
from slimta.policy.headers import (
    AddDateHeader,
    AddMessageIdHeader,
    AddReceivedHeader,
    format_date,
    has_field,
)

VERSION = slimta.__version__
TS = 1709647629.75  # Tue, 05 Mar 2024 14:07:09 UTC
DATE = "Tue, 05 Mar 2024 14:07:09 +0000"

HEAD = (
    b"Received: from a.example.net (a.example.net [198.51.100.7])\r\n"
    b"\tby b.example.net (Postfix) with ESMTP id 4TqXy; Mon, 04 Mar 2024 10:00:00 +0000\r\n"
    b"From: Alice <alice@example.com>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: hello\r\n"
)
COMPLETE = HEAD + b"Date: Mon, 04 Mar 2024 10:00:00 +0000\r\nMessage-ID: <x.1@example.com>\r\n"
BODY = b"Hi Bob,\r\nDate: not a header\r\nMessage-Id: neither\r\n"


def make(head: bytes = HEAD, rcpts=("bob@example.org",), **client) -> Envelope:
    env = Envelope("alice@example.com", list(rcpts))
    env.parse(head + b"\r\n" + BODY)
    env.client = {
        "ip": "192.0.2.1", "host": None, "name": "mail.example.com",
        "protocol": "ESMTP", "auth": None,
    }
    env.client.update(client)
    env.receiver = "mx.example.org"
    env.timestamp = TS
    return env


def head_of(env: Envelope) -> bytes:
    return env.flatten()[0]


@pytest.fixture
def no_header_parsing(monkeypatch):
    """Make any read of Envelope.headers fail: the policies must not need it."""

    def boom(self):
        raise AssertionError("the header block was parsed")

    monkeypatch.setattr(Envelope, "headers", property(boom))


# --- format_date --------------------------------------------------------------


def test_format_date_utc():
    assert format_date(TS) == DATE
    assert format_date(0) == "Thu, 01 Jan 1970 00:00:00 +0000"
    assert email.utils.parsedate_to_datetime(format_date(TS)).timestamp() == int(TS)


def test_format_date_defaults_to_now():
    before = int(time.time())
    stamp = email.utils.parsedate_to_datetime(format_date()).timestamp()
    assert before <= stamp <= time.time()


@pytest.fixture
def tz(monkeypatch):
    def set_tz(name):
        monkeypatch.setenv("TZ", name)
        time.tzset()

    yield set_tz
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize(
    ("zone", "expected"),
    [
        ("EST+5", "Tue, 05 Mar 2024 09:07:09 -0500"),
        ("IST-5:30", "Tue, 05 Mar 2024 19:37:09 +0530"),
        ("UTC0", "Tue, 05 Mar 2024 14:07:09 +0000"),
    ],
)
def test_format_date_localtime_has_a_numeric_zone(tz, zone, expected):
    tz(zone)
    assert format_date(TS, localtime=True) == expected
    assert email.utils.parsedate_to_datetime(expected).timestamp() == int(TS)


# --- has_field ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "name", "found"),
    [
        (b"Date: x\r\n", "Date", True),
        (b"DATE: x\r\n", "Date", True),
        (b"date:x\r\n", "Date", True),
        (b"From: a\r\nMessage-ID: <a@b>\r\n", "Message-Id", True),
        (b"From: a\r\n", "Date", False),
        (b"Dated: x\r\n", "Date", False),
        (b"X-Date: x\r\n", "Date", False),
        (b"Subject: a\r\n Date: folded, not a field\r\n", "Date", False),
        (b"Date : x\r\n", "Date", False),  # not a field to Envelope either
        (b"From: a\r\nnot a field\r\nDate: x\r\n", "Date", False),
        (b"From: a\nDate: x\n", "Date", True),
    ],
)
def test_has_field(head, name, found):
    env = Envelope()
    env.parse(head + b"\r\n" + BODY)
    assert has_field(env, name) is found
    assert (name in env.headers) is found


def test_has_field_header_only_message_without_empty_line():
    env = Envelope()
    env.parse(b"From: a\r\nDate: x")
    assert has_field(env, "Date")


def test_has_field_sees_prepended_and_changed_headers():
    env = make(COMPLETE)
    env.prepend_header("X-Top", "1")
    assert has_field(env, "X-Top")
    del env.headers["Date"]
    assert not has_field(env, "Date")
    env.headers["Date"] = "again"
    assert has_field(env, "Date")


def test_has_field_on_an_envelope_built_from_a_message():
    msg = email.message.Message()
    msg["Date"] = "x"
    assert has_field(Envelope(headers=msg), "Date")
    assert not has_field(Envelope(), "Date")


_names = st.sampled_from(["Date", "date", "DATE", "Dated", "X-Date", "From", "Date ", "Subject"])
_lines = st.one_of(
    st.builds(lambda n, v: f"{n}:{v}", _names, st.sampled_from(["", " x", " Date: y"])),
    st.sampled_from([" continued", "\tDate: cont", "junk line", "Date", ":nothing"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_lines, max_size=6), st.sampled_from(["\r\n", "\n"]), st.booleans())
def test_has_field_agrees_with_the_parsed_headers(lines, nl, ended):
    data = nl.join(lines).encode()
    if ended:
        data += nl.encode() + nl.encode() + b"Date: body\r\n"
    env = Envelope()
    env.parse(data)
    expected = "Date" in env.headers
    fresh = Envelope()
    fresh.parse(data)
    assert has_field(fresh, "Date") is expected


# --- AddDateHeader --------------------------------------------------------------


def test_date_added_at_the_end_when_missing():
    env = make()
    AddDateHeader().apply(env)
    assert env.headers["Date"] == DATE
    assert head_of(env) == HEAD + f"Date: {DATE}\r\n\r\n".encode()
    assert env.message.startswith(b"Hi Bob")


def test_date_from_now_without_timestamp():
    env = make()
    env.timestamp = None
    before = int(time.time())
    AddDateHeader().apply(env)
    stamp = email.utils.parsedate_to_datetime(env.headers["Date"]).timestamp()
    assert before <= stamp <= time.time()


def test_date_localtime(tz):
    tz("EST+5")
    env = make()
    AddDateHeader(localtime=True).apply(env)
    assert env.headers["Date"] == "Tue, 05 Mar 2024 09:07:09 -0500"


def test_date_not_duplicated(no_header_parsing):
    env = make(COMPLETE)
    AddDateHeader().apply(env)
    AddDateHeader().apply(env)
    assert head_of(env) == COMPLETE + b"\r\n"


def test_date_in_lower_case_counts():
    env = make(HEAD + b"date: Mon, 04 Mar 2024 10:00:00 +0000\r\n")
    AddDateHeader().apply(env)
    assert env.headers.get_all("Date") == ["Mon, 04 Mar 2024 10:00:00 +0000"]


def test_date_in_the_body_does_not_count():
    env = make()
    AddDateHeader().apply(env)
    assert env.headers.get_all("Date") == [DATE]


# --- AddMessageIdHeader -------------------------------------------------------


MSGID = re.compile(r"<\d+\.[0-9a-f]{16}@mx\.example\.org>")


def test_message_id_added_when_missing():
    env = make()
    AddMessageIdHeader("mx.example.org").apply(env)
    value = env.headers["Message-Id"]
    assert MSGID.fullmatch(value)
    assert head_of(env) == HEAD + f"Message-Id: {value}\r\n\r\n".encode()
    # an RFC 5322 msg-id, as the email package reads it
    assert email.utils.unquote(value).endswith("@mx.example.org")


def test_message_ids_are_unique():
    policy = AddMessageIdHeader("mx.example.org")
    ids = {policy.new_id() for _ in range(10000)}
    assert len(ids) == 10000


def test_message_id_hostname_defaults_to_fqdn(monkeypatch):
    monkeypatch.setattr("socket.getfqdn", lambda: "fqdn.example.net")
    env = make()
    AddMessageIdHeader().apply(env)
    assert env.headers["Message-Id"].endswith("@fqdn.example.net>")


def test_message_id_not_duplicated(no_header_parsing):
    env = make(COMPLETE)  # spelled Message-ID there
    AddMessageIdHeader("mx.example.org").apply(env)
    assert head_of(env) == COMPLETE + b"\r\n"


# --- AddReceivedHeader ----------------------------------------------------------


def received(env: Envelope, policy: AddReceivedHeader | None = None) -> str:
    (policy or AddReceivedHeader()).apply(env)
    head = head_of(env)
    assert head.startswith(b"Received: ")
    first = head.split(b"\r\nReceived: from a.example.net")[0]
    return first.decode()


def test_received_single_recipient_exact(no_header_parsing):
    env = make()
    AddReceivedHeader().apply(env)
    assert head_of(env) == (
        b"Received: from mail.example.com ([192.0.2.1])\r\n"
        b"\tby mx.example.org (slimta " + VERSION.encode() + b") with ESMTP\r\n"
        b"\tfor <bob@example.org>; Tue, 05 Mar 2024 14:07:09 +0000\r\n"
        + HEAD + b"\r\n"
    )


def test_received_multiple_recipients_has_no_for_clause():
    env = make(rcpts=("bob@example.org", "carol@example.org"))
    assert received(env) == (
        "Received: from mail.example.com ([192.0.2.1])\r\n"
        f"\tby mx.example.org (slimta {VERSION}) with ESMTP; {DATE}"
    )
    assert "carol" not in head_of(env).decode()


def test_received_with_reverse_dns_host():
    env = make(host="mail-out.example.com")
    assert received(env).startswith(
        "Received: from mail.example.com (mail-out.example.com [192.0.2.1])\r\n"
    )


@pytest.mark.parametrize("protocol", ["SMTP", "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA", "LMTP"])
def test_received_protocol(protocol):
    env = make(protocol=protocol, auth="alice")
    value = received(env)
    assert f"\tby mx.example.org (slimta {VERSION}) with {protocol}\r\n" in value
    assert "alice" not in value  # who authenticated is not written


def test_received_without_protocol_has_no_with_clause():
    env = make(protocol=None)
    assert f"\tby mx.example.org (slimta {VERSION})\r\n\tfor <bob" in received(env)


@pytest.mark.parametrize(
    ("ip", "literal"),
    [
        ("2001:db8::1", "[IPv6:2001:db8::1]"),
        ("2001:0db8:0000::0001", "[IPv6:2001:db8::1]"),
        ("::ffff:192.0.2.9", "[192.0.2.9]"),
        ("fe80::1%eth0", "[IPv6:fe80::1]"),
    ],
)
def test_received_address_literals(ip, literal):
    env = make(ip=ip)
    assert received(env).startswith(f"Received: from mail.example.com ({literal})\r\n")


def test_received_missing_ehlo_name_uses_host_then_literal():
    env = make(name=None, host="h.example.com")
    assert received(env).startswith("Received: from h.example.com (h.example.com [192.0.2.1])\r\n")
    env = make(name=None)
    assert received(env).startswith("Received: from [192.0.2.1] ([192.0.2.1])\r\n")


def test_received_without_ip():
    env = make(ip=None)
    assert received(env).startswith("Received: from mail.example.com\r\n\tby mx.example.org")
    env = make(ip="not-an-ip", host="h.example.com")
    assert received(env).startswith("Received: from mail.example.com\r\n\tby mx.example.org")


def test_received_with_no_client_information_at_all():
    env = make()
    env.client = {}
    assert received(env) == (
        f"Received: by mx.example.org (slimta {VERSION})\r\n\tfor <bob@example.org>; {DATE}"
    )
    env = make()
    env.client = {"ip": None, "host": None, "name": None, "protocol": None, "auth": None}
    env.recipients = []
    assert received(env) == f"Received: by mx.example.org (slimta {VERSION}); {DATE}"


def test_received_without_receiver_uses_hostname(monkeypatch):
    env = make()
    env.receiver = None
    policy = AddReceivedHeader(hostname="relay.example.org")
    assert "\tby relay.example.org (slimta" in received(env, policy)
    monkeypatch.setattr("socket.getfqdn", lambda: "fqdn.example.net")
    env = make()
    env.receiver = None
    assert "\tby fqdn.example.net (slimta" in received(env)


def test_received_client_names_cannot_break_the_field():
    env = make(name='evil; Mon, 1 Jan 2001 (x) "y"\\z', host="bad host\x01")
    value = received(env)
    assert value.startswith(
        'Received: from evil??Mon,?1?Jan?2001??x???y??z (bad?host? [192.0.2.1])\r\n'
    )
    assert value.count(";") == 1


def test_received_id_clause_from_a_subclass():
    class WithId(AddReceivedHeader):
        def received_id(self, envelope):
            return "4TqXyz"

    env = make(protocol="ESMTPS")
    assert f"\tby mx.example.org (slimta {VERSION}) with ESMTPS id 4TqXyz\r\n" in received(
        env, WithId()
    )


def test_received_date_format_and_now():
    env = make()
    policy = AddReceivedHeader(date_format="%d %b %Y %H:%M:%S +0000")
    assert received(env, policy).endswith("; 05 Mar 2024 14:07:09 +0000")
    env = make()
    env.timestamp = None
    before = int(time.time())
    value = received(env)
    stamp = email.utils.parsedate_to_datetime(value.rsplit("; ", 1)[1]).timestamp()
    assert before <= stamp <= time.time()


def test_received_localtime(tz):
    tz("EST+5")
    assert received(make(), AddReceivedHeader(localtime=True)).endswith(
        "; Tue, 05 Mar 2024 09:07:09 -0500"
    )


def test_received_keeps_the_header_block_line_endings():
    env = Envelope("alice@example.com", ["bob@example.org"])
    env.parse(b"Subject: hi\n\nbody\n")
    env.receiver = "mx.example.org"
    env.timestamp = TS
    AddReceivedHeader().apply(env)
    assert b"".join(env.flatten()) == (
        f"Received: by mx.example.org (slimta {VERSION})\n"
        f"\tfor <bob@example.org>; {DATE}\n"
        "Subject: hi\n\nbody\n"
    ).encode()


def test_received_newest_on_top_and_read_back_by_the_email_package():
    env = make()
    AddReceivedHeader().apply(env)
    env.receiver = "second.example.org"
    AddReceivedHeader().apply(env)
    parsed = email.message_from_bytes(b"".join(env.flatten()))
    fields = parsed.get_all("Received")
    assert len(fields) == 3
    assert fields[0].startswith("from mail.example.com ([192.0.2.1])\r\n\tby second.example.org")
    assert fields[1].startswith("from mail.example.com ([192.0.2.1])\r\n\tby mx.example.org")
    assert fields[2].startswith("from a.example.net")
    # the date after the last ';' is an RFC 5322 date-time
    stamp = email.utils.parsedate_to_datetime(fields[0].rsplit(";", 1)[1].strip())
    assert stamp.timestamp() == int(TS)


def test_received_on_a_split_envelope_names_its_recipient():
    env = make(rcpts=("a@example.org", "b@example.org"))
    copies = [env.copy([r]) for r in env.recipients]
    for copy in copies:
        AddReceivedHeader().apply(copy)
    assert b"\tfor <a@example.org>;" in head_of(copies[0])
    assert b"\tfor <b@example.org>;" in head_of(copies[1])
    assert not head_of(env).startswith(b"Received: from mail")


# --- the three together -----------------------------------------------------------


async def test_the_three_on_a_message_without_date_or_message_id():
    env = make(protocol="ESMTPSA", host="h.example.com")
    policies = [AddDateHeader(), AddMessageIdHeader("mx.example.org"), AddReceivedHeader()]
    assert await apply_queue_policies(policies, env) == [env]
    head = head_of(env)
    msgid = env.headers["Message-Id"]
    assert head == (
        b"Received: from mail.example.com (h.example.com [192.0.2.1])\r\n"
        b"\tby mx.example.org (slimta " + VERSION.encode() + b") with ESMTPSA\r\n"
        b"\tfor <bob@example.org>; " + DATE.encode() + b"\r\n"
        + HEAD
        + b"Date: " + DATE.encode() + b"\r\n"
        + b"Message-Id: " + msgid.encode() + b"\r\n"
        + b"\r\n"
    )
    assert env.message == BODY


async def test_the_three_do_not_parse_a_complete_header_block(no_header_parsing):
    env = make(COMPLETE)
    policies = [AddDateHeader(), AddMessageIdHeader("mx.example.org"), AddReceivedHeader()]
    await apply_queue_policies(policies, env)
    head = head_of(env)
    assert head.startswith(b"Received: from mail.example.com ([192.0.2.1])\r\n")
    assert head.endswith(b"\r\n" + COMPLETE + b"\r\n")
    assert head.count(b"Date:") == 1
    assert head.lower().count(b"message-id:") == 1
