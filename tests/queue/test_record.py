"""Tests for slimta.queue.record: the stored form of an envelope."""

from __future__ import annotations

import json

import pytest

from slimta.envelope import Envelope
from slimta.queue.record import RECORD_VERSION, envelope_from_record, envelope_to_record

RAW = (
    "From: Jörg <jörg@exämple.de>\r\n".encode()
    + b"Subject: caf\xe9 latin-1, not UTF-8\r\n"
    + b"X-Folded: one\r\n  two\r\n"
    + b"\r\n"
    + b"8-bit body \xff\xfe\x00 and a bare LF\nend\r\n"
)


def full_envelope() -> Envelope:
    env = Envelope("sénder@exämple.de", [])
    env.add_recipient("a@example.org", notify=["SUCCESS", "FAILURE"], orcpt="rfc822;a@example.org")
    env.add_recipient("b@example.org")
    env.add_recipient("ü@example.org", notify=["NEVER"])
    env.parse(RAW)
    env.client.update(ip="192.0.2.1", host="mail.example.de", name="[192.0.2.1]",
                      protocol="ESMTPSA", auth="jörg")
    env.receiver = "mx.example.net"
    env.timestamp = 1700000000.125
    env.ret = "HDRS"
    env.envid = "QQ314159"
    env.auth = "<>"
    env.smtputf8 = True
    env.body = "8BITMIME"
    return env


def through_json(env: Envelope) -> Envelope:
    meta, data = envelope_to_record(env)
    text = json.dumps(meta)
    assert text.isascii()
    return envelope_from_record(json.loads(text), data)


def test_meta_is_versioned_json():
    meta, data = envelope_to_record(full_envelope())
    assert meta["v"] == RECORD_VERSION == 1
    assert set(meta) == {"v", "sender", "recipients", "client", "receiver", "timestamp", "ret",
                         "envid", "auth", "rcpt_params", "smtputf8", "body"}
    assert data == RAW
    assert json.loads(json.dumps(meta)) == meta


def test_round_trip_every_field():
    env = full_envelope()
    back = through_json(env)
    assert back is not env
    assert b"".join(back.flatten()) == RAW
    assert back.message == env.message
    for attr in ("sender", "recipients", "client", "receiver", "timestamp", "ret", "envid",
                 "auth", "rcpt_params", "smtputf8", "body"):
        assert getattr(back, attr) == getattr(env, attr), attr
    assert back.notify("a@example.org") == ["SUCCESS", "FAILURE"]
    assert back.orcpt("a@example.org") == "rfc822;a@example.org"
    assert back.notify("b@example.org") is None
    assert back.headers["X-Folded"] == "one\r\n  two"
    assert str(back.headers["Subject"]) == str(env.headers["Subject"])
    assert back.headers["From"] == "Jörg <jörg@exämple.de>"


def test_changed_headers_are_stored_as_flattened():
    env = full_envelope()
    env.prepend_header("Received", "from x by y; Thu, 1 Jan 2024 00:00:00 +0000")
    env.headers["X-New"] = "värde"
    expected = b"".join(env.flatten())
    back = through_json(env)
    assert b"".join(back.flatten()) == expected
    assert back.headers["X-New"] == "värde"
    assert back.headers["Received"].startswith("from x by y")


@pytest.mark.parametrize("data", [b"", b"no headers at all", b"\r\nbody only", b"A: b",
                                  b"A: b\n\nlf body\n", b"Subject: x\r\n\r\n"])
def test_odd_messages_are_byte_exact(data):
    env = Envelope("", ["x@example.org"])
    env.parse(data)
    assert b"".join(through_json(env).flatten()) == data


def test_surrogate_escaped_text_survives():
    env = Envelope("a\udcffb@example.org", ["c@example.org"])
    assert through_json(env).sender == "a\udcffb@example.org"


def test_record_shares_nothing_mutable():
    env = full_envelope()
    meta, _ = envelope_to_record(env)
    env.recipients.append("late@example.org")
    env.client["ip"] = "198.51.100.1"
    env.rcpt_params["a@example.org"]["notify"].append("DELAY")
    assert meta["recipients"] == ["a@example.org", "b@example.org", "ü@example.org"]
    assert meta["client"]["ip"] == "192.0.2.1"
    assert meta["rcpt_params"]["a@example.org"]["notify"] == ["SUCCESS", "FAILURE"]
    back = envelope_from_record(meta, RAW)
    back.rcpt_params["a@example.org"]["notify"].append("DELAY")
    assert meta["rcpt_params"]["a@example.org"]["notify"] == ["SUCCESS", "FAILURE"]


def test_unknown_keys_ignored_missing_keys_default():
    back = envelope_from_record({"v": 1, "sender": "a@b", "recipients": ["c@d"], "new": 1}, b"")
    assert back.sender == "a@b"
    assert back.recipients == ["c@d"]
    assert back.client["ip"] is None
    assert back.body == "7BIT"
    assert back.smtputf8 is False
    assert back.rcpt_params == {}


@pytest.mark.parametrize("meta", [{"v": 2}, {"v": 0}, {"v": "1"}, {}, {"sender": "a@b"}])
def test_unknown_versions_are_refused(meta):
    with pytest.raises(ValueError, match="version"):
        envelope_from_record(meta, b"")
