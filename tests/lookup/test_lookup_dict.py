"""Tests for slimta.lookup (the base, templates) and slimta.lookup.dict.DictLookup."""

from __future__ import annotations

import builtins

import pytest

from slimta.lookup import Lookup, LookupError, address_kwargs
from slimta.lookup.dict import DictLookup

RECORDS = {
    "alice@example.com": {"alias": "al@example.net"},
    "example.com": {"relay": "mx.example.net"},
    "bob": {"password": "{PLAIN}x"},
}


def test_address_kwargs():
    assert address_kwargs("alice@example.com") == {
        "address": "alice@example.com", "localpart": "alice", "domain": "example.com"}
    # the last @ splits: a quoted local part may hold one
    assert address_kwargs('"a@b"@example.com')["localpart"] == '"a@b"'
    assert address_kwargs("postmaster") == {
        "address": "postmaster", "localpart": "postmaster", "domain": ""}


def test_lookup_error_is_a_lookup_error():
    assert issubclass(LookupError, builtins.LookupError)


async def test_key_templates():
    by_address = DictLookup(RECORDS, "{address}")
    by_domain = DictLookup(RECORDS, "{domain}")
    by_local = DictLookup(RECORDS, "{localpart}")
    assert await by_address.lookup(address="alice@example.com") == {"alias": "al@example.net"}
    assert await by_address.lookup_address("alice@example.com") == {"alias": "al@example.net"}
    assert await by_domain.lookup_address("anyone@example.com") == {"relay": "mx.example.net"}
    assert await by_local.lookup_address("bob@elsewhere.example") == {"password": "{PLAIN}x"}
    assert await by_address.lookup_address("nobody@example.com") is None
    assert await by_domain.lookup_address("x@example.org") is None


async def test_composite_template():
    lookup = DictLookup({"smtp:example.com": {"ok": 1}}, "{service}:{domain}")
    assert await lookup.lookup_address("a@example.com", service="smtp") == {"ok": 1}


async def test_missing_template_name_raises():
    lookup = DictLookup(RECORDS, "{username}")
    with pytest.raises(LookupError, match="username"):
        await lookup.lookup(address="alice@example.com")


async def test_records_are_copies():
    lookup = DictLookup(RECORDS, "{address}")
    record = await lookup.lookup(address="alice@example.com")
    record["alias"] = "changed"
    assert RECORDS["alice@example.com"] == {"alias": "al@example.net"}


async def test_record_must_be_a_mapping():
    lookup = DictLookup({"a": "not a dict"}, "{address}")
    with pytest.raises(LookupError, match="not a mapping"):
        await lookup.lookup(address="a")


async def test_base_class_and_context_manager():
    with pytest.raises(NotImplementedError):
        await Lookup("{address}").lookup(address="a")
    with pytest.raises(LookupError, match="no key template"):
        Lookup().format_key(address="a")
    async with DictLookup(RECORDS, "{address}") as lookup:
        assert await lookup.lookup(address="nobody") is None
