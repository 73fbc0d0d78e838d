"""The stored form of an :class:`~slimta.envelope.Envelope`: JSON metadata plus raw bytes.

Every storage keeps a message as two parts, built by :func:`envelope_to_record`
and read back by :func:`envelope_from_record`:

``data``
    The message itself, ``b''.join(envelope.flatten())``: the header block
    (with the empty line that ends it) followed by the body, exactly the bytes
    a relay would send. Reading it back with :meth:`Envelope.parse
    <slimta.envelope.Envelope.parse>` gives the same bytes from ``flatten()``.

``meta``
    A JSON object (a ``dict`` of JSON types) with everything else. Format
    version 1, the only one so far::

        {
          "v": 1,                       # format version, always present
          "sender": "a@example.com",    # reverse-path; "" for <>, null if never set
          "recipients": ["b@example.org", ...],   # forward-paths, in order
          "client": {"ip": ..., "host": ..., "name": ..., "protocol": ..., "auth": ...},
          "receiver": "mx.example.net", # or null
          "timestamp": 1700000000.25,   # when it was received (time.time()), or null
          "ret": "FULL" | "HDRS" | null,          # DSN RET=
          "envid": "..." | null,                  # DSN ENVID=, decoded
          "auth": "..." | null,                   # MAIL FROM AUTH=, decoded
          "rcpt_params": {"b@example.org": {"notify": ["FAILURE"], "orcpt": "rfc822;b@..."}},
          "smtputf8": false,
          "body": "7BIT" | "8BITMIME" | "BINARYMIME"
        }

    Strings are written with JSON ``\\u`` escapes for everything outside ASCII
    (so the text is pure ASCII, and lone surrogates that stand for undecodable
    bytes survive). ``client`` holds whatever the edge put there; its values
    must be JSON types. Attributes that code added to an envelope beyond
    these are not stored.

Compatibility promise: a reader of version 1 ignores keys it does not know and
uses the :class:`~slimta.envelope.Envelope` defaults for keys that are missing,
so keys may be added without a new version. A change that an older reader
would misread gets a new ``"v"``; a reader given a version it does not know
refuses it with :class:`ValueError` rather than guess. Pickle is never used.
"""

from __future__ import annotations

from typing import Any

from slimta.envelope import Envelope

__all__ = ["RECORD_VERSION", "envelope_from_record", "envelope_to_record"]

#: The format version :func:`envelope_to_record` writes.
RECORD_VERSION = 1


def _copy_params(params: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``rcpt_params`` that shares no dict or list with it."""
    return {
        rcpt: {key: (list(val) if isinstance(val, list) else val) for key, val in p.items()}
        for rcpt, p in params.items()
    }


def envelope_to_record(envelope: Envelope) -> tuple[dict[str, Any], bytes]:
    """``(meta, data)`` for ``envelope``: its JSON-able metadata and its message bytes.

    The result shares nothing mutable with ``envelope``: later changes to the
    envelope do not change the record.
    """
    meta: dict[str, Any] = {
        "v": RECORD_VERSION,
        "sender": envelope.sender,
        "recipients": list(envelope.recipients),
        "client": dict(envelope.client),
        "receiver": envelope.receiver,
        "timestamp": envelope.timestamp,
        "ret": envelope.ret,
        "envid": envelope.envid,
        "auth": envelope.auth,
        "rcpt_params": _copy_params(envelope.rcpt_params),
        "smtputf8": bool(envelope.smtputf8),
        "body": envelope.body,
    }
    header, body = envelope.flatten()
    return meta, header + body


def envelope_from_record(meta: dict[str, Any], data: bytes) -> Envelope:
    """A new :class:`~slimta.envelope.Envelope` from a record made by :func:`envelope_to_record`.

    Raises :class:`ValueError` for a record without a format version or with
    one this code does not know.
    """
    version = meta.get("v") if isinstance(meta, dict) else None
    if version != RECORD_VERSION:
        if version is None:
            raise ValueError("queue record has no format version ('v')")
        raise ValueError(
            f"queue record format version {version!r} is not supported "
            f"(this slimta reads version {RECORD_VERSION})"
        )
    envelope = Envelope(meta.get("sender"), meta.get("recipients") or [])
    envelope.parse(bytes(data))
    client = meta.get("client")
    if client:
        envelope.client.update(client)
    envelope.receiver = meta.get("receiver")
    envelope.timestamp = meta.get("timestamp")
    envelope.ret = meta.get("ret")
    envelope.envid = meta.get("envid")
    envelope.auth = meta.get("auth")
    envelope.rcpt_params = _copy_params(meta.get("rcpt_params") or {})
    envelope.smtputf8 = bool(meta.get("smtputf8", False))
    envelope.body = meta.get("body") or "7BIT"
    return envelope
