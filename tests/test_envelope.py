"""Tests for slimta.envelope.Envelope."""

from __future__ import annotations

import base64
import email
import email.policy
import quopri
from email.message import Message

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimta.envelope import Envelope

SIMPLE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Hi Bob,\r\n"
    b"\r\n"
    b"see you.\r\n"
)


def parsed(data: bytes) -> Envelope:
    env = Envelope("alice@example.com", ["bob@example.org"])
    env.parse(data)
    return env


def joined(env: Envelope) -> bytes:
    return b"".join(env.flatten())


def reparse(env: Envelope) -> Envelope:
    return parsed(joined(env))


# --- construction -------------------------------------------------------------


def test_defaults():
    env = Envelope()
    assert env.sender is None
    assert env.recipients == []
    assert env.message == b""
    assert env.client == {"ip": None, "host": None, "name": None, "protocol": None, "auth": None}
    assert env.receiver is None
    assert env.timestamp is None
    assert env.ret is None
    assert env.envid is None
    assert env.auth is None
    assert env.smtputf8 is False
    assert env.body == "7BIT"
    assert env.rcpt_params == {}
    assert isinstance(env.headers, Message)
    assert env.headers.items() == []
    assert env.flatten() == (b"", b"")


def test_constructor_arguments():
    headers = Message()
    headers["Subject"] = "hi"
    rcpts = ["a@example.com"]
    env = Envelope("", rcpts, headers, b"body\r\n")
    assert env.sender == ""
    assert env.recipients == ["a@example.com"]
    rcpts.append("b@example.com")
    assert env.recipients == ["a@example.com"]  # a list of its own
    assert env.headers is headers
    assert env.flatten() == (b"Subject: hi\r\n\r\n", b"body\r\n")


def test_constructed_without_headers_but_body_gets_separator():
    env = Envelope(message=b"Looks: like a header\r\n")
    assert env.flatten() == (b"\r\n", b"Looks: like a header\r\n")


def test_client_dicts_are_not_shared():
    a, b = Envelope(), Envelope()
    a.client["ip"] = "192.0.2.1"
    assert b.client["ip"] is None


def test_repr():
    env = Envelope("", ["a@example.com", "b@example.com"])
    assert repr(env) == "<Envelope sender='' recipients=['a@example.com', 'b@example.com']>"


# --- DSN parameters -----------------------------------------------------------


def test_add_recipient_and_dsn_lookups():
    env = Envelope("s@example.com")
    env.add_recipient("a@example.com", notify=["SUCCESS", "FAILURE"], orcpt="rfc822;a@example.com")
    env.add_recipient("b@example.com", notify=["NEVER"])
    env.add_recipient("c@example.com")
    assert env.recipients == ["a@example.com", "b@example.com", "c@example.com"]
    assert env.notify("a@example.com") == ["SUCCESS", "FAILURE"]
    assert env.orcpt("a@example.com") == "rfc822;a@example.com"
    assert env.notify("b@example.com") == ["NEVER"]
    assert env.orcpt("b@example.com") is None
    assert env.notify("c@example.com") is None
    assert env.orcpt("c@example.com") is None
    assert "c@example.com" not in env.rcpt_params
    assert env.notify("nobody@example.com") is None


def test_rcpt_params_can_be_set_directly():
    env = Envelope("s@example.com", ["a@example.com"])
    env.rcpt_params["a@example.com"] = {"orcpt": "rfc822;x@example.com"}
    assert env.orcpt("a@example.com") == "rfc822;x@example.com"
    assert env.notify("a@example.com") is None


# --- parse and flatten: byte-exact round trips ---------------------------------


