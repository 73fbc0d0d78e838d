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
"""

from __future__ import annotations

import re

__all__ = ["ChunkReader", "DataReader", "dot_stuff", "dot_unstuff"]

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
    """

    __slots__ = (
        "_chunks", "_pending_cr", "_tail", "_trim", "bare_newline", "bogus_end", "done",
        "max_size", "size", "too_big",
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
        self._trim = 0

    def feed(self, buf: bytes, start: int) -> int:
        """Consume ``buf[start:]`` up to the end of data; return the new offset."""
        tail = self._tail
        # ``end`` is the offset of the terminator's dot; it may be negative (a
        # dot stored in an earlier read), so "not found" is None, not -1.
        end = None
        # A terminator that begins in what was read before.
        if len(tail) > 0:
            probe = tail + buf[start:start + 4]
            i = probe.find(END_OF_DATA)
            if i != -1 and i < len(tail):
                end = start + i + 2 - len(tail)
        if end is None:
            i = buf.find(END_OF_DATA, start)
            if i != -1:
                end = i + 2
        if end is not None:
            consumed = end + 3
            if end < start:
                # the content ended inside bytes already stored
                self._trim = start - end
                region_end = start
            else:
                region_end = end
        else:
            consumed = region_end = len(buf)
        self._check_region(buf, start, region_end, final=end is not None)
        if self.done:  # a bogus end-of-data was seen
            return consumed
        n = region_end - start
        if n > 0:
            self.size += n
            if self.max_size is not None and self.size - self._trim > self.max_size:
                self.too_big = True
                self._chunks.clear()
            elif not self.too_big:
                self._chunks.append(buf[start:region_end] if start or region_end != len(buf)
                                    else buf)
        if end is not None:
            self.done = True
            return consumed
        keep = tail + buf[start:region_end] if region_end - start < 4 else buf[region_end - 4:region_end]
        self._tail = keep[-4:]
        return consumed

    def _check_region(self, buf: bytes, s: int, e: int, final: bool) -> None:
        """Look for bare CR/LF in buf[s:e] (the boundary with earlier bytes included)."""
        if s >= e:
            if final:  # a pending CR was the start of the terminator
                self._pending_cr = False
            return
        n_lf = buf.count(b"\n", s, e)
        n_cr = buf.count(b"\r", s, e)
        if n_lf == 0 and n_cr == 0 and not self._pending_cr:
            return
        n_crlf = buf.count(b"\r\n", s, e)
        first = buf[s]
        if self._pending_cr:
            if first == 10:  # the CR before was half of a CRLF split across reads
                n_crlf += 1
                n_cr += 1
            else:
                self.bare_newline = True
        self._pending_cr = False
        if not final and buf[e - 1] == 13:
            # may be the first half of a CRLF whose LF has not arrived
            self._pending_cr = True
            n_cr -= 1
        if n_lf != n_crlf or n_cr != n_crlf:
            self.bare_newline = True
            self._look_for_bogus_end(buf, s, e)

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
        data = b"".join(self._chunks) if len(self._chunks) != 1 else self._chunks[0]
        if self._trim:
            data = data[: len(data) - self._trim]
        return dot_unstuff(data)


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
