"""Tests for slimta.policy.forward.Forward."""

from __future__ import annotations

import re

from slimta.envelope import Envelope
from slimta.policy import apply_queue_policies
from slimta.policy.forward import Forward


def envelope(*rcpts: str) -> Envelope:
    env = Envelope("alice@example.com", list(rcpts))
    env.parse(b"Subject: hi\r\n\r\nbody\r\n")
    return env


def test_no_rules_changes_nothing():
    env = envelope("bob@example.org")
    Forward().apply(env)
    assert env.recipients == ["bob@example.org"]


def test_rewrite_with_group_references():
    forward = Forward()
    forward.add_mapping(r"^(\w+)@old\.example\.com$", r"\1@example.com")
    env = envelope("bob@old.example.com", "carol@example.org", "dave@old.example.com")
    forward.apply(env)
    assert env.recipients == ["bob@example.com", "carol@example.org", "dave@example.com"]


def test_first_matching_rule_wins_and_only_once():
    forward = Forward()
    forward.add_mapping(r"^postmaster@", "admin@")
    forward.add_mapping(r"@example\.org$", "@example.net")
    forward.add_mapping(r"x", "y")
    env = envelope("postmaster@example.org", "bob@example.org", "xx@example.com")
    forward.apply(env)
    # the first rule stops the second; the third replaces the first 'x' only
    assert env.recipients == ["admin@example.org", "bob@example.net", "yx@example.com"]


def test_catch_all_and_callable_replacement():
    forward = Forward()
    forward.add_mapping(r"@(?P<domain>[^@]+)$", lambda m: f"@{m['domain'].upper()}")
    forward.add_mapping(r"^.*$", "catchall@example.com")
    env = envelope("bob@example.org")
    forward.apply(env)
    assert env.recipients == ["bob@EXAMPLE.ORG"]
    env = envelope("postmaster")
    forward.apply(env)
    assert env.recipients == ["catchall@example.com"]


def test_rule_with_an_empty_result_does_not_apply():
    forward = Forward([(r"^.*$", ""), (r"^bob@", "robert@")])
    env = envelope("bob@example.org")
    forward.apply(env)
    assert env.recipients == ["robert@example.org"]


def test_case_sensitivity_is_up_to_the_pattern():
    forward = Forward()
    forward.add_mapping(r"@example\.org$", "@example.net")
    env = envelope("bob@EXAMPLE.ORG")
    forward.apply(env)
    assert env.recipients == ["bob@EXAMPLE.ORG"]
    forward.add_mapping(re.compile(r"@example\.org$", re.IGNORECASE), "@example.net")
    forward.apply(env)
    assert env.recipients == ["bob@example.net"]


def test_rules_from_a_mapping_or_pairs_keep_their_order():
    env = envelope("bob@example.org")
    Forward({r"^bob@": "robert@", r"example": "sample"}).apply(env)
    assert env.recipients == ["robert@example.org"]
    env = envelope("bob@example.org")
    Forward([(r"example", "sample"), (r"^bob@", "robert@")]).apply(env)
    assert env.recipients == ["bob@sample.org"]


def test_recipients_list_changed_in_place():
    env = envelope("bob@example.org")
    rcpts = env.recipients
    Forward({"bob": "carol"}).apply(env)
    assert rcpts is env.recipients
    assert rcpts == ["carol@example.org"]


def test_rcpt_params_move_with_the_recipient():
    env = Envelope("alice@example.com")
    env.add_recipient("bob@old.example.com", notify=["SUCCESS", "FAILURE"],
                      orcpt="rfc822;bob@old.example.com")
    env.add_recipient("carol@example.org", notify=["NEVER"])
    env.add_recipient("dave@old.example.com")
    Forward({r"@old\.example\.com$": "@example.com"}).apply(env)
    assert env.recipients == ["bob@example.com", "carol@example.org", "dave@example.com"]
    assert env.rcpt_params == {
        "bob@example.com": {
            "notify": ["SUCCESS", "FAILURE"], "orcpt": "rfc822;bob@old.example.com",
        },
        "carol@example.org": {"notify": ["NEVER"]},
    }
    assert env.notify("bob@example.com") == ["SUCCESS", "FAILURE"]
    assert env.orcpt("bob@example.com") == "rfc822;bob@old.example.com"
    assert env.notify("bob@old.example.com") is None
    assert env.notify("dave@example.com") is None


def test_two_recipients_forwarded_to_one_address_keep_the_first_ones_params():
    env = Envelope("alice@example.com")
    env.add_recipient("a@example.org", notify=["SUCCESS"])
    env.add_recipient("b@example.org", notify=["NEVER"])
    Forward({r"^[ab]@": "team@"}).apply(env)
    assert env.recipients == ["team@example.org", "team@example.org"]
    assert env.rcpt_params == {"team@example.org": {"notify": ["SUCCESS"]}}


def test_params_of_a_recipient_that_another_is_rewritten_to():
    env = Envelope("alice@example.com")
    env.add_recipient("old@example.org", notify=["NEVER"])
    env.add_recipient("new@example.org", notify=["SUCCESS"])
    Forward({r"^new@": "newer@", r"^old@": "new@"}).apply(env)
    assert env.recipients == ["new@example.org", "newer@example.org"]
    assert env.rcpt_params == {
        "new@example.org": {"notify": ["NEVER"]},
        "newer@example.org": {"notify": ["SUCCESS"]},
    }


async def test_as_a_queue_policy():
    env = envelope("bob@example.org")
    result = await apply_queue_policies([Forward({"bob": "carol"})], env)
    assert result == [env]
    assert env.recipients == ["carol@example.org"]