ROUND_TRIP = [
    SIMPLE,
    # bare LF everywhere
    b"From: a@example.com\nSubject: lf\n\nbody line\nsecond\n",
    # folded headers, tabs, odd spacing
    b"Subject: a long\r\n\tfolded subject\r\n  with more\r\nX-Spaces:    lots   \r\n"
    b"Received: from a\r\n by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n",
    # no headers: starts with the empty line
    b"\r\nonly a body\r\n",
    b"\nonly a body\n",
    # no body
    b"Subject: no body\r\n\r\n",
    # headers only, no empty line at all
    b"Subject: no separator\r\nTo: x@example.com\r\n",
    b"Subject: no final newline",
    # no empty line and not headers: all body
    b"just some text\r\nwithout headers\r\n",
    # empty
    b"",
    b"\r\n",
    # mixed endings: LF line then CRLF empty line, CRLF line then LF empty line
    b"A: 1\nB: 2\n\r\nbody\r\n",
    b"A: 1\r\nB: 2\r\n\nbody\n",
    # body with more empty lines and 8-bit / binary bytes
    b"Subject: bin\r\n\r\n\r\n\x00\xff\xfe\r\n\r\n\r\n",
    # 8-bit header values (SMTPUTF8) and invalid UTF-8
    b"Subject: caf\xc3\xa9\r\nX-Latin1: caf\xe9\r\n\r\nbody\r\n",
    # a malformed line in the header block
    b"Subject: ok\r\nthis is not a header\r\nX-After: y\r\n\r\nbody\r\n",
    # whitespace-only line is a continuation, not the end of the headers
    b"Subject: x\r\n \r\nX-B: y\r\n\r\nbody\r\n",
]


@pytest.mark.parametrize("data", ROUND_TRIP)
def test_untouched_round_trip_is_byte_exact(data):
    env = parsed(data)
    assert joined(env) == data


@pytest.mark.parametrize("data", ROUND_TRIP)
def test_round_trip_after_reading_headers_is_byte_exact(data):
    env = parsed(data)
    env.headers.items()
    env.headers.get("Subject")
    _ = "To" in env.headers
    assert joined(env) == data


@pytest.mark.parametrize("data", ROUND_TRIP)
def test_round_trip_after_noop_change_is_byte_exact(data):
    env = parsed(data)
    env.headers["X-Temp"] = "1"
    del env.headers["X-Temp"]
    assert joined(env) == data


def test_split_crlf():
    env = parsed(SIMPLE)
    header_bytes, body = env.flatten()
    assert header_bytes == (
        b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\nSubject: hello\r\n\r\n"
    )
    assert body == b"Hi Bob,\r\n\r\nsee you.\r\n"
    assert env.message == body


def test_split_bare_lf():
    env = parsed(b"A: 1\nB: 2\n\nbody\n\nmore\n")
    assert env.flatten() == (b"A: 1\nB: 2\n\n", b"body\n\nmore\n")
    assert env.headers["B"] == "2"


def test_split_takes_first_empty_line_of_either_kind():
    env = parsed(b"A: 1\n\nbody\r\n\r\nmore")
    assert env.message == b"body\r\n\r\nmore"
    env = parsed(b"A: 1\r\n\r\nbody\n\nmore")
    assert env.message == b"body\n\nmore"


def test_message_starting_with_empty_line_has_no_headers():
    env = parsed(b"\r\nFrom: not a header\r\n")
    assert env.headers.items() == []
    assert env.message == b"From: not a header\r\n"
    assert env.flatten() == (b"\r\n", b"From: not a header\r\n")


def test_no_empty_line_headers():
    env = parsed(b"Subject: hi\r\nTo: a@example.com\r\n")
    assert env.message == b""
    assert env.headers["Subject"] == "hi"
    assert env.headers["To"] == "a@example.com"


def test_no_empty_line_body():
    env = parsed(b"hello world\r\nbye\r\n")
    assert env.headers.items() == []
    assert env.message == b"hello world\r\nbye\r\n"


def test_parse_accepts_bytearray_and_memoryview():
    assert parsed(bytearray(SIMPLE)).flatten() == parsed(SIMPLE).flatten()
    assert parsed(memoryview(SIMPLE)).flatten() == parsed(SIMPLE).flatten()


def test_parse_again_replaces_everything():
    env = parsed(SIMPLE)
    env.prepend_header("Received", "x")
    env.headers["X-Old"] = "1"
    env.parse(b"Subject: new\r\n\r\nnew body")
    assert joined(env) == b"Subject: new\r\n\r\nnew body"
    assert env.headers.items() == [("Subject", "new")]
    assert env.sender == "alice@example.com"


