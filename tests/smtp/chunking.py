"""Helpers shared by the sans-IO tests: cutting one byte stream into reads."""

from __future__ import annotations


def split_at(data: bytes, cuts) -> list[bytes]:
    """``data`` cut at the given offsets (out-of-range and repeated ones ignored)."""
    points = sorted({c for c in cuts if 0 < c < len(data)})
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out
