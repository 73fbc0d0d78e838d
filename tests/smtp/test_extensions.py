"""Tests for slimta.smtp.extensions: EHLO keywords, ESMTP parameters, xtext."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from slimta.smtp.extensions import (
    Extensions,
    ParamError,
    parse_body,
    parse_envid,
    parse_notify,
    parse_orcpt,
    parse_params,
    parse_ret,
    parse_size,
    xtext_decode,
    xtext_encode,
)

# --- Extensions -------------------------------------------------------------


def test_extensions_lines_and_order():
    ext = Extensions()
    ext.add("8bitmime")
    ext.add("SIZE", 10485760)
    ext.add("AUTH", "PLAIN LOGIN")
    assert ext.lines() == ["8BITMIME", "SIZE 10485760", "AUTH PLAIN LOGIN"]
    assert ext.keywords() == ["8BITMIME", "SIZE", "AUTH"]
    assert "size" in ext and "Auth" in ext and "DSN" not in ext
    assert 42 not in ext
    assert ext.getparam("size") == "10485760"
    assert ext.getparam("8BITMIME") is None
    assert ext.getparam("DSN") is None
    assert len(ext) == 3
    assert list(ext) == ["8BITMIME", "SIZE", "AUTH"]


def test_extensions_replace_keeps_place_and_drop():
    ext = Extensions({"PIPELINING": None, "SIZE": "100", "DSN": None})
    ext.add("size", 200)
    assert ext.lines() == ["PIPELINING", "SIZE 200", "DSN"]
    assert ext.drop("Size") is True
    assert ext.drop("SIZE") is False
    assert ext.lines() == ["PIPELINING", "DSN"]


def test_extensions_copy_is_independent():
    ext = Extensions({"STARTTLS": None})
    dup = ext.copy()
    dup.drop("STARTTLS")
    dup.add("AUTH", "PLAIN")
    assert ext.lines() == ["STARTTLS"]
    assert dup.lines() == ["AUTH PLAIN"]
    assert ext == Extensions({"starttls": None})
    assert ext != dup


@pytest.mark.parametrize("keyword", ["", "-X", "A B", "A=B", "Ä"])
def test_extensions_bad_keyword(keyword):
    with pytest.raises(ValueError):
        Extensions().add(keyword)


def test_extensions_param_must_be_one_line():
    with pytest.raises(ValueError):
        Extensions().add("X", "a\r\nb")


def test_parse_ehlo():
    text = (
        "mx.example.com Hello client\r\nPIPELINING\r\nSIZE 10240000\r\n"
        "auth PLAIN  LOGIN \r\n8BITMIME"
    )
    greeting, ext = Extensions.parse_ehlo(text)
    assert greeting == "mx.example.com Hello client"
    assert ext.lines() == ["PIPELINING", "SIZE 10240000", "AUTH PLAIN  LOGIN", "8BITMIME"]


def test_parse_ehlo_legacy_auth_and_junk():
    greeting, ext = Extensions.parse_ehlo("hi\nAUTH=LOGIN PLAIN\nnot_a_keyword\n\nSTARTTLS")
    assert greeting == "hi"
    assert ext.lines() == ["STARTTLS", "AUTH LOGIN PLAIN"]
    _, ext = Extensions.parse_ehlo("hi\nAUTH PLAIN\nAUTH=LOGIN")
    assert ext.getparam("AUTH") == "PLAIN"
    greeting, ext = Extensions.parse_ehlo("just hello")
    assert greeting == "just hello" and len(ext) == 0


def test_parse_ehlo_round_trip():
    ext = Extensions({"SIZE": "5", "DSN": None, "AUTH": "CRAM-MD5"})
    _, back = Extensions.parse_ehlo("\n".join(["greeting", *ext.lines()]))
    assert back == ext


# --- parse_params -----------------------------------------------------------


def test_parse_params():
    assert parse_params("") == {}
    assert parse_params("   ") == {}
    assert parse_params("SIZE=100") == {"SIZE": "100"}
    assert parse_params("size=100  body=8bitmime   SMTPUTF8") == {
        "SIZE": "100", "BODY": "8bitmime", "SMTPUTF8": None,
    }
    assert parse_params("X-FOO=a+2Bb ORCPT=rfc822;a@b") == {"X-FOO": "a+2Bb", "ORCPT": "rfc822;a@b"}
    assert parse_params("ORCPT=utf-8;ü@b") == {"ORCPT": "utf-8;ü@b"}


@pytest.mark.parametrize(
    "text",
    ["=", "=1", "SIZE=", "SIZE==1", "SIZE=1=2", "-X=1", "A_B=1", "SIZE=1\tBODY=7BIT", "A=\x01",
     "A=\x7f", "A=\x85", "A=\udcff", "Ä=1", "A=b\r\n"],
)
def test_parse_params_syntax_errors(text):
    with pytest.raises(ParamError) as info:
        parse_params(text)
    assert info.value.kind == "syntax"


def test_parse_params_duplicate():
    with pytest.raises(ParamError) as info:
        parse_params("SIZE=1 size=2")
    assert info.value.kind == "syntax"
    assert info.value.param == "SIZE"


def test_param_error():
    e = ParamError("unknown", "XYZ not supported", param="XYZ")
    assert (e.kind, str(e), e.param) == ("unknown", "XYZ not supported", "XYZ")
    assert ParamError("syntax").kind == "syntax"
    assert str(ParamError("syntax")) == "syntax"
    assert ParamError().kind == "syntax"
    # A reason alone is a syntax error with that reason.
    e = ParamError("bad thing")
    assert (e.kind, str(e)) == ("syntax", "bad thing")
    assert isinstance(e, ValueError)


_key = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,15}", fullmatch=True)
_value_chars = st.one_of(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="="),
    st.characters(codec="utf-8", min_codepoint=0xA0, exclude_categories=("Cs",)),
)
_value = st.one_of(st.none(), st.text(_value_chars, min_size=1, max_size=20))


@given(
    params=st.dictionaries(_key, _value, max_size=8),
    seps=st.lists(st.integers(min_value=1, max_value=4), min_size=9, max_size=9),
    lead=st.integers(min_value=0, max_value=2),
)
def test_parse_params_round_trip(params, seps, lead):
    # Keys are case-insensitive: keep one spelling of each.
    unique = {}
    for k, v in params.items():
        unique.setdefault(k.upper(), (k, v))
    tokens = [k if v is None else f"{k}={v}" for k, v in unique.values()]
    text = " " * lead + "".join(t + " " * n for t, n in zip(tokens, seps, strict=False))
    assert parse_params(text) == {ku: v for ku, (_, v) in unique.items()}


# --- value checkers ---------------------------------------------------------


def test_parse_size():
    assert parse_size("0") == 0
    assert parse_size("10485760") == 10485760
    for bad in [None, "", "-1", "+1", "1.0", "1e3", "١٢", "²", " 1", "9" * 21]:
        with pytest.raises(ParamError) as info:
            parse_size(bad)
        assert info.value.kind == "syntax"


def test_parse_body():
    assert parse_body("7bit") == "7BIT"
    assert parse_body("8BITMIME") == "8BITMIME"
    assert parse_body("BinaryMIME") == "BINARYMIME"
    for bad in [None, "", "8BIT", "BINARY"]:
        with pytest.raises(ParamError):
            parse_body(bad)


def test_parse_ret():
    assert parse_ret("full") == "FULL"
    assert parse_ret("HDRS") == "HDRS"
    for bad in [None, "", "HEADERS", "FULL,HDRS"]:
        with pytest.raises(ParamError):
            parse_ret(bad)


def test_parse_notify():
    assert parse_notify("NEVER") == ["NEVER"]
    assert parse_notify("never") == ["NEVER"]
    assert parse_notify("SUCCESS") == ["SUCCESS"]
    assert parse_notify("failure,Delay,success") == ["FAILURE", "DELAY", "SUCCESS"]
    assert parse_notify("DELAY,DELAY") == ["DELAY"]
    for bad in [None, "", "NEVER,SUCCESS", "SUCCESS,NEVER", "SUCCESS,", ",DELAY", "ALWAYS",
                "SUCCESS, DELAY"]:
        with pytest.raises(ParamError):
            parse_notify(bad)


def test_parse_orcpt():
    assert parse_orcpt("rfc822;a@b.c") == "rfc822;a@b.c"
    assert parse_orcpt("RFC822;a+2Bb@c") == "RFC822;a+b@c"
    assert parse_orcpt("rfc822;a+20b@c") == "rfc822;a b@c"
    assert parse_orcpt("rfc822;+C3+BC@b") == "rfc822;ü@b"
    # RFC 6533 utf-8 address type: \x{HEX}, raw UTF-8, and +XX.
    assert parse_orcpt("utf-8;\\x{263A}@b") == "utf-8;☺@b"
    assert parse_orcpt("utf-8;ü\\x{2B}x@b") == "utf-8;ü+x@b"
    assert parse_orcpt("UTF-8;a+2Bb@c") == "UTF-8;a+b@c"
    for bad in [None, "", "a@b", ";a@b", "rfc822;", "rfc 822;a@b", "rfc822;a+2", "rfc822;a+ZZb",
                "rfc822;a=b", "rfc822;+0D+0Ab", "rfc822;+FF", "rfc822;ü@b", "utf-8;\\x{0A}",
                "utf-8;\\x{D800}", "utf-8;\\x{110000}", "utf-8;a\\b", "utf-8;\\x{12"]:
        with pytest.raises(ParamError) as info:
            parse_orcpt(bad)
        assert info.value.kind == "syntax"


def test_parse_envid():
    assert parse_envid("QQ314159") == "QQ314159"
    assert parse_envid("a+2Bb+20c") == "a+b c"
    assert parse_envid("x" * 100) == "x" * 100
    for bad in [None, "", "x" * 101, "a+0Ab", "a+C3+BC", "a+", "a=b"]:
        with pytest.raises(ParamError):
            parse_envid(bad)


# --- xtext -----------------------------------------------------------------


def test_xtext_examples():
    assert xtext_encode("a@b.c") == "a@b.c"
    assert xtext_encode("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext_encode("ü") == "+C3+BC"
    assert xtext_encode("\r\n") == "+0D+0A"
    assert xtext_decode("a+2Bb+3Dc+20d") == "a+b=c d"
    assert xtext_decode("a+2bb") == "a+b"  # lower-case hex is accepted
    assert xtext_decode("") == ""


@pytest.mark.parametrize("bad", ["a+", "a+2", "a+2G", "a=b", "a b", "ü", "+FF", "+C3", "\x01"])
def test_xtext_decode_errors(bad):
    with pytest.raises(ParamError) as info:
        xtext_decode(bad)
    assert info.value.kind == "syntax"


@given(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",))))
def test_xtext_round_trip(s):
    encoded = xtext_encode(s)
    assert encoded.isascii()
    assert " " not in encoded and "=" not in encoded
    assert xtext_decode(encoded) == s
    # An encoded value is a valid esmtp-value.
    if encoded:
        assert parse_params(f"X={encoded}") == {"X": encoded}


@given(st.from_regex(r"([\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*", fullmatch=True))
def test_xtext_decode_never_crashes(s):
    try:
        decoded = xtext_decode(s)
    except ParamError:
        return
    assert xtext_decode(xtext_encode(decoded)) == decoded