# --- lazy headers -------------------------------------------------------------


def test_headers_are_not_parsed_until_read():
    env = parsed(SIMPLE)
    assert env._msg is None
    header_bytes, body = env.flatten()
    assert env._msg is None
    assert header_bytes is env.flatten()[0]  # the stored bytes, not a new serialization
    assert body is env.message
    assert env.headers["Subject"] == "hello"
    assert env._msg is not None


def test_flatten_returns_original_object_after_read():
    env = parsed(SIMPLE)
    first = env.flatten()[0]
    env.headers.get_all("To")
    assert env.flatten()[0] is first


def test_prepend_header_does_not_parse():
    env = parsed(SIMPLE)
    env.prepend_header("Received", "from a by b; Mon, 1 Jan 2024 00:00:00 +0000")
    assert env._msg is None
    assert joined(env) == b"Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n" + SIMPLE


# --- header values ---------------------------------------------------------------


def test_folded_header_value_keeps_line_breaks_like_email_package():
    env = parsed(b"Subject: one\r\n two\r\n\r\n")
    assert env.headers["Subject"] == "one\r\n two"


def test_non_ascii_header_is_decoded_as_utf8():
    env = parsed("Subject: Grüße\r\n\r\nbody".encode())
    assert env.headers["Subject"] == "Grüße"


def test_invalid_utf8_header_follows_email_package_convention():
    env = parsed(b"X-Mixed: \x80 \xc3\xa9\r\nX-Latin1: caf\xe9\r\n\r\n")
    # compat32 reports such values as Header objects in the unknown-8bit charset
    from email.header import decode_header

    assert decode_header(env.headers["X-Latin1"]) == [(b"caf\xe9", "unknown-8bit")]
    assert len(env.headers.items()) == 2
    env.headers["X-New"] = "1"
    assert env.flatten()[0] == b"X-Mixed: \x80 \xc3\xa9\r\nX-Latin1: caf\xe9\r\nX-New: 1\r\n\r\n"


def test_non_ascii_headers_survive_reserialization():
    data = b"Subject: caf\xc3\xa9\r\nX-Latin1: caf\xe9\r\nTo: \xc3\xbc@example.com\r\n\r\nbody\r\n"
    env = parsed(data)
    env.headers["X-Added"] = "ok"
    header_bytes, body = env.flatten()
    assert header_bytes == (
        b"Subject: caf\xc3\xa9\r\nX-Latin1: caf\xe9\r\nTo: \xc3\xbc@example.com\r\n"
        b"X-Added: ok\r\n\r\n"
    )
    assert body == b"body\r\n"


def test_changed_non_ascii_header_is_written_as_utf8():
    env = parsed(b"Subject: old\r\nX-Latin1: caf\xe9\r\n\r\nbody")
    env.headers.replace_header("Subject", "naïve café ☕")
    latin1 = env.headers._headers[1][1]  # invalid UTF-8 is kept as surrogate escapes
    del env.headers["X-Latin1"]
    env.headers["X-Latin1"] = latin1
    assert joined(env) == (
        "Subject: naïve café ☕\r\n".encode() + b"X-Latin1: caf\xe9\r\n\r\nbody"
    )
    assert reparse(env).headers["Subject"] == "naïve café ☕"


def test_unchanged_fields_keep_their_bytes_when_others_change():
    data = (
        b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\t d=example.com;  s=sel;\r\n"
        b"Subject:   spaced\r\n"
        b"X-Remove: me\r\n"
        b"\r\nbody"
    )
    env = parsed(data)
    del env.headers["X-Remove"]
    env.headers["X-New"] = "new"
    assert joined(env) == (
        b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\t d=example.com;  s=sel;\r\n"
        b"Subject:   spaced\r\n"
        b"X-New: new\r\n"
        b"\r\nbody"
    )


def test_duplicate_fields_keep_their_own_bytes():
    data = b"Received: x\r\nReceived:  x\r\nSubject: s\r\n\r\n"
    env = parsed(data)
    env.headers.replace_header("Subject", "t")
    assert joined(env) == b"Received: x\r\nReceived:  x\r\nSubject: t\r\n\r\n"


