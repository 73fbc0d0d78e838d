"""Tests for slimta.smtp.data: dot-stuffing, DataReader (end of DATA) and ChunkReader (BDAT).

The readers are fed the way ServerConnection feeds them: a buffer and the
offset where unread input starts; they return the offset past what they used.
"""

from __future__ import annotations

from unittest import mock

import pytest
from chunking import split_at
from hypothesis import given, settings
from hypothesis import strategies as st

from slimta.smtp import data as data_module
from slimta.smtp.data import END_OF_DATA, ChunkReader, DataReader, dot_stuff, dot_unstuff

FAST = settings(max_examples=200, deadline=None)


def feed_chunks(reader, chunks, prefix=b""):
    """Feed ``chunks`` as a server would; return the input left after the reader finished.

    Unread input is carried over into the next buffer, like
    ServerConnection.receive_data. ``prefix`` (already-read bytes, e.g. the
    command line) stands before the first chunk so the start offset is not 0.
    """
    buf, pos = prefix, len(prefix)
    chunks = list(chunks)
    for n, chunk in enumerate(chunks):
        buf = buf[pos:] + chunk
        pos = 0
        pos = reader.feed(buf, pos)
        assert 0 <= pos <= len(buf)
        if reader.done:
            return buf[pos:] + b"".join(chunks[n + 1:])
    return None




def outcome(reader):
    if not reader.done:
        return ("not done",)
    if reader.bogus_end:
        return ("bogus",)
    if reader.too_big:
        return ("too big",)
    if reader.bare_newline:
        return ("bare",)
    return ("ok", reader.content())


def stored(reader) -> int:
    """Octets the reader holds (white-box: the limit promises nothing is kept past it)."""
    return sum(len(c) for c in reader._chunks)


