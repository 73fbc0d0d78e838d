"""Tests for slimta.smtp.client: the sans-IO SMTP/LMTP client state machine.

Most tests wire a ClientConnection to the real sans-IO ServerConnection in
memory: what one side writes the other reads. Where the server cannot say
what a test needs (no DSN offered, LMTP, XOAUTH2, broken replies) the
server's bytes are written by hand. No sockets, no asyncio.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimta.smtp.data import LINE_LENGTH_LIMIT, fold_long_lines, to_crlf

FAST = settings(max_examples=200, deadline=None)


def unfold(data: bytes) -> bytes:
    return data.replace(b"\r\n ", b"")


# ---------------------------------------------------------------------------
# message content helpers (slimta.smtp.data)
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", b""),
        (b"a\r\nb\r\n", b"a\r\nb\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb", b"a\r\nb"),
        (b"a\r\r\nb\n\n", b"a\r\n\r\nb\r\n\r\n"),
        (b"\n.\r\n", b"\r\n.\r\n"),
    ],
)
def test_to_crlf(content, expected):
    assert to_crlf(content) == expected


def test_to_crlf_returns_clean_content_as_is():
    content = b"line\r\n" * 100
    assert to_crlf(content) is content


def test_fold_limit_is_postfix_default():
    assert LINE_LENGTH_LIMIT == 998


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"abc\r\n", b"abc\r\n"),
        (b"abcd\r\n", b"abc\r\n d\r\n"),
        (b"abcdefg\r\n12\r\n", b"abc\r\n de\r\n fg\r\n12\r\n"),
        (b"abcdefgh", b"abc\r\n de\r\n fg\r\n h"),
        (b"12\r\nabcd\r\n12345", b"12\r\nabc\r\n d\r\n123\r\n 45"),
        (b"\r\n\r\nabcd", b"\r\n\r\nabc\r\n d"),
    ],
)
def test_fold_small_limit(content, expected):
    # a line is cut after `limit` octets; each continuation is a space and
    # limit - 1 octets, as Postfix's smtp_line_length_limit does
    assert fold_long_lines(content, 3) == expected


def test_fold_5000_octet_line():
    line = (bytes(range(33, 127)) * 54)[:5000]  # printable octets
    assert len(line) == 5000
    content = b"Subject: long\r\n\r\n" + line + b"\r\nend\r\n"
    folded = fold_long_lines(content)
    lines = folded.split(b"\r\n")
    assert lines[:2] == [b"Subject: long", b""]
    body = lines[2:-2]
    assert body[0] == line[:998]
    assert all(x[:1] == b" " and len(x) == 998 for x in body[1:-1])
    # 5000 = 998 + 4 * 997 + 14
    assert len(body) == 6 and body[-1] == b" " + line[-14:]
    assert lines[-2:] == [b"end", b""]
    assert unfold(folded) == content


def test_fold_boundaries():
    assert fold_long_lines(b"a" * 998 + b"\r\n") == b"a" * 998 + b"\r\n"
    assert fold_long_lines(b"a" * 999 + b"\r\n") == b"a" * 998 + b"\r\n a\r\n"
    assert fold_long_lines(b"a" * 998) == b"a" * 998
    assert fold_long_lines(b"a" * 999) == b"a" * 998 + b"\r\n a"


def test_fold_returns_content_as_is_when_nothing_is_long():
    content = (b"x" * 997 + b"\r\n") * 50
    assert fold_long_lines(content) is content


def test_fold_off_and_bad_limits():
    content = b"a" * 5000
    assert fold_long_lines(content, 0) is content
    with pytest.raises(ValueError):
        fold_long_lines(content, 1)


@FAST
@given(
    lines=st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
                   max_size=12),
    limit=st.integers(2, 12),
    final=st.booleans(),
)
def test_fold_property(lines, limit, final):
    content = b"\r\n".join(lines) + (b"\r\n" if final else b"")
    folded = fold_long_lines(content, limit)
    out_lines = folded.split(b"\r\n")
    assert all(len(x) <= limit for x in out_lines)
    # every inserted break is CRLF SP; nothing else changes
    expected = []
    for line in content.split(b"\r\n"):
        pieces = [line[:limit]]
        pieces += [b" " + line[i:i + limit - 1] for i in range(limit, len(line), limit - 1)]
        expected.append(b"\r\n".join(pieces))
    assert folded == b"\r\n".join(expected)
