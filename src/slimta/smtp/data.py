"""Message content on the wire: end-of-data, dot-stuffing, size and line-ending checks.

DATA content arrives in chunks of any size. :class:`DataReader` finds the
``<CRLF>.<CRLF>`` that ends it (also across chunk boundaries), counts the
size without holding more than ``max_size`` bytes, and notices bare CR or LF
(RFC 5321 §2.3.8), which it reports instead of guessing where lines end:
guessing is what makes "SMTP smuggling" possible. It works on whole buffers
with ``bytes.find``/``bytes.count`` so a large message costs a few C-level
scans, not a Python loop per line.

:class:`ChunkReader` reads the exact octet count of one BDAT chunk (RFC 3030),
which is binary-clean: no dot-stuffing and no line-ending rules.

For the sending side, :func:`to_crlf` makes every line ending CRLF and
:func:`fold_long_lines` breaks lines longer than :data:`LINE_LENGTH_LIMIT`
the way Postfix's ``smtp_line_length_limit`` does; :func:`dot_stuff` then
makes the DATA content.
"""

from __future__ import annotations

import re

__all__ = [
    "LINE_LENGTH_LIMIT",
    "ChunkReader",
    "DataReader",
    "dot_stuff",
    "dot_unstuff",
    "fold_long_lines",
    "to_crlf",
]

#: The longest line sent in DATA, CRLF not counted: RFC 5321 §4.5.3.1.6 allows
#: 1000 octets with CRLF; Postfix's ``smtp_line_length_limit`` default.
LINE_LENGTH_LIMIT = 998

END_OF_DATA = b"\r\n.\r\n"
# A line holding only "." where one of the two line endings around it is not
# CRLF: a client (or an attacker) that means it as end-of-data.
_DOT_LINE = re.compile(rb"(?:\r\n|\r|\n)\.(?:\r\n|\r|\n)")


def dot_unstuff(content: bytes) -> bytes:
    """Remove the dot-stuffing of RFC 5321 §4.5.2 from CRLF-terminated lines."""
    if b"\r\n.." in content:
        content = content.replace(b"\r\n..", b"\r\n.")
    if content[:2] == b"..":
        content = content[1:]
    return content


def dot_stuff(content: bytes) -> bytes:
    """Dot-stuff ``content`` and append the end-of-data line.

    Line endings are taken as they are; a missing final CRLF is added.
    """
    if content[:1] == b".":
        content = b"." + content
    if b"\n." in content:
        content = content.replace(b"\n.", b"\n..")
    if content and content[-2:] != b"\r\n":
        content += b"\r\n"
    return content + b".\r\n"


_ANY_LINE_END = re.compile(rb"\r\n|\r|\n")


def to_crlf(content: bytes) -> bytes:
    """``content`` with every line ending as CRLF: a bare LF or a bare CR becomes CRLF.

    Content whose line endings are all CRLF already is returned as it is
    (three C-level counts decide that).
    """
    crlf = content.count(b"\r\n")
    if content.count(b"\n") == crlf and content.count(b"\r") == crlf:
        return content
    return _ANY_LINE_END.sub(b"\r\n", content)


def _fold_line(line: bytes, limit: int) -> bytes:
    step = limit - 1
    parts = [line[:limit]]
    parts.extend(b" " + line[i:i + step] for i in range(limit, len(line), step))
    return b"\r\n".join(parts)


def fold_long_lines(content: bytes, limit: int = LINE_LENGTH_LIMIT) -> bytes:
    """Break lines longer than ``limit`` octets (CRLF not counted) as Postfix does.

    Postfix's ``smtp_line_length_limit``: a longer line is cut after
    ``limit`` octets and continues on a new line that starts with a space,
    again at most ``limit`` octets long (the space and ``limit - 1`` octets
    of the line), so "<CR><LF><SPACE>" is inserted every ``limit - 1``
    octets after the first ``limit``. A line of exactly ``limit`` octets is
    left alone. The space makes a continued header field a folded one and
    keeps a continuation from starting with a dot. ``limit`` 0 turns folding
    off; 1 is refused (there would be no room after the space).

    ``content`` must have CRLF line endings only (see :func:`to_crlf`); it is
    returned as it is when no line is too long. The check looks at one
    window of ``limit`` octets at a time, not at every line.
    """
    if limit == 0:
        return content
    if limit < 2:
        raise ValueError("the line length limit must be 0 or at least 2")
    n = len(content)
    start = 0  # where the line being checked starts
    copied = 0  # content[:copied] is in out already
    out: list[bytes] = []
    while n - start > limit:
        # a line of at most `limit` octets has its CR within the next limit + 1
        cr = content.rfind(b"\r", start, start + limit + 1)
        if cr != -1:
            start = cr + 2  # past the last line end in the window
            continue
        end = content.find(b"\r", start + limit + 1)
        if end == -1:
            end = n
        out.append(content[copied:start])
        out.append(_fold_line(content[start:end], limit))
        copied = end
        start = end + 2
    if not out:
        return content
    out.append(content[copied:])
    return b"".join(out)


