"""MaildirRelay: deliver into local Maildirs, durably.

A delivery follows the Maildir protocol: the message is written to a new file
in ``tmp/``, fsynced, renamed into ``new/``, and ``new/`` itself is fsynced,
so a delivery that returned survives a crash (power loss included).

The path may be a template. ``MaildirRelay('/var/mail/{domain}/{localpart}')``
delivers each recipient into its own Maildir, with results per recipient;
``MaildirRelay('/var/mail/shared')`` delivers the message once into one
Maildir, as it always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
import string
import time
from typing import Any

from slimta.envelope import Envelope
from slimta.relay import PermanentRelayError, Relay, RelayError, TransientRelayError
from slimta.smtp.reply import Reply

__all__ = ["MaildirRelay", "header_newline", "parse_macros", "split_address", "trace_headers"]

#: The macros a path template may use.
PATH_MACROS = frozenset({"recipient", "localpart", "domain"})


def header_newline(head: bytes) -> bytes:
    """The line ending the header block ``head`` uses: ``b'\\n'`` or ``b'\\r\\n'``.

    Fields we add in front use the same one, so a header block never mixes
    the two. An empty block counts as CRLF (the SMTP convention).
    """
    i = head.find(b"\n")
    if i == 0 or (i > 0 and head[i - 1] != 0x0D):
        return b"\n"
    return b"\r\n"


def _header_value(text: str | None) -> bytes:
    """An address as a header value: no line breaks or NULs can sneak in."""
    text = "".join(c for c in (text or "") if c not in "\r\n\0")
    return text.encode("utf-8", "surrogateescape")


def trace_headers(
    head: bytes, sender: str | None, recipient: str | None = None, return_path: bool = True
) -> bytes:
    """The ``Return-Path:`` and ``Delivered-To:`` fields of a final delivery.

    To be written in front of ``head`` (the header block from
    :meth:`~slimta.envelope.Envelope.flatten`), with its line endings:
    ``Return-Path: <sender>`` (``<>`` for the null sender) unless
    ``return_path`` is false, then, when ``recipient`` is given,
    ``Delivered-To: recipient``, as Postfix's local(8) and pipe(8) write
    them. When the message has no header block at all, an empty line
    follows, so its body stays a body.
    """
    nl = header_newline(head)
    out = b""
    if return_path:
        out += b"Return-Path: <" + _header_value(sender) + b">" + nl
    if recipient is not None:
        out += b"Delivered-To: " + _header_value(recipient) + nl
    if out and not head:
        out += nl
    return out


def split_address(address: str) -> tuple[str, str]:
    """``(localpart, domain)`` of ``address``, split at its last ``@``.

    The domain is lower-cased (domains are case-insensitive, local parts are
    not); an address without ``@`` (``postmaster``) has an empty domain.
    """
    localpart, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return localpart, domain.lower()


def parse_macros(template: str, allowed: frozenset[str]) -> list[str]:
    """The macro names ``template`` uses; ValueError for anything else.

    Macros are ``{name}`` with no conversion or format spec; ``{{`` and
    ``}}`` are literal braces, as in :meth:`str.format`.
    """
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from None
    for _literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            raise ValueError(
                f"unknown macro {{{name}}} in {template!r}; "
                f"known: {', '.join('{' + m + '}' for m in sorted(allowed))}"
            )
        names.append(name)
    return names


def _safe_component(value: str) -> bool:
    """True when ``value`` can be put into a path without leaving its directory."""
    return bool(value) and value[0] != "." and not any(
        c == "/" or ord(c) < 0x20 or c == "\x7f" for c in value
    )


_ERRNO_REPLIES = {
    errno.ENOSPC: ("452", "4.3.1 Insufficient system storage"),
    errno.EDQUOT: ("452", "4.2.2 Mailbox full"),
}
_WRITE_FAILED = ("451", "4.3.0 Could not write to the mailbox")


class MaildirRelay(Relay):
    """Delivers into the Maildir ``path_template`` names, created if missing.

    ``path_template`` is a directory path, in :meth:`str.format` syntax
    (``{{`` for a literal brace). Without macros every message is
    written once into that one Maildir, whatever its recipients, and the
    result is for the whole message. With macros, each recipient gets its own
    delivery into the Maildir its address names, and the result is one per
    recipient:

    ``{recipient}``
        the whole address, ``localpart@domain`` with the domain lower-cased;
    ``{localpart}``
        the part before the last ``@``, as it is (case kept);
    ``{domain}``
        the part after it, lower-cased.

    A recipient whose value for a macro is empty, contains ``/`` or a
    control character, or starts with ``.`` (``..``, hidden directories,
    Maildir++ folders) is refused with ``550 5.1.3``: a path is never built
    from it. Replacing the bad characters instead would let ``a/b@x`` land
    in the mailbox of ``a_b@x``. Recipients are delivered once each, in order.

    Each file starts with ``Return-Path: <sender>``; a delivery per
    recipient adds ``Delivered-To: recipient`` below it. The message bytes
    follow unchanged (line endings included). File names are unique per the
    Maildir specification (``time.MusecPpidQcounterRrandom.host``) and a name
    is never reused: ``tmp/`` files are created with ``O_EXCL``.

    ``fsync=False`` skips the fsyncs (for tests and benchmarks only: a crash
    may then lose mail that was reported delivered). Failures to write are
    transient: ``452 4.3.1`` for a full disk, ``452 4.2.2`` for an exceeded
    quota, ``451 4.3.0`` otherwise.
    """

    def __init__(self, path_template: str, fsync: bool = True):
        super().__init__()
        self.path_template = path_template
        self.fsync = fsync
        self.macros = frozenset(parse_macros(path_template, PATH_MACROS))
        self._fixed = None if self.macros else path_template.format()
        self._seq = itertools.count()
        self._host = (
            socket.gethostname().replace("/", "\\057").replace(":", "\\072") or "localhost"
        )
        self._ready: set[str] = set()  # Maildirs known to exist

    @property
    def path(self) -> str:
        """The path template, under the name older code knows."""
        return self.path_template

    def path_for(self, recipient: str) -> str:
        """The Maildir of ``recipient``; PermanentRelayError when its address is unsafe."""
        localpart, domain = split_address(recipient)
        values = {
            "recipient": f"{localpart}@{domain}" if domain else localpart,
            "localpart": localpart,
            "domain": domain,
        }
        for name in self.macros:
            if not _safe_component(values[name]):
                raise PermanentRelayError(
                    f"no Maildir for {recipient!r}: its {{{name}}} is unsafe in a path",
                    Reply("550", "5.1.3 Bad destination mailbox address syntax"),
                )
        return self.path_template.format_map(values)

    async def _attempt(self, envelope: Envelope, attempts: int) -> Any:
        head, body = envelope.flatten()
        if self._fixed is not None:
            data = trace_headers(head, envelope.sender) + head + body
            error = await asyncio.to_thread(self._deliver, self._fixed, data)
            if error is not None:
                raise error
            return None
        return await asyncio.to_thread(self._deliver_each, envelope, head, body)

    def _deliver_each(
        self, envelope: Envelope, head: bytes, body: bytes
    ) -> dict[str, RelayError | None]:
        results: dict[str, RelayError | None] = {}
        for rcpt in dict.fromkeys(envelope.recipients):
            try:
                path = self.path_for(rcpt)
            except PermanentRelayError as exc:
                results[rcpt] = exc
                continue
            data = trace_headers(head, envelope.sender, rcpt) + head + body
            results[rcpt] = self._deliver(path, data)
        return results

    def _deliver(self, path: str, data: bytes) -> TransientRelayError | None:
        try:
            self._write(path, data)
        except OSError as exc:
            self._ready.discard(path)
            code, text = _ERRNO_REPLIES.get(exc.errno, _WRITE_FAILED)
            return TransientRelayError(f"Maildir {path}: {exc}", Reply(code, text))
        return None

    def _prepare_dir(self, path: str) -> None:
        """Create the Maildir's ``tmp/``, ``new/`` and ``cur/`` if they are not there."""
        if path in self._ready:
            return
        created = not os.path.isdir(path)
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        if created and self.fsync:
            # Make the new directory entries durable too, up to the parent.
            self._fsync_dir(path)
            self._fsync_dir(os.path.dirname(os.path.abspath(path)))
        self._ready.add(path)

    def _unique_name(self) -> str:
        now = time.time()
        return (
            f"{int(now)}.M{int(now % 1 * 1e6)}P{os.getpid()}Q{next(self._seq)}"
            f"R{os.urandom(4).hex()}.{self._host}"
        )

    def _write(self, path: str, data: bytes) -> str:
        self._prepare_dir(path)
        while True:
            name = self._unique_name()
            tmp = os.path.join(path, "tmp", name)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
            except FileExistsError:
                continue
            break
        try:
            with open(fd, "wb") as f:
                f.write(data)
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            final = os.path.join(path, "new", name)
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        if self.fsync:
            self._fsync_dir(os.path.join(path, "new"))
        return final

    @staticmethod
    def _fsync_dir(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
