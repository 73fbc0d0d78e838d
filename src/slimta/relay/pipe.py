"""PipeRelay: deliver by running a local program with the message on its stdin.

Modelled on Postfix's pipe(8): the program is started directly (never through
a shell) with arguments built from the envelope, reads the message on
standard input, and says how delivery went with its exit status:

* ``0``: delivered;
* ``75`` (``EX_TEMPFAIL``): failed for now, retried later;
* any other status: failed for good, with the enhanced status code of the
  ``sysexits.h`` name of that status (``67`` EX_NOUSER is ``5.1.1``, ``77``
  EX_NOPERM ``5.7.0``, ...), as Postfix reports them.

The first line the program writes (on stdout, else stderr) becomes the text
of the reply, so bounces show what the program said. When that line starts
with an enhanced status code (``5.1.1 No such mailbox`` or ``4.2.2 Over
quota``), the code decides: ``5.x.x`` is permanent and ``4.x.x`` transient,
whatever the non-zero exit status. A program that runs out of time is killed
(with everything it started in its process group) and the delivery is
retried later.

:class:`MaildropRelay` and :class:`DovecotLdaRelay` are PipeRelays set up for
courier-maildrop and Dovecot's LDA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from slimta.envelope import Envelope
from slimta.relay import PermanentRelayError, Relay, RelayError, TransientRelayError
from slimta.relay.maildir import parse_macros, split_address, trace_headers
from slimta.smtp.reply import Reply

__all__ = ["EX_TEMPFAIL", "MACROS", "DovecotLdaRelay", "MaildropRelay", "PipeRelay"]

#: The exit status for "try again later" (sysexits.h).
EX_TEMPFAIL = 75

#: The macros an argument may use (see :class:`PipeRelay`).
MACROS = frozenset(
    {
        "sender", "recipient", "localpart", "domain", "recipients", "message_id",
        "client_ip", "client_host", "client_name", "client_protocol", "client_auth",
        "receiver",
    }
)
_RECIPIENT_MACROS = frozenset({"recipient", "localpart", "domain"})

log = logging.getLogger(__name__)

# sysexits.h: the enhanced status code and text Postfix gives each exit status.
_SYSEXITS: dict[int, tuple[str, str]] = {
    64: ("5.3.0", "command line usage error"),
    65: ("5.6.0", "data format error"),
    66: ("5.3.0", "cannot open input"),
    67: ("5.1.1", "user unknown"),
    68: ("5.1.2", "host name unknown"),
    69: ("5.3.0", "service unavailable"),
    70: ("5.3.0", "internal software error"),
    71: ("5.3.0", "system error"),
    72: ("5.3.0", "critical OS file missing"),
    73: ("5.2.0", "can't create user output file"),
    74: ("5.3.0", "input/output error"),
    75: ("4.3.0", "temporary failure"),
    76: ("5.5.0", "remote error in protocol"),
    77: ("5.7.0", "permission denied"),
    78: ("5.3.5", "local configuration error"),
}
_CODED_LINE = re.compile(r"([45])\.\d{1,3}\.\d{1,3}(?:\s|$)")
_MAX_TEXT = 256  # characters of program output kept in a reply


def _first_line(data: bytes) -> str:
    """The first non-blank line of ``data``, printable and at most _MAX_TEXT long."""
    for line in data.decode("utf-8", "replace").splitlines():
        line = "".join(c if c.isprintable() else " " for c in line).strip()
        if line:
            return line[:_MAX_TEXT].rstrip()
    return ""


def _message_id(envelope: Envelope) -> str:
    """The Message-Id header's value without angle brackets, or ''."""
    value = envelope.headers.get("Message-Id")
    if not isinstance(value, str):
        return ""
    value = "".join(value.split())
    return value[1:-1] if value.startswith("<") and value.endswith(">") else value


class _Arg:
    """One argument template: literal, macros, or exactly ``{recipients}``."""

    __slots__ = ("macros", "template")

    def __init__(self, template: str):
        if not isinstance(template, str):
            raise TypeError(f"arguments must be strings, not {type(template).__name__}")
        self.template = template
        names = set(parse_macros(template, MACROS))
        if "recipients" in names and template != "{recipients}":
            raise ValueError("{recipients} must be an argument of its own")
        self.macros = frozenset(names)

    def expand(self, values: Mapping[str, Any]) -> list[str]:
        if not self.macros:
            return [self.template.format()]
        if self.template == "{recipients}":
            return list(values["recipients"])
        return [self.template.format_map(values)]