def _py_scan(buf: bytes, start: int, pending_cr: bool) -> tuple[int, bool, bool, bool]:
    """The pure-Python twin of ``_speedups.scan`` (see _speedups.c for the contract)."""
    bare = dots = False
    p = start
    n = len(buf)
    if pending_cr:
        if p >= n:
            return -1, False, False, True
        if buf[p] != 10:
            bare = True
        else:
            p += 1
            if buf[p:p + 3] == b".\r\n":
                return p, False, False, False
            if buf[p:p + 1] == b".":
                dots = True
    i = buf.find(END_OF_DATA, p)
    e = i + 2 if i != -1 else n
    n_lf = buf.count(b"\n", p, e)
    n_cr = buf.count(b"\r", p, e)
    pending = False
    if i == -1 and e > p and buf[e - 1] == 13:
        pending = True
        n_cr -= 1
    if (n_lf or n_cr) and (n_lf != n_cr or buf.count(b"\r\n", p, e) != n_lf):
        bare = True
    if not dots and buf.find(b"\n.", p, e) != -1:
        dots = True
    return (e if i != -1 else -1), bare, dots, pending


try:
    from slimta.smtp._speedups import scan as _scan
except ImportError:  # pragma: no cover - the C part did not build
    _scan = _py_scan


class DataReader:
    """Collects the content of one DATA command.

    Call :meth:`feed` with the input buffer and the offset where unread input
    starts; it returns the offset just past what it consumed. When
    :attr:`done` becomes true, exactly one of these holds:

    - :attr:`bogus_end` — a dot line with a bare CR or LF ended the data; the
      rest of the input cannot be trusted and the session should close;
    - :attr:`too_big` — the content exceeded ``max_size`` (nothing was kept);
    - :attr:`bare_newline` — a bare CR or LF appeared in the content;
    - otherwise :meth:`content` gives the unstuffed message.

    Size counts the content as sent, dot-stuffing included.
    """

    __slots__ = (
        "_chunks", "_dots", "_pending_cr", "_tail", "_trim", "bare_newline", "bogus_end",
        "done", "max_size", "size", "too_big",
    )

    def __init__(self, max_size: int | None = None):
        self.max_size = max_size
        self.size = 0
        self.done = False
        self.too_big = False
        self.bare_newline = False
        self.bogus_end = False
        self._chunks: list[bytes] = []
        # The CRLF that ended the DATA command line counts as the line end
        # before the first content line, so ".\r\n" at once is an empty message.
        self._tail = b"\r\n"
        self._pending_cr = False
        self._dots = False
        self._trim = 0

    def feed(self, buf: bytes, start: int) -> int:
        """Consume ``buf[start:]`` up to the end of data; return the new offset."""
        tail = self._tail
        # A terminator that begins in bytes read before: its dot may even be
        # stored already (then ``dot`` is before ``start``, possibly negative).
        probe = tail + buf[start:start + 4]
        i = probe.find(END_OF_DATA)
        if i != -1 and i < len(tail):
            dot = start + i + 2 - len(tail)
            if dot < start:
                self._trim = start - dot
            else:
                if self.bare_newline:
                    # that LF may end a bogus dot line begun in the last read
                    self._look_for_bogus_end(buf, start, dot)
                    if self.done:
                        return dot + 3
                self._store(buf, start, dot)  # at most the LF of a split CRLF
            self._finish()
            return dot + 3
        eod, bare, dots, pending = _scan(buf, start, self._pending_cr)
        if tail[-1:] == b"\n" and buf[start:start + 1] == b".":
            dots = True
        region_end = eod if eod != -1 else len(buf)
        if bare or self.bare_newline:
            # once a line ending was bare, a dot line may be one too, even across reads
            self.bare_newline = True
            self._look_for_bogus_end(buf, start, region_end)
            if self.done:
                return eod + 3 if eod != -1 else len(buf)
        self._pending_cr = pending
        if dots:
            self._dots = True
        self._store(buf, start, region_end)
        if eod != -1:
            self._finish()
            return eod + 3
        if region_end - start >= 4:
            self._tail = buf[region_end - 4:region_end]
        else:
            self._tail = (tail + buf[start:region_end])[-4:]
        return region_end

    def _store(self, buf: bytes, s: int, e: int) -> None:
        n = e - s
        if n <= 0:
            return
        self.size += n
        if self.too_big:
            return
        # up to two stored bytes (".", CR) may turn out to be the terminator's
        if self.max_size is not None and self.size > self.max_size + 2:
            self.too_big = True
            self._chunks.clear()
            return
        self._chunks.append(buf if n == len(buf) else buf[s:e])

    def _finish(self) -> None:
        self.done = True
        self.size -= self._trim
        if not self.too_big and self.max_size is not None and self.size > self.max_size:
            self.too_big = True
            self._chunks.clear()

    def _look_for_bogus_end(self, buf: bytes, s: int, e: int) -> None:
        window = self._tail + buf[s:e]
        for m in _DOT_LINE.finditer(window):
            if m.group() == END_OF_DATA:
                continue
            if m.end() == len(window) and window[-1:] == b"\r":
                continue  # undecided until the next byte arrives
            self.bogus_end = True
            self.done = True
            self._chunks.clear()
            return

    def content(self) -> bytes:
        """The unstuffed message content (valid once :attr:`done`, if no error)."""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if self._trim:
            data = data[: len(data) - self._trim]
        return dot_unstuff(data) if self._dots else data


class ChunkReader:
    """Reads one BDAT chunk of ``size`` octets, keeping it unless ``discard``."""

    __slots__ = ("chunks", "discard", "remaining")

    def __init__(self, size: int, discard: bool = False):
        self.remaining = size
        self.discard = discard
        self.chunks: list[bytes] = []

    def feed(self, buf: bytes, start: int) -> int:
        """Consume up to the rest of the chunk from ``buf[start:]``; return the new offset."""
        n = min(self.remaining, len(buf) - start)
        if n > 0:
            if not self.discard:
                self.chunks.append(buf[start:start + n] if start or n != len(buf) else buf)
            self.remaining -= n
        return start + n

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def content(self) -> bytes:
        return b"".join(self.chunks)
