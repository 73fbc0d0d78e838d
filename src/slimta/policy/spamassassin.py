"""SpamAssassin: score messages with a ``spamd`` server, as a queue policy or at the edge.

:class:`SpamAssassin` is an asyncio client of the protocol ``spamc`` speaks
to ``spamd`` (``SPAMC/1.5``). One request per connection: a command line,
``Content-length``, an empty line and the message; ``spamd`` answers with
``SPAMD/1.1 0 EX_OK``, a ``Spam: True ; 15.0 / 5.0`` line (verdict, score,
threshold) and, for some commands, a body:

* ``CHECK`` (:meth:`SpamAssassin.check`): the verdict only;
* ``SYMBOLS`` (:meth:`SpamAssassin.symbols`, used by :meth:`SpamAssassin.scan`):
  the verdict and the names of the rules that hit (``GTUBE,MISSING_DATE``);
* ``HEADERS`` (:meth:`SpamAssassin.headers`): the verdict and the header
  block ``spamd`` would write, of which the ``X-Spam-*`` fields are returned;
* ``PING`` (:meth:`SpamAssassin.ping`): is it there.

As a queue policy, :meth:`SpamAssassin.apply` puts three fields on top of the
message::

    X-Spam-Status: Yes, score=1003.3 required=5.0 tests=GTUBE,MISSING_DATE,
            MISSING_MID
    X-Spam-Score: 1003.3
    X-Spam-Symbols: GTUBE,MISSING_DATE,MISSING_MID

Fields of those names that the message already had are removed first, so a
sender cannot forge a verdict. Nothing is rejected there: the message is only
marked, for a filter further on (Sieve, a mail client) to act on.

At the edge, :func:`check_spam` decorates
:meth:`SmtpValidators.handle_have_data
<slimta.edge.smtp.SmtpValidators.handle_have_data>` to refuse a message at the
end of DATA, before the queue takes responsibility for it, with ``550 5.7.1
Message rejected as spam``. The verdict is kept on the session's envelope
(:data:`RESULT_ATTRIBUTE`), where the queue policy finds it and adds its
fields without asking ``spamd`` a second time.

Limits and failures, as ``spamc`` does them:

* Messages bigger than ``max_size`` octets (default 500 KiB, the default of
  ``spamc -s``) are not scanned: :meth:`SpamAssassin.scan` returns ``None``,
  the policy leaves the message as it is and the edge check accepts it. Spam
  is small; scanning a big attachment costs ``spamd`` much and finds little.
* When ``spamd`` cannot be reached, does not answer within ``timeout``
  seconds, or answers with an error, the client raises :class:`SpamdError`.
  The policy and the edge check *fail open* by default: the message goes
  through unmarked and the failure is logged. With ``fail_open=False`` the
  policy refuses it with a temporary error (``451 4.7.1``; the client tries
  again later) and so does the edge check.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

from slimta.envelope import Envelope
from slimta.policy import QueuePolicy
from slimta.policy.headers import has_field
from slimta.queue import QueueError
from slimta.smtp.reply import Reply
from slimta.util.aio import maybe_await

__all__ = [
    "DEFAULT_MAX_SIZE",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "RESULT_ATTRIBUTE",
    "SpamAssassin",
    "SpamResult",
    "SpamdAnswer",
    "SpamdError",
    "check_spam",
]

log = logging.getLogger(__name__)

#: spamd's port (IANA ``spamassassin``).
DEFAULT_PORT = 783
#: Messages larger than this many octets are not scanned (``spamc -s``'s default, 500 KiB).
DEFAULT_MAX_SIZE = 500 * 1024
#: Seconds a whole request may take, connecting included.
DEFAULT_TIMEOUT = 30.0
#: The envelope attribute where :func:`check_spam` keeps the verdict for the policy.
RESULT_ATTRIBUTE = "spam_result"

_PROTOCOL = b"SPAMC/1.5"
_MAX_LINE = 78
_FIELDS = ("X-Spam-Status", "X-Spam-Score", "X-Spam-Symbols")
# "SPAMD/1.1 0 EX_OK"
_STATUS_LINE = re.compile(rb"SPAMD/(\d+\.\d+) +(\d+) *(.*)")
# "Spam: True ; 15.0 / 5.0" (older servers say Yes/No)
_SPAM_LINE = re.compile(
    r"(?i)(true|false|yes|no)\s*;\s*(-?[0-9]+(?:\.[0-9]+)?)\s*/\s*(-?[0-9]+(?:\.[0-9]+)?)"
)
_MAX_RESPONSE_HEADER = 64 * 1024


class SpamdError(Exception):
    """``spamd`` could not give a verdict: unreachable, too slow, or it answered with an error.

    ``code`` is spamd's status (an ``EX_*`` code of ``sysexits.h``, such as
    76 for a protocol error) when it answered with one, else ``None``.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class SpamResult(NamedTuple):
    """The verdict of ``spamd`` on one message.

    A tuple, so ``is_spam, score, threshold, symbols = result`` works.
    ``symbols`` is empty for a ``CHECK`` request, which does not ask for them.
    """

    is_spam: bool
    score: float
    threshold: float
    symbols: list[str]