def test_changed_header_with_line_breaks_is_normalised():
    env = parsed(SIMPLE)
    env.headers.replace_header("Subject", "one\ntwo\r\n\tthree\r\n")
    header_bytes = env.flatten()[0]
    assert b"Subject: one\r\n two\r\n\tthree\r\nTo" not in header_bytes  # order kept below
    assert header_bytes == (
        b"From: Alice <alice@example.com>\r\nTo: bob@example.org\r\n"
        b"Subject: one\r\n two\r\n\tthree\r\n\r\n"
    )


def test_header_injection_is_not_possible():
    env = parsed(SIMPLE)
    env.headers["X-Evil"] = "a\r\nBcc: victim@example.com\r\n\r\nbody"
    out = reparse(env)
    assert out.headers["Bcc"] is None
    assert out.message == SIMPLE.split(b"\r\n\r\n", 1)[1]


def test_long_value_is_folded_losslessly():
    value = " ".join(f"word{i}" for i in range(60))
    env = parsed(SIMPLE)
    env.headers["X-Long"] = value
    header_bytes = env.flatten()[0]
    lines = header_bytes.split(b"\r\n")
    assert all(len(line) <= 78 for line in lines)
    folded = reparse(env).headers["X-Long"]
    assert folded.replace("\r\n", "") == value


def test_long_value_without_spaces_stays_on_one_line():
    env = Envelope()
    env.headers["X-Token"] = "x" * 200
    assert env.flatten()[0] == b"X-Token: " + b"x" * 200 + b"\r\n\r\n"


def test_header_object_values_are_encoded():
    from email.header import Header

    env = Envelope()
    env.headers["Subject"] = Header("héllo", "utf-8")
    header_bytes = env.flatten()[0]
    assert header_bytes.isascii()
    msg = email.message_from_bytes(header_bytes, policy=email.policy.default)
    assert str(msg["Subject"]) == "héllo"


def test_malformed_lines_are_kept_after_fields():
    data = b"Subject: ok\r\nnot a field\r\nX-After: y\r\n\r\nbody\r\n"
    env = parsed(data)
    assert env.headers.items() == [("Subject", "ok")]
    env.headers["X-New"] = "n"
    assert joined(env) == b"Subject: ok\r\nX-New: n\r\nnot a field\r\nX-After: y\r\n\r\nbody\r\n"


def test_bare_lf_message_gets_lf_headers():
    env = parsed(b"A: 1\nB: 2\n\nbody\n")
    env.prepend_header("Received", "by me")
    assert joined(env) == b"Received: by me\nA: 1\nB: 2\n\nbody\n"
    env.headers["C"] = "3"
    assert joined(env) == b"Received: by me\nA: 1\nB: 2\nC: 3\n\nbody\n"


def test_assigning_new_headers_object():
    env = parsed(SIMPLE)
    msg = Message()
    msg["Subject"] = "replaced"
    env.headers = msg
    assert env.flatten() == (b"Subject: replaced\r\n\r\n", b"Hi Bob,\r\n\r\nsee you.\r\n")


def test_all_headers_deleted_keeps_separator_before_body():
    env = parsed(SIMPLE)
    for name in ("From", "To", "Subject"):
        del env.headers[name]
    assert env.flatten() == (b"\r\n", b"Hi Bob,\r\n\r\nsee you.\r\n")


def test_changed_headers_of_headers_only_message_get_separator():
    env = parsed(b"Subject: x")
    env.headers["To"] = "y@example.com"
    assert joined(env) == b"Subject: x\r\nTo: y@example.com\r\n\r\n"


def test_new_body_after_headers_only_message_is_separated():
    env = parsed(b"Subject: x\r\n")
    env.message = b"Looks: like a header\r\n"
    out = reparse(env)
    assert out.headers.items() == [("Subject", "x")]
    assert out.message == b"Looks: like a header\r\n"
    env = parsed(b"Subject: x")
    env.message = b"body"
    assert joined(env) == b"Subject: x\r\n\r\nbody"
    env = parsed(b"")
    env.message = b"Looks: like a header\r\n"
    assert reparse(env).message == b"Looks: like a header\r\n"


