"""``slimta send``: send one message over SMTP, to try a server (ours or another).

The message comes from stdin when stdin is not a terminal (and not empty);
otherwise a small test message is built. It is sent with our own
:class:`~slimta.relay.smtp.static.StaticSmtpRelay`, and the server's reply
is printed.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import socket
import ssl
import sys
from typing import Any

import click

from slimta.envelope import Envelope
from slimta.relay import RelayError
from slimta.smtp.data import to_crlf
from slimta.smtp.reply import Reply

__all__ = ["EXIT_FAILED", "EXIT_OK", "EXIT_USAGE", "build_test_message", "send",
           "send_message"]

#: Every recipient was accepted.
EXIT_OK = 0
#: The server refused the message or some recipient (a failure reply).
EXIT_FAILED = 1
#: Bad arguments, or no conversation with the server (connection, TLS, no AUTH offered).
EXIT_USAGE = 2

# The replies the relay makes up itself when it could not talk to the server (see
# slimta.relay.smtp.session): connection failed or lost, timeout, bad reply (4.4.x),
# TLS handshake failed (4.7.5), STARTTLS or AUTH not offered (4.7.0).
_LOCAL_CODES = frozenset({"4.4.1", "4.4.2", "4.7.0", "4.7.5"})


def build_test_message(sender: str, recipients: list[str], subject: str,
                       hostname: str | None = None) -> bytes:
    """A small RFC 5322 message: Date, Message-Id, From, To, Subject and a line of body."""
    domain = hostname or socket.getfqdn()
    lines = [
        f"Date: {email.utils.formatdate(localtime=True)}",
        f"Message-Id: {email.utils.make_msgid(domain=domain)}",
        f"From: <{sender}>",
        f"To: {', '.join(f'<{r}>' for r in recipients)}",
        f"Subject: {subject}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "",
        f"This is a test message sent by slimta send from {domain}.",
        "",
    ]
    return "\r\n".join(lines).encode("utf-8")


def is_local_failure(exc: RelayError) -> bool:
    """True when the relay could not converse with the server (no reply of the server's)."""
    reply = exc.reply
    if isinstance(exc.__cause__, OSError | TimeoutError):
        return True
    return reply.code == "451" and reply.enhanced_status_code in _LOCAL_CODES


async def send_message(envelope: Envelope, host: str, port: int, **relay_options: Any) -> dict:
    """Deliver ``envelope`` with a StaticSmtpRelay: ``{recipient: Reply | RelayError}``.

    Raises :class:`RelayError` when the whole transaction failed.
    """
    from slimta.relay.smtp.static import StaticSmtpRelay

    relay = StaticSmtpRelay(host, port, pool_size=1, **relay_options)
    try:
        result = await relay.attempt(envelope, 0)
    finally:
        await relay.close()
    if not isinstance(result, dict):
        result = dict.fromkeys(envelope.recipients, result)
    return result


def _server(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise click.BadParameter("expected HOST:PORT ('[::1]:25' for IPv6)", param_hint="--server")
    return host.strip("[]"), int(port)


def _password(user: str | None, password_env: str | None) -> str | None:
    if user is None:
        if password_env is not None:
            raise click.UsageError("--password-env needs --auth USER")
        return None
    if password_env is not None:
        secret = os.environ.get(password_env)
        if secret is None:
            raise click.UsageError(f"the environment variable {password_env} is not set")
        return secret
    if not sys.stdin.isatty():
        raise click.UsageError("--auth needs --password-env VAR when stdin is not a terminal")
    import getpass

    return getpass.getpass(f"Password for {user}: ")


def _message(sender: str, recipients: list[str], subject: str, ehlo: str | None) -> bytes:
    if not sys.stdin.isatty():
        data = sys.stdin.buffer.read()
        if data.strip():
            return to_crlf(data)
    return build_test_message(sender, recipients, subject, ehlo)


def _describe(reply: Reply | None) -> str:
    return str(reply) if reply is not None else "250 Ok"


_SEND_HELP = """Send one message over SMTP and print the server's reply.

The message is read from stdin when stdin is not a terminal (and not
empty); otherwise a small test message (Date, Message-Id, From, To,
Subject, a line of body) is built.

\b
Exit codes:
  0  every recipient was accepted
  1  the server refused the message or some recipient
  2  usage error, or no conversation with the server (connection
     refused or lost, TLS failed, STARTTLS or AUTH not offered)
"""


@click.command("send", help=_SEND_HELP)
@click.option("--from", "sender", required=True, metavar="ADDR",
              help="The envelope sender ('' for the null sender).")
@click.option("--to", "recipients", required=True, multiple=True, metavar="ADDR",
              help="A recipient (repeat for more).")
@click.option("--server", default="127.0.0.1:1025", show_default=True, metavar="HOST:PORT",
              help="The SMTP server.")
@click.option("--tls", is_flag=True, help="Require STARTTLS (otherwise used when offered).")
@click.option("--smtps", is_flag=True, help="TLS from the start (port 465 style).")
@click.option("--tls-verify", is_flag=True,
              help="Check the server's certificate and name (default: encrypt only).")
@click.option("--cafile", type=click.Path(exists=True, dir_okay=False),
              help="CA certificates for --tls-verify (default: the system's).")
@click.option("--auth", "user", metavar="USER", help="Authenticate as USER (needs TLS).")
@click.option("--password-env", metavar="VAR",
              help="Take the AUTH password from this environment variable "
                   "(default: ask on the terminal; never on the command line).")
@click.option("--subject", default="slimta test message", show_default=True,
              help="Subject of the built test message.")
@click.option("--ehlo", default=None, metavar="NAME", help="EHLO name (default: this host's FQDN).")
@click.option("--timeout", default=30.0, show_default=True, type=float,
              help="Seconds to wait to connect and for each reply.")
def send(sender: str, recipients: tuple[str, ...], server: str, tls: bool, smtps: bool,
         tls_verify: bool, cafile: str | None, user: str | None, password_env: str | None,
         subject: str, ehlo: str | None, timeout: float) -> None:
    host, port = _server(server)
    secret = _password(user, password_env)
    context = None
    if tls_verify or cafile:
        context = ssl.create_default_context(cafile=cafile)
    rcpts = list(recipients)
    envelope = Envelope(sender, rcpts)
    data = _message(sender, rcpts, subject, ehlo)
    envelope.parse(data)
    if any(b > 127 for b in data):
        envelope.body = "8BITMIME"
    options: dict[str, Any] = {
        "context": context, "tls_required": tls, "tls_immediately": smtps,
        "credentials": (user, secret) if user is not None else None, "ehlo_as": ehlo,
        "connect_timeout": timeout, "command_timeout": timeout, "data_timeout": timeout,
    }
    try:
        results = asyncio.run(send_message(envelope, host, port, **options))
    except RelayError as exc:
        click.echo(f"slimta send: {exc}", err=True)
        sys.exit(EXIT_USAGE if is_local_failure(exc) else EXIT_FAILED)
    replies = {rcpt: (r.reply if isinstance(r, RelayError) else r) for rcpt, r in results.items()}
    failed = [rcpt for rcpt, r in results.items() if isinstance(r, RelayError)]
    if len({_describe(r) for r in replies.values()}) == 1:
        click.echo(_describe(next(iter(replies.values()))))
    else:
        for rcpt, reply in replies.items():
            click.echo(f"<{rcpt}>: {_describe(reply)}")
    sys.exit(EXIT_FAILED if failed else EXIT_OK)
