"""Constants and helpers shared by the sans-IO SMTP tests: the server's host
name and CRAM-MD5 nonce, and base64 as the AUTH exchange writes it."""

from __future__ import annotations

import base64

HOST = "mx.example.com"
NONCE = "1896.697170952"


def b64(data: str | bytes) -> str:
    """``data`` (UTF-8 when text) in base64, as text."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    return base64.b64encode(data).decode("ascii")