# --- prepend_header ------------------------------------------------------------


def test_prepend_keeps_original_bytes_and_order():
    data = b"Subject: x\r\n\tfolded  \r\n\r\nbody"
    env = parsed(data)
    env.prepend_header("Received", "first")
    env.prepend_header("Received", "second")
    assert joined(env) == b"Received: second\r\nReceived: first\r\n" + data


def test_prepend_visible_in_headers_before_and_after_parse():
    env = parsed(SIMPLE)
    env.prepend_header("Received", "one")
    assert env.headers.keys()[:2] == ["Received", "From"]
    env.prepend_header("Received", "two")
    assert env.headers.get_all("Received") == ["two", "one"]
    assert joined(env) == b"Received: two\r\nReceived: one\r\n" + SIMPLE


def test_prepend_then_change_then_flatten():
    env = parsed(SIMPLE)
    env.prepend_header("Received", "one")
    env.headers.replace_header("Subject", "changed")
    assert joined(env) == (
        b"Received: one\r\nFrom: Alice <alice@example.com>\r\nTo: bob@example.org\r\n"
        b"Subject: changed\r\n\r\nHi Bob,\r\n\r\nsee you.\r\n"
    )


def test_prepend_long_received_is_folded():
    value = (
        "from mail.example.com (mail.example.com [192.0.2.1]) by mx.example.org "
        "(slimta 0.1.0) with ESMTPSA id 0123456789abcdef for <bob@example.org>; "
        "Mon, 1 Jan 2024 00:00:00 +0000"
    )
    env = parsed(SIMPLE)
    env.prepend_header("Received", value)
    header_bytes = env.flatten()[0]
    assert header_bytes.endswith(SIMPLE.split(b"\r\n\r\n")[0] + b"\r\n\r\n")
    received = header_bytes[: -len(SIMPLE.split(b"\r\n\r\n")[0]) - 4]
    assert all(len(line) <= 78 for line in received.split(b"\r\n"))
    assert reparse(env).headers["Received"].replace("\r\n", "") == value


def test_prepend_to_message_without_headers():
    env = parsed(b"\r\nbody\r\n")
    env.prepend_header("Received", "x")
    assert joined(env) == b"Received: x\r\n\r\nbody\r\n"
    env = parsed(b"plain body text\r\n")
    env.prepend_header("Received", "x")
    assert joined(env) == b"Received: x\r\n\r\nplain body text\r\n"
    assert reparse(env).message == b"plain body text\r\n"
    env = parsed(b"")
    env.prepend_header("Received", "x")
    assert joined(env) == b"Received: x\r\n\r\n"


def test_prepend_to_constructed_envelope():
    env = Envelope(message=b"body")
    env.headers["Subject"] = "s"
    env.prepend_header("Received", "r")
    assert joined(env) == b"Received: r\r\nSubject: s\r\n\r\nbody"


# --- copy ------------------------------------------------------------------------


def full_envelope() -> Envelope:
    env = Envelope("s@example.com")
    env.parse(SIMPLE)
    env.add_recipient("a@example.com", notify=["SUCCESS"], orcpt="rfc822;a@example.com")
    env.add_recipient("b@example.com", notify=["NEVER"])
    env.add_recipient("c@example.com")
    env.client.update(ip="192.0.2.1", host="client.example.com", name="client", protocol="ESMTP")
    env.receiver = "mx.example.org"
    env.timestamp = 1700000000.5
    env.ret = "HDRS"
    env.envid = "ID123"
    env.auth = "<>"
    env.smtputf8 = True
    env.body = "8BITMIME"
    return env


def test_copy_keeps_everything():
    env = full_envelope()
    new = env.copy()
    for attr in (
        "sender", "recipients", "message", "client", "receiver", "timestamp", "ret", "envid",
        "auth", "smtputf8", "body", "rcpt_params",
    ):
        assert getattr(new, attr) == getattr(env, attr), attr
    assert new.flatten() == env.flatten()
    assert new.flatten()[0] is env.flatten()[0]  # bytes are shared, never changed