class PipeRelay(Relay):
    """Delivers by running ``args`` with the message on standard input.

    ``args`` is the program and its arguments, as for
    :func:`asyncio.create_subprocess_exec` (no shell is involved, so nothing
    in an address is ever interpreted). Each argument may contain macros, as
    in :meth:`str.format` (``{{`` is a literal brace):

    ``{sender}``
        the envelope sender, ``''`` for the null sender ``<>``;
    ``{recipient}``, ``{localpart}``, ``{domain}``
        the recipient, its part before the last ``@``, and its domain
        (lower-cased), only with ``per_recipient=True``;
    ``{recipients}``
        all recipients as separate arguments; only as an argument of its
        own, and only without ``per_recipient``;
    ``{message_id}``
        the ``Message-Id`` header without angle brackets, or ``''``;
    ``{client_ip}``, ``{client_host}``, ``{client_name}``,
    ``{client_protocol}``, ``{client_auth}``
        what the edge recorded of the client (``name`` is the EHLO
        argument), ``''`` when unknown;
    ``{receiver}``
        the host name of the server that received the message.

    An address is one argument whatever it contains, but one that starts
    with ``-`` could pass for an option: put recipients after ``--`` or as
    option values (``-d {recipient}``) when the program parses options.

    ``per_recipient=True`` runs the program once for each (distinct)
    recipient, one after the other, and gives results per recipient;
    otherwise it runs once per message and the result is for all recipients.

    ``timeout`` (seconds, default none) limits each run: then the program
    and its process group are killed (SIGKILL) and the delivery fails
    transiently (``451 4.3.0``). ``env`` is the program's environment
    (default: this process's).

    What the program reads, and how it fails, is set by keywords:

    ``return_path``
        write ``Return-Path: <sender>`` in front of the message (Postfix's
        ``R`` flag);
    ``delivered_to``
        write ``Delivered-To: recipient`` below it (the ``D`` flag; needs
        ``per_recipient``);
    ``unix_newlines``
        turn CRLF into LF in the whole message, as local delivery agents
        expect (Postfix always does); otherwise the message is written
        byte for byte as :meth:`~slimta.envelope.Envelope.flatten` gives it;
    ``tempfail_codes``
        the exit statuses that are transient failures (default ``{75}``);
    ``max_output``
        bytes of stdout and of stderr kept (the rest is read and dropped).

    A program that cannot be started (missing, not executable) fails the
    delivery transiently (``451 4.3.0``), so mail waits while the setup is
    fixed; one killed by a signal fails transiently too.
    """

    def __init__(
        self,
        args: Sequence[str],
        timeout: float | None = None,
        per_recipient: bool = False,
        env: Mapping[str, str] | None = None,
        *,
        return_path: bool = False,
        delivered_to: bool = False,
        unix_newlines: bool = False,
        tempfail_codes: Iterable[int] = (EX_TEMPFAIL,),
        max_output: int = 4096,
    ):
        super().__init__()
        if isinstance(args, (str, bytes)):
            raise TypeError("args must be a list of arguments, not one string (no shell is used)")
        self.args = [_Arg(a) for a in args]
        if not self.args:
            raise ValueError("args must name a program")
        used = frozenset().union(*(a.macros for a in self.args))
        if per_recipient and "recipients" in used:
            raise ValueError("{recipients} cannot be used with per_recipient=True")
        if not per_recipient and used & _RECIPIENT_MACROS:
            names = ", ".join("{" + m + "}" for m in sorted(used & _RECIPIENT_MACROS))
            raise ValueError(f"{names} need per_recipient=True (or use {{recipients}})")
        if delivered_to and not per_recipient:
            raise ValueError("delivered_to needs per_recipient=True")
        self.program = os.path.basename(args[0]) or args[0]
        self.timeout = timeout
        self.per_recipient = per_recipient
        self.env = dict(env) if env is not None else None
        self.return_path = return_path
        self.delivered_to = delivered_to
        self.unix_newlines = unix_newlines
        self.tempfail_codes = frozenset(tempfail_codes)
        self.max_output = max_output
        self._uses = used

    # --- building the command and its input -------------------------------

    def _values(self, envelope: Envelope) -> dict[str, Any]:
        client = envelope.client or {}
        values: dict[str, Any] = {
            "sender": envelope.sender or "",
            "recipients": list(envelope.recipients),
            "receiver": envelope.receiver or "",
            "message_id": _message_id(envelope) if "message_id" in self._uses else "",
        }
        for key in ("ip", "host", "name", "protocol", "auth"):
            value = client.get(key)
            values[f"client_{key}"] = "" if value is None else str(value)
        return values

    def build_args(self, envelope: Envelope, recipient: str | None = None) -> list[str]:
        """The command line for ``envelope`` (for one ``recipient`` when per recipient)."""
        values = self._values(envelope)
        localpart, domain = split_address(recipient) if recipient is not None else ("", "")
        values.update(recipient=recipient or "", localpart=localpart, domain=domain)
        argv: list[str] = []
        for arg in self.args:
            argv.extend(arg.expand(values))
        return argv

    def build_input(self, envelope: Envelope, recipient: str | None = None) -> bytes:
        """The bytes written to the program's standard input."""
        head, body = envelope.flatten()
        data = head + body
        rcpt = recipient if self.delivered_to else None
        if self.return_path or rcpt is not None:
            data = trace_headers(head, envelope.sender, rcpt, self.return_path) + data
        if self.unix_newlines:
            data = data.replace(b"\r\n", b"\n")
        return data

    # --- delivery -----------------------------------------------------------

    async def _attempt(self, envelope: Envelope, attempts: int) -> Any:
        if not self.per_recipient:
            error = await self.run(self.build_args(envelope), self.build_input(envelope))
            if error is not None:
                raise error
            return None
        results: dict[str, RelayError | None] = {}
        for rcpt in dict.fromkeys(envelope.recipients):
            argv = self.build_args(envelope, rcpt)
            results[rcpt] = await self.run(argv, self.build_input(envelope, rcpt))
        return results

    async def run(self, argv: list[str], data: bytes) -> RelayError | None:
        """Run ``argv`` with ``data`` on stdin: None when delivered, else the error."""
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.env,
                start_new_session=True,  # its own process group, killed as one
            )
        except OSError as exc:
            log.error("pipe: cannot run %s: %s", argv[0], exc)
            text = f"4.3.0 Could not run {self.program}: {exc.strerror or exc}"
            return TransientRelayError(f"{argv[0]}: {exc}", Reply("451", text))
        except ValueError as exc:  # a NUL byte in an argument
            text = f"5.3.0 Could not run {self.program}: bad argument"
            return PermanentRelayError(f"{argv[0]}: {exc}", Reply("554", text))
        try:
            async with asyncio.timeout(self.timeout):
                out, err, _ = await asyncio.gather(
                    self._read(proc.stdout), self._read(proc.stderr), self._write(proc, data)
                )
                status = await proc.wait()
        except TimeoutError:
            log.warning("pipe: %s (pid %d) killed after %g s", argv[0], proc.pid, self.timeout)
            text = f"4.3.0 {self.program} timed out after {self.timeout:g} s"
            return TransientRelayError(f"{argv[0]} killed: time limit exceeded",
                                       Reply("451", text))
        finally:
            if proc.returncode is None:
                self._kill(proc)
                await proc.wait()
        return self.error_for(status, out, err)

    async def _read(self, stream: asyncio.StreamReader | None) -> bytes:
        """Everything ``stream`` gives until EOF, keeping the first max_output bytes."""
        kept = bytearray()
        if stream is None:
            return b""
        while chunk := await stream.read(65536):
            room = self.max_output - len(kept)
            if room > 0:
                kept += chunk[:room]
        return bytes(kept)

    @staticmethod
    async def _write(proc: asyncio.subprocess.Process, data: bytes) -> None:
        """Write the message and close stdin; a program may exit without reading it all."""
        stdin = proc.stdin
        if stdin is None:
            return
        try:
            stdin.write(data)
            await stdin.drain()
            stdin.close()
            await stdin.wait_closed()
        except (BrokenPipeError, ConnectionResetError):
            stdin.close()

    @staticmethod
    def _kill(proc: asyncio.subprocess.Process) -> None:
        """SIGKILL the program's process group (what it started goes too)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def error_for(self, status: int, stdout: bytes, stderr: bytes) -> RelayError | None:
        """The result of a run that ended with ``status`` and this output.

        Subclasses may override it to read a program's output their own way.
        """
        if status == 0:
            return None
        lines = [line for line in (_first_line(stdout), _first_line(stderr)) if line]
        if status < 0:
            sig = -status
            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = f"signal {sig}"
            text = f"4.3.0 {self.program} killed by {name}"
            return TransientRelayError(f"{self.program} killed by {name}", Reply("451", text))
        coded = next((line for line in lines if _CODED_LINE.match(line)), None)
        if coded is not None:
            permanent = coded[0] == "5"
            message = coded
        else:
            transient = status in self.tempfail_codes
            esc, description = _SYSEXITS.get(status, ("5.3.0", "unknown error"))
            if transient:
                esc = "4" + esc[1:]
            elif esc[0] == "4":
                esc = "5" + esc[1:]
            permanent = not transient
            message = f"{esc} {lines[0] if lines else f'{self.program}: {description}'}"
        reply = Reply("550" if permanent else "451", message)
        cls = PermanentRelayError if permanent else TransientRelayError
        return cls(f"{self.program} exited with status {status}: {reply}", reply)


class MaildropRelay(PipeRelay):
    """Delivers with courier-maildrop: ``maildrop -f {sender} [extra_args] [-d user]``.

    Without ``user``, maildrop runs once per message and delivers to the
    mailbox of the user this process runs as (its filters decide the rest).
    With ``user`` (a template, e.g. ``'{recipient}'`` or ``'{localpart}'``
    for virtual users), it runs once per recipient with ``-d``, as Postfix's
    maildrop example does, and the results are per recipient. ``extra_args``
    are more maildrop options, placed before ``-d``.

    The message gets ``Return-Path:`` (and ``Delivered-To:`` when per
    recipient) in front, and LF line endings (Postfix's ``DRu`` flags).
    maildrop exits with 75 for temporary failures and 67 for an unknown
    user (``550 5.1.1``); other statuses are permanent. Its first line of
    output (``maildrop: ...``) is the reply text.
    """

    def __init__(
        self,
        path: str = "maildrop",
        timeout: float | None = None,
        extra_args: Sequence[str] | None = None,
        user: str | None = None,
    ):
        args = [path, "-f", "{sender}", *(extra_args or ())]
        per_recipient = False
        if user is not None:
            args += ["-d", user]
            per_recipient = bool(_Arg(user).macros & _RECIPIENT_MACROS)
        super().__init__(
            args, timeout, per_recipient=per_recipient,
            return_path=True, delivered_to=per_recipient, unix_newlines=True,
        )


class DovecotLdaRelay(PipeRelay):
    """Delivers with Dovecot's LDA, once per recipient.

    Runs ``dovecot-lda -e -f {sender} -a {recipient} [extra_args] -d user``
    with ``user`` ``'{recipient}'`` by default: the user is looked up in
    Dovecot's userdb (virtual users; Dovecot must be running for its auth
    service). ``user=None`` leaves out ``-d``, for an LDA running as the
    mailbox's system user. ``-e`` makes the LDA report a rejection (Sieve
    ``reject``, a full quota) with exit status 77 (``550 5.7.0`` with its
    reason) instead of sending a bounce itself: bounces are ours to send.
    ``extra_args`` may add ``-c config``, ``-m mailbox``, ``-o setting=value``.

    The message gets ``Return-Path:`` and ``Delivered-To:`` in front, and LF
    line endings (Postfix's ``DRu`` flags, as Dovecot's documentation sets
    them). Exit status 75 is transient (the LDA's answer to most failures),
    67 is an unknown user (``550 5.1.1``), anything else permanent.
    """

    def __init__(
        self,
        path: str = "/usr/lib/dovecot/dovecot-lda",
        timeout: float | None = None,
        extra_args: Sequence[str] | None = None,
        user: str | None = "{recipient}",
    ):
        args = [path, "-e", "-f", "{sender}", "-a", "{recipient}", *(extra_args or ())]
        if user is not None:
            args += ["-d", user]
        super().__init__(
            args, timeout, per_recipient=True,
            return_path=True, delivered_to=True, unix_newlines=True,
        )
