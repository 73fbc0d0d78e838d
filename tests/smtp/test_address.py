"""Tests for slimta.smtp.address: MAIL/RCPT paths (RFC 5321 §4.1.2, RFC 6531)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimta.smtp.address import (
    MAX_DOMAIN_LENGTH,
    MAX_LOCAL_PART_LENGTH,
    MAX_PATH_LENGTH,
    AddressError,
    format_path,
    parse_path,
    quote_local_part,
    split_address,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<a@b.com>", ("a@b.com", "", False)),
        ("<First.Last+tag@Example.COM>", ("First.Last+tag@Example.COM", "", False)),
        (" <a@b.com>", ("a@b.com", "", False)),
        ("   <a@b.com>  SIZE=10 BODY=8BITMIME", ("a@b.com", "SIZE=10 BODY=8BITMIME", False)),
        ("\t<a@b.com>\tSIZE=10", ("a@b.com", "SIZE=10", False)),
        ("<a@b.com> ", ("a@b.com", "", False)),
        ("<!#$%&'*+/=?^_`{|}~-@x-y.z0>", ("!#$%&'*+/=?^_`{|}~-@x-y.z0", "", False)),
        ("<a@localhost>", ("a@localhost", "", False)),
    ],
)
def test_simple_paths(text, expected):
    assert parse_path(text) == expected


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ('<"a b"@c.d>', '"a b"@c.d'),
        ('<"a\\"b"@c.d>', '"a\\"b"@c.d'),
        ('<"a\\\\b"@c.d>', '"a\\\\b"@c.d'),
        ('<"a>b"@c.d>', '"a>b"@c.d'),
        ('<"a@b"@c.d>', '"a@b"@c.d'),
        ('<""@c.d>', '""@c.d'),
        ('<"a..b."@c.d>', '"a..b."@c.d'),
    ],
)
def test_quoted_local_parts(text, address):
    assert parse_path(text) == (address, "", False)


@pytest.mark.parametrize(
    "text",
    ['<"a@c.d>', '<"a\\"@c.d>', '<"a\x01b"@c.d>', '<"a\rb"@c.d>', '<"a"b@c.d>', '<a"b"@c.d>'],
)
def test_bad_quoted_local_parts(text):
    with pytest.raises(AddressError):
        parse_path(text)


def test_source_routes_are_dropped():
    assert parse_path("<@a.example:u@c.example>") == ("u@c.example", "", False)
    assert parse_path("<@a.example,@b.example:u@c.example> X=1") == ("u@c.example", "X=1", False)


@pytest.mark.parametrize(
    "text",
    ["<@a.example u@c>", "<@a.example,b.example:u@c>", "<@:u@c>", "<@[1.2.3.4]:u@c>",
     "<@a..b:u@c>"],
)
def test_bad_source_routes(text):
    with pytest.raises(AddressError):
        parse_path(text)


@pytest.mark.parametrize(
    "address",
    ["u@[192.0.2.1]", "u@[IPv6:2001:db8::1]", "u@[ipv6:::1]", "u@[IPv6:::ffff:192.0.2.1]",
     "u@[IPv6:2001:db8:0:0:0:0:0:1]"],
)
def test_address_literals(address):
    assert parse_path(f"<{address}>") == (address, "", False)


@pytest.mark.parametrize(
    "text",
    ["<u@[192.0.2.256]>", "<u@[192.0.2]>", "<u@[IPv6:2001:db8::g]>", "<u@[IPv6:fe80::1%eth0]>",
     "<u@[IPv6:]>", "<u@[2001:db8::1]>", "<u@[x-tag:abc]>", "<u@[192.0.2.1>", "<u@[]>"],
)
def test_bad_address_literals(text):
    with pytest.raises(AddressError):
        parse_path(text)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("<用户@例子.广告>", "用户@例子.广告"),
        ("<ünïcödé@bücher.de>", "ünïcödé@bücher.de"),
        ("<a@bücher.de>", "a@bücher.de"),
        ("<ü@b.de>", "ü@b.de"),
        ('<"ü ö"@b.de>', '"ü ö"@b.de'),
        ("<😀.x@b.de>", "😀.x@b.de"),
    ],
)
def test_utf8_addresses(text, address):
    assert parse_path(text) == (address, "", True)


@pytest.mark.parametrize(
    "text",
    ["<a\x85b@c.d>", "<a\udcffb@c.d>", "<a@b\x9f.de>", "<a@-bü.de>", "<a@bü-.de>"],
)
def test_bad_utf8(text):
    with pytest.raises(AddressError):
        parse_path(text)


def test_null_path():
    assert parse_path("<>", allow_null=True) == ("", "", False)
    assert parse_path("<> SIZE=0", allow_null=True) == ("", "SIZE=0", False)
    assert parse_path(" <>", allow_null=True) == ("", "", False)
    with pytest.raises(AddressError):
        parse_path("<>")
    with pytest.raises(AddressError):
        parse_path("<>x", allow_null=True)


def test_postmaster():
    assert parse_path("<postmaster>", allow_postmaster=True) == ("postmaster", "", False)
    assert parse_path("<PostMaster> X", allow_postmaster=True) == ("PostMaster", "X", False)
    with pytest.raises(AddressError):
        parse_path("<postmaster>")
    with pytest.raises(AddressError):
        parse_path("<webmaster>", allow_postmaster=True)
    # With a domain it is an ordinary address.
    assert parse_path("<postmaster@x.y>") == ("postmaster@x.y", "", False)


@pytest.mark.parametrize(
    "text", ["<a@b>x", "<a@b>SIZE=10", "<a@b>>", "<a@b>,<c@d>", "<a@b><c@d>"],
)
def test_junk_after_path(text):
    with pytest.raises(AddressError):
        parse_path(text)


def test_bare_addresses():
    assert parse_path("a@b.c") == ("a@b.c", "", False)
    assert parse_path(" a@b.c SIZE=10") == ("a@b.c", "SIZE=10", False)
    assert parse_path("ü@b.c") == ("ü@b.c", "", True)
    assert parse_path("postmaster", allow_postmaster=True) == ("postmaster", "", False)
    with pytest.raises(AddressError):
        parse_path('"a b"@c.d')
    with pytest.raises(AddressError):
        parse_path("a@b.c>")
    with pytest.raises(AddressError):
        parse_path("a")


@pytest.mark.parametrize(
    "text",
    ["", "   ", "<", "<a@b", "<a>", "<@>", "<a@>", "<@b>", "<a@b.>", "<a@.b>", "<.a@b>",
     "<a.@b>", "<a..b@c>", "<a b@c>", "<a@b c>", "<a@b_c.d>", "<a@-b.c>", "<a@b-.c>",
     "<a\x00@b>", "<a@b\x00>", "<a(b)@c>", "<a,b@c>", "<<a@b>>", "<a@b@c>"],
)
def test_bad_syntax(text):
    with pytest.raises(AddressError):
        parse_path(text, allow_null=True, allow_postmaster=True)


def test_local_part_length():
    ok = "a" * MAX_LOCAL_PART_LENGTH
    assert parse_path(f"<{ok}@b.c>")[0] == f"{ok}@b.c"
    with pytest.raises(AddressError, match="local part too long"):
        parse_path(f"<{ok}a@b.c>")
    # Octets, not characters: 32 two-octet characters fill the limit.
    assert parse_path(f"<{'ü' * 32}@b.c>")[2] is True
    with pytest.raises(AddressError, match="local part too long"):
        parse_path(f"<{'ü' * 33}@b.c>")
    # The limit can be raised for VERP/SRS-style senders.
    long = "a" * 100
    assert parse_path(f"<{long}@b.c>", max_local_part_length=200)[0] == f"{long}@b.c"


def test_domain_and_label_length():
    label = "x" * 63
    assert parse_path(f"<a@{label}.c>")[0] == f"a@{label}.c"
    with pytest.raises(AddressError):
        parse_path(f"<a@{label}x.c>")
    domain = ".".join(["d" * 50] * 5) + ".abcd"  # 259 octets
    assert len(domain) > MAX_DOMAIN_LENGTH
    with pytest.raises(AddressError, match="domain too long"):
        parse_path(f"<a@{domain}>", max_path_length=1000)


def test_path_length():
    # <, 60 + @ + 193 = 254, > : 256 octets in all.
    domain = ".".join(["d" * 63] * 3) + ".c"
    assert len(domain) == 193
    local = "a" * 60
    text = f"<{local}@{domain}>"
    assert len(text) == MAX_PATH_LENGTH
    assert parse_path(text)[0] == f"{local}@{domain}"
    with pytest.raises(AddressError, match="path too long"):
        parse_path(f"<{local}a@{domain}>")
    # The source route counts too.
    with pytest.raises(AddressError, match="path too long"):
        parse_path(f"<@x.y:{local}@{domain}>")
    with pytest.raises(AddressError, match="path too long"):
        parse_path(f"{local}a@{domain}")


def test_error_is_value_error():
    assert issubclass(AddressError, ValueError)


# --- the client side ------------------------------------------------------

@pytest.mark.parametrize(
    ("local", "quoted"),
    [("a", "a"), ("a.b+c", "a.b+c"), ("a b", '"a b"'), ('a"b', '"a\\"b"'), ("a\\b", '"a\\\\b"'),
     ("", '""'), ("a..b", '"a..b"'), ('"a b"', '"a b"'), ("ü", "ü")],
)
def test_quote_local_part(local, quoted):
    assert quote_local_part(local) == quoted


def test_format_path():
    assert format_path("") == "<>"
    assert format_path("a@b.c") == "<a@b.c>"
    assert format_path("a b@c") == '<"a b"@c>'
    assert format_path('"a b"@c') == '<"a b"@c>'
    assert format_path('"a@b"@c') == '<"a@b"@c>'
    assert format_path("postmaster") == "<postmaster>"
    assert split_address('"a@b"@c') == ('"a@b"', "c")
    assert split_address("postmaster") == ("postmaster", "")


_local_chars = st.characters(
    codec="utf-8", min_codepoint=0x20, exclude_categories=("Cs",),
).filter(lambda c: not (0x7F <= ord(c) <= 0x9F))


@given(
    local=st.text(_local_chars, max_size=20),
    domain=st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?(\.[a-z]{1,10}){0,3}", fullmatch=True),
)
def test_format_then_parse_round_trip(local, domain):
    path = format_path(f"{local}@{domain}")
    address, rest, non_ascii = parse_path(path, max_local_part_length=1000)
    assert rest == ""
    assert non_ascii == (not local.isascii())
    # Parsing gives the quoted form; quoting it again changes nothing.
    assert format_path(address) == path