def test_copy_is_independent():
    env = full_envelope()
    assert env.headers["Subject"] == "hello"  # parsed before copying
    new = env.copy()
    new.recipients.append("d@example.com")
    new.client["ip"] = "198.51.100.1"
    new.rcpt_params["a@example.com"]["notify"].append("DELAY")
    new.headers["X-Copy"] = "yes"
    new.prepend_header("Received", "copy")
    assert env.recipients == ["a@example.com", "b@example.com", "c@example.com"]
    assert env.client["ip"] == "192.0.2.1"
    assert env.notify("a@example.com") == ["SUCCESS"]
    assert "X-Copy" not in env.headers
    assert joined(env) == SIMPLE
    assert b"X-Copy: yes" in joined(new)


def test_copy_of_lazy_envelope_is_independent():
    env = full_envelope()
    env.prepend_header("Received", "orig")
    new = env.copy()
    new.prepend_header("Received", "copy")
    assert env._msg is None
    assert joined(env) == b"Received: orig\r\n" + SIMPLE
    assert joined(new) == b"Received: copy\r\nReceived: orig\r\n" + SIMPLE
    env.headers["X-Env"] = "1"
    assert "X-Env" not in new.headers


def test_copy_with_new_recipients_filters_params():
    env = full_envelope()
    new = env.copy(["b@example.com", "z@example.com"])
    assert new.recipients == ["b@example.com", "z@example.com"]
    assert new.rcpt_params == {"b@example.com": {"notify": ["NEVER"]}}
    assert env.recipients == ["a@example.com", "b@example.com", "c@example.com"]
    assert env.copy([]).recipients == []


def test_copy_copies_extra_attributes_deeply():
    env = full_envelope()
    env.custom = {"list": [1]}
    new = env.copy()
    new.custom["list"].append(2)
    assert env.custom == {"list": [1]}


def test_copy_keeps_subclass():
    class MyEnvelope(Envelope):
        """A subclass."""

    assert type(MyEnvelope().copy()) is MyEnvelope


# --- encode_7bit ----------------------------------------------------------------


def as_email(env: Envelope) -> email.message.EmailMessage:
    return email.message_from_bytes(joined(env), policy=email.policy.default)


def test_encode_7bit_leaves_7bit_message_untouched():
    data = (
        b"Subject: plain\r\nMIME-Version: 1.0\r\nContent-Type: text/plain\r\n\r\n"
        b"just ascii =\r\n.\r\n"
    )
    env = parsed(data)
    header_bytes = env.flatten()[0]
    env.body = "8BITMIME"
    assert env.encode_7bit() is False
    assert env.body == "7BIT"
    assert joined(env) == data
    assert env.flatten()[0] is header_bytes


