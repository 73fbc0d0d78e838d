"""Tests for slimta.lookup.regex.RegexLookup."""

from __future__ import annotations

import re

import pytest

from slimta.lookup import LookupError
from slimta.lookup.regex import RegexLookup


async def test_first_matching_rule_wins():
    lookup = RegexLookup([
        (r"^postmaster@", {"alias": "admin@example.com"}),
        (r"@example\.com$", {"relay": "internal"}),
        (r".", {"relay": "default"}),
    ], "{address}")
    assert await lookup.lookup_address("postmaster@example.com") == {"alias": "admin@example.com"}
    assert await lookup.lookup_address("bob@example.com") == {"relay": "internal"}
    assert await lookup.lookup_address("bob@example.org") == {"relay": "default"}


async def test_no_match_and_case():
    lookup = RegexLookup([(r"^bob@example\.com$", {"ok": True})])
    assert await lookup.lookup_address("BOB@Example.COM") == {"ok": True}
    assert await lookup.lookup_address("bob@example.com.evil.example") is None
    strict = RegexLookup([(r"^bob@example\.com$", {"ok": True})], flags=0)
    assert await strict.lookup_address("BOB@example.com") is None


async def test_template_and_compiled_pattern():
    lookup = RegexLookup([(re.compile(r"^sales-"), {"list": True})], "{localpart}")
    assert await lookup.lookup_address("sales-eu@example.com") == {"list": True}
    assert await lookup.lookup_address("eu-sales@example.com") is None


async def test_named_groups():
    lookup = RegexLookup([(r"^(?P<user>[^+@]+)(?:\+(?P<tag>[^@]*))?@example\.com$", {"x": 1})],
                         groups=True)
    assert await lookup.lookup_address("bob+news@example.com") == {
        "x": 1, "user": "bob", "tag": "news"}
    assert await lookup.lookup_address("bob@example.com") == {"x": 1, "user": "bob"}


async def test_add_and_bad_record():
    lookup = RegexLookup()
    lookup.add(r"x", {"n": 1})
    record = await lookup.lookup(address="x")
    record["n"] = 2
    assert await lookup.lookup(address="x") == {"n": 1}
    with pytest.raises(LookupError, match="not a mapping"):
        lookup.add(r"y", "alias")  # type: ignore[arg-type]