class SpamdAnswer(NamedTuple):
    """What :meth:`SpamAssassin.request` returns: the verdict, if spamd gave one, and the body."""

    result: SpamResult | None
    body: bytes


def _message_bytes(message: Envelope | bytes) -> bytes:
    if isinstance(message, Envelope):
        head, body = message.flatten()
        return head + body
    return bytes(message)


def _number(value: float) -> str:
    """A score as SpamAssassin writes it: one decimal, and never ``-0.0``."""
    return f"{value or 0.0:.1f}"


def _fold_list(name: str, first: str, items: list[str]) -> str:
    """``first`` then ``items`` joined by commas, with a line break after a comma
    whenever a line of the field would pass 78 characters (as SpamAssassin folds
    ``tests=``). Continuation lines start with a tab."""
    lines: list[str] = []
    line = f"{name}: {first}"
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if len(line) + len(piece) > _MAX_LINE and line.strip() and not line.endswith(("=", ": ")):
            lines.append(line)
            line = "\t"
        line += piece
    lines.append(line)
    return "\n".join(lines)[len(name) + 2:]


class SpamAssassin(QueuePolicy):
    """A client of ``spamd`` and a queue policy that marks messages with its verdict.

    ``address`` is ``(host, port)`` for TCP or a path for spamd's Unix socket
    (``spamd --socketpath``). ``timeout`` bounds each request, connecting
    included. ``max_size``: larger messages are not scanned (see the module
    documentation). ``user``, when given, is sent as spamd's ``User:`` header
    (whose per-user settings to use, as ``spamc -u``). ``fail_open``: what
    :meth:`apply` and :func:`check_spam` do when spamd fails: let the message
    through unmarked (the default) or refuse it with ``tempfail_reply``
    (``451 4.7.1``).
    """

    def __init__(
        self,
        address: tuple[str, int] | str = ("127.0.0.1", DEFAULT_PORT),
        timeout: float = DEFAULT_TIMEOUT,
        max_size: int | None = DEFAULT_MAX_SIZE,
        *,
        user: str | None = None,
        fail_open: bool = True,
        tempfail_reply: Reply | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.max_size = max_size
        if user is not None and not re.fullmatch(r"[^\x00-\x20\x7f]+", user):
            raise ValueError(f"bad spamd user name: {user!r}")
        self.user = user
        self.fail_open = fail_open
        self.tempfail_reply = tempfail_reply or Reply(
            "451", "4.7.1 Message could not be checked for spam, try again later"
        )

    def __repr__(self) -> str:
        return f"SpamAssassin({self.address!r})"

    # --- the protocol ---------------------------------------------------------

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if isinstance(self.address, str):
            return await asyncio.open_unix_connection(self.address)
        host, port = self.address
        return await asyncio.open_connection(host, port)

    async def _exchange(self, command: bytes, data: bytes | None) -> SpamdAnswer:
        reader, writer = await self._connect()
        try:
            head = [command + b" " + _PROTOCOL]
            if data is not None:
                head.append(b"Content-length: %d" % len(data))
            if self.user is not None:
                head.append(b"User: " + self.user.encode("utf-8"))
            writer.write(b"\r\n".join(head) + b"\r\n\r\n")
            if data:
                writer.write(data)
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            return await self._read_response(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _read_response(self, reader: asyncio.StreamReader) -> SpamdAnswer:
        line = await reader.readline()
        match = _STATUS_LINE.fullmatch(line.rstrip(b"\r\n"))
        if match is None:
            if not line:
                raise SpamdError("spamd closed the connection without answering")
            raise SpamdError(f"not a spamd answer: {line[:100]!r}")
        code = int(match.group(2))
        text = match.group(3).decode("utf-8", "replace").strip()
        if code != 0:
            raise SpamdError(f"spamd error {code}: {text}", code)
        fields: dict[str, str] = {}
        size = len(line)
        while True:
            line = await reader.readline()
            size += len(line)
            if size > _MAX_RESPONSE_HEADER:
                raise SpamdError("spamd answer header too long")
            if not line.strip():
                break  # the empty line, or the end of a PING answer
            name, sep, value = line.decode("utf-8", "replace").partition(":")
            if not sep:
                raise SpamdError(f"bad line in spamd answer: {line[:100]!r}")
            fields[name.strip().lower()] = value.strip()
        result = None
        if "spam" in fields:
            spam = _SPAM_LINE.fullmatch(fields["spam"])
            if spam is None:
                raise SpamdError(f"bad Spam line from spamd: {fields['spam'][:100]!r}")
            result = SpamResult(
                spam.group(1).lower() in ("true", "yes"),
                float(spam.group(2)),
                float(spam.group(3)),
                [],
            )
        body = b""
        if "content-length" in fields:
            try:
                length = int(fields["content-length"])
            except ValueError:
                raise SpamdError("bad Content-length from spamd") from None
            try:
                body = await reader.readexactly(length)
            except asyncio.IncompleteReadError:
                raise SpamdError("spamd answer cut short") from None
        return SpamdAnswer(result, body)

    async def request(self, command: str, message: Envelope | bytes | None) -> SpamdAnswer:
        """Send one request; return spamd's verdict (if it gave one) and the answer's body.

        Raises :class:`SpamdError` for every failure: no connection, the
        ``timeout``, an error status, an answer that is not spamd's.
        """
        data = None if message is None else _message_bytes(message)
        try:
            async with asyncio.timeout(self.timeout):
                return await self._exchange(command.encode("ascii"), data)
        except TimeoutError:
            raise SpamdError(f"spamd at {self.address!r} did not answer in {self.timeout} s")\
                from None
        except OSError as exc:
            raise SpamdError(f"spamd at {self.address!r}: {exc}") from exc

    def _needs(self, response: SpamdAnswer, command: str) -> SpamResult:
        if response.result is None:
            raise SpamdError(f"spamd answered {command} without a Spam line")
        return response.result

    async def ping(self) -> bool:
        """True when spamd answers ``PING`` (``SPAMD/1.5 0 PONG``)."""
        try:
            await self.request("PING", None)
        except SpamdError:
            return False
        return True

    async def check(self, message: Envelope | bytes) -> SpamResult:
        """``CHECK``: the verdict and the score, without the rules that hit."""
        return self._needs(await self.request("CHECK", message), "CHECK")

    async def symbols(self, message: Envelope | bytes) -> SpamResult:
        """``SYMBOLS``: the verdict, the score and the names of the rules that hit."""
        response = await self.request("SYMBOLS", message)
        result = self._needs(response, "SYMBOLS")
        text = response.body.decode("ascii", "replace")
        names = [s.strip() for s in text.replace("\n", ",").split(",")]
        return result._replace(symbols=[s for s in names if s])

    async def headers(
        self, message: Envelope | bytes
    ) -> tuple[SpamResult, list[tuple[str, str]]]:
        """``HEADERS``: the verdict and the ``X-Spam-*`` fields spamd itself would add.

        The fields are ``(name, value)`` in spamd's order, values with their
        folding (line breaks as ``\\n``). spamd's own fields, rather than the
        three :meth:`apply` writes: ``X-Spam-Checker-Version``,
        ``X-Spam-Level``, ``X-Spam-Status`` (with autolearn and version),
        ``X-Spam-Flag`` for spam.
        """
        response = await self.request("HEADERS", message)
        result = self._needs(response, "HEADERS")
        fields: list[tuple[str, str]] = []
        text = response.body.decode("utf-8", "replace").replace("\r\n", "\n")
        for line in text.split("\n"):
            if not line:
                break
            if line[0] in " \t":
                if fields:
                    name, value = fields[-1]
                    fields[-1] = (name, value + "\n" + line)
                continue
            name, _, value = line.partition(":")
            fields.append((name, value.strip()))
        return result, [(n, v) for n, v in fields if n.lower().startswith("x-spam-")]

    async def scan(self, message: Envelope | bytes) -> SpamResult | None:
        """The verdict on ``message`` with its symbols; ``None`` when it is over ``max_size``.

        ``(is_spam, score, threshold, symbols)``. Raises :class:`SpamdError`
        when spamd gives none.
        """
        data = _message_bytes(message)
        if self.max_size is not None and len(data) > self.max_size:
            log.info("spam check skipped: %d octets over max_size %d", len(data), self.max_size)
            return None
        return await self.symbols(data)

    # --- the queue policy -------------------------------------------------------

    def header_fields(self, result: SpamResult) -> list[tuple[str, str]]:
        """The fields :meth:`apply` adds for ``result``, top first."""
        score = _number(result.score)
        verdict = "Yes" if result.is_spam else "No"
        first = f"{verdict}, score={score} required={_number(result.threshold)} tests="
        tests = result.symbols or ["none"]
        return [
            ("X-Spam-Status", _fold_list("X-Spam-Status", first, tests)),
            ("X-Spam-Score", score),
            ("X-Spam-Symbols", _fold_list("X-Spam-Symbols", "", tests)),
        ]

    async def apply(self, envelope: Envelope) -> None:
        """Scan ``envelope`` (unless the edge already did) and put the ``X-Spam-*`` fields on top.

        Over ``max_size``: left as it is. spamd failing: left as it is and
        logged, or with ``fail_open=False``, :class:`~slimta.queue.QueueError`
        with ``tempfail_reply``.
        """
        result = getattr(envelope, RESULT_ATTRIBUTE, None)
        if not isinstance(result, SpamResult):
            try:
                result = await self.scan(envelope)
            except SpamdError as exc:
                if self.fail_open:
                    log.warning("spam check failed, message passed unchecked: %s", exc)
                    return
                log.warning("spam check failed, message refused for now: %s", exc)
                raise QueueError(Reply(self.tempfail_reply.code, self.tempfail_reply.message),
                                 str(exc)) from exc
            if result is None:
                return
            setattr(envelope, RESULT_ATTRIBUTE, result)
        for name in _FIELDS:
            if has_field(envelope, name):
                del envelope.headers[name]
        for name, value in reversed(self.header_fields(result)):
            envelope.prepend_header(name, value)


F = TypeVar("F", bound=Callable[..., Any])


def _render(template: str, result: SpamResult) -> str:
    if "{" not in template:
        return template
    return template.format(
        score=_number(result.score),
        threshold=_number(result.threshold),
        symbols=",".join(result.symbols),
    )


def check_spam(
    spamassassin: SpamAssassin,
    reject_above: float | None = None,
    match_code: str = "550",
    match_message: str = "5.7.1 Message rejected as spam",
) -> Callable[[F], Callable[..., Awaitable[Any]]]:
    """Decorate :meth:`SmtpValidators.handle_have_data
    <slimta.edge.smtp.SmtpValidators.handle_have_data>` to refuse spam at the end of DATA.

    The message is scanned by ``spamassassin`` first. It is refused with
    ``match_code``/``match_message`` when its score is above ``reject_above``
    (strictly), or, with ``reject_above=None``, when spamd calls it spam (its
    score reached spamd's threshold). Then the decorated hook is not called;
    otherwise it is, and finds the verdict in
    ``self.session.envelope.spam_result``, where the
    :class:`SpamAssassin` queue policy finds it too (it then adds its fields
    without scanning again).

    ``match_message`` is a template: ``{score}``, ``{threshold}`` and
    ``{symbols}`` (comma-separated) are replaced; other braces must be
    doubled. A message over ``max_size`` is accepted unscanned. When spamd
    fails, the message is accepted (logged), or, when ``spamassassin`` was made
    with ``fail_open=False``, refused with its ``tempfail_reply``
    (``451 4.7.1``).

    ::

        class Validators(SmtpValidators):
            @check_spam(SpamAssassin(('127.0.0.1', 783)), reject_above=10.0)
            def handle_have_data(self, reply, data):
                pass
    """
    if match_code[:1] not in ("4", "5"):
        raise ValueError(f"match_code must be a 4xx or 5xx code, not {match_code!r}")

    def decorator(func: F) -> Callable[..., Awaitable[Any]]:
        @functools.wraps(func)
        async def wrapper(self: Any, reply: Reply, data: bytes, *args: Any, **kwargs: Any) -> Any:
            session = getattr(self, "session", None)
            client = getattr(session, "address", None) or ("?",)
            try:
                result = await spamassassin.scan(data)
            except SpamdError as exc:
                if spamassassin.fail_open:
                    log.warning("spam check failed for a message from %s, accepted unchecked: %s",
                                client[0], exc)
                    result = None
                else:
                    log.warning("spam check failed for a message from %s, refused for now: %s",
                                client[0], exc)
                    reply.code = spamassassin.tempfail_reply.code
                    reply.message = spamassassin.tempfail_reply.message
                    return None
            if result is not None:
                envelope = getattr(session, "envelope", None)
                if envelope is not None:
                    setattr(envelope, RESULT_ATTRIBUTE, result)
                if result.is_spam if reject_above is None else result.score > reject_above:
                    reply.code = match_code
                    reply.message = _render(match_message, result)
                    log.info("refused spam from %s: score %s (%s)", client[0],
                             _number(result.score), ",".join(result.symbols))
                    return None
            return await maybe_await(func(self, reply, data, *args, **kwargs))

        return wrapper

    return decorator