def test_encode_7bit_text_plain_quoted_printable():
    text = "Grüße aus Köln =\r\nline two with trailing space \r\n".encode()
    data = (
        b"Subject: hi\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + text
    )
    env = parsed(data)
    env.body = "8BITMIME"
    assert env.encode_7bit() is True
    assert env.body == "7BIT"
    out = joined(env)
    assert out.isascii()
    assert env.headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert env.headers.get_all("Content-Transfer-Encoding") == ["quoted-printable"]
    # The field stays where it was; the others keep their bytes.
    assert env.flatten()[0] == (
        b"Subject: hi\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    )
    assert quopri.decodestring(env.message) == text
    assert as_email(env).get_content() == text.decode()
    assert all(len(line) <= 76 for line in env.message.split(b"\r\n"))


def test_encode_7bit_without_mime_headers():
    env = parsed(b"Subject: old style\r\n\r\nna\xefve\r\n")
    env.encode_7bit()
    assert env.headers["Content-Transfer-Encoding"] == "quoted-printable"
    assert env.headers["MIME-Version"] == "1.0"
    assert quopri.decodestring(env.message) == b"na\xefve\r\n"
    assert joined(env).isascii()


def test_encode_7bit_non_text_single_part_base64():
    payload = bytes(range(256)) * 4
    env = parsed(
        b"MIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: binary\r\n\r\n" + payload
    )
    env.body = "BINARYMIME"
    env.encode_7bit()
    assert env.headers["Content-Transfer-Encoding"] == "base64"
    assert base64.b64decode(env.message) == payload
    assert as_email(env).get_content() == payload


MULTIPART = (
    b"From: a@example.com\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="BOUNDARY"\r\n'
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"This is a multi-part message.\r\n"
    b"--BOUNDARY\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"ascii part\r\n"
    b"--BOUNDARY\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"8-bit \xc3\xa9t\xc3\xa9\r\n"
    b"--BOUNDARY\r\n"
    b'Content-Type: application/octet-stream; name="r\xc3\xa9sum\xc3\xa9.bin"\r\n'
    b'Content-Disposition: attachment; filename="r\xc3\xa9sum\xc3\xa9.bin"\r\n'
    b"Content-Transfer-Encoding: binary\r\n"
    b"\r\n"
    + bytes(range(256))
    + b"\r\n--BOUNDARY--\r\n"
)


def test_encode_7bit_multipart_with_binary_attachment():
    env = parsed(MULTIPART)
    env.body = "BINARYMIME"
    assert env.encode_7bit() is True
    out = joined(env)
    assert out.isascii()
    assert env.body == "7BIT"
    assert env.headers["Content-Transfer-Encoding"] == "7bit"
    msg = as_email(env)
    parts = list(msg.walk())
    assert [p.get_content_type() for p in parts] == [
        "multipart/mixed", "text/plain", "text/plain", "application/octet-stream",
    ]
    assert parts[1]["Content-Transfer-Encoding"] is None
    assert parts[1].get_content() == "ascii part"
    assert parts[2]["Content-Transfer-Encoding"] == "quoted-printable"
    assert parts[2].get_content() == "8-bit été"
    assert parts[3]["Content-Transfer-Encoding"] == "base64"
    assert parts[3].get_content() == bytes(range(256))
    assert parts[3].get_filename() == "résumé.bin"
    assert parts[3].get_param("name") == "résumé.bin"
    assert msg.preamble.strip() == "This is a multi-part message."
    # the 7-bit part is written as it was
    assert b"Content-Type: text/plain; charset=us-ascii\r\n\r\nascii part\r\n--BOUNDARY" in out


def test_encode_7bit_with_custom_encoder():
    from email.encoders import encode_base64

    env = parsed(MULTIPART)
    env.encode_7bit(encode_base64)
    parts = list(as_email(env).walk())
    assert parts[2]["Content-Transfer-Encoding"] == "base64"
    assert parts[2].get_content() == "8-bit été"
    assert parts[3].get_content() == bytes(range(256))


def test_encode_7bit_nested_message_rfc822():
    data = (
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=outer\r\n\r\n"
        b"--outer\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"Subject: inner\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n\xc3\xbcber\r\n"
        b"--outer--\r\n"
    )
    env = parsed(data)
    env.encode_7bit()
    assert joined(env).isascii()
    msg = as_email(env)
    attached = msg.get_payload()[0]
    assert attached["Content-Transfer-Encoding"] == "7bit"
    inner = attached.get_payload()[0]
    assert inner.get_content() == "über"


def test_encode_7bit_long_lines_and_nul():
    data = b"Content-Type: text/plain\r\n\r\n" + b"a" * 2000 + b"\r\nnul\x00\r\n"
    env = parsed(data)
    assert env.encode_7bit() is True
    assert all(len(line) <= 76 for line in env.message.split(b"\r\n"))
    assert quopri.decodestring(env.message) == b"a" * 2000 + b"\r\nnul\x00\r\n"


def test_encode_7bit_headers():
    data = (
        'Subject: Grüße aus Köln, wie geht es dir?\r\n'
        'From: "Jörg Müller" <joerg@example.com>\r\n'
        'To: Zoë <zoe@example.com>, plain <p@example.com>\r\n'
        'X-Ascii: untouched  spacing\r\n'
        '\r\nbody\r\n'
    ).encode()
    env = parsed(data)
    env.prepend_header("X-Prepended", "ünïcödé")
    assert env.encode_7bit() is True
    header_bytes, body = env.flatten()
    assert header_bytes.isascii()
    assert body == b"body\r\n"
    assert b"X-Ascii: untouched  spacing\r\n" in header_bytes
    assert all(len(line) <= 78 for line in header_bytes.split(b"\r\n"))
    msg = email.message_from_bytes(header_bytes + body, policy=email.policy.default)
    assert str(msg["Subject"]) == "Grüße aus Köln, wie geht es dir?"
    assert msg["From"].addresses[0].display_name == "Jörg Müller"
    assert msg["From"].addresses[0].addr_spec == "joerg@example.com"
    assert [a.display_name for a in msg["To"].addresses] == ["Zoë", "plain"]
    assert str(msg["X-Prepended"]) == "ünïcödé"


def test_encode_7bit_invalid_utf8_header_uses_unknown_8bit():
    env = parsed(b"Subject: caf\xe9\r\n\r\n")
    env.encode_7bit()
    header_bytes = env.flatten()[0]
    assert header_bytes.isascii()
    assert b"=?unknown-8bit?b?" in header_bytes
    from email.header import decode_header

    assert decode_header(env.headers["Subject"]) == [(b"caf\xe9", "unknown-8bit")]


def test_encode_7bit_malformed_header_lines():
    env = parsed(b"Subject: ok\r\nbroken \xff line\r\n\r\nbody")
    env.encode_7bit()
    assert joined(env) == b"Subject: ok\r\nbroken ? line\r\n\r\nbody"


def test_encode_7bit_untouched_headers_keep_bytes_when_body_encoded():
    data = (
        b"Received: from a\r\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n\xc3\xa9\r\n"
    )
    env = parsed(data)
    env.encode_7bit()
    assert env.flatten()[0] == (
        b"Received: from a\r\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n\r\n"
    )
    assert env.message == b"=C3=A9\r\n"


# --- properties -----------------------------------------------------------------

_field_name = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, blacklist_characters=":"),
    min_size=1,
    max_size=20,
).map(str.encode)
_field_text = st.binary(max_size=60).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
)