# ---------------------------------------------------------------------------
# dot_stuff / dot_unstuff
@pytest.mark.parametrize(
    ("content", "wire"),
    [
        (b"", b".\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"a", b"a\r\n.\r\n"),  # a missing final CRLF is added
        (b".\r\n", b"..\r\n.\r\n"),
        (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n.\r\n"),
        (b"\r\n.\r\n", b"\r\n..\r\n.\r\n"),
    ],
)
def test_dot_stuff(content, wire):
    assert dot_stuff(content) == wire


@pytest.mark.parametrize(
    ("stuffed", "content"),
    [
        (b"", b""),
        (b"..a\r\n", b".a\r\n"),
        (b"a\r\n..\r\n", b"a\r\n.\r\n"),
        (b"a\r\n...b\r\n", b"a\r\n..b\r\n"),
        (b"a..b\r\n", b"a..b\r\n"),  # dots inside a line are content
        (b"a\r\n.x\r\n", b"a\r\n.x\r\n"),  # an unstuffed leading dot is left alone
    ],
)
def test_dot_unstuff(stuffed, content):
    assert dot_unstuff(stuffed) == content


# ---------------------------------------------------------------------------
# DataReader
def test_simple_message_and_offset():
    r = DataReader()
    buf = b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    pos = r.feed(buf, 6)
    assert r.done and not (r.bogus_end or r.too_big or r.bare_newline)
    assert r.content() == b"Subject: hi\r\n\r\nbody\r\n"
    assert buf[pos:] == b"QUIT\r\n"


def test_empty_message():
    r = DataReader()
    assert r.feed(b".\r\nNOOP\r\n", 0) == 3
    assert r.done and r.content() == b""


def test_empty_line_message():
    r = DataReader()
    assert feed_chunks(r, [b"\r\n.\r\n"]) == b""
    assert r.content() == b"\r\n"


def test_unstuffs():
    r = DataReader()
    feed_chunks(r, [b"..leading\r\nmid\r\n..\r\n...two\r\n.\r\n"])
    assert r.content() == b".leading\r\nmid\r\n.\r\n..two\r\n"


def test_not_done_without_terminator():
    r = DataReader()
    assert feed_chunks(r, [b"a\r\n", b"b\r\n", b".x\r\n"]) is None
    assert not r.done


@pytest.mark.parametrize("prefix", [b"", b"DATA\r\n"])
def test_terminator_split_at_every_position(prefix):
    wire = b"one\r\n..two\r\nthree\r\n.\r\nNOOP\r\n"
    for i in range(1, len(wire)):
        for j in range(i, len(wire)):
            r = DataReader()
            rest = feed_chunks(r, [wire[:i], wire[i:j], wire[j:]], prefix=prefix)
            assert outcome(r) == ("ok", b"one\r\n.two\r\nthree\r\n"), (i, j)
            assert rest == b"NOOP\r\n", (i, j)


def test_terminator_after_dot_stored_before():
    # "...\r\n." in one read and "\r\n" in the next: the dot is the terminator's
    for first, second in [(b"abc\r\n.", b"\r\n"), (b"abc\r\n.\r", b"\n"), (b"abc\r", b"\n.\r\n")]:
        r = DataReader()
        assert feed_chunks(r, [first, second + b"QUIT\r\n"]) == b"QUIT\r\n"
        assert outcome(r) == ("ok", b"abc\r\n")


def test_one_byte_at_a_time():
    wire = dot_stuff(b"a\r\n.b\r\n\r\n.\r\n") + b"rest"
    r = DataReader()
    rest = feed_chunks(r, [wire[i:i + 1] for i in range(len(wire))])
    assert outcome(r) == ("ok", b"a\r\n.b\r\n\r\n.\r\n")
    assert rest == b"rest"


def test_long_text_lines_accepted():
    # RFC 5321's 1000-octet text line limit is not enforced: only max_size counts
    line = b"x" * 50_000 + b"\r\n"
    r = DataReader(max_size=100_000)
    feed_chunks(r, [line[:7000], line[7000:] + b".\r\n"])
    assert outcome(r) == ("ok", line)


def test_max_size_exact_is_accepted():
    content = b"a" * 98 + b"\r\n"
    r = DataReader(max_size=100)
    feed_chunks(r, [content + b".\r\n"])
    assert outcome(r) == ("ok", content)


def test_max_size_plus_one_is_too_big():
    r = DataReader(max_size=100)
    feed_chunks(r, [b"a" * 99 + b"\r\n.\r\n"])
    assert outcome(r) == ("too big",)


@pytest.mark.parametrize("cut", range(1, 6))
def test_max_size_exact_split_before_terminator(cut):
    # the bytes of the terminator must not be counted, wherever the read ends
    content = b"a" * 98 + b"\r\n"
    wire = content + b".\r\n"
    r = DataReader(max_size=100)
    feed_chunks(r, [wire[:len(content) - 2 + cut], wire[len(content) - 2 + cut:]])
    assert outcome(r) == ("ok", content)


def test_too_big_holds_nothing():
    r = DataReader(max_size=1000)
    block = b"y" * 998 + b"\r\n"
    feed_chunks(r, [block])
    assert not r.too_big and stored(r) <= 1000
    for _ in range(50):
        feed_chunks(r, [block])
        assert stored(r) <= 1002  # never more than the limit (plus a possible ".\r")
    assert r.too_big
    assert stored(r) == 0
    assert r.size > 50_000  # it kept counting
    rest = feed_chunks(r, [b".\r\nNOOP\r\n"])
    assert rest == b"NOOP\r\n"
    assert outcome(r) == ("too big",)


@pytest.mark.parametrize(
    "content",
    [b"a\nb\r\n", b"a\rb\r\n", b"a\r\n\n", b"\r\r\n", b"a\r\nb\n\r\n", b"\n", b"x\r"],
)
def test_bare_newline(content):
    r = DataReader()
    rest = feed_chunks(r, [content + b"\r\n.\r\n", b"NOOP\r\n"])
    assert outcome(r) == ("bare",)
    assert rest == b"NOOP\r\n"  # reading went on to the real end of data


@pytest.mark.parametrize("cut", range(1, 8))
def test_bare_newline_split(cut):
    wire = b"ab\rcd\r\n.\r\n"
    r = DataReader()
    feed_chunks(r, [wire[:cut], wire[cut:]])
    assert outcome(r) == ("bare",)


def test_crlf_split_across_reads_is_not_bare():
    r = DataReader()
    feed_chunks(r, [b"a\r", b"\nb\r", b"\n", b".\r\n"])
    assert outcome(r) == ("ok", b"a\r\nb\r\n")


@pytest.mark.parametrize(
    "bogus",
    [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\rX", b"\n.\rX", b"\r.\r"],
)
@pytest.mark.parametrize("prefix", [b"", b"Subject: x\r\n\r\nbody"])
def test_bogus_end_of_data(bogus, prefix):
    wire = prefix + bogus + b"MAIL FROM:<evil@example.com>\r\n\r\n.\r\n"
    # whole, and split at every position: always recognised, never passed over
    for cut in range(len(wire)):
        r = DataReader()
        feed_chunks(r, [wire[:cut], wire[cut:]])
        assert outcome(r) == ("bogus",), cut
        assert stored(r) == 0


@pytest.mark.parametrize("wire", [b"a\n.\r\n.\r\n", b"a\r\n.\n\r\n.\r\n", b"\n.\r\n.\r\n",
                                  b"x\r.\r\n.\r\n"])
def test_bogus_end_just_before_the_real_one(wire):
    # the real CRLF.CRLF may start inside the bogus dot line's ending
    for i in range(len(wire)):
        for j in range(i, len(wire)):
            r = DataReader()
            feed_chunks(r, [wire[:i], wire[i:j], wire[j:]])
            assert outcome(r) == ("bogus",), (i, j)


def test_bogus_end_at_start():
    r = DataReader()
    feed_chunks(r, [b".\nMAIL FROM:<a@b.c>\r\n.\r\n"])
    assert outcome(r) == ("bogus",)


def test_dot_line_with_crlf_is_not_bogus_with_bare_lf_elsewhere():
    r = DataReader()
    feed_chunks(r, [b"a\nb\r\n..\r\nc\r\n.\r\n"])
    assert outcome(r) == ("bare",)


# ---------------------------------------------------------------------------
# ChunkReader
def test_chunk_reader_exact():
    c = ChunkReader(5)
    buf = b"BDAT 5\r\nhello NOOP"
    pos = c.feed(buf, 8)
    assert c.done and c.content() == b"hello"
    assert buf[pos:] == b" NOOP"


def test_chunk_reader_split_and_binary():
    payload = b"\x00\r\n.\r\n\n\r.\r\xff" * 3
    c = ChunkReader(len(payload))
    for i in range(len(payload)):
        assert not c.done
        assert c.feed(payload[i:i + 1], 0) == 1
    assert c.done and c.content() == payload
    assert c.feed(b"more", 0) == 0  # takes nothing past its size


def test_chunk_reader_zero():
    c = ChunkReader(0)
    assert c.done
    assert c.feed(b"abc", 1) == 1
    assert c.content() == b""


def test_chunk_reader_discard_keeps_nothing():
    c = ChunkReader(10_000, discard=True)
    for _ in range(10):
        c.feed(b"z" * 1000, 0)
    assert c.done and c.chunks == [] and c.content() == b""


# ---------------------------------------------------------------------------
# properties
_line = st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_dotty_line = st.one_of(_line, _line.map(lambda b: b"." + b), _line.map(lambda b: b".." + b),
                        st.sampled_from([b"", b".", b"..", b"..."]))
_message = st.lists(_dotty_line, max_size=20).map(lambda ls: b"".join(x + b"\r\n" for x in ls))


@FAST
@given(message=_message, cuts=st.lists(st.integers(0, 800), max_size=12),
       prefix=st.sampled_from([b"", b"DATA\r\n"]), after=st.binary(max_size=10))
def test_property_dot_stuffing_round_trips(message, cuts, prefix, after):
    wire = dot_stuff(message)
    assert wire.endswith(END_OF_DATA) or wire == b".\r\n"
    r = DataReader()
    rest = feed_chunks(r, split_at(wire + after, cuts), prefix=prefix)
    assert outcome(r) == ("ok", message)
    assert rest == after
    assert dot_unstuff(wire[:-3]) == message


# bytes rich in the characters that matter to end-of-data detection
_nasty = st.lists(
    st.sampled_from([b"\r", b"\n", b".", b"\r\n", b"a", b"\r\n.", b".\r\n", b"\x00", b"\xff"]),
    max_size=40,
).map(b"".join)


@FAST
@given(body=_nasty, cuts=st.lists(st.integers(0, 120), max_size=10),
       max_size=st.one_of(st.none(), st.integers(0, 60)),
       prefix=st.sampled_from([b"", b"DATA\r\n"]))
def test_property_reader_ignores_chunking(body, cuts, max_size, prefix):
    """Whatever the reads look like, the reader decides the same, at the same place."""
    wire = body + b"\r\n.\r\nTAIL"
    whole = DataReader(max_size)
    whole_rest = feed_chunks(whole, [wire], prefix=prefix)
    split = DataReader(max_size)
    split_rest = feed_chunks(split, split_at(wire, cuts), prefix=prefix)
    assert outcome(split) == outcome(whole)
    if outcome(whole)[0] != "bogus":  # after a bogus end the session closes: no rest
        assert split_rest == whole_rest
    if outcome(whole)[0] == "ok":
        # an accepted message is exactly the content before the first CRLF.CRLF
        end = (b"\r\n" + wire).find(END_OF_DATA)
        assert whole.content() == dot_unstuff(wire[:end])
        assert max_size is None or end <= max_size
    if max_size is not None:
        assert stored(split) <= max_size + 2


@FAST
@given(buf=_nasty, start=st.integers(0, 10), pending=st.booleans())
def test_property_c_scan_matches_python_twin(buf, start, pending):
    start = min(start, len(buf))
    assert data_module._scan(buf, start, pending) == data_module._py_scan(buf, start, pending)


@FAST
@given(body=_nasty, cuts=st.lists(st.integers(0, 120), max_size=10),
       max_size=st.one_of(st.none(), st.integers(0, 60)))
def test_property_python_twin_ignores_chunking(body, cuts, max_size):
    """The same property with the pure-Python fallback (used when the C part is not built)."""
    with mock.patch.object(data_module, "_scan", data_module._py_scan):
        wire = body + b"\r\n.\r\nTAIL"
        whole = DataReader(max_size)
        whole_rest = feed_chunks(whole, [wire])
        split = DataReader(max_size)
        split_rest = feed_chunks(split, split_at(wire, cuts))
    assert outcome(split) == outcome(whole)
    if outcome(whole)[0] != "bogus":
        assert split_rest == whole_rest


@pytest.mark.parametrize("wire", [b"a\n.\r\n.\r\n", b"\n.\r\n.\r\n", b"x\r\n.\rX\r\n.\r\n"])
def test_python_twin_bogus_end(wire):
    with mock.patch.object(data_module, "_scan", data_module._py_scan):
        for i in range(len(wire)):
            r = DataReader()
            feed_chunks(r, [wire[:i], wire[i:]])
            assert outcome(r) == ("bogus",), i
