"""Tests for slimta.policy.split: RecipientSplit and RecipientDomainSplit."""

from __future__ import annotations

from slimta.envelope import Envelope
from slimta.policy import apply_queue_policies
from slimta.policy.headers import AddReceivedHeader
from slimta.policy.split import RecipientDomainSplit, RecipientSplit

DATA = b"From: alice@example.com\r\nSubject: hi\r\n\r\nbody\r\n"


def envelope(*rcpts: str) -> Envelope:
    env = Envelope("alice@example.com")
    for rcpt in rcpts:
        env.add_recipient(rcpt, notify=["SUCCESS"], orcpt=f"rfc822;{rcpt}")
    env.parse(DATA)
    env.client = {"ip": "192.0.2.1", "host": None, "name": "mail.example.com",
                  "protocol": "ESMTPS", "auth": None}
    env.receiver = "mx.example.org"
    env.timestamp = 1709647629.0
    env.envid = "abc"
    return env


# --- RecipientSplit -------------------------------------------------------------


def test_one_envelope_per_recipient():
    env = envelope("a@x.example", "b@y.example", "c@x.example")
    copies = RecipientSplit().apply(env)
    assert [c.recipients for c in copies] == [["a@x.example"], ["b@y.example"], ["c@x.example"]]
    for copy in copies:
        rcpt = copy.recipients[0]
        assert copy is not env
        assert copy.rcpt_params == {rcpt: {"notify": ["SUCCESS"], "orcpt": f"rfc822;{rcpt}"}}
        assert copy.sender == "alice@example.com"
        assert copy.client == env.client
        assert copy.receiver == "mx.example.org"
        assert copy.timestamp == env.timestamp
        assert copy.envid == "abc"
        assert b"".join(copy.flatten()) == DATA
    assert env.recipients == ["a@x.example", "b@y.example", "c@x.example"]


def test_copies_are_independent():
    copies = RecipientSplit().apply(envelope("a@x.example", "b@y.example"))
    copies[0].prepend_header("X-Only", "first")
    copies[0].headers["Subject"] = "changed"
    copies[0].client["name"] = "other"
    assert b"".join(copies[1].flatten()) == DATA
    assert copies[1].client["name"] == "mail.example.com"


def test_single_recipient_or_none_is_kept():
    assert RecipientSplit().apply(envelope("a@x.example")) is None
    assert RecipientSplit().apply(envelope()) is None


def test_duplicate_recipients_each_get_an_envelope():
    copies = RecipientSplit().apply(envelope("a@x.example", "a@x.example"))
    assert [c.recipients for c in copies] == [["a@x.example"], ["a@x.example"]]


# --- RecipientDomainSplit -------------------------------------------------------


def test_one_envelope_per_domain_in_order_of_first_appearance():
    env = envelope("a@y.example", "b@x.example", "c@Y.Example", "d@z.example", "e@X.EXAMPLE")
    copies = RecipientDomainSplit().apply(env)
    assert [c.recipients for c in copies] == [
        ["a@y.example", "c@Y.Example"],
        ["b@x.example", "e@X.EXAMPLE"],
        ["d@z.example"],
    ]
    for copy in copies:
        assert set(copy.rcpt_params) == set(copy.recipients)
        assert b"".join(copy.flatten()) == DATA


def test_recipients_without_a_domain_get_their_own_envelope_in_place():
    env = envelope("a@x.example", "postmaster", "b@x.example", "abuse@", "c@y.example")
    copies = RecipientDomainSplit().apply(env)
    assert [c.recipients for c in copies] == [
        ["a@x.example", "b@x.example"], ["postmaster"], ["abuse@"], ["c@y.example"],
    ]


def test_quoted_local_part_with_an_at_sign():
    env = envelope('"a@y.example"@x.example', "b@x.example")
    assert RecipientDomainSplit().apply(env) is None


def test_single_domain_is_kept():
    assert RecipientDomainSplit().apply(envelope("a@x.example", "b@X.example")) is None
    assert RecipientDomainSplit().apply(envelope("a@x.example")) is None
    assert RecipientDomainSplit().apply(envelope()) is None
    assert RecipientDomainSplit().apply(envelope("postmaster")) is None


async def test_split_before_received_gives_each_copy_a_for_clause():
    env = envelope("a@x.example", "b@x.example", "c@y.example")
    result = await apply_queue_policies([RecipientDomainSplit(), AddReceivedHeader()], env)
    heads = [c.flatten()[0] for c in result]
    assert b"\r\n\tfor <" not in heads[0]  # two recipients there
    assert b"\r\n\tfor <c@y.example>; " in heads[1]
    result = await apply_queue_policies([RecipientSplit(), AddReceivedHeader()], env)
    assert [b"\tfor <" + c.recipients[0].encode() + b">;" in c.flatten()[0]
            for c in result] == [True, True, True]