@st.composite
def header_fields(draw):
    name = draw(_field_name)
    first = draw(_field_text)
    lines = [name + b":" + first]
    for cont in draw(st.lists(_field_text, max_size=3)):
        lines.append(draw(st.sampled_from([b" ", b"\t"])) + cont)
    return b"\r\n".join(lines)


@settings(max_examples=300)
@given(st.lists(header_fields(), max_size=8), st.binary(max_size=300))
def test_property_parse_flatten_round_trip(fields, body):
    data = b"".join(field + b"\r\n" for field in fields) + b"\r\n" + body
    env = Envelope()
    env.parse(data)
    assert b"".join(env.flatten()) == data
    # reading the headers changes nothing
    assert len(env.headers) == len(fields)
    assert b"".join(env.flatten()) == data


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_property_any_bytes_round_trip(data):
    env = Envelope()
    env.parse(data)
    assert b"".join(env.flatten()) == data
    env.headers.items()
    assert b"".join(env.flatten()) == data


@settings(max_examples=200)
@given(st.lists(header_fields(), max_size=8), st.binary(max_size=200))
def test_property_changed_headers_reparse_to_same_fields(fields, body):
    data = b"".join(field + b"\r\n" for field in fields) + b"\r\n" + body
    env = Envelope()
    env.parse(data)
    before = env.headers.items()
    env.headers["X-Added"] = "value"
    env.prepend_header("Received", "by test")
    again = Envelope()
    again.parse(b"".join(env.flatten()))
    assert again.message == body
    assert again.headers.items() == [("Received", "by test"), *before, ("X-Added", "value")]


@settings(max_examples=200)
@given(st.lists(header_fields(), max_size=6), st.binary(max_size=300))
def test_property_encode_7bit_gives_7bit(fields, body):
    data = b"".join(field + b"\r\n" for field in fields) + b"\r\n" + body
    env = Envelope()
    env.parse(data)
    env.encode_7bit()
    assert b"".join(env.flatten()).isascii()
    assert env.body == "7BIT"
